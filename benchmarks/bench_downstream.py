"""Rerun the whole downstream comparison (notebook 04) at a larger, documented setting, on CPU.

Pipeline: synthetic cohort (``make_cohort``) -> patch store (``preprocess_cohort``) -> three
pretraining runs with one budget (MoCo, DrasCLR without the neighbour loss, DrasCLR) -> patch
embeddings of those and of the random-weight encoder -> ``run_downstream`` (with the %LAA-950 +
lung volume baseline) -> ``benchmarks/results/downstream_table.csv`` (+ per-fold table and a JSON
with the setting and timings).

Default setting (the README's table; 28 min on 2 CPU cores shared with another benchmark, load ~4:
cohort 26 s, preprocessing 235 s, three pretraining runs + embeddings 1082 s, downstream 307 s)::

    python benchmarks/bench_downstream.py --n-subjects 36 --cohort-seed 1 --max-steps 200 --batch-size 16

Regenerate the table on a cohort drawn with another seed: ``--cohort-seed 11`` (fresh cache folder).

Every stage is cached in ``--work`` (cohort, store, pretraining runs), so an interrupted run
continues where it stopped; a different cohort seed or size uses fresh folders.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-subjects", type=int, default=36, help="synthetic cohort size")
    p.add_argument("--cohort-seed", type=int, default=1, help="seed of the synthetic cohort")
    p.add_argument("--size", default="demo", help="synthetic subject size ('demo', 'adult' or a scale)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, random encoder and pretraining")
    p.add_argument("--epochs", type=int, default=1, help="epochs spanned by each pretraining schedule")
    p.add_argument("--max-steps", type=int, default=200, help="pretraining steps per method (0: full epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="pretraining batch (one location, many subjects)")
    p.add_argument("--lr", type=float, default=0.01,
                   help="pretraining learning rate at batch 128 (published 0.01), scaled linearly to the batch")
    p.add_argument("--queue-size", type=int, default=4096, help="negatives per location (capped for small cohorts)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--tasks", default="paper",
                   help='outcomes: "paper" or e.g. "FEV1pp:continuous, GOLD:ordinal, time+event:survival"')
    p.add_argument("--pca-components", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="processes for cohort generation, preprocessing, loading")
    p.add_argument("--work", default=str(REPO / "outputs" / "bench_downstream"), help="cache folder")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the tables go")
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from drasclr_lib.data.synthetic import make_cohort
    from drasclr_lib.downstream.ablations import prepare_embeddings
    from drasclr_lib.downstream.experiment import METHOD_LABELS, run_downstream
    from drasclr_lib.preprocess.cohort import preprocess_cohort
    from drasclr_lib.training import PretrainConfig
    from drasclr_lib.utils import atomic_path, save_json

    work = Path(args.work) / f"n{args.n_subjects}_seed{args.cohort_seed}_{args.size}"
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name):
        t0 = time.perf_counter()
        print(f"[bench_downstream] {name} ...", flush=True)
        return lambda: timings.__setitem__(name, round(time.perf_counter() - t0, 1))

    done = stage("cohort")
    manifest = make_cohort(work / "cohort", args.n_subjects, args.cohort_seed, size=args.size, workers=args.workers,
                           progress=False)
    done()
    done = stage("preprocess")
    store = preprocess_cohort(manifest, work / "patch_store", workers=args.workers, progress=False)
    done()
    print(f"[bench_downstream] {store}", flush=True)
    base = PretrainConfig(store=str(store.root), epochs=args.epochs, max_steps=args.max_steps or None,
                          batch_size=args.batch_size, lr=args.lr, queue_size=args.queue_size, seed=args.seed,
                          workers=args.workers, device=args.device, tensorboard=False, progress=False)
    done = stage("pretrain + embed")
    embeddings, sources = prepare_embeddings(store, base, work / "runs", seed=args.seed, device=args.device,
                                             progress=False)
    done()
    done = stage("downstream")
    res = run_downstream(store, embeddings, tasks=args.tasks, folds=args.folds, seed=args.seed,
                         pca_components=args.pca_components, progress=False)
    done()
    for name, df in (("downstream_table.csv", res.table), ("downstream_per_fold.csv", res.per_fold)):
        with atomic_path(results / name) as tmp:
            df.to_csv(tmp, index=False)
    setting = {k: v for k, v in vars(args).items() if k not in {"work", "results"}}
    save_json({"setting": setting, "num_subjects": store.num_subjects, "num_locations": store.num_locations,
               "failures": int(len(store.failures())), "weights": sources, "timings_s": timings,
               "pretrain_budget": base.to_dict(), "downstream_settings": res.settings, "results": res.metrics()},
              results / "downstream.json")
    order = [m for m in METHOD_LABELS if m in set(res.table.method)]
    pivot = res.table.pivot_table(index=["task", "metric"], columns="method", values="mean", sort=False)[order]
    print(pivot.round(3).to_string())
    print(f"[bench_downstream] timings (s): {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
