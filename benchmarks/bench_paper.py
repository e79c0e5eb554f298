"""The paper's experiments with enough subjects, seeds and folds to separate the methods (issue 17).

Stages (a progress bar over them; each one cached in ``--work``, so a killed run continues):

1. ``cohort``: a synthetic cohort (``make_cohort``, ``--n-subjects``, ``--cohort-seed``), or an
   existing patch store (``--store``, stages 1-2 skipped);
2. ``store``: its patch store (``preprocess_cohort``);
3. ``pretrain``: DrasCLR, DrasCLR without the neighbour loss and plain MoCo, each with ``--seeds``
   pretraining seeds at one budget (``--max-steps`` steps of ``--batch-size``;
   ``drasclr_lib.training.runs.ensure_checkpoint``: a finished run is reused, an unfinished one resumed
   from its last checkpoint, written every 100 steps). A run is ``--epochs`` epochs of the store at
   most (default 1; an epoch is subjects // batch x locations steps: 588 for the default 150 subjects
   x 147 locations at batch 32), with its cosine learning-rate schedule spanning those epochs;
   ``--max-steps`` stops it earlier on the same schedule, so with the same seed and ``--epochs`` a
   shorter budget is the beginning of a longer one. Stages 3, 4
   and 6 run ``--jobs`` runs at a time (``auto``: 2 on a CPU with 2+ cores, each on half the cores and
   without loader workers; 1 on a GPU);
4. ``embed``: patch embeddings of every encoder instance, ``--random-seeds`` random-weight encoders
   included (``<work>/embeddings/<method>_s<seed>.npz``, reused while the checkpoint's weights are the
   same);
5. ``downstream``: ``--repeats`` R x ``--folds`` K cross-validation; one ``run_downstream`` call per
   repeat (fold seed = repeat), so every method of a repeat is scored on the same folds
   (``<work>/downstream/repeat<r>.csv``). Methods: ``drasclr``, ``drasclr_no_nbr``, ``moco``,
   ``random`` (per seed), ``qct`` (%LAA-950 + lung volume), ``qct+drasclr`` (qct beside the DrasCLR
   pooled embedding reduced to ``--pca-components`` principal components, every column standardised:
   ``drasclr_lib.downstream.experiment.compose_blocks``) and ``oracle`` (the generator's latent
   variables: ``ORACLE_COLUMNS`` of ``drasclr_lib.data.synthetic.clinical`` when it defines them, else
   the columns below; those missing from the store are named in a warning). The oracle is a subject-level
   ceiling only: at patch level the generator's ground truth is the label patch itself, whose class
   fractions *are* the subtype target (AUC 1 by construction), which says nothing about the task;
   the subtype task therefore has no oracle row. Tasks: FEV1pp, FEV1_FVC, GOLD, emph_grade,
   paraseptal_grade, survival (C-index), patch-level subtype detection.
6. ``segmentation``: label-efficient fine-tuning with 4 classes (none, centrilobular, panlobular,
   paraseptal) from random weights, MoCo and DrasCLR (the seed-0 checkpoints of stage 3), at
   ``--seg-fractions`` of the labelled training subjects over ``--seg-seeds`` seeds (runs cached),
   beside the rules that need no training: ``laa950`` (-950 HU in the lung, every emphysema voxel
   called centrilobular) and ``laa950_position`` (the lobe / position heuristic of
   ``drasclr_lib.segmentation.baselines``; skipped with a printed note where this checkout's
   ``baseline_dice`` does not know the rule yet). With ``--jobs`` above 1 every init x fraction
   fine-tunes in a job of its own, ``--jobs`` at a time; each leaves its runs in the cache, where
   the stage's full ``label_efficiency`` call then finds them;
7. ``tables``: intervals (``drasclr_lib.downstream.stats``: Nadeau-Bengio corrected resampled
   t-test over the R x K splits, seeds averaged within a split; seed-to-seed SD beside it), written
   to ``--results`` (default ``benchmarks/results/paper/``):

   - ``per_fold.csv``: ``method, seed, repeat, fold, task, metric, value, n_train, n_test``, from
     which every interval can be recomputed (``seed`` empty for ``qct`` and ``oracle``);
   - ``summary.csv`` (mean, ci_low, ci_high, seed_sd per method, task, metric) + ``summary.png``;
   - ``paired.csv`` (DrasCLR - MoCo, DrasCLR - qct, qct+DrasCLR - qct, DrasCLR - DrasCLR w/o
     neighbours, DrasCLR - random; diff, ci_low, ci_high, p) + ``paired.png``;
   - ``segmentation.csv`` (every fine-tuning run and every rule) + ``segmentation.png``;
   - ``paper.json``: setting, seconds per stage (summed over resumed invocations), versions
     (python, torch, numpy, sklearn, lifelines, git commit), sources of the weights, notes.

Commands::

    python benchmarks/bench_paper.py --work /tmp/bench_paper             # the documented setting
    python benchmarks/bench_paper.py --work /tmp/bench_paper_q --quick   # the same tables, small
    python benchmarks/bench_paper.py --work /tmp/bench_paper_s23 --cohort-seed 23   # another cohort

Other pretraining budgets on the same store and folds (``--store``, ``--max-steps``, ``--methods
drasclr,moco --no-segmentation``) give the learning curve: ``benchmarks/paper_learning_curve.py``.

Setting and budget. Default: 150 subjects (cohort seed 17, size demo), 3 seeds x 3 pretrained
methods at 200 steps of batch 32 (+ 1 random encoder), 3 x 5-fold CV, segmentation at 10 / 25 /
100 % of the labels with 1 seed of 60 steps. Measured on 2 idle Intel Xeon AVX-512 cores without
AVX512-BF16 (2026-12-04, float32, ``--jobs auto``): ``--quick`` (40 subjects, 2 seeds, 30 steps of
16, 2 x 4-fold CV, 2 fractions x 1 seed of 30 steps) 471 s = 7.9 min (cohort 55 s, store 170 s,
pretrain 55 s, embed 103 s, downstream 14 s, segmentation 72 s, tables 2 s; 505 s before host memory
was kept for reuse, with the same tables); the default 2,912 s = 49 min (cohort 214 s, store 597 s,
pretrain 1,072 s: a DrasCLR step 1.81-1.94 s as one of two 1-thread runs; embed 481 s, downstream
230 s, segmentation 314 s, tables 3 s; the same tables as before host memory was kept, when it took 3,272 s =
55 min (cohort 260 s, store 605 s, pretrain 1,211 s for 9 runs: a DrasCLR step 2.1-2.2 s, MoCo
0.72-0.77 s, each as one of two 1-thread runs; embed 632 s for 10 encoders, downstream 225 s,
segmentation 337 s, tables 2 s)), inside the 75 min the issue allows. The same command with the
earlier ``--precision auto``, which chose oneDNN's emulated bfloat16 on that CPU, took 4,163 s = 69
min (pretrain 2,010 s: a DrasCLR step 3.8 s). Earlier versions: 65 min in bfloat16 on an AMD EPYC
AVX-512 machine, one run at a time (``benchmarks/results/paper_seed17_bf16/``); on an AVX2 CPU (AMD
EPYC Zen 3, fp32) on cohort seed 23, 5,243 s = 87 min one run at a time (pretrain 2,150 s: DrasCLR
1.9-2.1 s a step, MoCo 0.7-0.8 s; embed 1,334 s for 12 encoders) and 4,581 s = 76 min with
``--jobs 2`` and one random encoder (``benchmarks/results/paper_seed23_jobs2/``), before the
embedding batch and lung-mask changes. The first ``--quick`` run, before the CPU loader cap
(``training.config.loader_workers``) and on cores shared with three other jobs, took 37 min, most
of it in DrasCLR steps starved by their own loader workers.
``benchmarks/results/paper{,_seed23}/paper.json`` keep the figures, the CPU and each run's precision.
The budget goes where it buys power: subjects (the corrected interval shrinks with n, barely with
repeats), folds and repeats (cheap: no retraining) and seeds of the pretrained encoders;
pretraining steps stay at one small budget (``--max-steps``).

The patch-level subtype classifier dominates the downstream stage (measured in the ``--quick``
run on a loaded machine: 87 of 97 s of one method's ``run_downstream``, about 22 s per fold at
2000 training patches). So ``--max-train-patches`` caps its training patches per fold (2000) and
the task runs in the first ``--subtype-repeats`` repeats only (1: its K folds); its test folds
hold thousands of patches, so its per-fold scores vary little and further repeats buy little. Its
intervals use the same formula with J = subtype repeats x K.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRETRAINED = ("drasclr", "moco", "drasclr_no_nbr")
ENCODERS = (*PRETRAINED, "random")
DEFAULT_ORACLE = ("emph_centrilobular", "emph_panlobular", "emph_paraseptal", "airway_wall", "mucus_plugging", "age")
PAIRS = (("drasclr", "moco"), ("drasclr", "qct"), ("qct+drasclr", "qct"), ("drasclr", "drasclr_no_nbr"),
         ("drasclr", "random"))
#: the metric each task's figure panel shows
PRIMARY = {"FEV1pp": "r2", "FEV1_FVC": "r2", "GOLD": "auc_macro", "emph_grade": "auc_macro",
           "paraseptal_grade": "auc_macro", "survival": "c_index", "subtype": "auc_macro"}
ORDER = ("oracle", "qct+drasclr", "qct", "drasclr", "drasclr_no_nbr", "moco", "random")
STAGES = ("cohort", "store", "pretrain", "embed", "downstream", "segmentation", "tables")
QUICK = dict(n_subjects=40, seeds=2, max_steps=30, batch_size=16, repeats=2, folds=4, seg_fractions="0.25,1.0",
             seg_seeds=1, seg_steps=30, seg_eval_patches=16, max_train_patches=1000)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-subjects", type=int, default=150, help="synthetic cohort size")
    p.add_argument("--cohort-seed", type=int, default=17, help="seed of the synthetic cohort")
    p.add_argument("--size", default="demo", help="synthetic subject size ('demo', 'adult' or a scale)")
    p.add_argument("--store", default=None, help="an existing patch store instead of a synthetic cohort")
    p.add_argument("--seeds", type=int, default=3, help="pretraining seeds per pretrained method")
    p.add_argument("--random-seeds", type=int, default=1,
                   help="random-weight encoders (not pretrained: more seeds buy the head-to-head comparisons nothing)")
    p.add_argument("--max-steps", type=int, default=200, help="pretraining steps per run")
    p.add_argument("--epochs", type=int, default=1,
                   help="epochs of the store the pretraining schedule spans (--max-steps stops a run earlier)")
    p.add_argument("--batch-size", type=int, default=32, help="pretraining batch (one location, many subjects)")
    p.add_argument("--lr", type=float, default=0.01, help="pretraining lr at batch 128, scaled to the batch")
    p.add_argument("--queue-size", type=int, default=4096, help="negatives per location (capped for small cohorts)")
    p.add_argument("--calibration-batches", type=int, default=64, help="BatchNorm calibration of the random encoders")
    p.add_argument("--repeats", type=int, default=3, help="repeats R of the K-fold cross-validation")
    p.add_argument("--folds", type=int, default=5, help="folds K")
    p.add_argument("--pca-components", type=int, default=8, help="PCA before Cox; embedding width in qct+drasclr")
    p.add_argument("--max-train-patches", type=int, default=2000, help="subtype classifier: training patches per fold")
    p.add_argument("--subtype-repeats", type=int, default=1,
                   help="repeats that run the patch-level subtype task (the first ones; it dominates the stage)")
    p.add_argument("--seg-fractions", default="0.1,0.25,1.0", help="label fractions of the segmentation")
    p.add_argument("--seg-seeds", type=int, default=1, help="fine-tuning seeds per fraction and init")
    p.add_argument("--seg-steps", type=int, default=60, help="fine-tuning steps per run")
    p.add_argument("--seg-batch", type=int, default=8, help="fine-tuning batch")
    p.add_argument("--seg-eval-patches", type=int, default=32, help="patches scored per test subject")
    p.add_argument("--seg-test-fraction", type=float, default=0.25, help="held-out share of subjects")
    p.add_argument("--no-segmentation", action="store_true", help="skip stage 6")
    p.add_argument("--methods", default=",".join(ENCODERS),
                   help="encoders to pretrain and score (qct and the oracle always run); a learning curve over "
                        "budgets needs only drasclr,moco")
    p.add_argument("--workers", type=int, default=2, help="processes for cohort, preprocessing, data loading")
    p.add_argument("--work", default=str(REPO / "outputs" / "bench_paper"), help="cache folder")
    p.add_argument("--results", default="",
                   help="where the tables go (default benchmarks/results/paper, with --quick .../paper_quick: a "
                        "quick run never overwrites the documented setting's tables)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", default="auto",
                   help="pretraining and embedding runs at a time, each on cores/jobs torch threads; 'auto': 2 on a "
                        "CPU with 2+ cores (1.3x the pretraining throughput of one run on both cores), 1 on a GPU")
    p.add_argument("--quick", action="store_true",
                   help="the same tables small: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def versions() -> dict:
    """Versions of the interpreter, the numeric libraries and this checkout's git commit."""
    import lifelines
    import numpy
    import pandas
    import sklearn
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    from drasclr_lib.training.config import cpu_bf16_fast, cpu_has_bf16

    cpu = platform.processor() or None
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pandas": pandas.__version__, "sklearn": sklearn.__version__, "lifelines": lifelines.__version__,
            "git_commit": commit, "git_dirty": dirty, "platform": platform.platform(), "cpu": cpu,
            "cpu_bf16": cpu_has_bf16(), "cpu_bf16_fast": cpu_bf16_fast(), "torch_threads": torch.get_num_threads()}


