"""Seconds per pretraining step against the number of DataLoader workers, on a real patch store.

Why it exists: on a 2-core CPU, DrasCLR with its neighbour views in bfloat16 ran 5x slower with the
two loader workers the benchmarks asked for than with none (the workers' augmentation and the
training threads' spinning waits starve each other). ``PretrainConfig.workers`` is now capped on
the CPU (``drasclr_lib.training.config.loader_workers``); this script lifts the cap to measure what
each worker count costs, side by side in one run::

    python benchmarks/bench_loader_workers.py --store /tmp/bp_q/n40_seed17_demo/patch_store

Each setting is a fresh ``pretrain`` of ``--steps`` steps (the first logging window, which holds
start-up, is reported apart). Writes ``benchmarks/results/loader_workers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a patch store (e.g. one bench_paper.py built)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["auto", "fp32"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader_workers.json"))
    args = p.parse_args(argv)

    import pandas as pd
    import torch

    import drasclr_lib.training.config as config
    from drasclr_lib.training import PretrainConfig, pretrain
    from drasclr_lib.utils import save_json

    config._usable_cores = lambda: 1024  # lift the cap: measure exactly the worker counts asked for
    rows = []
    for precision in args.precisions:
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as out:
                cfg = PretrainConfig(store=args.store, out_dir=out, max_steps=args.steps, batch_size=args.batch_size,
                                     precision=precision, workers=workers, epochs=1, log_every=4, tensorboard=False,
                                     progress=False)
                t0 = time.perf_counter()
                pretrain(cfg)
                wall = time.perf_counter() - t0
                sec = pd.read_csv(Path(out) / "history.csv")["seconds"].to_numpy()
            steady = (sec[-1] - sec[0]) / (args.steps - 4)
            rows.append({"precision": precision, "workers": workers, "seconds_per_step": round(float(steady), 3),
                         "first_window_s": round(float(sec[0]), 2), "wall_s": round(wall, 1)})
            print(rows[-1], flush=True)
    save_json({"store": args.store, "steps": args.steps, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "load_average_after": list(os.getloadavg()), "torch": torch.__version__,
               "rows": rows}, args.out)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
