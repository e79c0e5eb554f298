"""DrasCLR pretraining: ``PretrainConfig``, ``pretrain(cfg) -> checkpoint path`` and the ``drasclr pretrain`` command.

One process on the CPU or one GPU::

    drasclr pretrain --store outputs/patch_store --out outputs/02_pretraining

Many GPUs or nodes (DDP; each process takes ``cuda:LOCAL_RANK``, ``--batch-size`` is per GPU)::

    torchrun --nproc_per_node=8 -m drasclr_lib.training --store ... --out ...

The learning rate is given for a global batch of 128 (published: 0.01) and scaled linearly with
``batch_size x processes / 128``. The queue length is rounded down to a multiple of the global
batch and capped for small cohorts (see ``PretrainConfig``). An interrupted run continues with
``--resume`` from ``checkpoint.pt`` (written every epoch and every ``--save-every`` steps).

Modules: :mod:`~.config` (the settings), :mod:`~.data` (sampler, dataset), :mod:`~.checkpoint`
(file format), :mod:`~.loop` (``pretrain``, ``train_step``), :mod:`~.runs` (reuse a finished run or
train it; the compared methods' runs), :mod:`~.cli` (the command, generated from the config).
"""

from drasclr_lib.training.checkpoint import load_checkpoint
from drasclr_lib.training.cli import cli_main
from drasclr_lib.training.config import PretrainConfig, effective_lr, effective_queue_size
from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset, SampleIndex
from drasclr_lib.training.loop import cosine_factor, pretrain, pretrain_model, train_step
from drasclr_lib.training.runs import pretrain_or_reuse, reuse_or_train

__all__ = ["PretrainConfig", "pretrain", "pretrain_model", "pretrain_or_reuse", "reuse_or_train", "train_step",
           "cli_main", "LocationBatchSampler", "PatchPairDataset", "SampleIndex", "load_checkpoint", "effective_lr",
           "effective_queue_size", "cosine_factor"]
