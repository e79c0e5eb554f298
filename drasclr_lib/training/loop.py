"""The pretraining loop: one process on the CPU or one GPU, or DDP under ``torchrun``.

Per step: a batch of one location (``LocationBatchSampler``), two augmented views of every anchor
and its augmented neighbours (``PatchPairDataset``), one ``DrasCLR`` forward (local + beta x
neighbour InfoNCE, keys of the step enqueued into that location's queue), SGD with momentum and
weight decay on the query encoder, learning rate on a per-step cosine schedule.

Resuming restores the model (query and key encoders, queues and pointers), the optimiser, the
schedule, the gradient scaler, every RNG state, the sampler position and the partial logging
window; with ``workers=0`` on the CPU a resumed run reproduces the uninterrupted one exactly.

:func:`train_step` is the optimisation step alone (forward, backward, SGD), also timed by
``benchmarks/bench_train.py``; reusing a finished run instead of training is
:mod:`drasclr_lib.training.runs`.

(About 420 lines: the loop, its resume and its step are one piece of state handling; splitting
them would scatter what a checkpoint must restore.)
"""

from __future__ import annotations

import locale
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from drasclr_lib.augment import build_augment
from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.host_memory import keep_freed_memory
from drasclr_lib.training.checkpoint import (load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                                             write_history_csv)
from drasclr_lib.training.config import (RESUME_KEYS, PretrainConfig, effective_lr, effective_queue_size,
                                         loader_workers, resolve_speed)
from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset, trainable_pairs
from drasclr_lib.training.model_card import write_model_card
from drasclr_lib.utils import output_dir, resolve_device, save_json, seed_everything

__all__ = ["pretrain", "pretrain_model", "train_step", "cosine_factor", "autocast"]

_METRICS = ("loss", "loss_local", "loss_neighbor", "acc1")  # means over a logging window
_COUNTS = ("self_negatives", "masked_negatives")  # sums over a logging window and over processes


def _new_window() -> dict:
    return {"n": 0, **{k: 0.0 for k in _METRICS + _COUNTS}}


def cosine_factor(step: int, total_steps: int) -> float:
    """Cosine decay of the learning rate, per step: 1 at step 0, 0 at ``total_steps``."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def _dist_env() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _setup_distributed(cfg: PretrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, initialised_here); initialises the process group under torchrun."""
    created = False
    if not dist.is_initialized() and _dist_env() and int(os.environ["WORLD_SIZE"]) > 1:
        use_cuda = torch.cuda.is_available() and cfg.device in {"auto", "cuda"}
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        else:
            device = torch.device("cpu")
    else:
        rank, world, device = 0, 1, resolve_device(cfg.device)
    return rank, world, device, created


def _build_model(cfg: PretrainConfig, num_locations: int, queue_size: int):
    from drasclr_lib.models import DrasCLR, DrasEncoder

    encoder = DrasEncoder(rep_dim=cfg.rep_dim, proj_dim=cfg.proj_dim, num_experts=cfg.num_experts,
                          conditional=cfg.conditional)
    return DrasCLR(encoder, num_locations=num_locations, queue_size=queue_size, momentum=cfg.moco_momentum,
                   temperature=cfg.temperature, neighbor_weight=cfg.neighbor_weight, split_bn=cfg.split_bn,
                   exclude_same_subject=cfg.exclude_self_negatives)


def autocast(device_type: str, precision: str):
    """The autocast context of a precision: none for ``"fp32"``, bfloat16 / float16 autocast on ``device_type``.

    Raises:
        ValueError: on an unknown precision.
    """
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _check_resume(ckpt: dict, cfg: PretrainConfig, run: dict, path: Path) -> None:
    old = ckpt["config"]
    diff = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_KEYS if old.get(k) != getattr(cfg, k)]
    old_run = ckpt.get("run", {})
    for k in ("world_size", "num_subjects", "num_locations", "queue_size"):
        if k in old_run and old_run[k] != run[k]:
            diff.append(f"{k}: {old_run[k]!r} -> {run[k]!r}")
    if diff:
        raise ValueError(f"cannot resume from {path}: the run's settings changed ({'; '.join(diff)}); "
                         "use a new out_dir or resume=False")
    old_precision = old_run.get("precision")
    if old_precision is not None and old_precision != run["precision"]:
        warnings.warn(f"{path} was trained in {old_precision} and resumes in {run['precision']}: the run goes on, "
                      f"but no longer reproduces an uninterrupted {old_precision} run exactly "
                      f"(pass precision={old_precision!r} to keep it exact)", stacklevel=4)


