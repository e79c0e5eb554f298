"""The ``drasclr pretrain`` command; also ``python -m drasclr_lib.training`` and, on many GPUs or nodes,
``torchrun --nproc_per_node=8 -m drasclr_lib.training --store ... --out ...`` (DDP; each process takes
``cuda:LOCAL_RANK``, ``--batch-size`` is per GPU).

The options are generated from the fields of :class:`~drasclr_lib.training.config.PretrainConfig`:
``--field-name`` with the field's type and default, ``--no-field-name`` for a switch that is on by
default, ``--field-name`` (store_true) for one that is off. :data:`OPTIONS` renames a few of them
(``--out``, ``--neighbors``, ``--beta``, ``--save-every``, ``--keep-self-negatives``) and gives help
texts and choices; a field added to the config gets its option without a change here
(:data:`NOT_ON_CLI` lists the fields deliberately left out). Every option has a help text: the one in
:data:`OPTIONS`, else the first sentence of the field's entry in the config's ``Attributes:`` docstring;
``--help`` shows each default (:class:`~drasclr_lib.cli_help.HelpFormatter`) and examples.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from dataclasses import fields

from drasclr_lib.cli_help import HelpFormatter, examples_epilog
from drasclr_lib.training.config import AUGMENT_ON, HOST_MEMORY, MEMORY_FORMATS, PRECISIONS, PretrainConfig
from drasclr_lib.training.loop import pretrain

__all__ = ["cli_main", "build_parser", "field_help", "OPTIONS", "NOT_ON_CLI", "EXAMPLES"]

#: field -> ``flag`` (instead of the generated one), ``help``, ``choices``.
OPTIONS: dict[str, dict] = {
    "store": {"help": "patch store folder (default: $DRASCLR_OUT/patch_store, notebook 01's)"},
    "out_dir": {"flag": "--out", "help": "output folder for checkpoint.pt, config.json, history.csv and tb/ "
                                        "(default: $DRASCLR_OUT/02_pretraining)"},
    "epochs": {"help": "passes over all (subject, location) pairs; the cosine schedule spans them all"},
    "batch_size": {"help": "patches per step and process"},
    "lr": {"help": "learning rate at a global batch of 128 (scaled linearly)"},
    "scale_lr": {"help": "use --lr as given, without linear scaling"},
    "momentum": {"help": "SGD momentum"},
    "weight_decay": {"help": "SGD weight decay"},
    "queue_size": {"help": "negatives per location"},
    "moco_momentum": {"help": "momentum of the key encoder"},
    "num_neighbors": {"flag": "--neighbors", "help": "anatomical neighbours per anchor"},
    "neighbor_weight": {"flag": "--beta", "help": "weight of the neighbour loss"},
    "conditional": {"help": "plain convolutions (MoCo baseline)"},
    "num_experts": {"help": "experts of the conditional convolutions"},
    "rep_dim": {"help": "representation size"},
    "proj_dim": {"help": "projection head output size"},
    "temperature": {"help": "InfoNCE temperature"},
    "augment": {"help": "augmentation letters from 'aefgc' (see drasclr_lib.augment)"},
    "augment_on": {"choices": list(AUGMENT_ON),
                   "help": "where views are augmented: workers (CPU DataLoader workers), device (batched on the "
                           "training device), auto (the device when it is a GPU, else the workers)"},
    "workers": {"help": "DataLoader worker processes"},
    "device": {"help": "auto, cpu, cuda, cuda:1 ... (under torchrun each process takes cuda:LOCAL_RANK)"},
    "seed": {"help": "seed of the model initialisation, the sampler and the augmentations"},
    "amp": {"help": "disable mixed precision (the same as --precision fp32)"},
    "precision": {"choices": list(PRECISIONS),
                  "help": "encoder arithmetic: auto (bf16 on a CPU with AVX512-BF16/AMX, fp16 on CUDA, else fp32), "
                          "fp32, bf16, fp16 (CUDA); losses and weights stay float32"},
    "memory_format": {"choices": list(MEMORY_FORMATS),
                      "help": "convolution layout: auto (contiguous, the faster one as measured), "
                              "contiguous, channels_last"},
    "host_memory": {"choices": list(HOST_MEMORY),
                    "help": "keep: glibc malloc keeps freed memory for reuse during the run (no page faults on "
                            "the large activations, ~1.25x the CPU step; resident memory stays at its peak); "
                            "system: glibc's defaults; auto: keep on a CPU with glibc"},
    "compile": {"help": "compile both encoders with torch.compile (1-2 min at start on 2 cores; needs a C++ "
                        "compiler; falls back to eager when compiling fails)"},
    "max_steps": {"help": "stop after this many steps in total; the schedule still spans --epochs "
                          "(default: the whole schedule)"},
    "log_every": {"help": "steps per history.csv row / TensorBoard point (means over the window)"},
    "save_every_steps": {"flag": "--save-every", "help": "checkpoint every N steps (0: epochs only)"},
    "tensorboard": {"help": "do not write TensorBoard scalars to OUT/tb"},
    "split_bn": {"help": "sub-batches of the key encoder's split-batch BatchNorm on one device"},
    "exclude_self_negatives": {
        "flag": "--keep-self-negatives",
        "help": "do not mask an anchor's own older keys out of its negatives (unmasked ablation)"},
    "resume": {"help": "continue from OUT/checkpoint.pt"},
    "progress": {"help": "no progress bar"},
}
#: Fields without an option (they keep their default on the command line).
NOT_ON_CLI: frozenset[str] = frozenset()

#: ``(what it does, command line)`` examples shown under ``drasclr pretrain --help``.
EXAMPLES = (
    ("the published settings on notebook 01's store (20 epochs, batch 128, queues of 4096)",
     "drasclr pretrain --store outputs/patch_store --out runs/drasclr"),
    ("a short CPU run on a small cohort",
     "drasclr pretrain --store store --out runs/cpu --epochs 2 --batch-size 16 --queue-size 64 --device cpu"),
    ("continue an interrupted run with the same settings",
     "drasclr pretrain --store store --out runs/drasclr --resume"),
    ("8 GPUs on one machine (--batch-size is per GPU)",
     "torchrun --nproc_per_node=8 -m drasclr_lib.training --store store --out runs/ddp --batch-size 16"),
)


def _value_type(hint) -> type:
    """``int`` for ``int`` and ``int | None`` alike."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _attribute_docs(config: type) -> dict[str, str]:
    """Field -> first sentence of its entry in the ``Attributes:`` sections of ``config`` and its bases.

    An entry is ``name: text`` or ``a, b: text`` (several fields share it), continued on deeper
    indented lines.
    """
    docs: dict[str, str] = {}
    for cls in reversed(inspect.getmro(config)):
        lines = (inspect.cleandoc(cls.__dict__.get("__doc__") or "")).splitlines()
        if "Attributes:" not in lines:
            continue
        entries: list[list[str]] = []
        for line in lines[lines.index("Attributes:") + 1:]:
            if line.strip() and not line.startswith(" "):
                break  # the next section
            m = re.match(r"^ {4}([\w, ]+):\s*(.*)$", line)
            if m:
                entries.append([m.group(1), m.group(2)])
            elif entries and line.strip():
                entries[-1][1] += " " + line.strip()
        for names, text in entries:
            for name in (n.strip() for n in names.split(",")):
                docs[name] = _first_sentence(text)
    return docs


