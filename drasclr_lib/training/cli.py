"""The ``drasclr pretrain`` command; also ``python -m drasclr_lib.training`` and, on many GPUs or nodes,
``torchrun --nproc_per_node=8 -m drasclr_lib.training --store ... --out ...`` (DDP; each process takes
``cuda:LOCAL_RANK``, ``--batch-size`` is per GPU).

The options are generated from the fields of :class:`~drasclr_lib.training.config.PretrainConfig`:
``--field-name`` with the field's type and default, ``--no-field-name`` for a switch that is on by
default, ``--field-name`` (store_true) for one that is off. :data:`OPTIONS` renames a few of them
(``--out``, ``--neighbors``, ``--beta``, ``--save-every``, ``--keep-self-negatives``) and gives help
texts and choices; a field added to the config gets its option without a change here
(:data:`NOT_ON_CLI` lists the fields deliberately left out).
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields

from drasclr_lib.training.config import AUGMENT_ON, PretrainConfig
from drasclr_lib.training.loop import pretrain

__all__ = ["cli_main", "build_parser", "OPTIONS", "NOT_ON_CLI"]

#: field -> ``flag`` (instead of the generated one), ``help``, ``choices``.
OPTIONS: dict[str, dict] = {
    "store": {"help": "patch store folder (default: $DRASCLR_OUT/patch_store)"},
    "out_dir": {"flag": "--out", "help": "output folder (default: $DRASCLR_OUT/02_pretraining)"},
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
    "augment": {"help": "augmentation letters from 'aefgc' (default agc)"},
    "augment_on": {"choices": list(AUGMENT_ON)},
    "amp": {"help": "disable mixed precision on CUDA"},
    "max_steps": {"help": "stop after this many steps in total"},
    "save_every_steps": {"flag": "--save-every", "help": "checkpoint every N steps (0: epochs only)"},
    "split_bn": {"help": "sub-batches of the key encoder's split-batch BatchNorm on one device"},
    "exclude_self_negatives": {
        "flag": "--keep-self-negatives",
        "help": "do not mask an anchor's own older keys out of its negatives (unmasked ablation)"},
    "resume": {"help": "continue from OUT/checkpoint.pt"},
    "progress": {"help": "no progress bar"},
}
#: Fields without an option (they keep their default on the command line).
NOT_ON_CLI: frozenset[str] = frozenset()


def _value_type(hint) -> type:
    """``int`` for ``int`` and ``int | None`` alike."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser(config: type = PretrainConfig) -> argparse.ArgumentParser:
    """The ``drasclr pretrain`` parser of ``config`` (``PretrainConfig``); an option's ``dest`` is its field."""
    defaults, hints = config(), typing.get_type_hints(config)
    p = argparse.ArgumentParser(prog="drasclr pretrain", description="DrasCLR pretraining on a patch store "
                                "(CPU, one GPU, or many under torchrun).")
    for f in fields(config):
        if f.name in NOT_ON_CLI:
            continue
        opt, default, kind = OPTIONS.get(f.name, {}), getattr(defaults, f.name), _value_type(hints[f.name])
        name = f.name.replace("_", "-")
        kw = {"dest": f.name, "help": opt.get("help")}
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