def run_record(checkpoint: Path) -> dict:
    """What a pretraining run used and how fast it went (kept in ``paper.json``, so the figures outlive
    the ``--work`` cache): ``precision`` and ``memory_format`` from its ``config.json``; ``steps`` and
    ``s_per_step`` from its checkpoint (the step it stopped at and its seconds, summed over resumed
    invocations; read with ``weights_only=True``). What cannot be read is None."""
    from drasclr_lib.training.checkpoint import load_checkpoint

    run = Path(checkpoint).parent
    out = {"precision": None, "memory_format": None, "host_memory": None, "steps": None, "s_per_step": None}
    try:
        eff = json.loads((run / "config.json").read_text(encoding="utf-8")).get("effective", {})
        out.update(precision=eff.get("precision"), memory_format=eff.get("memory_format"),
                   host_memory=eff.get("host_memory"))
    except (OSError, ValueError):
        pass
    try:
        ckpt = load_checkpoint(checkpoint)
        step, seconds = int(ckpt["step"]), float(ckpt.get("seconds", 0.0))
        out.update(steps=step, s_per_step=round(seconds / step, 4) if step and seconds else None)
    except (OSError, KeyError, ValueError):
        pass
    return out


def oracle_columns(table) -> tuple[list[str], list[str]]:
    """``(present, missing)`` latent columns of the generator in a store's subjects table."""
    try:
        from drasclr_lib.data.synthetic import clinical

        wanted = tuple(getattr(clinical, "ORACLE_COLUMNS", DEFAULT_ORACLE))
    except ImportError:
        wanted = DEFAULT_ORACLE
    present = [c for c in wanted if c in table.columns]
    return present, [c for c in wanted if c not in table.columns]


