"""The ``drasclr downstream`` command: notebook 04's experiment on a patch store and embedding files.

Command line::

    drasclr downstream --store outputs/patch_store \\
        --embeddings drasclr=outputs/03_embeddings/embeddings.npz --tasks "FEV1pp:continuous,GOLD:ordinal" \\
        --out outputs/downstream

It runs :func:`drasclr_lib.downstream.experiment.run_downstream` (the same folds for every method and
task; whole patients per fold when ``subjects.csv`` has a ``group`` column) and writes, atomically,
into ``--out``: ``results.csv`` (method, task, metric, mean, sd, folds, n), ``results_per_fold.csv``,
``results_by_task.csv`` (one row per task and metric, one column per method) and ``settings.json``
(the arguments, the embedding files and the tasks as a spec string).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["cli_main", "parse_embedding_args"]

_DESCRIPTION = """\
Run the downstream experiment of notebook 04 (Yu et al., MedIA 2023) on a patch store and one or more
embedding files: subject-level prediction from pooled patch embeddings (ridge, logistic regression,
Cox), the patch-level emphysema-subtype classifier, and the %LAA-950 + lung volume baseline, with
one set of cross-validation folds for every method and task.

Tasks are manifest columns with a kind (--tasks): COLUMN:continuous (ridge, R2), COLUMN:ordinal or
COLUMN:categorical (logistic regression, accuracy and macro AUC), TIME+EVENT:survival (Cox,
C-index), subtype (patch level, needs label maps), paper (the paper's tasks, the default; those
the cohort lacks are skipped). A "group" column in the manifest (patient id) keeps all scans of one
patient in one fold."""

_EXAMPLES = [
    ("the paper's tasks for two encoders' embeddings (drasclr embed --out ...)",
     "drasclr downstream --store outputs/patch_store --embeddings drasclr=emb_drasclr.npz random=emb_random.npz "
     "--out outputs/downstream"),
    ("your own outcomes: two columns of your manifest and a survival pair, 10 folds",
     'drasclr downstream --store store --embeddings emb.npz --tasks "FEV1pp:continuous, smoker:categorical, '
     'os_years+death:survival" --folds 10 --out results'),
]


def parse_embedding_args(items: list[str]) -> dict[str, Path]:
    """``["NAME=PATH", "PATH", ...]`` -> ``{name: path}``; a bare PATH is named after its file stem.

    Raises:
        ValueError: for an empty name or path, or a name given twice.
    """
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--embeddings {item!r}: write NAME=PATH (e.g. drasclr=embeddings.npz) or a PATH")
        if name in out:
            raise ValueError(f"--embeddings: the name {name!r} is given twice ({out[name]} and {path}); "
                             "name them NAME=PATH")
        out[name] = Path(path)
    return out


def _parser():
    from drasclr_lib.cli_help import command_parser

    p = command_parser("drasclr downstream", _DESCRIPTION, _EXAMPLES,
                       "Outputs: results.csv, results_per_fold.csv, results_by_task.csv, settings.json in --out. "
                       "See docs/downstream.md.")
    p.add_argument("--store", required=True, metavar="DIR", help="patch store folder (drasclr preprocess / notebook 01); its "
                                                  "subjects.csv holds the manifest's label columns")
    p.add_argument("--embeddings", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                   help="embedding files (.npz of drasclr embed / notebook 03), each as NAME=PATH (the method's "
                        "name in the tables) or PATH (named after the file); repeatable (default: none, only the "
                        "%%LAA-950 + lung volume baseline)")
    p.add_argument("--tasks", default="paper", metavar="SPEC",
                   help='which outcomes: "paper" or a list like "FEV1pp:continuous, GOLD:ordinal, '
                        'time+event:survival, subtype" (kinds: continuous, ordinal, categorical, survival, subtype)')
    p.add_argument("--folds", type=int, default=5, metavar="K", help="cross-validation folds k (2 to the number of patients)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of the patch subsampling")
    p.add_argument("--pool", choices=("mean", "meanmax"), default="mean",
                   help="subject vector from patch embeddings: mean, or mean and max concatenated")
    p.add_argument("--no-qct", action="store_true", help="leave out the %%LAA-950 + lung volume baseline")
    p.add_argument("--pca-components", type=int, default=8, help="PCA components before the Cox model")
    p.add_argument("--penalizer", type=float, default=0.1, help="ridge penalty of the Cox model")
    p.add_argument("--logistic-c", type=float, default=0.1,
                   help="inverse L2 penalty of the subject-level logistic regressions")
    p.add_argument("--patch-c", type=float, default=1.0, help="inverse L2 penalty of the patch subtype classifier")
    p.add_argument("--subtype-threshold", type=float, default=0.05,
                   help="emphysema fraction of a patch's lung below which the patch is 'none'")
    p.add_argument("--max-train-patches", type=int, default=20000,
                   help="training patches per fold of the subtype task (subsampled above)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr downstream --store DIR [--embeddings NAME=PATH ...] [--tasks SPEC] --out DIR ...``.

    Returns:
        0 on success; 2 for a bad argument, a missing file, a task the store cannot serve (the reason,
        naming the column or file, goes to stderr).
    """
    args = _parser().parse_args(argv)

    import pandas as pd

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.downstream.experiment import METHOD_LABELS, run_downstream
    from drasclr_lib.downstream.tasks import TaskError, parse_tasks
    from drasclr_lib.embed import EmbeddingSet
    from drasclr_lib.utils import atomic_path, save_json

    def fail(msg: str) -> int:
        print(f"drasclr downstream: {msg}", file=sys.stderr)
        return 2

    try:
        files = parse_embedding_args(args.embeddings)
        tasks = parse_tasks(args.tasks)
    except (ValueError, TaskError) as exc:
        return fail(str(exc))
    if not files and args.no_qct:
        return fail("nothing to compare: give --embeddings or leave out --no-qct")
    store_root = Path(args.store)
    if not store_root.is_dir():
        return fail(f"patch store {store_root} does not exist (run drasclr preprocess first)")
    store = PatchStore(store_root)
    embeddings = {}
    for name, path in files.items():
        try:
            embeddings[name] = EmbeddingSet.load(path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            return fail(f"--embeddings {name}={path}: {exc}")
    try:
        res = run_downstream(store, embeddings, tasks=tasks, folds=args.folds, seed=args.seed, pool=args.pool,
                             include_qct=not args.no_qct, pca_components=args.pca_components,
                             penalizer=args.penalizer, C=args.logistic_c, patch_C=args.patch_c,
                             subtype_threshold=args.subtype_threshold, max_train_patches=args.max_train_patches,
                             progress=not args.no_progress)
    except (TaskError, KeyError, ValueError) as exc:
        return fail(str(exc).strip("'\""))
    out = Path(args.out)
    res.save(out)
    order = [m for m in METHOD_LABELS if m in set(res.table.method)]
    order += [m for m in dict.fromkeys(res.table.method) if m not in order]
    by_task = (res.table.pivot_table(index=["task", "metric"], columns="method", values="mean", sort=False)
               .reindex(columns=order) if len(res.table) else pd.DataFrame())
    with atomic_path(out / "results_by_task.csv") as tmp:
        by_task.to_csv(tmp)
    save_json({"settings": res.settings, "embeddings": {n: str(p.resolve()) for n, p in files.items()},
               "fold_sizes": [int(c) for c in pd.Series(res.fold).value_counts().sort_index()],
               "results": res.metrics()}, out / "settings.json")
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(by_task.round(3).to_string() if len(by_task) else "no task could run (see the warnings above)")
    print(f"wrote {out / 'results.csv'}, results_per_fold.csv, results_by_task.csv, settings.json")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
