"""DrasCLR pretraining: ``PretrainConfig``, ``pretrain(cfg) -> checkpoint path`` and the
``drasclr pretrain`` command.

One process on the CPU or one GPU::

    drasclr pretrain --store outputs/patch_store --out outputs/02_pretraining

Many GPUs or nodes (DDP; each process takes ``cuda:LOCAL_RANK``, ``--batch-size`` is per GPU)::

    torchrun --nproc_per_node=8 -m drasclr_lib.train --store ... --out ...

The learning rate is given for a global batch of 128 (published: 0.01) and scaled linearly with
``batch_size x processes / 128``. The queue length is rounded down to a multiple of the global
batch and capped for small cohorts (see ``PretrainConfig``). An interrupted run continues with
``--resume`` from ``checkpoint.pt`` (written every epoch and every ``--save-every`` steps).
The implementation lives in :mod:`drasclr_lib.training`.
"""

from __future__ import annotations

import argparse
import sys

from drasclr_lib.training.checkpoint import load_checkpoint
from drasclr_lib.training.config import PretrainConfig, effective_lr, effective_queue_size
from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset, SampleIndex
from drasclr_lib.training.loop import cosine_factor, pretrain, pretrain_or_reuse

__all__ = ["PretrainConfig", "pretrain", "pretrain_or_reuse", "cli_main", "LocationBatchSampler", "PatchPairDataset", "SampleIndex",
           "load_checkpoint", "effective_lr", "effective_queue_size", "cosine_factor"]


def _parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(prog="drasclr pretrain", description="DrasCLR pretraining on a patch store "
                                "(CPU, one GPU, or many under torchrun).")
    p.add_argument("--store", default=d.store, help="patch store folder (default: $DRASCLR_OUT/patch_store)")
    p.add_argument("--out", default=d.out_dir, help="output folder (default: $DRASCLR_OUT/02_pretraining)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step and process")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate at a global batch of 128 (scaled linearly)")
    p.add_argument("--no-scale-lr", action="store_true", help="use --lr as given, without linear scaling")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="negatives per location")
    p.add_argument("--neighbors", type=int, default=d.num_neighbors, help="anatomical neighbours per anchor")
    p.add_argument("--beta", type=float, default=d.neighbor_weight, help="weight of the neighbour loss")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--no-conditional", action="store_true", help="plain convolutions (MoCo baseline)")
    p.add_argument("--keep-self-negatives", action="store_true",
                   help="do not mask an anchor's own older keys out of its negatives (unmasked ablation)")
    p.add_argument("--augment", default=d.augment, help="augmentation letters from 'aefgc' (default agc)")
    p.add_argument("--augment-on", default=d.augment_on, choices=["auto", "workers", "device"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=d.save_every_steps, help="checkpoint every N steps (0: epochs only)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr pretrain [options]``; returns the exit code (0 on success)."""
    a = _parser().parse_args(argv)
    try:
        cfg = PretrainConfig(store=a.store, out_dir=a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                             scale_lr=not a.no_scale_lr, queue_size=a.queue_size, num_neighbors=a.neighbors,
                             neighbor_weight=a.beta, temperature=a.temperature, conditional=not a.no_conditional,
                             augment=a.augment, augment_on=a.augment_on, device=a.device, workers=a.workers,
                             amp=not a.no_amp, seed=a.seed, max_steps=a.max_steps, log_every=a.log_every,
                             save_every_steps=a.save_every, tensorboard=not a.no_tensorboard, resume=a.resume,
                             exclude_self_negatives=not a.keep_self_negatives)
        path = pretrain(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"drasclr pretrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":  # torchrun -m drasclr_lib.train ...
    sys.exit(cli_main())