def pretrain(cfg: PretrainConfig) -> Path:
    """Pretrain a DrasCLR encoder on a patch store; write checkpoints, history and config.

    Files (rank 0 writes) in ``cfg.out_dir``: ``checkpoint.pt`` (the latest; every epoch and every
    ``save_every_steps`` steps), ``config.json`` (the config plus the effective lr, queue size and
    process count), ``history.csv`` (step, epoch, loss, loss_local, loss_neighbor, acc1, lr,
    seconds; means over ``log_every`` steps; ``self_negatives`` and ``masked_negatives``: the
    (anchor, queue entry) pairs of one patient (the store's ``group`` column; else one subject) that
    reached the loss / were masked out of it, summed over the window and processes) and ``tb/`` (TensorBoard).

    Args:
        cfg: the run's settings (:class:`PretrainConfig`).

    Returns:
        Path of ``checkpoint.pt``.

    Raises:
        FileNotFoundError: when the store is missing.
        ValueError: on settings the store cannot serve (batch larger than the cohort) or a resume
            whose settings differ from the checkpoint's.
        FloatingPointError: when the loss becomes NaN or infinite (names the step and location).
    """
    return pretrain_model(cfg)[0]


def pretrain_model(cfg: PretrainConfig):
    """:func:`pretrain`, also returning this process's trained ``DrasCLR`` (in train mode).

    Returns:
        ``(checkpoint_path, model)``.
    """
    cfg.validate()
    rank, world, device, created = _setup_distributed(cfg)
    try:
        speed = resolve_speed(cfg, device)
        # a frame that fails to compile runs eagerly (torch.compile's own fallback), with a warning
        compile_errors = torch._dynamo.config.patch(suppress_errors=True) if cfg.compile else nullcontext()
        with keep_freed_memory(speed["host_memory"] == "keep"), compile_errors:
            return _train(cfg, rank, world, device, speed)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch: dict,
               *, amp: bool = False, precision: str | None = None) -> dict:
    """One optimisation step: ``DrasCLR`` forward (momentum update and enqueue included), backward, SGD step.

    Args:
        net: a ``DrasCLR`` in train mode (or its ``DistributedDataParallel`` wrapper).
        optimizer: the optimiser of the query encoder's parameters.
        scaler: gradient scaler (``torch.amp.GradScaler("cuda", enabled=amp)``; disabled it is a no-op).
        batch: the step's tensors on the training device, views already augmented: ``x_q``, ``x_k``
            (B, 1, P, P, P) float32 in [-1, 1], ``loc_idx`` (B,) int64 (one location), ``loc`` (B, 3) in
            [-1, 1], optional ``group`` (B,) int64 (the anchor's patient: its queue entries are masked out
            of its negatives; without it ``subject`` (B,), its own subject), optional ``x_nbr``
            (B, k, 1, P, P, P) and ``nbr_locs`` (B, k, 3) (the neighbour loss; absent or None: none).
        amp: float16 autocast (CUDA only; the same as ``precision="fp16"``).
        precision: ``"fp32"``, ``"bf16"`` (bfloat16 autocast on the batch's device) or ``"fp16"``
            (float16 autocast; pair it with an enabled scaler); ``None``: ``"fp16"`` when ``amp`` else
            ``"fp32"``. The embeddings and losses stay float32 (``DrasCLR``).

    Returns:
        The model's output: ``loss``, ``loss_local``, ``loss_neighbor``, ``acc1``, ``self_negatives``,
        ``masked_negatives``...

    Raises:
        FloatingPointError: when the loss is NaN or infinite (names the location); no step is taken.
    """
    if precision is None:
        precision = "fp16" if amp else "fp32"
    with autocast(batch["x_q"].device.type, precision):
        res = net(batch["x_q"], batch["x_k"], batch["loc_idx"], batch["loc"], x_nbr=batch.get("x_nbr"),
                  nbr_locs=batch.get("nbr_locs"), subjects=batch.get("group", batch.get("subject")))
    loss = res["loss"]
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} (location {int(batch['loc_idx'][0])}); "
                                 "lower the learning rate or use precision='fp32'")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return res


def _on_device(batch: dict, device: torch.device, nbr: bool) -> dict:
    """The loader's batch on the training device (neighbour views only when the neighbour loss is on)."""
    return {"x_q": batch["x_q"].to(device, non_blocking=True), "x_k": batch["x_k"].to(device, non_blocking=True),
            "x_nbr": batch["x_nbr"].to(device, non_blocking=True) if nbr else None, "loc": batch["loc"].to(device),
            "subject": batch["subject"].to(device), "group": batch["group"].to(device),
            "loc_idx": batch["loc_idx"].to(device),
            "nbr_locs": batch["nbr_locs"].to(device) if nbr else None}


