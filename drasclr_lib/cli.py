"""The ``drasclr`` command line: one sub-command per long job.

``drasclr --help`` lists the commands, ``drasclr <command> --help`` (or ``drasclr help <command>``)
shows one command's options, each with its default, and an example; ``drasclr --version`` prints
the package version. The commands are documented together in ``docs/cli.md``.

Sub-commands are imported lazily, so ``drasclr --help`` is fast and a missing optional piece
only affects its own command.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS = {
    "synth": ("drasclr_lib.data.synthetic", "cli_main", "write a synthetic lung-CT cohort and its manifest"),
    "fetch-real": ("drasclr_lib.data.real", "cli_main", "obtain the offline Lung-PET-CT-Dx scan and its manifest"),
    "validate": ("drasclr_lib.data.validate_cli", "cli_main", "check a manifest and list every problem in it"),
    "preprocess": ("drasclr_lib.preprocess.cohort", "cli_main", "CT files -> registered atlas patches (patch store)"),
    "qc": ("drasclr_lib.viz.qc_cli", "cli_main", "a patch store's QC report: every subject worst first, HTML + PNGs"),
    "pretrain": ("drasclr_lib.training.cli", "cli_main", "DrasCLR pretraining on CPU, one GPU or many (torchrun)"),
    "embed": ("drasclr_lib.embed_cli", "cli_main", "embed every patch of a patch store with a checkpoint"),
    "downstream": ("drasclr_lib.downstream.cli", "cli_main",
                   "notebook 04's experiment on a store + embeddings -> results.csv"),
    "segment": ("drasclr_lib.segmentation.cli", "cli_main", "whole-scan emphysema labels (NIfTI) from a fine-tuned "
                "segmenter"),
    "run-notebooks": ("drasclr_lib.runner", "main", "execute the notebooks in order with papermill"),
}

#: The typical order of a study, shown under the command list.
_WORKFLOW = """\
a study, step by step:
  # is the manifest usable? (every problem listed)
  drasclr validate my_cohort.csv
  # CT -> 32^3 patches at the published atlas's 581 locations
  drasclr preprocess --manifest my_cohort.csv --out store --atlas published
  # pretrain on your cohort (or skip it and embed with the released COPDGene weights)
  drasclr pretrain --store store --out run
  drasclr embed --store store --checkpoint run/checkpoint.pt --out emb.npz
  # your outcomes, all scans of a patient in one fold
  drasclr downstream --store store --embeddings drasclr=emb.npz --out results"""


def _version() -> str:
    from drasclr_lib import __version__

    return __version__


def _usage() -> str:
    lines = ["usage: drasclr [--version] [--help] <command> [options]", "",
             "DrasCLR toolkit: self-supervised representations of 3D lung CT (Yu et al., MedIA 2023).", "",
             "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "options:", f"  {'-h, --help':<14} show this message and exit",
              f"  {'-V, --version':<14} print the drasclr_lib version and exit", "", _WORKFLOW, "",
              "drasclr <command> --help (or drasclr help <command>) shows the options of a command, each with its "
              "default,", "and an example; docs/cli.md describes every command."]
    return "\n".join(lines)


def _run(name: str, rest: list[str]) -> int:
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run ``drasclr ARGV``; returns the exit code (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv == ["help"]:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        print(f"drasclr {_version()}")
        return 0
    if argv[0] == "help":  # drasclr help <command> == drasclr <command> --help
        argv = [argv[1], "--help"]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"drasclr: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return _run(name, rest)
    except SystemExit as exc:  # argparse: --help exits 0, a usage error exits 2
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)  # sys.exit("message")
        return 1


if __name__ == "__main__":
    sys.exit(main())
