"""Full DrasCLR training step vs data loading, samples/s, side by side in one run.

* **model**: the training step of the loop (``drasclr_lib.training.loop.train_step``) on batches already in memory:
  ``DrasCLR`` forward (query encoder on the anchors and on their k neighbours, momentum update,
  key encoder with split-batch BatchNorm, local + neighbour InfoNCE with the own-subject mask,
  enqueue), backward, SGD step; mixed precision on CUDA, as the loop's default. One sample = one
  anchor (with its two views and its neighbours).
* **data**: what the training loop's ``DataLoader`` delivers: ``LocationBatchSampler`` +
  ``PatchPairDataset`` (memory-mapped reads, HU -> input, augmentation of the two anchor views and
  the neighbours) with ``--workers`` worker processes; once with the batched torch augmentation
  (the default) and once with MONAI's transforms per patch (the reference backend), and once in
  the main process (workers=0).

The data side must deliver at least 5x what the model consumes so that loading never stalls
training. Store: ``--store DIR`` (a patch store, e.g. notebook 01's), or by default a generated
toy store of 32³ patches (``drasclr_lib.testing.make_toy_store``; 24 subjects x 18 locations).

Usage::

    python benchmarks/bench_train.py                  # CPU, batch 16, 2 workers
    python benchmarks/bench_train.py --quick          # smoke run

Writes ``benchmarks/results/train.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drasclr_lib.augment import build_augment  # noqa: E402
from drasclr_lib.data.patch_store import PatchStore  # noqa: E402
from drasclr_lib.models import DrasCLR, DrasEncoder  # noqa: E402
from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset  # noqa: E402
from drasclr_lib.training.loop import train_step  # noqa: E402
from drasclr_lib.utils import resolve_device, save_json  # noqa: E402


def bench_model(store: PatchStore, batch: int, steps: int, warmup: int, device: torch.device,
                num_neighbors: int) -> dict:
    """Training steps per second on pre-loaded batches (no data loading in the timed loop)."""
    torch.manual_seed(0)
    model = DrasCLR(DrasEncoder(), num_locations=store.num_locations, queue_size=batch * 2).to(device).train()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    ds = PatchPairDataset(store, num_neighbors=num_neighbors, augment="agc", seed=0)
    sampler = LocationBatchSampler(store.num_subjects, store.num_locations, batch, seed=0)
    batches = []
    for i, idx in enumerate(sampler):
        if i == 2:
            break
        items = [ds[k] for k in idx]
        drop = () if num_neighbors else ("x_nbr", "nbr_locs")  # no neighbour views: no neighbour loss
        batches.append({k: torch.stack([it[k] for it in items]).to(device) for k in items[0] if k not in drop})

    def step(b):
        train_step(model, opt, scaler, b, amp=amp)

    for i in range(warmup):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"samples_per_s": steps * batch / dt, "s_per_step": dt / steps, "steps": steps}


def bench_loader(store: PatchStore, batch: int, batches: int, workers: int, backend: str, num_neighbors: int) -> dict:
    """Samples per second delivered by the training DataLoader (first batch excluded: worker start-up)."""
    aug = build_augment("agc", seed=0, backend=backend)
    ds = PatchPairDataset(store, num_neighbors=num_neighbors, augment=aug, seed=0)
    sampler = LocationBatchSampler(store.num_subjects, store.num_locations, batch, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                         persistent_workers=False)
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i == 0:
            t0 = time.perf_counter()  # workers are up and the first batch is done
            continue
        n += len(b["x_q"])
        if i >= batches:
            break
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "batches": i, "workers": workers, "augment_backend": backend}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default="", help="patch store folder (default: a generated toy store of 32³ patches)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed training steps")
    p.add_argument("--batches", type=int, default=12, help="timed loader batches")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--neighbors", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the model (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 steps, 4 batches")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.batch_size, a.steps, a.batches = 8, 2, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    tmp = None
    if a.store:
        store = PatchStore(a.store)
    else:
        from drasclr_lib.testing import make_toy_store

        tmp = tempfile.TemporaryDirectory()
        store = PatchStore(make_toy_store(Path(tmp.name) / "store", n_subjects=max(24, a.batch_size)))
    print(f"{store}; batch {a.batch_size}, {a.neighbors} neighbours, device {device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")

    model = bench_model(store, a.batch_size, a.steps, 2 if not a.quick else 1, device, a.neighbors)
    print(f"model: {model['samples_per_s']:.1f} samples/s")
    loaders = {}
    for name, workers, backend in [("torch_workers", a.workers, "torch"), ("monai_workers", a.workers, "monai"),
                                   ("torch_main_process", 0, "torch")]:
        loaders[name] = bench_loader(store, a.batch_size, a.batches, workers, backend, a.neighbors)
        print(f"data {name}: {loaders[name]['samples_per_s']:.1f} samples/s")

    ratio = {k: v["samples_per_s"] / model["samples_per_s"] for k, v in loaders.items()}
    rows = [("training step (model)", f"{model['samples_per_s']:.1f}", "1.0x", "-")]
    labels = {"torch_workers": f"data: torch augment, {a.workers} workers (default)",
              "monai_workers": f"data: MONAI augment, {a.workers} workers",
              "torch_main_process": "data: torch augment, main process"}
    for k, v in loaders.items():
        rows.append((labels[k], f"{v['samples_per_s']:.1f}", f"{ratio[k]:.1f}x",
                     "yes" if ratio[k] >= 5 else "no"))
    print(f"\n| {'what':<45} | samples/s | vs model | >= 5x |\n|{'-' * 47}|-----------|----------|-------|")
    for r in rows:
        print(f"| {r[0]:<45} | {r[1]:>9} | {r[2]:>8} | {r[3]:>5} |")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(device)},
        "settings": {"batch_size": a.batch_size, "neighbors": a.neighbors, "workers": a.workers,
                     "steps": a.steps, "batches": a.batches, "store": str(store.root) if a.store else "toy (generated)",
                     "num_subjects": store.num_subjects, "num_locations": store.num_locations,
                     "patch_size": store.patch_size},
        "model": model, "data": loaders, "data_over_model": ratio,
        "ok": bool(ratio["torch_workers"] >= 5),
    }
    save_json(result, a.out)
    print(f"\nwrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