def split_name(name: str) -> tuple[str, float]:
    """``"drasclr@2"`` -> ``("drasclr", 2.0)``; ``"qct"`` -> ``("qct", nan)``."""
    if "@" in name:
        m, s = name.rsplit("@", 1)
        return m, float(s)
    return name, float("nan")


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_jobs(fn, jobs: dict, n: int, bar, label: str) -> dict:
    """``{name: fn(*args)}`` for ``jobs = {name: args}``, ``n`` at a time.

    ``n == 1`` runs them here, one after the other, on this process's torch threads. ``n > 1`` runs
    them in ``n`` spawned processes with ``cores // n`` torch threads each: on a 2-core CPU two
    1-thread pretraining runs train 1.3x faster together than one 2-thread run after the other
    (small convolutions leave the second thread of one run half idle). A job that fails raises here
    after the running ones have finished (their results are cached in ``--work``).
    """
    if n <= 1 or len(jobs) <= 1:
        out = {}
        for name, a in jobs.items():
            bar.set_postfix_str(f"{label} {name}")
            out[name] = fn(*a)
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    from drasclr_lib.preprocess.resample import available_cores

    threads = max(1, available_cores() // n)
    out = {}
    bar.set_postfix_str(f"{label}: {len(jobs)} runs, {n} at a time")
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *a): name for name, a in jobs.items()}
        for k, fut in enumerate(as_completed(futures), 1):
            out[futures[fut]] = fut.result()
            bar.set_postfix_str(f"{label}: {k}/{len(jobs)} runs done ({futures[fut]})")
    return {name: out[name] for name in jobs}


