"""The pretraining configuration (one dataclass, saved next to every checkpoint).

Also the two lists of its fields that identify a run: :data:`RESUME_KEYS` (what the run trains:
must match to resume a checkpoint or to count as the same run) and :data:`BUDGET_KEYS` (those plus
where it stops: the budget that :mod:`drasclr_lib.training.runs` hashes into a run's identity), and
:func:`resolve_speed`, which turns ``precision="auto"`` / ``memory_format="auto"`` into the settings
a device runs fastest with.

Why precision is not part of a run's identity: like ``device`` (a CPU and a GPU do not round alike
either) it changes how the numbers are computed, not what is trained; ``tests/training/test_precision.py``
checks that a bfloat16 and a float32 run learn the same loss curve within a stated tolerance. The
resolved precision is recorded in ``config.json`` (``effective.precision``) and in the checkpoint,
and resuming with another one warns that the continuation is no longer bit-exact (resuming with
the same one, the default on the same machine, stays exact).

(About 355 lines: one dataclass whose docstring documents every field, and the functions that
resolve its ``auto`` settings for a device, which read those fields.)
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from drasclr_lib.augment import parse_augment_spec
from drasclr_lib.host_memory import HOST_MEMORY, resolve_host_memory
from drasclr_lib.utils import output_dir

__all__ = ["PretrainConfig", "effective_queue_size", "effective_lr", "REFERENCE_BATCH", "RESUME_KEYS", "BUDGET_KEYS",
           "AUGMENT_ON", "PRECISIONS", "MEMORY_FORMATS", "HOST_MEMORY", "resolve_speed", "loader_workers", "cpu_has_bf16", "cpu_bf16_fast"]

#: Batch size the published learning rate belongs to (lr 0.01 at batch 128).
REFERENCE_BATCH = 128

#: Fields that define what a run trains: they must match to resume a run (the others, e.g.
#: ``max_steps``, ``workers`` or ``device``, may change).
RESUME_KEYS = ("epochs", "batch_size", "lr", "scale_lr", "momentum", "weight_decay", "queue_size", "moco_momentum",
               "temperature", "num_neighbors", "neighbor_weight", "conditional", "num_experts", "rep_dim",
               "proj_dim", "augment", "seed", "split_bn", "exclude_self_negatives")
#: The budget of a run: :data:`RESUME_KEYS` and where it stops. Two configs with the same budget
#: (and store) train the same model (see :func:`drasclr_lib.training.runs.config_digest`).
BUDGET_KEYS = (*RESUME_KEYS, "max_steps")
#: Where the views are augmented (``PretrainConfig.augment_on``).
AUGMENT_ON = ("auto", "workers", "device")
#: Arithmetic of the encoders (``PretrainConfig.precision``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Memory layout of the convolutions (``PretrainConfig.memory_format``).
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; defaults are the published settings (SPEC, "Pretraining").

    Attributes:
        store: patch store folder; ``""`` means ``output_dir("patch_store")`` (notebook 01's).
        out_dir: output folder for ``checkpoint.pt``, ``config.json``, ``history.csv`` and ``tb/``;
            ``""`` means ``output_dir("02_pretraining")``.
        epochs: passes over all (subject, location) pairs; the cosine schedule spans all of them.
        batch_size: patches per step *per process* (all of one location).
        lr: learning rate at a global batch of 128 (published 0.01). With ``scale_lr`` the run uses
            ``lr * batch_size * world_size / 128`` (linear scaling rule).
        scale_lr: apply the linear scaling rule above.
        momentum, weight_decay: SGD settings (published 0.9, 1e-4).
        queue_size: negatives per location K (published 4096). Rounded down to a multiple of the
            global batch and capped for small cohorts at the largest multiple of the global batch
            not above ``num_subjects - global_batch`` (at least one global batch), so that the queue
            of a location holds keys of other subjects rather than stale copies of the same ones.
        moco_momentum: key-encoder momentum m (0.999).
        temperature: InfoNCE temperature (0.2).
        num_neighbors: k nearest anatomical neighbours per anchor (2; 0 disables the neighbour loss).
        neighbor_weight: beta, weight of the neighbour loss (1.0).
        conditional: location-conditioned convolutions (``False``: the plain MoCo baseline encoder).
        num_experts, rep_dim, proj_dim: encoder size (8, 128, 128).
        augment: augmentation letters (``"agc"``; see :mod:`drasclr_lib.augment`).
        augment_on: ``"workers"`` (CPU, in the DataLoader workers), ``"device"`` (batched on the
            training device) or ``"auto"`` (the device when it is a GPU, else the workers).
        workers: DataLoader worker processes, at most: on a CPU device the run uses no more than
            the cores the training threads leave free (:func:`loader_workers`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``... (under torchrun each process takes ``cuda:LOCAL_RANK``).
        amp: allow mixed precision (``False`` forces ``precision`` to float32, as ``--no-amp`` did before
            ``precision`` existed).
        precision: arithmetic of the encoders: ``"fp32"``; ``"bf16"`` (bfloat16 autocast, CPU with
            AVX512-BF16 / AMX or a GPU that supports it); ``"fp16"`` (float16 autocast and gradient
            scaling, CUDA only); ``"auto"`` (the fastest safe one: bf16 on a CPU with native
            bfloat16, fp16 on CUDA as before, else fp32). Embeddings, queue, losses and parameters
            stay float32 in every case. See :func:`resolve_speed`.
        memory_format: layout of the convolutions: ``"contiguous"`` (NCDHW), ``"channels_last"``
            (NDHWC) or ``"auto"`` (contiguous: the faster one as measured, ``docs/pretraining.md``).
        host_memory: ``"keep"`` (glibc ``malloc`` keeps freed memory for reuse while the run trains:
            no page faults on the step's large activations, 1.25x the float32 CPU step, resident
            memory stays at its peak), ``"system"`` (glibc's defaults) or ``"auto"`` (keep on the
            CPU where ``malloc`` is glibc's). See :mod:`drasclr_lib.host_memory`.
        compile: compile both encoders with ``torch.compile`` (inductor; BatchNorm and ELU fused
            around oneDNN's convolutions). Off by default: compiling takes 1-2 minutes on 2 cores at
            the start of a run (cached on disk for the next) and needs a C++ compiler; an encoder
            that fails to compile runs eagerly. Measured in ``docs/pretraining.md``.
        seed: seed of the model initialisation, the sampler and the augmentations.
        max_steps: stop after this many steps in total (CI); the schedule still spans ``epochs``.
        log_every: steps per history row / TensorBoard point (means over the window); a row is
            also written at the schedule's end, not at a ``max_steps`` stop (the partial window is
            kept in the checkpoint, so a resumed run's history equals an uninterrupted one's).
        save_every_steps: also checkpoint every this many steps inside an epoch (0: only at epoch
            ends), so an interrupted long run loses at most this many steps.
        tensorboard: write TensorBoard scalars to ``out_dir/tb``.
        split_bn: sub-batches of the key encoder's split-batch BatchNorm on one device (2).
        exclude_self_negatives: mask queue entries of an anchor's own subject out of its logits
            (``True``). The sampler reshuffles subjects every epoch, so without the mask an anchor
            meets older keys of itself from the second epoch on; the published code's fixed
            subject order never does. ``False`` reproduces the unmasked loss (counted in
            ``history.csv``'s ``self_negatives``).
        resume: continue from ``out_dir/checkpoint.pt`` when it exists.
        progress: show a tqdm bar.
    """

    store: str = ""
    out_dir: str = ""
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.01
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    queue_size: int = 4096
    moco_momentum: float = 0.999
    temperature: float = 0.2
    num_neighbors: int = 2
    neighbor_weight: float = 1.0
    conditional: bool = True
    num_experts: int = 8
    rep_dim: int = 128
    proj_dim: int = 128
    augment: str = "agc"
    augment_on: str = "auto"
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    precision: str = "auto"
    memory_format: str = "auto"
    host_memory: str = "auto"
    compile: bool = False
    seed: int = 0
    max_steps: int | None = None
    log_every: int = 10
    save_every_steps: int = 1000
    tensorboard: bool = True
    split_bn: int = 2
    exclude_self_negatives: bool = True
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.store, self.out_dir = str(self.store), str(self.out_dir)
        self.validate()

    def validate(self) -> None:
        """Check ranges and types.

        Raises:
            ValueError: naming the first bad field.
        """
        positive = ["epochs", "batch_size", "queue_size", "num_experts", "rep_dim", "proj_dim", "log_every",
                    "split_bn"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ["lr", "temperature"]:
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"PretrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ["momentum", "moco_momentum"]:
            if not 0 <= float(getattr(self, name)) < 1:
                raise ValueError(f"PretrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ["weight_decay", "neighbor_weight", "num_neighbors", "workers", "save_every_steps"]:
            if getattr(self, name) < 0:
                raise ValueError(f"PretrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and int(self.max_steps) < 1:
            raise ValueError(f"PretrainConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.augment_on not in AUGMENT_ON:
            raise ValueError("PretrainConfig.augment_on must be 'auto', 'workers' or 'device', "
                             f"got {self.augment_on!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"PretrainConfig.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"PretrainConfig.memory_format must be one of {', '.join(MEMORY_FORMATS)}, "
                             f"got {self.memory_format!r}")
        if self.host_memory not in HOST_MEMORY:
            raise ValueError(f"PretrainConfig.host_memory must be one of {', '.join(HOST_MEMORY)}, "
                             f"got {self.host_memory!r}")
        parse_augment_spec(self.augment)

    def to_dict(self) -> dict:
        """Plain dict (JSON- and ``weights_only``-safe)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """Build from a dict (e.g. a checkpoint's ``config``); unknown keys are ignored with a warning."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            warnings.warn(f"PretrainConfig.from_dict ignores unknown keys {extra}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "PretrainConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def out_path(self) -> Path:
        """The run folder: ``out_dir``, or ``output_dir("02_pretraining")`` when it is empty."""
        return Path(self.out_dir) if self.out_dir else output_dir("02_pretraining")

    def stop_step(self, total_steps: int) -> int:
        """The step the run stops at: ``total_steps`` of the schedule, or ``max_steps`` when smaller."""
        return min(total_steps, self.max_steps) if self.max_steps else total_steps


def effective_lr(cfg: PretrainConfig, world_size: int = 1) -> float:
    """The learning rate the optimiser starts from (linear scaling when ``cfg.scale_lr``)."""
    return cfg.lr * cfg.batch_size * world_size / REFERENCE_BATCH if cfg.scale_lr else cfg.lr


def effective_queue_size(queue_size: int, global_batch: int, num_subjects: int) -> int:
    """The per-location queue length K a run uses (see ``PretrainConfig.queue_size``).

    Args:
        queue_size: requested K.
        global_batch: keys enqueued per step (batch size x processes).
        num_subjects: subjects in the store.

    Returns:
        K, a multiple of ``global_batch``, ``global_batch <= K <= queue_size``.

    Raises:
        ValueError: when ``queue_size < global_batch`` (one step's keys would not fit).
    """
    if queue_size < global_batch:
        raise ValueError(f"queue_size {queue_size} is smaller than the global batch {global_batch}: "
                         "one step's keys would not fit; use queue_size >= batch_size x processes")
    k = queue_size // global_batch * global_batch
    cap = max(global_batch, (num_subjects - global_batch) // global_batch * global_batch)
    return min(k, cap)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(cfg: PretrainConfig, device: torch.device, *, augment_on_device: bool = False) -> int:
    """The DataLoader worker processes a run starts: ``cfg.workers``, capped on a CPU device.

    When the model trains on the CPU, loader workers and the training threads share the same
    cores; on a machine with no core to spare the workers' augmentation and the threads' spinning
    waits slow each other down far more than they overlap (2 cores, DrasCLR with neighbours, batch
    16, bfloat16: 3.5 s a step with 2 workers, 0.8 with 1, 0.68 with none; ``docs/pretraining.md``).
    So on the CPU the workers are capped at the usable cores minus ``torch.get_num_threads()``. On a
    GPU, or with augmentation on the device, ``cfg.workers`` is used as given.

    Returns:
        the number of worker processes (0: the main process loads and augments).
    """
    if device.type != "cpu" or augment_on_device:
        return int(cfg.workers)
    return max(0, min(int(cfg.workers), _usable_cores() - torch.get_num_threads()))


def cpu_has_bf16() -> bool:
    """True when oneDNN can run bfloat16 convolutions on this CPU (``bf16`` is allowed, maybe slowly).

    oneDNN answers yes on any AVX-512 CPU, including those without bfloat16 instructions, where it
    converts and computes in float32: correct but slower (:func:`cpu_bf16_fast`).
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the query
        return False


#: CPU flags (``/proc/cpuinfo``) of bfloat16 instructions: VDPBF16PS (AVX512-BF16) and AMX tiles.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The first processor's flags from ``/proc/cpuinfo`` (empty where the file is absent: not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_fast() -> bool:
    """True when bfloat16 autocast beats float32 here: oneDNN runs it and the CPU has bfloat16 instructions.

    Without ``avx512_bf16`` or ``amx_bf16`` (:data:`BF16_CPU_FLAGS`), oneDNN emulates bfloat16
    on AVX-512: on 2 Intel Xeon AVX-512 cores without them the whole DrasCLR step at batch 32
    ran 17.3 anchors/s in bfloat16 against 25.4 in float32 (0.68x); with AVX512-BF16 (AMD EPYC)
    31.1 against 21.7 (1.43x) (``benchmarks/bench_train.py``). Where the flags cannot be read
    (not Linux) this is ``False``: float32 is never the slow choice.
    """
    return cpu_has_bf16() and bool(_cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_speed(cfg: PretrainConfig, device: torch.device) -> dict:
    """The precision and memory format a run uses on ``device`` (``"auto"`` resolved).

    ``precision="auto"``: ``"bf16"`` on a CPU with bfloat16 instructions (:func:`cpu_bf16_fast`); on CUDA
    ``"fp16"`` with gradient scaling (the toolkit's mixed precision before this setting existed);
    otherwise ``"fp32"``. ``amp=False`` always gives ``"fp32"``. ``memory_format="auto"``:
    contiguous (channels-last made the bfloat16 model step slower on the CPU, 26.5 against 36.7
    anchors/s at batch 32, see ``docs/pretraining.md``; not measured on a GPU).
    ``host_memory="auto"``: ``"keep"`` on the CPU with glibc (:func:`drasclr_lib.host_memory.resolve_host_memory`).

    Args:
        cfg: the run's settings.
        device: the training device.

    Returns:
        ``{"precision": "fp32" | "bf16" | "fp16", "memory_format": "contiguous" | "channels_last",
        "host_memory": "keep" | "system"}``.

    Raises:
        ValueError: when the requested precision cannot run on ``device`` (``"fp16"`` off CUDA,
            ``"bf16"`` on a GPU without bfloat16).
    """
    precision = cfg.precision
    if not cfg.amp:
        precision = "fp32"
    elif precision == "auto":
        if device.type == "cuda":
            precision = "fp16"
        elif device.type == "cpu" and cpu_bf16_fast():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (float16 with gradient scaling); the run is on "
                         f"{device}: use 'bf16' or 'fp32'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision 'bf16': {torch.cuda.get_device_name(device)} has no bfloat16; use 'fp16'")
    fmt = cfg.memory_format
    if fmt == "auto":
        fmt = "contiguous"  # channels-last measured slower with bfloat16 on the CPU (docs/pretraining.md)
    return {"precision": precision, "memory_format": fmt,
            "host_memory": resolve_host_memory(cfg.host_memory, device.type)}
