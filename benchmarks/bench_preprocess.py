"""Preprocessing speed: one adult-size chest CT from its file to atlas patches, on 2 CPU cores.

The subject is a synthetic adult chest CT (``make_cohort(size="adult")``: about 350 x 300 x 310 mm
at 0.8 x 0.8 x 2.5 mm, so roughly 330 x 330 x 300 mm of body and field after resampling to 1 mm;
generated once and cached). It goes through every stage of ``preprocess_subject`` (the per-scan
pipeline ``process_scan``, then the store write) with our own
lung segmentation (no mask given, as for a real scan): read, resample to 1 mm (B-spline) with 60
voxels of padding, lung mask, affine registration of the lung mask to the atlas mask, patch cutting,
writing. The atlas is the published one (``../shared/reference``: 387 x 387 x 319 mm, 581
landmarks) when present, else another synthetic adult subject with the grid rule.

The process is pinned to 2 cores (CPU affinity) and SimpleITK uses 2 threads. The published
pipeline needed about 7 minutes per scan for the registration alone; the target here is at most
60 s for the whole pipeline.

Usage::

    python benchmarks/bench_preprocess.py              # 2 cores, 2 repeats
    python benchmarks/bench_preprocess.py --cores 4 --repeats 3
    python benchmarks/bench_preprocess.py --quick      # demo-size subject, 1 repeat (smoke run)

Writes ``benchmarks/results/preprocess.json`` and prints a markdown table (median over repeats;
the process's CPU time over all threads and the machine's load average are recorded too, since
other processes on a shared machine slow every stage).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _pin(cores: int) -> list[int]:
    avail = sorted(os.sched_getaffinity(0))
    chosen = avail[:cores]
    os.sched_setaffinity(0, set(chosen))
    return chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2, help="CPU cores to use (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (median reported)")
    ap.add_argument("--cache", default=str(ROOT / "outputs" / "bench_preprocess"), help="where the subject is generated")
    ap.add_argument("--atlas-mask", help="atlas lung mask (default: the published one, else a synthetic subject)")
    ap.add_argument("--landmarks", help="atlas landmarks .npy for --atlas-mask")
    ap.add_argument("--quick", action="store_true", help="demo-size subject, 1 repeat")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preprocess.json"))
    args = ap.parse_args(argv)

    cores = _pin(args.cores)
    import numpy as np
    import pandas as pd
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(len(cores))
    from drasclr_lib.data.synthetic import make_cohort
    from drasclr_lib.preprocess.atlas import Atlas
    from drasclr_lib.preprocess.cohort import preprocess_subject
    from drasclr_lib.preprocess.errors import STAGES
    from drasclr_lib.utils import save_json

    size = "demo" if args.quick else "adult"
    repeats = 1 if args.quick else args.repeats
    cache = Path(args.cache) / size
    manifest = make_cohort(cache, n_subjects=2, seed=0, size=size, workers=1, progress=False)
    df = pd.read_csv(manifest)
    for col in ("image", "lung_mask", "label_map", "lobe_map"):
        df[col] = [str((cache / p).resolve()) for p in df[col]]
    subject = df.iloc[0].to_dict()
    shared = ROOT / ".." / "shared" / "reference"
    if args.atlas_mask:
        atlas = Atlas.from_files(args.atlas_mask, args.landmarks)
    elif (shared / "atlas_lung_mask.nii.gz").exists():
        atlas = Atlas.from_files(shared / "atlas_lung_mask.nii.gz", shared / "atlas_patch_loc.npy")
    else:
        other = df.iloc[1]
        atlas = Atlas.from_subject(other["image"], other["lung_mask"], sid=other["sid"])

    ct = sitk.ReadImage(subject["image"])
    runs = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            # label maps dropped: the benchmark is a real scan's path (CT only, lungs segmented)
            rec = preprocess_subject({"sid": subject["sid"], "image": subject["image"]}, atlas, tmp, sid=subject["sid"])
            total, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.append({**{s: rec.times[s] for s in STAGES}, "total": total, "cpu_s": cpu, "reg_dice": rec.reg_dice,
                     "lung_volume_l": rec.lung_volume_l, "grid_1mm": rec.grid_1mm["size"]})
        print(f"run {r + 1}/{repeats}: {total:.1f} s wall, {cpu:.1f} s CPU (registration Dice {rec.reg_dice:.3f})",
              flush=True)

    med = {k: statistics.median(run[k] for run in runs) for k in (*STAGES, "total", "cpu_s")}
    grid = runs[0]["grid_1mm"]
    result = {
        "subject": {"size": size, "input_size": list(ct.GetSize()), "input_spacing_mm": list(ct.GetSpacing()),
                    "field_mm": [round(n * s) for n, s in zip(ct.GetSize(), ct.GetSpacing())], "grid_1mm_padded": grid,
                    "lung_volume_l": runs[0]["lung_volume_l"]},
        "atlas": atlas.source, "num_locations": atlas.num_locations,
        "cores": len(cores), "repeats": repeats, "median_s": med, "runs": runs,
        "reg_dice": [run["reg_dice"] for run in runs],
        "target_total_s": 60.0, "published_registration_s": 420.0,
        "machine": {"python": platform.python_version(), "simpleitk": sitk.Version.VersionString(),
                    "cpu_count": os.cpu_count(), "load_average_after": list(os.getloadavg()), "numpy": np.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(result, out)
    print(f"\n{size} subject {result['subject']['field_mm']} mm field -> {grid} voxels at 1 mm (padded), "
          f"atlas {atlas.num_locations} locations, {len(cores)} cores, median of {repeats}\n")
    print("| stage | seconds |\n|---|---:|")
    for s in (*STAGES, "total"):
        print(f"| {s} | {med[s]:.1f} |")
    print(f"\nCPU time of the whole run (all threads): {med['cpu_s']:.1f} s; "
          f"load average after the run: {os.getloadavg()[0]:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