def resolve_jobs(value: str, device: str) -> int:
    """``--jobs``: ``"auto"`` is 2 on a CPU with 2 or more cores and 1 on a GPU; else the number given."""
    from drasclr_lib.cli_help import auto_or_positive_int
    from drasclr_lib.preprocess.resample import available_cores
    from drasclr_lib.utils import resolve_device

    try:
        n = auto_or_positive_int(value)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"--jobs {err}") from None
    if n is None:
        return 2 if resolve_device(device).type == "cpu" and available_cores() >= 2 else 1
    return n


def _pretrain_job(method: str, base, runs: Path):
    from drasclr_lib.training.runs import ensure_checkpoint

    return ensure_checkpoint(method, base, runs)


def _embed_job(method: str, seed: int, ckpt, store_root: str, device: str, calibration_batches: int,
               path: Path, meta: Path, key: dict) -> None:
    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.embed import embed_cohort
    from drasclr_lib.models import load_encoder, random_encoder
    from drasclr_lib.utils import save_json

    store = PatchStore(store_root)
    enc = (load_encoder(ckpt) if ckpt else
           random_encoder(seed=seed, store=store, device=device, calibration_batches=calibration_batches))
    emb = embed_cohort(enc, store, device=device, progress=False,
                       meta={"method": method, "seed": seed, "checkpoint": str(ckpt) if ckpt else None})
    emb.save(path)
    save_json({"key": key, "checkpoint": str(ckpt) if ckpt else None}, meta)