def _first_sentence(text: str) -> str:
    """Up to the first ``.`` or ``;`` outside parentheses, without reST markup; ``%`` escaped for argparse."""
    text, depth = re.sub(r":\w+:`~?([^`]+)`", r"\1", text.replace("``", "")).strip(), 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch in ".;" and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            text = text[:i]
            break
    return text.replace("%", "%%")


def field_help(config: type = PretrainConfig) -> dict[str, str]:
    """The help text of each field's option: :data:`OPTIONS`' text, else the field's docstring entry.

    For a switch that is on by default (``--no-x``) a docstring entry is prefixed with ``turn off:``;
    a field with neither gets ``"<Config>.<field> (no description)"``.
    """
    docs, defaults = _attribute_docs(config), config()
    out = {}
    for f in fields(config):
        text = OPTIONS.get(f.name, {}).get("help")
        if text is None:
            text = docs.get(f.name)
            if text is not None and getattr(defaults, f.name) is True:
                text = f"turn off: {text}"
        out[f.name] = text if text is not None else f"{config.__name__}.{f.name} (no description)"
    return out


def build_parser(config: type = PretrainConfig) -> argparse.ArgumentParser:
    """The ``drasclr pretrain`` parser of ``config`` (``PretrainConfig``); an option's ``dest`` is its field."""
    defaults, hints, helps = config(), typing.get_type_hints(config), field_help(config)
    p = argparse.ArgumentParser(
        prog="drasclr pretrain", formatter_class=HelpFormatter, epilog=examples_epilog(EXAMPLES),
        description="DrasCLR pretraining on a patch store (CPU, one GPU, or many under torchrun). The defaults are\n"
                    "the published settings; OUT gets checkpoint.pt (+ config.json, history.csv, tb/), which\n"
                    "drasclr embed reads. A rerun with --resume continues from OUT/checkpoint.pt.")
    for f in fields(config):
        if f.name in NOT_ON_CLI:
            continue
        opt, default, kind = OPTIONS.get(f.name, {}), getattr(defaults, f.name), _value_type(hints[f.name])
        name = f.name.replace("_", "-")
        kw = {"dest": f.name, "help": helps[f.name]}
        if kind is bool:  # a switch turns the default over
            flag = opt.get("flag", f"--no-{name}" if default else f"--{name}")
            p.add_argument(flag, action="store_false" if default else "store_true", **kw)
        else:
            flag = opt.get("flag", f"--{name}")
            metavar = None if "choices" in opt else flag[2:].replace("-", "_").upper()  # --beta BETA, as typed
            p.add_argument(flag, type=kind, default=default, choices=opt.get("choices"), metavar=metavar, **kw)
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr pretrain [options]``; returns the exit code (0 on success, 2 on bad settings or a missing store)."""
    a = build_parser().parse_args(argv)
    try:
        path = pretrain(PretrainConfig(**{f.name: getattr(a, f.name) for f in fields(PretrainConfig)
                                          if f.name not in NOT_ON_CLI}))
    except (ValueError, FileNotFoundError) as exc:
        print(f"drasclr pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0