def _step_metrics(res: dict, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's ``_METRICS`` (means over processes) and ``_COUNTS`` (sums over processes), float64."""
    vals = torch.tensor([float(res[k].detach() if torch.is_tensor(res[k]) else res[k])
                         if res.get(k) is not None else 0.0 for k in _METRICS], dtype=torch.float64)
    counts = torch.tensor([int(res[k]) for k in _COUNTS], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(vals)
        vals /= world
        dist.all_reduce(counts)
    return vals, counts


def _restore(ckpt_path: Path, cfg: PretrainConfig, run: dict, model, optimizer, scheduler, scaler,
             use_amp: bool) -> tuple[int, list, dict, float]:
    """Load ``ckpt_path`` into the model, optimiser, schedule, scaler and RNGs; ``(step, history, window, seconds)``."""
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    _check_resume(ckpt, cfg, run, ckpt_path)
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt and use_amp:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if "queue_subject" not in ckpt["state_dict"]:
        warnings.warn(f"{ckpt_path} predates per-entry subject indices: the queues resume with no subject "
                      "known, so the first queue turn of each location is not masked", stacklevel=4)
    return (int(ckpt["step"]), list(ckpt.get("history", [])), {**_new_window(), **ckpt.get("log_window", {})},
            float(ckpt.get("seconds", 0.0)))


@contextmanager
def _utf8_ctype():
    """``LC_CTYPE`` set to C.UTF-8 inside the block when the current one is not UTF-8, then restored.

    torch's inductor reads its kernel templates with ``open()`` in the locale's encoding, and one
    holds non-ASCII bytes: under an ASCII ``LC_CTYPE`` (the "C" locale, which a library can set in
    a running process) importing it fails with ``UnicodeDecodeError``.
    """
    previous = locale.setlocale(locale.LC_CTYPE)
    if locale.getpreferredencoding(False).lower().replace("-", "") != "utf8":
        try:
            locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        except locale.Error:
            pass
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def _compile_encoders(model) -> bool:
    """Compile both encoders in place (names, checkpoints and the optimiser see the same modules).

    Returns:
        True when compiled; False (a warning says why; the encoders run eagerly) when
        ``torch.compile`` cannot start here.
    """
    try:
        with _utf8_ctype():
            import torch._inductor.compile_fx  # noqa: F401  (the import that reads the templates)
        model.encoder_q.compile()
        model.encoder_k.compile()
        return True
    except Exception as exc:  # noqa: BLE001 - any failure to start compiling leaves the eager encoders
        warnings.warn(f"compile=True: torch.compile could not start ({type(exc).__name__}: {exc}); "
                      "the encoders run eagerly", stacklevel=4)
        return False


def _train(cfg: PretrainConfig, rank: int, world: int, device: torch.device, speed: dict):
    store = PatchStore(cfg.store or output_dir("patch_store"))
    out = cfg.out_path()
    ckpt_path = out / "checkpoint.pt"
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    n_sub, n_loc = store.num_subjects, store.num_locations
    global_batch = cfg.batch_size * world
    if global_batch > n_sub:
        raise ValueError(f"batch_size {cfg.batch_size} x {world} process(es) = {global_batch} exceeds the "
                         f"{n_sub} subjects of {store.root}; every batch holds distinct subjects of one location")
    queue = effective_queue_size(cfg.queue_size, global_batch, n_sub)
    if queue != cfg.queue_size and is_main:
        warnings.warn(f"queue_size {cfg.queue_size} -> {queue} (a multiple of the global batch {global_batch}, "
                      f"at most num_subjects - global batch for the {n_sub} subjects)", stacklevel=3)
    lr0 = effective_lr(cfg, world)
    sampler = LocationBatchSampler(n_sub, n_loc, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                                   rank=rank, world_size=world, valid=trainable_pairs(store, cfg.num_neighbors))
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    stop_step = cfg.stop_step(total_steps)
    on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and device.type == "cuda")
    run = {"world_size": world, "num_subjects": n_sub, "num_locations": n_loc, "queue_size": queue,
           "lr": lr0, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch,
           "total_steps": total_steps, "augment_on": "device" if on_device else "workers",
           "device": str(device), "store": str(store.root)}

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    run.update(speed)
    workers = loader_workers(cfg, device, augment_on_device=on_device)
    run["loader_workers"] = workers
    model = _build_model(cfg, n_loc, queue).to(device)
    model.set_channels_last(speed["memory_format"] == "channels_last")
    run["compile"] = _compile_encoders(model) if cfg.compile else False
    use_amp = speed["precision"] == "fp16"  # float16 needs the gradient scaler; bfloat16 does not
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=lr0, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_factor(s, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step, history, window = 0, [], _new_window()
    elapsed = 0.0

    if cfg.resume and ckpt_path.exists():
        step, history, window, elapsed = _restore(ckpt_path, cfg, run, model, optimizer, scheduler, scaler, use_amp)
        if is_main:
            print(f"resuming {ckpt_path} at step {step} of {stop_step}")
    elif cfg.resume and is_main:
        print(f"resume: no checkpoint at {ckpt_path}; starting a new run")
    if is_main:
        print(f"pretrain on {device}: precision {speed['precision']} (asked {cfg.precision}"
              f"{', amp off' if not cfg.amp else ''}), {speed['memory_format']} convolutions, "
              f"{'freed host memory kept for reuse' if speed['host_memory'] == 'keep' else 'system malloc'}, "
              f"{'compiled' if run['compile'] else 'eager'} encoders, "
              f"augmentation on the "
              f"{run['augment_on']}, {workers} loader worker(s){'' if workers == cfg.workers else f' (asked {cfg.workers}: no core left for them beside the training threads)'}, "
              f"{torch.get_num_threads()} torch thread(s), "
              f"batch {cfg.batch_size} x {world} process(es)")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # the queues (up to GBs) stay in sync through the gathered keys
    dataset = PatchPairDataset(store, num_neighbors=cfg.num_neighbors, augment=None if on_device else cfg.augment,
                               seed=cfg.seed)
    device_aug = build_augment(cfg.augment, seed=cfg.seed) if on_device else None
    writer = None
    if is_main:
        save_json({**cfg.to_dict(), "effective": run}, out / "config.json")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"), purge_step=step if step else None)

    def checkpoint() -> None:
        if not is_main:
            return
        save_checkpoint({
            "epoch": step // steps_per_epoch, "step": step, "arch": "drasclr",
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "config": cfg.to_dict(), "run": dict(run), "rng": rng_state(), "history": history,
            "log_window": dict(window), "seconds": elapsed,
        }, ckpt_path)
        write_history_csv(history, out / "history.csv")
        write_model_card(out, cfg=cfg, run=run, step=step, history=history, store=store)

    from tqdm.auto import tqdm

    bar = tqdm(total=stop_step, initial=step, desc="pretrain", unit="step", disable=not (is_main and cfg.progress),
               dynamic_ncols=True)
    model.train()
    nbr = cfg.num_neighbors > 0 and cfg.neighbor_weight > 0
    last_saved = step
    while step < stop_step:
        epoch, start = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))  # keeps the global RNG untouched
        t0 = time.perf_counter()
        for batch in loader:
            batch = _on_device(batch, device, nbr)
            if device_aug is not None:  # batched; q, k independent, one shared transform per anchor's neighbours
                gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0]))
                batch["x_q"], batch["x_k"], batch["x_nbr"] = PatchPairDataset.augment_views(
                    device_aug, batch["x_q"], batch["x_k"], batch["x_nbr"], generator=gen)
            lr_now = scheduler.get_last_lr()[0]
            try:
                res = train_step(net, optimizer, scaler, batch, precision=speed["precision"])
            except FloatingPointError as exc:
                raise FloatingPointError(f"step {step} (epoch {epoch}): {exc}") from None
            scheduler.step()
            step += 1
            vals, counts = _step_metrics(res, world)
            window["n"] += 1
            for k, v in zip(_METRICS + _COUNTS, vals.tolist() + counts.tolist()):
                window[k] += v
            elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            if is_main:
                bar.update(1)
                bar.set_postfix(loss=f"{vals[0]:.3f}", acc1=f"{vals[3]:.1f}", epoch=epoch)
            # rows at every log_every-th step and at the schedule's end; a partial window at a
            # max_steps stop stays in the checkpoint and is continued on resume (exact history)
            if window["n"] >= cfg.log_every or step == total_steps:
                row = {"step": step, "epoch": epoch, **{k: window[k] / window["n"] for k in _METRICS},
                       **{k: int(window[k]) for k in _COUNTS}, "lr": lr_now, "seconds": round(elapsed, 3)}
                history.append(row)
                if writer is not None:
                    for k in (*_METRICS, *_COUNTS, "lr"):
                        writer.add_scalar(f"train/{k}", row[k], step)
                window = _new_window()
            if step % steps_per_epoch == 0 or (cfg.save_every_steps and step - last_saved >= cfg.save_every_steps):
                checkpoint()
                last_saved = step
            if step >= stop_step:
                break
        del loader
    if last_saved != step or not ckpt_path.exists():
        checkpoint()
    bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
    return ckpt_path, model