def encoder_seeds(method: str, args) -> range:
    """Seeds of one method: ``--seeds`` for a pretrained one, ``--random-seeds`` for random weights."""
    return range(args.random_seeds if method == "random" else args.seeds)


def embeddings_stage(store, checkpoints: dict, args, folder: Path, bar) -> dict:
    """``{"<method>@<seed>": EmbeddingSet}``, each loaded from ``folder`` when its weights are unchanged.

    The missing ones are computed ``args.jobs`` at a time (:func:`run_jobs`).
    """
    from drasclr_lib.embed import EmbeddingSet
    from drasclr_lib.models.fingerprint import encoder_digest, store_digest
    from drasclr_lib.utils import load_json

    folder.mkdir(parents=True, exist_ok=True)
    sdig = store_digest(store)
    files, todo = {}, {}
    for m in [m for m in ENCODERS if m in args.methods]:
        for s in encoder_seeds(m, args):
            name = f"{m}@{s}"
            ckpt = checkpoints.get(name)
            key = {"store": sdig, "weights": encoder_digest(ckpt) if ckpt else
                   f"random seed {s}, {args.calibration_batches} calibration batches"}
            path, meta = folder / f"{m}_s{s}.npz", folder / f"{m}_s{s}.json"
            files[name] = path
            if not (path.exists() and meta.exists() and load_json(meta).get("key") == key):
                todo[name] = (m, s, ckpt, str(store.root), args.device, args.calibration_batches, path, meta, key)
    run_jobs(_embed_job, todo, args.jobs, bar, "embed")
    return {name: EmbeddingSet.load(path) for name, path in files.items()}


def downstream_stage(store, embeddings: dict, args, folder: Path, bar) -> tuple:
    """Per-fold long table over all repeats (cached per repeat) and the oracle columns used."""
    import numpy as np
    import pandas as pd

    from drasclr_lib.downstream.experiment import run_downstream
    from drasclr_lib.downstream.tasks import PAPER_TASKS
    from drasclr_lib.utils import atomic_path, load_json, save_json

    folder.mkdir(parents=True, exist_ok=True)
    present, missing = oracle_columns(store.table)
    if missing:
        warnings.warn(f"patch store {store.root}: the oracle lacks latent columns {missing} (not in subjects.csv); "
                      f"it uses {present}", stacklevel=2)
    features = {}
    if present:
        X = store.table.loc[list(store.sids), present].apply(pd.to_numeric, errors="coerce")
        features["oracle"] = X.to_numpy(dtype=np.float64)
    compose = ({f"qct+drasclr@{s}": ("qct", f"drasclr@{s}") for s in range(args.seeds)}
               if "drasclr" in args.methods else {})
    settings = dict(folds=args.folds, pca_components=args.pca_components, max_train_patches=args.max_train_patches,
                    embeddings={k: (e.meta.get("checkpoint"), float(np.nansum(e.h[:, :2])))
                                for k, e in embeddings.items()},
                    oracle=present, compose=compose)
    frames = []
    for r in range(args.repeats):
        bar.set_postfix_str(f"downstream repeat {r + 1}/{args.repeats}")
        path, meta = folder / f"repeat{r}.csv", folder / f"repeat{r}.json"
        with_subtype = r < args.subtype_repeats
        key = _digest({**settings, "repeat": r, "subtype": with_subtype})
        if path.exists() and meta.exists() and load_json(meta).get("key") == key:
            frames.append(pd.read_csv(path))
            continue
        tasks = list(PAPER_TASKS) if with_subtype else [t for t in PAPER_TASKS if t.kind != "subtype"]
        res = run_downstream(store, embeddings, tasks=tasks, folds=args.folds, seed=r,
                             pca_components=args.pca_components, max_train_patches=args.max_train_patches,
                             features=features, compose=compose,
                             progress=False)
        pf = res.per_fold.copy()
        parts = [split_name(m) for m in pf["method"]]
        pf["method"], pf["seed"], pf["repeat"] = [p[0] for p in parts], [p[1] for p in parts], r
        with atomic_path(path) as tmp:
            pf.to_csv(tmp, index=False)
        save_json({"key": key, "settings": res.settings}, meta)
        frames.append(pf)
    from drasclr_lib.downstream.stats import PER_FOLD_COLUMNS

    return pd.concat(frames, ignore_index=True)[PER_FOLD_COLUMNS], present, missing


