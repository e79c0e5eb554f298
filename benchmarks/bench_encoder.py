"""Encoder forward+backward throughput: batched conditional convolution vs the per-sample loop.

Measures patches/s of ``DrasEncoder`` forward + backward (the training workload) with the batched
``CondConv3d`` paths and with the published per-sample-loop definition (``forward_loop``), on
the same machine in the same run, interleaving the two so that machine load affects both alike
(warm-up, then the median of repeats). Batch kinds:

* ``one-location``: every patch at one location (a DrasCLR training batch);
* ``3-locations``: three locations in the batch (a neighbour batch: k=2 neighbours + anchor);
* ``all-different``: every patch at its own location (grouped-convolution path).

FLOPs are counted from the architecture (multiply-accumulates of every convolution and linear
layer x 2; backward = 2x forward), and the paper's full pretraining schedule is projected from
the measured throughput.

Usage::

    python benchmarks/bench_encoder.py                      # CPU, 2 threads, batch 32 and 128
    python benchmarks/bench_encoder.py --device cuda        # a GPU (AMP off; add --amp for bf16)
    python benchmarks/bench_encoder.py --quick              # smoke run (batch 8, 1 repeat)

Writes ``benchmarks/results/encoder.json`` (``encoder_<device>.json`` for non-CPU devices) and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drasclr_lib.models import DrasEncoder  # noqa: E402
from drasclr_lib.models.condconv import CondConv3d  # noqa: E402
from drasclr_lib.utils import resolve_device, save_json  # noqa: E402

# Paper's full schedule: 20 epochs x 581 locations x ~9,000 COPDGene subjects.
SCHEDULE = {"epochs": 20, "locations": 581, "subjects": 9000, "neighbors": 2}


def count_flops(encoder: DrasEncoder, patch: int = 32) -> dict:
    """Forward FLOPs per patch (2 x multiply-accumulates) of every conv and linear layer.

    Counted with forward hooks on one patch: a 3x3x3 convolution costs
    ``out_voxels * C_out * C_in * 27`` MACs (zero padding counted as full windows), the
    per-location kernel mixing ``E * C_out * C_in * 27`` MACs, a linear layer ``in * out``.
    Backward costs twice the forward (gradient w.r.t. input and w.r.t. weights).
    """
    macs = {"conv": 0, "kernel_mix": 0, "linear": 0}

    def hook(mod, inp, out):
        if isinstance(mod, (CondConv3d, torch.nn.Conv3d)):
            w = mod.weight
            cout, cin, k = (w.shape[1], w.shape[2], w.shape[3]) if w.dim() == 6 else (w.shape[0], w.shape[1], w.shape[2])
            macs["conv"] += out[0].numel() * cin * k ** 3 if out.dim() == 5 else 0
            if w.dim() == 6:
                macs["kernel_mix"] += w.numel()
        elif isinstance(mod, torch.nn.Linear):
            macs["linear"] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in encoder.modules()
               if isinstance(m, (CondConv3d, torch.nn.Conv3d, torch.nn.Linear))]  # incl. routing Linear(3, E)
    enc = encoder.eval()
    with torch.no_grad():
        enc(torch.zeros(1, 1, patch, patch, patch), torch.zeros(1, 3))
    for h in handles:
        h.remove()
    fwd = 2 * (macs["conv"] + macs["linear"])
    return {"forward_gflop_per_patch": fwd / 1e9, "fwd_bwd_gflop_per_patch": 3 * fwd / 1e9,
            "conv_macs": macs["conv"], "linear_macs": macs["linear"],
            "kernel_mix_gflop_per_batch_location": 2 * macs["kernel_mix"] / 1e9}


def make_locs(kind: str, b: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "one-location":
        return (torch.rand(1, 3, generator=gen) * 2 - 1).expand(b, 3).clone()
    if kind == "3-locations":
        three = torch.rand(3, 3, generator=gen) * 2 - 1
        return three[torch.arange(b) % 3]
    if kind == "all-different":
        return torch.rand(b, 3, generator=gen) * 2 - 1
    raise ValueError(f"unknown batch kind {kind!r}")


def step_fn(encoder: DrasEncoder, x, loc, loop: bool, device, amp: bool):
    def run():
        encoder.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z, h = encoder.forward_loop(x, loc) if loop else encoder(x, loc)
        (z.float().square().mean() + h.float().mean()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def contention_note(load_start, load_end, cpus) -> str:
    """Say whether other processes competed for the CPU during the run (from the load averages)."""
    if not load_start or not load_end or not cpus:
        return "load average unavailable"
    peak = max(load_start[0], load_end[0])
    if peak > 1.5 * cpus:
        return (f"CPU oversubscribed by other processes (1-min load {load_start[0]:.1f} at start, {load_end[0]:.1f} at "
                f"end, on {cpus} CPUs): absolute throughput is well below an idle machine's; batched and loop were "
                "interleaved, so their ratio is the comparable figure")
    return f"1-min load {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, on {cpus} CPUs"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--kinds", nargs="+", default=["one-location", "3-locations", "all-different"])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-loop", action="store_true", help="skip the per-sample-loop reference")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    ap.add_argument("--quick", action="store_true", help="batch 8, 1 repeat (smoke test)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.warmup = [8], 1, 1
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    encoder = DrasEncoder().to(device).train()
    flops = count_flops(DrasEncoder())
    fb_gflop = flops["fwd_bwd_gflop_per_patch"]
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in args.batches:
        x = (torch.rand(b, 1, 32, 32, 32, generator=gen) * 2 - 1).to(device)
        for kind in args.kinds:
            loc = make_locs(kind, b, gen).to(device)
            variants = {"batched": step_fn(encoder, x, loc, False, device, args.amp)}
            if not args.no_loop:
                variants["loop"] = step_fn(encoder, x, loc, True, device, args.amp)
            for fn in variants.values():
                for _ in range(args.warmup):
                    fn()
            times = {name: [] for name in variants}
            for _ in range(args.repeats):  # interleaved: batched, loop, batched, loop, ...
                for name, fn in variants.items():
                    times[name].append(timed(fn))
            row = {"batch": b, "kind": kind}
            for name, ts in times.items():
                med = statistics.median(ts)
                row[f"{name}_s"] = med
                row[f"{name}_times_s"] = ts
                row[f"{name}_patches_per_s"] = b / med
                row[f"{name}_gflops"] = b * fb_gflop / med
            if "loop" in times:
                row["speedup"] = row["loop_s"] / row["batched_s"]
            rows.append(row)
            print(f"batch {b:4d} {kind:14s} batched {row['batched_patches_per_s']:8.1f} patches/s"
                  + (f"  loop {row['loop_patches_per_s']:7.1f}  x{row['speedup']:.2f}" if "loop" in times else ""),
                  flush=True)

    # projected full schedule: per anchor, query + 2 neighbours forward+backward, key forward only
    anchors = SCHEDULE["epochs"] * SCHEDULE["locations"] * SCHEDULE["subjects"]
    fb_units = (1 + SCHEDULE["neighbors"]) + 1 / 3  # key forward = 1/3 of a forward+backward
    projection = {}
    for row in rows:
        if row["kind"] != "one-location":
            continue
        for name in ("batched", "loop"):
            if f"{name}_patches_per_s" in row:
                secs = anchors * fb_units / row[f"{name}_patches_per_s"]
                projection[f"batch{row['batch']}_{name}_days"] = secs / 86400
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "torch": torch.__version__,
        "amp_bf16": bool(args.amp),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": "",
        "flops": flops,
        "schedule": SCHEDULE,
        "encoder_passes_per_anchor_in_fwd_bwd_units": fb_units,
        "projected_full_schedule": projection,
        "rows": rows,
        "command": ("OMP_WAIT_POLICY=" + os.environ["OMP_WAIT_POLICY"] + " " if "OMP_WAIT_POLICY" in os.environ else "")
        + "python benchmarks/bench_encoder.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result["note"] = contention_note(result["load_average_start"], result["load_average_end"], result["cpu_count"])
    if device.type == "cuda":
        result["note"] += "; GPU run"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "encoder.json" if device.type == "cpu" else f"encoder_{device.type}.json")
    save_json(result, out)
    print()
    print(markdown_table(result))
    print(f"\nwrote {out}")
    return result


def markdown_table(result: dict) -> str:
    f = result["flops"]
    lines = [f"Device: {result['device_name']} ({result['device']}, {result['torch_threads']} threads, "
             f"torch {result['torch']}); forward {f['forward_gflop_per_patch']:.3f} GFLOP/patch, "
             f"forward+backward {f['fwd_bwd_gflop_per_patch']:.3f} GFLOP/patch.",
             "",
             "| batch | locations in batch | batched patches/s | loop patches/s | speed-up | batched GFLOP/s | loop GFLOP/s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        loop_ps = f"{r['loop_patches_per_s']:.1f}" if "loop_s" in r else "—"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "—"
        loop_gf = f"{r['loop_gflops']:.1f}" if "loop_s" in r else "—"
        lines.append(f"| {r['batch']} | {r['kind']} | {r['batched_patches_per_s']:.1f} | {loop_ps} | {sp} | "
                     f"{r['batched_gflops']:.1f} | {loop_gf} |")
    if result.get("note"):
        lines.append("")
        lines.append(f"Note: {result['note']}.")
    if result["projected_full_schedule"]:
        lines.append("")
        proj = ", ".join(f"{k.replace('_days', '')}: {v:,.0f} days" for k, v in result["projected_full_schedule"].items())
        lines.append(f"Projected full schedule (20 epochs x 581 locations x 9,000 subjects, per anchor 3 "
                     f"forward+backward + 1 key forward) on this device: {proj}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
