"""Label efficiency of emphysema segmentation in a larger setting than the notebook's CI run.

Stages (each resumable; a rerun skips what is done):

1. a synthetic cohort (``make_cohort``, ``--n-subjects`` subjects, ``--cohort-seed``);
2. its patch store (``preprocess_cohort``, atlas built from the cohort);
3. a DrasCLR pretraining run (``--pretrain-steps`` steps of batch ``--pretrain-batch``) and a
   plain-MoCo run with the same budget (``drasclr_lib.training.runs.ensure_checkpoint``);
4. fine-tuning from random weights, MoCo and DrasCLR with 5 %, 10 %, 25 % and 100 % of the
   labelled training subjects over ``--seeds`` seeds (``label_efficiency``, runs cached), each
   model scored on the held-out subjects inside their lung masks, like the rules it is compared with;
5. ``benchmarks/results/segmentation.csv`` (every run), ``segmentation_summary.csv`` (mean ± sd),
   ``segmentation_curve.png`` and ``segmentation.json`` (settings, baselines, timings).

Documented setting (the default arguments: 24 subjects, 150 pretraining steps of 16, 150 fine-tuning
steps of 8, 3 seeds; about 35 min on 2 idle CPU cores, an hour when they are shared)::

    python benchmarks/bench_segmentation.py --work /tmp/bench_seg

Regenerate the curve on a cohort drawn with another seed::

    python benchmarks/bench_segmentation.py --work /tmp/bench_seg_s11 --cohort-seed 11

Smoke run (minutes)::

    python benchmarks/bench_segmentation.py --work /tmp/bench_seg_q --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench_segmentation", help="working folder (cohort, store, runs)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the result files go")
    ap.add_argument("--n-subjects", type=int, default=24)
    ap.add_argument("--cohort-seed", type=int, default=7)
    ap.add_argument("--size", default="demo", help="synthetic size: demo, adult or a float scale")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--fractions", default="0.05,0.1,0.25,1.0")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--num-classes", type=int, default=2)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--eval-patches", type=int, default=48)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="8 subjects, 20 pretraining steps, 10 fine-tuning steps, 1 seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_subjects, args.pretrain_steps, args.steps, args.seeds, args.fractions = 8, 20, 10, 1, "0.25,1.0"

    from drasclr_lib.data.synthetic import make_cohort
    from drasclr_lib.training.runs import ensure_checkpoint
    from drasclr_lib.preprocess.cohort import preprocess_cohort
    from drasclr_lib.segmentation import SegConfig
    from drasclr_lib.segmentation import experiment as ex
    from drasclr_lib.segmentation.baselines import baseline_dice
    from drasclr_lib.training import PretrainConfig, pretrain
    from drasclr_lib.utils import save_json

    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    times = {}
    t = time.perf_counter()
    manifest = make_cohort(work / "cohort", n_subjects=args.n_subjects, seed=args.cohort_seed, size=args.size,
                           workers=args.workers)
    times["cohort_s"] = time.perf_counter() - t
    t = time.perf_counter()
    store = preprocess_cohort(manifest, work / "patch_store", workers=args.workers)
    times["preprocess_s"] = time.perf_counter() - t

    if args.pretrain_batch > store.num_subjects:  # a batch holds distinct subjects of one location
        print(f"pretrain batch {args.pretrain_batch} -> {store.num_subjects} (the store's subjects)")
        args.pretrain_batch = store.num_subjects
    t = time.perf_counter()
    base = PretrainConfig(store=str(store.root), out_dir=str(work / "ckpt_drasclr"), epochs=1,
                          max_steps=args.pretrain_steps, batch_size=args.pretrain_batch,
                          queue_size=max(args.pretrain_batch, 64), workers=args.workers, device=args.device,
                          tensorboard=False, resume=True)
    drasclr_ckpt = work / "ckpt_drasclr" / "checkpoint.pt"
    if not (work / "ckpt_drasclr" / "done.json").exists():
        drasclr_ckpt = Path(pretrain(base))
        save_json({"checkpoint": str(drasclr_ckpt)}, work / "ckpt_drasclr" / "done.json")
    moco_ckpt, moco_how = ensure_checkpoint("moco", base.replace(out_dir=""), work)
    times["pretrain_s"] = time.perf_counter() - t

    train_pool, test_idx = ex.split_subjects(store, test_fraction=args.test_fraction, seed=0)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    cfg = SegConfig(num_classes=args.num_classes, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    eval_patches=args.eval_patches, device=args.device)
    inits = {"random": None, "moco": moco_ckpt, "drasclr": drasclr_ckpt}
    # models and rules are scored inside the lung (as whole-scan inference restricts to it): air outside
    # the body is below -950 HU too, and only the lung-restricted rule would otherwise get that for free
    lung_masks = dict(zip(store.table["sid"], store.table["lung_mask"])) if "lung_mask" in store.table else None
    t = time.perf_counter()
    runs = ex.label_efficiency(store, train_subjects=train_pool, test_subjects=test_idx, fractions=fractions,
                               inits=inits, seeds=tuple(range(args.seeds)), cfg=cfg, lung_masks=lung_masks,
                               cache_dir=work / "runs")
    times["finetune_s"] = time.perf_counter() - t
    summary = ex.summarize(runs)
    rules = {"every lung voxel": "all_lung", "-950 HU in the lung": "laa950"} if lung_masks else {"-950 HU": "laa950"}
    baselines = {k: float(baseline_dice(store, test_idx, rule=r, num_classes=args.num_classes, lung_masks=lung_masks,
                                        max_patches=args.eval_patches or None)["dice"].mean())
                 for k, r in rules.items()}

    import matplotlib
    matplotlib.use("Agg")
    fig = ex.plot_label_efficiency(summary, baselines=baselines,
                                   title=f"Label efficiency, {args.n_subjects} synthetic subjects (cohort seed "
                                         f"{args.cohort_seed})")
    fig.savefig(results / "segmentation_curve.png", dpi=120)
    runs.to_csv(results / "segmentation.csv", index=False)
    summary.to_csv(results / "segmentation_summary.csv", index=False)
    save_json({"settings": vars(args), "n_train_pool": len(train_pool), "test_sids": [store.sids[i] for i in test_idx],
               "moco_source": moco_how, "baselines": baselines, "summary": summary.to_dict("records"),
               "seconds": times, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                             "torch_threads": __import__("torch").get_num_threads()}},
              results / "segmentation.json")
    print(summary.pivot(index="init", columns="fraction", values="dice").round(3).to_string())
    print("baselines:", json.dumps({k: round(v, 3) for k, v in baselines.items()}))
    print("seconds:", json.dumps({k: round(v) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