def _segmentation_job(store_root: str, train_pool, test_idx, fraction: float, name: str, ckpt, seeds, cfg,
                      lung_masks, folder: Path) -> None:
    """The label-efficiency runs of one init at one fraction, cached in ``folder`` (same files as the full call)."""
    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.segmentation import experiment as ex

    ex.label_efficiency(PatchStore(store_root), train_subjects=train_pool, test_subjects=test_idx,
                        fractions=(fraction,), inits={name: ckpt}, seeds=seeds, cfg=cfg, lung_masks=lung_masks,
                        cache_dir=folder, progress=False)


def segmentation_stage(store, checkpoints: dict, args, folder: Path, bar) -> tuple:
    """Label-efficiency runs of random / MoCo / DrasCLR inits (4 classes) and the rule baselines."""
    import pandas as pd

    from drasclr_lib.segmentation import SegConfig
    from drasclr_lib.segmentation import experiment as ex
    from drasclr_lib.segmentation.baselines import baseline_dice

    bar.set_postfix_str("segmentation")
    train_pool, test_idx = ex.split_subjects(store, test_fraction=args.seg_test_fraction, seed=0)
    fractions = tuple(float(f) for f in args.seg_fractions.split(","))
    cfg = SegConfig(num_classes=4, steps=args.seg_steps, batch_size=args.seg_batch,
                    eval_patches=args.seg_eval_patches, device=args.device)
    inits = {"random": None, "moco": checkpoints["moco@0"], "drasclr": checkpoints["drasclr@0"]}
    lung_masks = None
    if "lung_mask" in store.table.columns:
        lung_masks = {sid: p for sid, p in zip(store.table["sid"], store.table["lung_mask"]) if isinstance(p, str)}
    seeds = tuple(range(args.seg_seeds))
    if args.jobs > 1:  # every init x fraction its own job; each leaves its runs in the cache read below
        jobs = {f"{name}@{f:g}": (str(store.root), train_pool, test_idx, f, name, ckpt, seeds, cfg, lung_masks, folder)
                for name, ckpt in inits.items() for f in fractions}
        run_jobs(_segmentation_job, jobs, args.jobs, bar, "segmentation")
    runs = ex.label_efficiency(store, train_subjects=train_pool, test_subjects=test_idx, fractions=fractions,
                               inits=inits, seeds=seeds, cfg=cfg, lung_masks=lung_masks,
                               cache_dir=folder, progress=False)
    runs.insert(0, "kind", "model")
    rules, notes = [], []
    for rule in ("laa950", "laa950_position"):
        try:
            d = baseline_dice(store, test_idx, rule=rule, num_classes=4, lung_masks=lung_masks,
                              max_patches=args.seg_eval_patches or None)
        except ValueError as err:  # a rule this checkout's baseline_dice does not know yet
            note = f"rule {rule!r} skipped: {err}"
            print(f"[bench_paper] {note}", flush=True)
            notes.append(note)
            continue
        row = {"kind": "rule", "init": rule, "n_labelled": 0, "dice": float(d["dice"].mean()),
               "dice_sd_subjects": float(d["dice"].std(ddof=0))}
        row.update({c: float(d[c].mean()) for c in d.columns if c.startswith("dice_")})
        rules.append(row)
    table = pd.concat([runs, pd.DataFrame(rules)], ignore_index=True)
    info = {"n_train_pool": len(train_pool), "test_sids": [store.sids[i] for i in test_idx],
            "lung_restricted": lung_masks is not None, "notes": notes}
    return table, info


def _ordered(methods) -> list[str]:
    methods = list(dict.fromkeys(methods))
    return [m for m in ORDER if m in methods] + [m for m in methods if m not in ORDER]


