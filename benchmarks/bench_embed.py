"""Embedding speed: a cohort batched by location, and one new scan with every patch at its own location.

    .venv/bin/python benchmarks/bench_embed.py --threads 2            # writes benchmarks/results/embed.json

Targets (issue 5, 2 CPU cores): cohort >= 250 patches/s; one adult scan (~580 patches, all
locations different) <= 5 s. The encoder is the published DrasEncoder (conditional, 8 experts,
~0.19 GFLOP per patch forward) with random weights; patches are the toy store's lung-like HU (drasclr_lib.testing). The machine's
load average is recorded next to the timings, since other processes on the same cores slow
everything down proportionally. ``--host-memory system,keep`` (the default) times both settings of
:mod:`drasclr_lib.host_memory` side by side; ``cohort`` and ``single_scan`` hold the last one's.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the target is for 2 cores)")
    ap.add_argument("--subjects", type=int, default=64, help="cohort size of the location-batched run")
    ap.add_argument("--locations", type=int, default=12, help="locations per subject of the cohort run")
    ap.add_argument("--cohort-batch-sizes", default="32,64,256",
                    help="batch sizes tried for the cohort (embed_cohort's CPU default is 32)")
    ap.add_argument("--scan-patches", type=int, default=580, help="patches of the single new scan")
    ap.add_argument("--batch-sizes", default="32,64,128", help="batch sizes tried for the single scan")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--host-memory", default="system,keep",
                    help="host_memory settings timed side by side (drasclr_lib.host_memory; 'auto' is keep on Linux)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed.json"))
    args = ap.parse_args(argv)

    import torch

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.embed import cohort_batch_size, embed_cohort, embed_subject
    from drasclr_lib.models import random_encoder
    from drasclr_lib.testing import make_toy_store
    from drasclr_lib.utils import save_json

    torch.set_num_threads(args.threads)
    memories = [m for m in args.host_memory.split(",") if m]
    res_note = "cohort / single_scan: the last --host-memory setting"
    enc = random_encoder(0)
    rng = np.random.default_rng(1)
    res = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "processor": platform.processor() or platform.machine(), "load_average_before": os.getloadavg(),
           "host_memory": memories, "note": res_note}
    with tempfile.TemporaryDirectory() as tmp:
        store = PatchStore(make_toy_store(Path(tmp) / "store", n_subjects=args.subjects, grid=(args.locations, 1, 1),
                                          with_labels=False))
        n = store.num_subjects * store.num_locations
        embed_cohort(enc, store, subjects=list(range(min(8, args.subjects))), progress=False, device="cpu")  # warm-up
        by_memory = {}
        for _ in range(args.repeats):  # batch sizes and memory settings interleaved: side by side under the same load
            for hm in memories:
                cohort = by_memory.setdefault(hm, {})
                for bs in [int(b) for b in args.cohort_batch_sizes.split(",")]:
                    t0 = time.perf_counter()
                    embed_cohort(enc, store, batch_size=bs, progress=False, device="cpu", host_memory=hm)
                    cohort[bs] = min(cohort.get(bs, float("inf")), time.perf_counter() - t0)
        for hm, cohort in by_memory.items():
            for bs, sec in cohort.items():
                print(f"cohort ({hm} host memory): {n} patches, one location x {min(args.subjects, bs)} subjects per "
                      f"batch: {sec:.2f} s = {n / sec:.0f} patches/s (target >= 250)")
        default = cohort_batch_size(torch.device("cpu"))
        res["cohort_by_host_memory"] = {}
        for hm, cohort in by_memory.items():
            best = min(cohort, key=cohort.get)
            res["cohort_by_host_memory"][hm] = {
                "subjects": args.subjects, "locations": args.locations, "patches": n,
                "seconds_by_batch_size": {str(b): v for b, v in cohort.items()},
                "patches_per_s_by_batch_size": {str(b): n / v for b, v in cohort.items()},
                "best_batch_size": best, "default_batch_size": default,
                "seconds": cohort.get(default, cohort[best]),
                "patches_per_s": n / cohort.get(default, cohort[best]), "target_patches_per_s": 250}
        res["cohort"] = res["cohort_by_host_memory"][memories[-1]]

    patches = rng.normal(-800, 120, size=(args.scan_patches, 32, 32, 32)).astype(np.int16)
    corners = rng.integers(10, 300, size=(args.scan_patches, 3))
    from drasclr_lib.preprocess.landmarks import normalize_locations

    locs = normalize_locations(corners)
    assert len(np.unique(locs, axis=0)) == args.scan_patches, "locations must all differ"
    res["single_scan_by_host_memory"] = {}
    for hm in memories:
        scan = {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            embed_subject(enc, patches[:bs], locs[:bs], batch_size=bs, device="cpu", host_memory=hm)  # warm-up
            best = min(_timed(lambda: embed_subject(enc, patches, locs, batch_size=bs, device="cpu", host_memory=hm))
                       for _ in range(args.repeats))
            scan[str(bs)] = best
            print(f"one scan ({hm} host memory): {args.scan_patches} patches, all locations different, batch {bs}: "
                  f"{best:.2f} s")
        bs_best = min(scan, key=scan.get)
        res["single_scan_by_host_memory"][hm] = {
            "patches": args.scan_patches, "seconds_by_batch_size": scan, "best_batch_size": int(bs_best),
            "seconds": scan[bs_best], "target_seconds": 5.0}
    res["single_scan"] = res["single_scan_by_host_memory"][memories[-1]]
    res["load_average_after"] = os.getloadavg()
    save_json(res, args.out)
    print(f"load average before/after: {res['load_average_before']} / {res['load_average_after']}; -> {args.out}")
    return 0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
