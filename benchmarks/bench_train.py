"""Pretraining throughput: the whole DrasCLR step, the model step alone and the published step, side by side.

What is timed (anchors/s; one anchor = its query and key views and its ``k`` neighbours):

* **whole step** (``whole``): ``drasclr_lib.training.pretrain`` itself on a toy store, as a user runs
  it: ``LocationBatchSampler``, ``DataLoader`` with its workers (memory-mapped reads, HU -> input,
  augmentation), the query / key / neighbour encoders, the local and neighbour losses, the queue
  update, SGD and the per-step bookkeeping. The seconds come from the run's own ``history.csv``
  (``log_every=1``); the first ``--warmup`` steps (worker start-up) are left out.
* **model step** (``model``): ``drasclr_lib.training.loop.train_step`` on batches already in memory.
* **candidates** (at the first batch size): the model step with one fast setting at a time
  (bfloat16 / float16 alone, channels-last alone), to show what each brings.
* **published step** (``published``): the published ``builder.DrasCLR`` (``models/cnn3d.py`` with its
  per-sample ``CondConv3D`` loop, from ``../shared/reference/published_code``) in a one-process
  gloo group on the CPU (``Tensor.cuda`` patched to the identity), with ``train.py``'s loss and SGD
  over ``model.parameters()``, on batches in memory (its MONAI data pipeline is not timed, so the
  ratio against it is a lower bound).

Each is run with today's float32 path (``--baseline``: ``precision=fp32``, contiguous layout,
augmentation in the workers, glibc's ``malloc`` defaults; selectable) and with the new defaults
(``precision=auto``, ``memory_format=auto``, ``host_memory=auto``), at every ``--batch-sizes`` on ``--threads`` threads; every configuration runs
in its own subprocess, which also gives its peak RSS (the main process plus its loader workers).

GFLOP/s: the FLOPs of one model step are counted with ``torch.utils.flop_counter.FlopCounterMode``
(convolutions and matrix products, forward and backward, about 1.9 GFLOP per anchor) and divided
by the measured time. Fraction of peak: see :func:`cpu_peak` (cores x clock x FLOP/cycle from
``lscpu``) and :func:`cuda_peak`. The projected time of the paper's schedule is 20 epochs x 581
locations x 9,000 subjects (1.05e8 anchors) at the measured whole-step rate.

Usage::

    python benchmarks/bench_train.py                       # CPU: batch 32 and 128, 2 threads
    python benchmarks/bench_train.py --quick               # smoke run (batch 4, a few steps)
    python benchmarks/bench_train.py --device cuda         # one GPU: the same table, the card's peak

Writes ``benchmarks/results/train_<device>.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drasclr_lib.utils import save_json  # noqa: E402

PUBLISHED = ROOT.parent / "shared" / "reference" / "published_code"
#: The paper's schedule: 20 epochs x 581 locations x ~9,000 subjects (one anchor each).
PAPER_ANCHORS = 20 * 581 * 9000
#: Dense tensor-core / FP32 peaks (TFLOP/s) of some cards, from the vendors' data sheets (SXM parts).
CUDA_PEAKS = {"H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
              "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}, "L4": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0},
              "A10": {"fp32": 31.2, "bf16": 125.0, "fp16": 125.0}, "V100": {"fp32": 15.7, "fp16": 125.0},
              "T4": {"fp32": 8.1, "fp16": 65.0}}


# --------------------------------------------------------------------------------------------------
# peaks
# --------------------------------------------------------------------------------------------------
def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def cpu_peak(threads: int) -> dict:
    """The CPU's peak GFLOP/s for ``threads`` compute threads, fp32 and bf16, and how it was computed.

    peak = cores x clock x FLOP/cycle, with cores = min(threads, physical cores), the clock from
    ``lscpu`` ("CPU max MHz", else "/proc/cpuinfo"'s "cpu MHz") and FLOP/cycle per core from the
    instruction set ``lscpu`` lists: AVX-512 (``avx512f``): 2 FMA units x 16 fp32 lanes x 2 = 64;
    AVX2 + FMA: 32. AMD Zen 4 (family 25 with AVX-512) executes a 512-bit FMA as two 256-bit
    halves, so its real figure is 32: ``fp32_microarch`` holds that, ``fp32`` the nominal AVX-512
    one (the issue's ~330 GFLOP/s on 2 cores). bfloat16 with ``avx512_bf16`` (VDPBF16PS: two
    products per fp32 lane) doubles the fp32 rate; with AMX (``amx_bf16``) it is far higher (not
    modelled: reported as the AVX512-BF16 figure).
    """
    info = _lscpu()
    flags = set(info.get("Flags", "").split())
    cores_per_socket = int(info.get("Core(s) per socket", "0") or 0)
    sockets = int(info.get("Socket(s)", "1") or 1)
    physical = cores_per_socket * sockets or os.cpu_count() or 1
    cores = min(threads, physical)
    mhz = None
    for key in ("CPU max MHz", "CPU MHz"):
        if info.get(key):
            mhz = float(info[key])
            break
    if mhz is None:
        try:
            mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(encoding="utf-8")).group(1))
        except (OSError, AttributeError):
            mhz = 0.0
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 (2 FMA units x 16 fp32 lanes x 2)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2 (2 FMA units x 8 fp32 lanes x 2)"
    else:
        per_cycle, isa = 8, "SSE (assumed)"
    zen4 = info.get("Vendor ID") == "AuthenticAMD" and info.get("CPU family") == "25" and "avx512f" in flags
    micro = 32 if zen4 else per_cycle
    bf16_factor = 2 if "avx512_bf16" in flags else 1
    ghz = mhz / 1000
    return {"cores": cores, "ghz": round(ghz, 3), "fp32_flop_per_cycle": per_cycle, "isa": isa,
            "model": info.get("Model name", platform.processor()), "bf16_native": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags,
            "fp32": cores * ghz * per_cycle, "fp32_microarch": cores * ghz * micro,
            "bf16": cores * ghz * per_cycle * bf16_factor,
            "formula": f"{cores} cores x {ghz:.3f} GHz x {per_cycle} fp32 FLOP/cycle ({isa})"
                       + (f"; bf16 x{bf16_factor} (avx512_bf16)" if bf16_factor > 1 else "")
                       + ("; Zen 4 double-pumps 512-bit FMAs: 32 FLOP/cycle in practice (fp32_microarch)"
                          if zen4 else "")}


def cuda_peak(device: torch.device) -> dict:
    """The card's dense peak GFLOP/s (fp32, bf16, fp16) from :data:`CUDA_PEAKS` by name (``None`` when unknown)."""
    name = torch.cuda.get_device_name(device)
    for key, peaks in CUDA_PEAKS.items():
        if key in name:
            return {"model": name, **{k: v * 1000 for k, v in peaks.items()},
                    "formula": f"{key} data-sheet dense peaks (TFLOP/s): {peaks}"}
    return {"model": name, "fp32": None, "bf16": None, "fp16": None, "formula": "card not in CUDA_PEAKS"}


# --------------------------------------------------------------------------------------------------
# one configuration (runs in a child process)
# --------------------------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    """Peak resident memory of this process plus its largest finished child (loader workers), MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + kids) / 1024, 1)


def _toy_store(root: Path, batch: int, patch: int) -> Path:
    from drasclr_lib.testing import make_toy_store

    store = root / f"store_b{batch}_p{patch}"
    if not store.exists():  # shared by the configurations of one run
        make_toy_store(store, n_subjects=batch + 8, patch_size=patch)
    return store


def _synthetic_batch(batch: int, patch: int, kn: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, patch, patch, patch, generator=g) * 2 - 1
    return {"x_q": x.to(device), "x_k": (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1).to(device),
            "x_nbr": (torch.rand(batch, kn, 1, patch, patch, patch, generator=g) * 2 - 1).to(device),
            "loc_idx": torch.zeros(batch, dtype=torch.long, device=device),
            "loc": torch.full((batch, 3), 0.1, device=device),
            "nbr_locs": torch.stack([torch.full((batch, 3), 0.1 * (j + 2)) for j in range(kn)], 1).to(device),
            "subject": torch.arange(batch, device=device)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(step, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return float(counter.get_total_flops())


def run_whole(cfg: dict) -> dict:
    """``pretrain`` on a toy store; seconds per step from its history (after ``warmup`` steps)."""
    import csv

    from drasclr_lib.training import PretrainConfig, pretrain

    store = _toy_store(Path(cfg["tmp"]), cfg["batch"], cfg["patch"])
    out = Path(tempfile.mkdtemp(dir=cfg["tmp"]))
    n = cfg["warmup"] + cfg["steps"]
    pc = PretrainConfig(store=str(store), out_dir=str(out), batch_size=cfg["batch"], max_steps=n, log_every=1,
                        tensorboard=False, save_every_steps=0, progress=False, device=cfg["device"],
                        workers=cfg["workers"], precision=cfg["precision"], memory_format=cfg["memory_format"],
                        augment_on=cfg["augment_on"], host_memory=cfg["host_memory"],
                        compile=cfg.get("compile", False))
    pretrain(pc)
    with open(out / "history.csv", encoding="utf-8") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    effective = json.loads((out / "config.json").read_text(encoding="utf-8"))["effective"]
    dt = (seconds[-1] - seconds[cfg["warmup"] - 1]) / cfg["steps"]
    return {"s_per_step": dt, "anchors_per_s": cfg["batch"] / dt, "precision": effective["precision"],
            "memory_format": effective["memory_format"], "augment_on": effective["augment_on"],
            "host_memory": effective["host_memory"], "compile": cfg.get("compile", False)}


def run_model(cfg: dict) -> dict:
    """``train_step`` on batches in memory, with the precision and layout a run would use."""
    from drasclr_lib.host_memory import keep_freed_memory
    from drasclr_lib.models import DrasCLR, DrasEncoder
    from drasclr_lib.training import PretrainConfig
    from drasclr_lib.training.config import resolve_speed
    from drasclr_lib.training.loop import train_step

    device = torch.device(cfg["device"])
    speed = resolve_speed(PretrainConfig(precision=cfg["precision"], memory_format=cfg["memory_format"],
                                         host_memory=cfg["host_memory"]), device)
    torch.manual_seed(0)
    model = DrasCLR(DrasEncoder(), num_locations=4, queue_size=4096).to(device).train()
    model.set_channels_last(speed["memory_format"] == "channels_last")
    if cfg.get("compile"):
        model.encoder_q.compile()
        model.encoder_k.compile()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=speed["precision"] == "fp16")
    batch = _synthetic_batch(cfg["batch"], cfg["patch"], cfg["neighbors"], device)

    def step(b):
        train_step(model, opt, scaler, b, precision=speed["precision"])

    with keep_freed_memory(speed["host_memory"] == "keep"):
        return {**_time_steps(step, batch, cfg, device), **speed, "compile": cfg.get("compile", False)}


def _time_steps(step, batch: dict, cfg: dict, device) -> dict:
    # compiled encoders: no FLOP count (the counter's dispatch mode would be traced into the graphs);
    # the same network's count comes from the eager rows. The warm-up steps hold the compiling.
    flops = None if cfg.get("compile") else _count_flops(step, batch)
    t0 = time.perf_counter()
    for _ in range(max(cfg["warmup"] - (flops is not None), 0)):
        step(batch)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # the median step: robust to a neighbour's burst on a shared machine
    res = {"s_per_step": dt, "anchors_per_s": cfg["batch"] / dt, "step_times": [round(t, 4) for t in times],
           "warmup_s": round(warmup_s, 1)}
    if flops is not None:
        res.update(gflop_per_anchor=flops / cfg["batch"] / 1e9, gflops=flops / dt / 1e9)
    if device.type == "cuda":
        res["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return res


def _import_published():
    """The published ``models.builder`` and ``models.cnn3d`` (registered as ``models.*`` while they load)."""
    pkg = types.ModuleType("models")
    pkg.__path__ = [str(PUBLISHED / "models")]
    sys.modules["models"] = pkg
    loaded = {}
    for short in ("condconv3d", "cnn3d", "builder"):
        spec = importlib.util.spec_from_file_location(f"models.{short}", PUBLISHED / "models" / f"{short}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"models.{short}"] = mod
        spec.loader.exec_module(mod)
        loaded[short] = mod
    return loaded["builder"], loaded["cnn3d"]


def run_published(cfg: dict) -> dict:
    """The published training step (float32, per-sample CondConv loop) in a one-process gloo group on the CPU."""
    import torch.distributed as dist

    if cfg["patch"] != 32:
        raise ValueError("the published neighbour path hard-codes 32³ patches")
    builder, cnn3d = _import_published()
    torch.Tensor.cuda = lambda self, *a, **k: self  # this child process only
    dist.init_process_group("gloo", store=dist.FileStore(str(Path(cfg["tmp"]) / f"gloo_{os.getpid()}"), 1),
                            rank=0, world_size=1)
    torch.manual_seed(0)
    queue = 4096 // cfg["batch"] * cfg["batch"]
    model = builder.DrasCLR(cnn3d.Encoder, 4, 128, 128, 8, 1, queue, 0.999, 0.2, True).train()
    opt = torch.optim.SGD(model.parameters(), 1e-3, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    batch = _synthetic_batch(cfg["batch"], cfg["patch"], cfg["neighbors"], torch.device("cpu"))

    def step(b):
        logits_pch, logits_ngb, labels = model(patch_idx=0, pch_q=[b["x_q"], b["loc"]], pch_k=[b["x_k"], b["loc"]],
                                               ngb_q=[b["x_nbr"][:, :, 0], b["nbr_locs"]])
        loss = criterion(logits_pch, labels) + criterion(logits_ngb, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    try:
        return {**_time_steps(step, batch, cfg, torch.device("cpu")), "precision": "fp32",
                "memory_format": "contiguous", "host_memory": "system"}
    finally:
        dist.destroy_process_group()


def child(cfg: dict) -> dict:
    """Run one configuration in this (fresh) process; returns its figures and peak RSS."""
    warnings.simplefilter("ignore")
    torch.set_num_threads(cfg["threads"])
    fn = {"whole": run_whole, "model": run_model, "published": run_published}[cfg["kind"]]
    t0 = time.perf_counter()
    res = fn(cfg)
    return {**res, "peak_rss_mib": _peak_rss_mib(), "wall_s": round(time.perf_counter() - t0, 1)}


def spawn(cfg: dict) -> dict:
    """Run :func:`child` in a subprocess (its own peak RSS, no state shared with the other configurations)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(cfg["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------
# the side-by-side run
# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--batch-sizes", default="32,128", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every configuration")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the whole step (pretrain's default)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (worker start-up, allocator)")
    p.add_argument("--neighbors", type=int, default=2)
    p.add_argument("--baseline", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the baseline ('today's path': contiguous layout, augmentation in the workers)")
    p.add_argument("--published-batches", default="32", help="batch sizes at which the published step runs ('' none)")
    p.add_argument("--compile", action="store_true",
                   help="also time the new defaults with torch.compile (pretrain --compile), whole and model step")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 4, 16 subjects, 2 + 1 steps")
    p.add_argument("--out", default="", help="JSON path (default benchmarks/results/train_<device>.json)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if a.quick:
        a.batch_sizes, a.steps, a.warmup, a.published_batches = "4", 1, 2, "4"
    batches = [int(b) for b in a.batch_sizes.split(",") if b]
    published_batches = {int(b) for b in a.published_batches.split(",") if b}
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"train_{device.type}{'_quick' if a.quick else ''}.json")
    peak = cuda_peak(device) if device.type == "cuda" else cpu_peak(a.threads)
    print(f"{platform.platform()}; torch {torch.__version__}; {peak['model']}; peak: {peak['formula']} = "
          f"{peak['fp32']} GFLOP/s fp32" if peak["fp32"] is None else
          f"{platform.platform()}; torch {torch.__version__}; {peak['model']}; peak: {peak['formula']} = "
          f"{peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16", flush=True)

    tmp = tempfile.TemporaryDirectory()
    common = {"device": str(device), "threads": a.threads, "steps": a.steps, "warmup": a.warmup, "patch": 32,
              "neighbors": a.neighbors, "tmp": tmp.name, "workers": a.workers}
    baseline = {"precision": a.baseline, "memory_format": "contiguous", "augment_on": "workers",
                "host_memory": "system"}
    new = {"precision": "auto", "memory_format": "auto", "augment_on": "auto", "host_memory": "auto"}
    rows = []
    for b in batches:
        plan = [("whole", "baseline", baseline), ("whole", "new", new), ("model", "baseline", baseline),
                ("model", "new", new)]
        if b == batches[0] and not a.quick:  # the candidates one at a time: which setting brings what
            low = "fp16" if device.type == "cuda" else "bf16"
            plan += [("model", f"{low} only", {**baseline, "precision": low}),
                     ("model", "cl only", {**baseline, "memory_format": "channels_last"}),
                    ("model", "keep only", {**baseline, "host_memory": "keep"})]
        if b == batches[0] and a.compile:  # the new defaults with torch.compile (opt-in: minutes of compiling)
            plan += [("whole", "new+compile", {**new, "compile": True}), ("model", "new+compile", {**new, "compile": True})]
        if b in published_batches and device.type == "cpu" and PUBLISHED.is_dir():
            plan.append(("published", "published", baseline))
        for kind, label, settings in plan:
            cfg = {**common, **settings, "batch": b, "kind": kind}
            if kind == "published":
                cfg["steps"] = max(1, min(a.steps, 2))
                cfg["warmup"] = 1
            res = spawn(cfg)
            rows.append({"batch": b, "kind": kind, "path": label, **res})
            msg = res.get("error") or f"{res['anchors_per_s']:.1f} anchors/s ({res['precision']}, {res['memory_format']}, {res['host_memory']} memory)"
            print(f"batch {b:>4} {kind:<9} {label:<10} {msg}; peak RSS {res.get('peak_rss_mib', '?')} MiB", flush=True)

    # FLOPs per anchor of the model step (the same network in every path), GFLOP/s and fractions of peak
    flop_rows = [r for r in rows if r.get("gflop_per_anchor")]
    gflop_anchor = flop_rows[0]["gflop_per_anchor"] if flop_rows else None
    for r in rows:
        if "error" in r or gflop_anchor is None:
            continue
        r["gflops"] = r["anchors_per_s"] * gflop_anchor
        pk = peak.get(r["precision"]) or peak.get("fp32")
        r["fraction_of_peak"] = r["gflops"] / pk if pk else None
        r["fraction_of_fp32_peak"] = r["gflops"] / peak["fp32"] if peak.get("fp32") else None
        if "fp32_microarch" in peak:
            r["fraction_of_fp32_microarch_peak"] = r["gflops"] / peak["fp32_microarch"]
        if r["kind"] == "whole":
            r["paper_schedule_hours"] = PAPER_ANCHORS / r["anchors_per_s"] / 3600

    def get(b, kind, path):
        return next((r for r in rows if r["batch"] == b and r["kind"] == kind and r["path"] == path
                     and "error" not in r), None)

    ratios = {}
    for b in batches:
        wb, wn, mb, mn, pub = (get(b, "whole", "baseline"), get(b, "whole", "new"), get(b, "model", "baseline"),
                               get(b, "model", "new"), get(b, "published", "published"))
        ratios[b] = {"whole_new_over_whole_baseline": wn and wb and wn["anchors_per_s"] / wb["anchors_per_s"],
                     "whole_new_over_published": wn and pub and wn["anchors_per_s"] / pub["anchors_per_s"],
                     "model_new_over_model_baseline": mn and mb and mn["anchors_per_s"] / mb["anchors_per_s"],
                     "model_new_fraction_of_fp32_peak": mn and mn.get("fraction_of_fp32_peak")}

    print(f"\n| batch | step | path | precision, layout, host memory | anchors/s | GFLOP/s | of peak | peak RSS MiB |\n"
          f"|---:|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['kind']} | {r['path']} | - | failed: {r['error'][:80]} | | | |")
            continue
        frac = f"{100 * r['fraction_of_peak']:.1f} %" if r.get("fraction_of_peak") else "-"
        gf = f"{r['gflops']:.1f}" if r.get("gflops") else "-"
        mem = f"{r['peak_rss_mib']:.0f}" + (f" (GPU {r['peak_gpu_mib']:.0f})" if "peak_gpu_mib" in r else "")
        print(f"| {r['batch']} | {r['kind']} | {r['path']} | {r['precision']}, {r['memory_format']}, {r['host_memory']} | "
              f"{r['anchors_per_s']:.1f} | {gf} | {frac} | {mem} |")
    for b, rt in ratios.items():
        parts = [f"{k} {v:.2f}" for k, v in rt.items() if v]
        print(f"batch {b}: " + "; ".join(parts))
    wn = [r for r in rows if r["kind"] == "whole" and r["path"] == "new" and "paper_schedule_hours" in r]
    if wn:
        best = max(wn, key=lambda r: r["anchors_per_s"])
        print(f"paper schedule ({PAPER_ANCHORS:.3g} anchors) at batch {best['batch']}: "
              f"{best['paper_schedule_hours']:.0f} h ({best['paper_schedule_hours'] / 24:.1f} days) on this {device.type}")

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "device": str(device), "threads": a.threads, "peak_gflops": peak},
              "settings": {"batch_sizes": batches, "steps": a.steps, "warmup": a.warmup, "workers": a.workers,
                           "neighbors": a.neighbors, "baseline": baseline, "new": new, "quick": a.quick,
                           "store": "toy (drasclr_lib.testing.make_toy_store, batch + 8 subjects, 18 locations, 32³)",
                           "command": "python benchmarks/bench_train.py " + " ".join(sys.argv[1:] if argv is None else argv)},
              "gflop_per_anchor": gflop_anchor, "rows": rows, "ratios": ratios,
              "paper_anchors": PAPER_ANCHORS}
    save_json(result, out)
    print(f"\nwrote {out}")
    tmp.cleanup()
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