def _interval_panel(ax, part, column: str, labels, title: str, show_labels: bool, tick_fontsize=None) -> None:
    """Dots at ``part[column]`` with ``ci_low`` / ``ci_high`` bars, one row per label, top to bottom."""
    import numpy as np

    y = np.arange(len(part))[::-1]
    v = part[column].to_numpy(float)
    lo, hi = part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float)
    ax.errorbar(v, y, xerr=[np.nan_to_num(v - lo), np.nan_to_num(hi - v)], fmt="o", capsize=3)
    font = {"fontsize": tick_fontsize} if tick_fontsize else {}
    ax.set_yticks(y, list(labels) if show_labels else [""] * len(y), **font)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_summary(summary, path: Path) -> None:
    """One panel per task (its primary metric): mean and 95 % interval of every method."""
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t in PRIMARY if ((summary.task == t) & (summary.metric == PRIMARY[t])).any()]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(2.6 * max(len(tasks), 1), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        part = summary[(summary.task == task) & (summary.metric == PRIMARY[task])].set_index("method")
        methods = _ordered(part.index)
        _interval_panel(ax, part.loc[methods], "mean", methods, f"{task}\n{PRIMARY[task]}", ax is axes[0][0])
    fig.suptitle("mean and 95 % interval (corrected resampled t over R x K splits)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(paired, path: Path) -> None:
    """One panel per pair: the difference on each task's primary metric with its 95 % interval."""
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(dict.fromkeys(zip(paired.a, paired.b)))
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(3.2 * max(len(pairs), 1), 3.4), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        part = paired[(paired.a == a) & (paired.b == b)]
        part = part[[PRIMARY.get(t) == m for t, m in zip(part.task, part.metric)]]
        _interval_panel(ax, part, "diff", [f"{t} {m}" for t, m in zip(part.task, part.metric)], f"{a} - {b}",
                        ax is axes[0][0], tick_fontsize=8)
        ax.axvline(0, color="k", lw=0.8)
    fig.suptitle("paired differences, 95 % interval (Nadeau-Bengio corrected)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_segmentation(seg, path: Path, title: str) -> None:
    """Held-out Dice (4 classes) against the label fraction per init; the rules as dashed lines."""
    import matplotlib.pyplot as plt

    from drasclr_lib.segmentation import experiment as ex

    models, rules = seg[seg.kind == "model"], seg[seg.kind == "rule"]
    fig = ex.plot_label_efficiency(ex.summarize(models.drop(columns=["kind"])),
                                   baselines={f"rule {r.init}": float(r.dice) for r in rules.itertuples()},
                                   title=title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:  # the quick values, except where the command line set another
        for k, v in QUICK.items():
            if getattr(args, k) == parser.get_default(k):
                setattr(args, k, v)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        args.jobs = resolve_jobs(args.jobs, args.device)
    except ValueError as err:
        parser.error(str(err))
    unknown = sorted(set(args.methods) - set(ENCODERS))
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown or 'none given'}; choose from {','.join(ENCODERS)}")
    if not args.no_segmentation and not {"drasclr", "moco"} <= set(args.methods):
        parser.error("segmentation fine-tunes the drasclr and moco checkpoints: add them to --methods "
                     "or pass --no-segmentation")

    import matplotlib

    matplotlib.use("Agg")
    from tqdm.auto import tqdm

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.downstream.stats import paired_differences, summarise_scores
    from drasclr_lib.training import PretrainConfig
    from drasclr_lib.utils import atomic_path, load_json, save_json

    if args.store:
        work = Path(args.work) / f"store_{_digest(str(Path(args.store).resolve()))}"
    else:
        work = Path(args.work) / f"n{args.n_subjects}_seed{args.cohort_seed}_{args.size}"
    results = Path(args.results or REPO / "benchmarks" / "results" / ("paper_quick" if args.quick else "paper"))
    results.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    timing_file = work / "timings.json"
    totals = load_json(timing_file) if timing_file.exists() else {}
    timings: dict[str, float] = {}
    bar = tqdm(STAGES, desc="bench_paper", unit="stage")
    clock = [time.perf_counter()]

    def done(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        totals[name] = round(totals.get(name, 0.0) + timings[name], 1)
        save_json(totals, timing_file)
        clock[0] = now
        bar.update(1)

    # 1-2. cohort and store
    if args.store:
        store = PatchStore(args.store)
        done("cohort")
        done("store")
    else:
        from drasclr_lib.data.synthetic import make_cohort
        from drasclr_lib.preprocess.cohort import preprocess_cohort

        bar.set_postfix_str("cohort")
        manifest = make_cohort(work / "cohort", args.n_subjects, args.cohort_seed, size=args.size,
                               workers=args.workers, progress=False)
        done("cohort")
        bar.set_postfix_str("store")
        store = preprocess_cohort(manifest, work / "patch_store", workers=args.workers, progress=False)
        done("store")
    if store.num_subjects < args.folds:
        raise SystemExit(f"bench_paper: the store {store.root} has {store.num_subjects} subjects, "
                         f"fewer than {args.folds} folds")

    # 3. pretraining: every method x seed at one budget
    batch = min(args.batch_size, store.num_subjects)
    # two runs at a time on one core each have no core to spare for loader workers
    workers = args.workers if args.jobs == 1 else 0
    jobs = {}
    for m in [m for m in PRETRAINED if m in args.methods]:  # DrasCLR first: the longest runs start first
        for s in range(args.seeds):
            base = PretrainConfig(store=str(store.root), epochs=args.epochs, max_steps=args.max_steps, batch_size=batch,
                                  lr=args.lr, queue_size=args.queue_size, seed=s, workers=workers,
                                  device=args.device, tensorboard=False, progress=False,
                                  # a killed run loses at most 100 steps (not part of the run's identity)
                                  save_every_steps=100)
            jobs[f"{m}@{s}"] = (m, base, work / "runs")
    made = run_jobs(_pretrain_job, jobs, args.jobs, bar, "pretrain")
    checkpoints = {k: v[0] for k, v in made.items()}
    sources = {k: v[1] for k, v in made.items()}
    trained = {k: run_record(v) for k, v in checkpoints.items()}
    short = sorted({r["steps"] for r in trained.values() if r["steps"] and r["steps"] < args.max_steps})
    if short:
        print(f"\n[bench_paper] note: the pretraining runs stopped at {short} steps: {args.epochs} epoch(s) of this "
              f"store ({store.num_subjects} subjects x {store.num_locations} locations, batches of {batch}), the "
              f"span of their cosine schedule (--epochs); --max-steps {args.max_steps} asks for more. paper.json "
              f"records the steps trained.",
              file=sys.stderr)
    done("pretrain")

    # 4-5. embeddings and the repeated cross-validation
    embeddings = embeddings_stage(store, checkpoints, args, work / "embeddings", bar)
    done("embed")
    per_fold, oracle_used, oracle_missing = downstream_stage(store, embeddings, args, work / "downstream", bar)
    done("downstream")

    # 6. segmentation
    seg, seg_info = None, {}
    if not args.no_segmentation:
        seg, seg_info = segmentation_stage(store, checkpoints, args, work / "segmentation", bar)
    done("segmentation")

    # 7. tables and figures
    bar.set_postfix_str("tables")
    summary = summarise_scores(per_fold)
    paired = paired_differences(per_fold, PAIRS)
    files = {"per_fold.csv": per_fold, "summary.csv": summary, "paired.csv": paired}
    if seg is not None:
        files["segmentation.csv"] = seg
    for name, df in files.items():
        with atomic_path(results / name) as tmp:
            df.to_csv(tmp, index=False)
    plot_summary(summary, results / "summary.png")
    plot_paired(paired, results / "paired.png")
    if seg is not None:
        plot_segmentation(seg, results / "segmentation.png",
                          f"4-class segmentation, {store.num_subjects} subjects")
    done("tables")
    bar.close()
    setting = {k: v for k, v in vars(args).items() if k not in {"work", "results"}}
    setting["batch_size_used"] = batch
    save_json({"setting": setting, "num_subjects": store.num_subjects, "num_locations": store.num_locations,
               "store": str(store.root), "timings_s": timings, "timings_total_s": totals,
               "versions": versions(), "weights": {k: f"{checkpoints[k]} ({v})" for k, v in sources.items()},
               "pretrain_runs": trained,
               "oracle_columns": oracle_used, "oracle_missing": oracle_missing,
               "patch_oracle": "none: at patch level the generator's truth is the subtype target itself",
               "pairs": [list(p) for p in PAIRS], "primary_metrics": PRIMARY,
               "intervals": "drasclr_lib.downstream.stats: Nadeau-Bengio corrected resampled t over repeat x fold, "
                            "seeds averaged within each split, level 0.95",
               "segmentation": seg_info}, results / "paper.json")
    show = summary[[PRIMARY.get(t) == m for t, m in zip(summary.task, summary.metric)]]
    print(show.pivot_table(index="task", columns="method", values="mean", sort=False).round(3).to_string())
    show = paired[[PRIMARY.get(t) == m for t, m in zip(paired.task, paired.metric)]]
    print(show[["a", "b", "task", "diff", "ci_low", "ci_high", "p"]].round(3).to_string(index=False))
    print(f"[bench_paper] seconds per stage: {json.dumps(timings)}; results in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
