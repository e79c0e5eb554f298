"""The ``drasclr`` command line: one sub-command per long job.

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
    "preprocess": ("drasclr_lib.preprocess.cohort", "cli_main", "CT files -> registered atlas patches (patch store)"),
    "pretrain": ("drasclr_lib.training.cli", "cli_main", "DrasCLR pretraining on CPU, one GPU or many (torchrun)"),
    "embed": ("drasclr_lib.embed_cli", "cli_main", "embed every patch of a patch store with a checkpoint"),
    "run-notebooks": ("drasclr_lib.runner", "main", "execute the notebooks in order with papermill"),
}


def _usage() -> str:
    lines = ["usage: drasclr <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "drasclr <command> --help shows the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"drasclr: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
