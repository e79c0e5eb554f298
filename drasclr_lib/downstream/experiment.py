"""The downstream comparison of the paper in one call, shared by notebook 04, the benchmark and
``drasclr downstream``.

:func:`run_downstream` takes a patch store (labels, QC) and the patch embeddings of each method,
draws the subject folds **once** (seeded, stratified by GOLD stage when the cohort has it, whole
patients per fold when ``subjects.csv`` has a ``group`` column) and runs every task on every method
with those folds. The tasks are the paper's by default (below) or any columns of the manifest, each
with its kind (``tasks=``, :mod:`drasclr_lib.downstream.tasks`):

=================  ==========================================  ===========================
task               model                                       metrics
=================  ==========================================  ===========================
FEV1pp, FEV1_FVC   ridge on pooled embeddings                  r2, r2_oof
GOLD, emph_grade,  multinomial logistic regression             accuracy, auc_macro
paraseptal_grade
survival           PCA + penalised Cox (lifelines)             c_index
subtype            patch-level multinomial logistic regression auc_macro, auc_<subtype>,
                                                               accuracy
=================  ==========================================  ===========================

The clinical baseline ``qct`` is built from the store itself: %LAA-950 and lung volume per
subject (``laa950``, ``lung_volume_l``) and, for the patch task, per-patch %LAA-950 and lung
fraction. The result table has one row per (method, task, metric) with the mean and standard
deviation over the evaluated folds. ``r2_oof`` is the R² of the out-of-fold predictions pooled over
all folds (one number, no SD): with a few subjects per fold the per-fold R² is dominated by the
small variance of each test fold, the pooled one is not.

Besides the patch embeddings, a run can compare subject-level feature sets given as arrays
(``features=``, e.g. the synthetic generator's latent variables as an "oracle" ceiling: they
enter every subject-level task, not the patch-level one) and compositions of methods
(``compose={"qct+drasclr": ("qct", "drasclr")}``, :func:`compose_blocks`): how a clinical
researcher adds a learned representation to density. The per-fold table records each fold's
labelled training and test subjects (``n_train``, ``n_test``), which the corrected intervals of
:mod:`drasclr_lib.downstream.stats` need. The file runs past 350 lines because the one function that
guarantees "same folds for every method" has to own every kind of method it compares.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from drasclr_lib.downstream.folds import make_folds
from drasclr_lib.downstream.prediction import cv_classification, cv_regression
from drasclr_lib.downstream.subtypes import SUBTYPE_NAMES, cv_patch_classifier, patch_qct_features, subtype_targets
from drasclr_lib.downstream.survival import cv_cox, km_logrank, risk_groups
from drasclr_lib.downstream.tasks import PAPER_TASKS, format_tasks, parse_tasks, task_targets, task_values
from drasclr_lib.training.data import GROUP_COLUMN, subject_groups
from drasclr_lib.utils import atomic_path

__all__ = [
    "METHOD_LABELS",
    "REGRESSION_TASKS",
    "CLASSIFICATION_TASKS",
    "QCT_COLUMNS",
    "DownstreamResult",
    "run_downstream",
    "subject_qct_features",
    "compose_blocks",
]

METHOD_LABELS = {
    "qct": "%LAA-950 + lung volume",
    "random": "random encoder",
    "moco": "MoCo (no location, no neighbours)",
    "drasclr_no_nbr": "DrasCLR w/o neighbour loss",
    "drasclr": "DrasCLR",
}
REGRESSION_TASKS = tuple(t.name for t in PAPER_TASKS if t.kind == "continuous")  # ("FEV1pp", "FEV1_FVC")
CLASSIFICATION_TASKS = tuple(t.name for t in PAPER_TASKS if t.kind == "ordinal")  # GOLD and the visual grades
QCT_COLUMNS = ("laa950", "lung_volume_l")
TABLE_COLUMNS = ["method", "task", "metric", "mean", "sd", "folds", "n"]


@dataclass
class DownstreamResult:
    """Everything :func:`run_downstream` computed.

    Attributes:
        table: one row per (method, task, metric): ``mean``, ``sd`` over folds, ``folds`` (number
            of folds scored) and ``n`` (labelled subjects, or labelled patches for ``subtype``).
        per_fold: long table ``method, task, metric, fold, value, n_train, n_test`` (labelled
            subjects of the task in the fold's training and test part).
        sids: the N subjects, in the order of every array below.
        fold: (N,) test fold of each subject (the same for every method).
        time, event: (N,) survival data of the first survival task (NaN when there is none).
        risk: ``{method: (N,) out-of-fold Cox partial hazard}`` of that task.
        subtype_true: (N, L) dominant subtype per patch (-1 unlabelled), or ``None``.
        subtype_proba: ``{method: (N, L, 4) out-of-fold class probabilities}``.
        settings: the arguments of the run (``tasks`` as a spec string).
        survival_task: the name of the task behind ``time``, ``event`` and ``risk``.
        groups: (N,) patient group index of each subject (:func:`subject_groups`; ``arange(N)``
            without a ``group`` column).
    """

    table: pd.DataFrame
    per_fold: pd.DataFrame
    sids: list[str]
    fold: np.ndarray
    time: np.ndarray
    event: np.ndarray
    risk: dict[str, np.ndarray] = field(default_factory=dict)
    subtype_true: np.ndarray | None = None
    subtype_proba: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    survival_task: str = "survival"
    groups: np.ndarray | None = None

    def value(self, method: str, task: str, metric: str) -> float:
        """The mean of one cell (NaN when absent)."""
        t = self.table
        row = t[(t.method == method) & (t.task == task) & (t.metric == metric)]
        return float(row["mean"].iloc[0]) if len(row) else float("nan")

    def logrank(self, method: str, n_groups: int = 3) -> tuple[dict, float]:
        """Kaplan-Meier fits by out-of-fold risk group of ``method`` and the log-rank p-value."""
        risk = self.risk.get(method)
        if risk is None:
            raise KeyError(f"no survival risk for method {method!r}; have {sorted(self.risk)}")
        return km_logrank(self.time, self.event, risk_groups(risk, n_groups))

    def metrics(self) -> dict:
        """``{method: {"task/metric": mean}}`` plus the log-rank p-values, for ``metrics.json``."""
        out: dict = {}
        for r in self.table.itertuples():
            out.setdefault(r.method, {})[f"{r.task}/{r.metric}"] = float(r.mean)
        for m in self.risk:
            out.setdefault(m, {})[f"{self.survival_task}/logrank_p_tertiles"] = self.logrank(m)[1]
        return out

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``results.csv`` and ``results_per_fold.csv`` atomically into ``out_dir``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, df in (("results.csv", self.table), ("results_per_fold.csv", self.per_fold)):
            with atomic_path(out_dir / name) as tmp:
                df.to_csv(tmp, index=False)
            paths[name] = out_dir / name
        return paths


def subject_qct_features(store, sids: list[str]) -> np.ndarray:
    """(N, 2) clinical QCT features per subject: %LAA-950 and lung volume (litres).

    Raises:
        KeyError: when the store's table lacks one of the columns.
    """
    missing = [c for c in QCT_COLUMNS if c not in store.table.columns]
    if missing:
        raise KeyError(f"patch store {store.root}: subjects.csv has no {missing} column (needed by the QCT baseline)")
    return store.table.loc[sids, list(QCT_COLUMNS)].to_numpy(dtype=np.float64)


def _column(table: pd.DataFrame, sids: list[str], name: str) -> np.ndarray | None:
    if name not in table.columns:
        return None
    return pd.to_numeric(table.loc[sids, name], errors="coerce").to_numpy(dtype=np.float64)


def _summarise(method: str, task: str, scores: pd.DataFrame, metrics: list[str], n: int, rows: list, long: list,
               sizes: Mapping[int, tuple[int, int]] | None = None):
    sizes = sizes or {}
    for metric in metrics:
        vals = scores[metric].to_numpy(dtype=np.float64) if len(scores) else np.array([])
        for f, v in zip(scores["fold"] if len(scores) else [], vals):
            n_train, n_test = sizes.get(int(f), (-1, -1))
            long.append({"method": method, "task": task, "metric": metric, "fold": int(f), "value": float(v),
                         "n_train": int(n_train), "n_test": int(n_test)})
        ok = vals[np.isfinite(vals)]
        rows.append({"method": method, "task": task, "metric": metric,
                     "mean": float(ok.mean()) if len(ok) else float("nan"),
                     "sd": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
                     "folds": int(len(ok)), "n": int(n)})


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """R² of pooled out-of-fold predictions (stable for small folds, where per-fold R² is noisy)."""
    if len(y) < 2 or np.ptp(y) == 0:
        return float("nan")
    return float(1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def _fold_sizes(labelled: np.ndarray, fold: np.ndarray) -> dict[int, tuple[int, int]]:
    """``{fold: (labelled subjects outside it, labelled subjects in it)}``."""
    return {int(f): (int((labelled & (fold != f)).sum()), int((labelled & (fold == f)).sum())) for f in np.unique(fold)}


def _standardise(X: np.ndarray) -> np.ndarray:
    """Columns to mean 0, SD 1 over the finite rows (constant columns to 0); non-finite rows stay NaN."""
    X = np.asarray(X, dtype=np.float64)
    ok = np.isfinite(X).all(axis=1)
    out = np.full(X.shape, np.nan)
    if ok.any():
        mu, sd = X[ok].mean(axis=0), X[ok].std(axis=0)
        out[ok] = (X[ok] - mu) / np.where(sd > 0, sd, 1.0)
    return out


def compose_blocks(blocks: Sequence[np.ndarray], n_components: int = 8) -> np.ndarray:
    """Concatenate feature blocks so that no block swamps another by its width or its units.

    Each block is standardised column-wise; a block wider than ``n_components`` columns (an
    embedding, D = 128) is replaced by its first ``n_components`` principal components
    (standardised again), so ``qct + drasclr`` is 2 density columns beside 8 embedding components
    rather than 2 beside 128. The PCA is fitted on every row without labels (unsupervised, like
    the embedding itself), never on a task's outcome.

    Args:
        blocks: arrays (..., F_b) with the same leading shape: (N, F_b) subject features or
            (N, L, F_b) patch features. Rows with a non-finite value in any block are NaN.
        n_components: width a block is reduced to.

    Returns:
        (..., sum of min(F_b, n_components)) float64.

    Raises:
        ValueError: for no blocks, mismatched leading shapes or ``n_components < 1``.
    """
    if not blocks:
        raise ValueError("compose_blocks needs at least one block")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    lead = np.asarray(blocks[0]).shape[:-1]
    out = []
    for i, B in enumerate(blocks):
        B = np.asarray(B, dtype=np.float64)
        if B.shape[:-1] != lead:
            raise ValueError(f"block {i} has leading shape {B.shape[:-1]}, block 0 has {lead}")
        Z = _standardise(B.reshape(-1, B.shape[-1]))
        if Z.shape[1] > n_components:
            ok = np.isfinite(Z).all(axis=1)
            pcs = np.full((len(Z), n_components), np.nan)
            if ok.sum() > 1:
                _, _, vt = np.linalg.svd(Z[ok], full_matrices=False)
                k = min(n_components, len(vt))
                pcs[ok, :k] = Z[ok] @ vt[:k].T
                pcs[ok, k:] = 0.0
            Z = _standardise(pcs)
        out.append(Z)
    bad = np.zeros(len(out[0]), dtype=bool)
    for Z in out:
        bad |= ~np.isfinite(Z).all(axis=1)
    X = np.concatenate(out, axis=1)
    X[bad] = np.nan
    return X.reshape(*lead, X.shape[-1])


def _feature_arrays(features: Mapping[str, Any], sids: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name, X in features.items():
        if isinstance(X, pd.DataFrame):
            missing = [s for s in sids if s not in X.index]
            if missing:
                raise KeyError(f"features[{name!r}] lack subjects {missing[:5]} of the patch store (index by sid)")
            X = X.loc[sids].to_numpy(dtype=np.float64)
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) != len(sids):
            raise ValueError(f"features[{name!r}] must be (N={len(sids)}, F) in the store's subject order, "
                             f"got shape {X.shape}")
        out[name] = X
    return out


def _embedding_arrays(embeddings: Mapping[str, Any], sids: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for method, emb in embeddings.items():
        h, emb_sids = getattr(emb, "h", None), getattr(emb, "sids", None)
        if h is None or emb_sids is None:
            raise TypeError(f"embeddings[{method!r}] must have .h (N, L, D) and .sids (an EmbeddingSet)")
        pos = {str(s): i for i, s in enumerate(emb_sids)}
        missing = [s for s in sids if s not in pos]
        if missing:
            raise KeyError(f"embeddings[{method!r}] lack subjects {missing[:5]} of the patch store")
        out[method] = np.asarray(h, dtype=np.float32)[[pos[s] for s in sids]]
    return out


def _drop_unscanned(subject_X: dict[str, np.ndarray], targets: dict, sids: list[str]) -> tuple[dict, dict]:
    """Leave out of every subject-level task the subjects some method has no features for.

    A subject whose patches are all invalid (outside the scan's field of view) pools to a NaN row;
    such a subject gets NaN labels for every method (so the methods are still compared on the same
    subjects) and a zero feature row that no fold then uses. Patch-level tasks skip NaN patches
    themselves. Returns ``(subject_X, targets)``, the inputs themselves when every subject has features.
    """
    bad = np.zeros(len(sids), dtype=bool)
    for X in subject_X.values():
        bad |= ~np.isfinite(X).all(axis=1)
    if not bad.any():
        return subject_X, targets
    names = ", ".join(s for s, b in zip(sids, bad) if b)
    warnings.warn(f"{int(bad.sum())} subject(s) have no valid patch (outside the field of view) and are left out of "
                  f"the subject-level tasks: {names}", stacklevel=3)
    features = {m: np.where(bad[:, None], 0.0, X) for m, X in subject_X.items()}
    out = {}
    for task, y in targets.items():
        if isinstance(y, tuple):  # survival: (time, event)
            out[task] = tuple(np.where(bad, np.nan, np.asarray(v, dtype=np.float64)) for v in y)
        elif np.asarray(y).dtype.kind in "fiub":
            out[task] = np.where(bad, np.nan, np.asarray(y, dtype=np.float64))
        else:  # patch-level targets (subtype) skip invalid patches on their own
            out[task] = y
    return features, out


def run_downstream(
    store,
    embeddings: Mapping[str, Any],
    *,
    tasks: str | Sequence | None = None,
    folds: int = 5,
    seed: int = 0,
    pool: str = "mean",
    include_qct: bool = True,
    pca_components: int = 8,
    penalizer: float = 0.1,
    C: float = 0.1,
    patch_C: float = 1.0,
    subtype_threshold: float = 0.05,
    max_train_patches: int = 20000,
    features: Mapping[str, Any] | None = None,
    compose: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
) -> DownstreamResult:
    """Run every downstream task on every method with one set of subject folds.

    Args:
        store: a ``PatchStore`` (or its path): labels in ``store.table``, label patches for the
            subtype task.
        embeddings: ``{method: EmbeddingSet}`` (anything with ``.h (N, L, D)`` and ``.sids``);
            every store subject must be present. Method names of :data:`METHOD_LABELS` get
            readable labels in the figures; any name works.
        tasks: which outcomes to predict: ``None`` (the paper's tasks, :data:`PAPER_TASKS`; those
            the cohort lacks are skipped), a spec string such as
            ``"FEV1pp:continuous, GOLD:ordinal, time+event:survival"`` or a list of specs /
            :class:`TaskSpec` (:func:`drasclr_lib.downstream.tasks.parse_tasks`). A named task must
            exist and hold values of its kind.
        folds: number of CV folds k (whole patient groups per fold when ``subjects.csv`` has a
            ``group`` column).
        seed: seed of the folds (and of the patch subsampling).
        pool: ``"mean"`` or ``"meanmax"`` (see ``drasclr_lib.embed.pool_subjects``).
        include_qct: add the clinical QCT baseline as method ``"qct"``.
        pca_components: PCA components before the Cox model.
        penalizer: Cox ridge penalty.
        C: inverse penalty of the subject-level logistic regressions.
        patch_C: inverse penalty of the patch-level subtype classifier.
        subtype_threshold: emphysema fraction below which a patch is "none".
        max_train_patches: cap on training patches per fold of the subtype task.
        features: optional ``{name: (N, F) array}`` subject-level feature sets in the store's
            subject order (or DataFrames indexed by sid), compared like the embeddings on the
            subject-level tasks (not on the patch-level subtype task). Non-finite rows leave the
            subject out as an unscanned one.
        compose: optional ``{name: (method, method, ...)}``: a method whose features are the
            named methods' (``qct``, an embedding, a feature set) joined by :func:`compose_blocks`
            (``pca_components`` columns per wide block); on the subtype task too when every part
            has patch features.
        progress: show a tqdm bar over methods.

    Returns:
        A :class:`DownstreamResult`.

    Raises:
        ValueError: when there are fewer subjects (or patient groups) than folds, no method at all,
            a feature set of the wrong shape, or a composition naming an unknown method.
        TaskError: a task spec that cannot be parsed, a named task's column missing or holding values
            of the wrong kind (the message names the column).
    """
    from tqdm.auto import tqdm

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.embed import pool_subjects

    if not isinstance(store, PatchStore):
        store = PatchStore(store)
    sids = list(store.sids)
    if len(sids) < folds:
        raise ValueError(f"patch store {store.root} has {len(sids)} subjects, fewer than {folds} folds")
    if not embeddings and not include_qct and not features:
        raise ValueError("nothing to compare: no embeddings and include_qct=False")
    tasks = parse_tasks(tasks)
    table = store.table
    targets = task_targets(store, sids, tasks, folds)
    gold = _column(table, sids, "GOLD")
    strata = np.where(np.isfinite(gold), gold, -1) if gold is not None else None
    groups = subject_groups(table, sids)
    fold = make_folds(len(sids), k=folds, seed=seed, strata=strata, groups=groups)

    H = _embedding_arrays(embeddings, sids)
    subject_X: dict[str, np.ndarray] = {}
    patch_X: dict[str, np.ndarray] = {}
    if include_qct:
        subject_X["qct"] = subject_qct_features(store, sids)
    for m, h in H.items():
        subject_X[m] = pool_subjects(h, pool)
        patch_X[m] = h
    for m, X in _feature_arrays(features or {}, sids).items():
        if m in subject_X:
            raise ValueError(f"feature set {m!r} has the name of another method")
        subject_X[m] = X
    kinds = {t.name: t.kind for t in tasks}
    subtype = any(kinds[t] == "subtype" for t in targets)
    y_sub = subtype_targets(store, sids, threshold=subtype_threshold) if subtype else None
    if subtype and include_qct:
        patch_X = {"qct": patch_qct_features(store, sids), **patch_X}
    for m, parts in (compose or {}).items():
        unknown = [p for p in parts if p not in subject_X]
        if unknown or m in subject_X:
            raise ValueError(f"compose[{m!r}]: " + (f"unknown methods {unknown}; have {sorted(subject_X)}" if unknown
                                                   else "the name of another method"))
        subject_X[m] = compose_blocks([subject_X[p] for p in parts], pca_components)
        if subtype and all(p in patch_X for p in parts):
            patch_X[m] = compose_blocks([patch_X[p] for p in parts], pca_components).astype(np.float32)
    subject_X, targets = _drop_unscanned(subject_X, targets, sids)
    sizes = {}
    for task, y in targets.items():
        if isinstance(y, tuple):
            labelled = np.isfinite(np.asarray(y[0], dtype=np.float64)) & np.isfinite(np.asarray(y[1], dtype=np.float64))
        elif kinds[task] == "subtype":
            labelled = (y_sub >= 0).any(axis=1)
        else:
            labelled = np.isfinite(np.asarray(y, dtype=np.float64))
        sizes[task] = _fold_sizes(labelled, fold)

    # the first survival task that runs (else the first named) feeds time, event and risk (KM plot)
    survival = [t for t in targets if kinds[t] == "survival"] + [t.name for t in tasks if t.kind == "survival"]
    spec = {t.name: t for t in tasks}
    first = task_values(table, sids, spec[survival[0]]) if survival else None
    time, event = first if first is not None else (np.full(len(sids), np.nan),) * 2
    rows: list = []
    long: list = []
    risk: dict[str, np.ndarray] = {}
    proba: dict[str, np.ndarray] = {}
    for m in tqdm(list(subject_X), desc="downstream (methods)", disable=not progress, leave=False):
        X = subject_X[m]
        for task, y in targets.items():
            kind = kinds[task]
            if kind == "continuous":
                scores, pred = cv_regression(X, y, fold)
                _summarise(m, task, scores, ["r2"], int(np.isfinite(y).sum()), rows, long, sizes[task])
                ok = np.isfinite(pred) & np.isfinite(y)
                rows.append({"method": m, "task": task, "metric": "r2_oof", "mean": _r2(y[ok], pred[ok]),
                             "sd": float("nan"), "folds": int(len(scores)), "n": int(ok.sum())})
            elif kind in {"ordinal", "categorical"}:
                scores, _ = cv_classification(X, y, fold, C=C)
                _summarise(m, task, scores, ["accuracy", "auc_macro"], int(np.isfinite(y).sum()), rows, long,
                           sizes[task])
            elif kind == "survival":
                t, e = y
                scores, r = cv_cox(X, t, e, fold, n_components=pca_components, penalizer=penalizer)
                if task == survival[0]:
                    risk[m] = r
                _summarise(m, task, scores, ["c_index"], int((np.isfinite(t) & np.isfinite(e)).sum()), rows, long,
                           sizes[task])
            elif m in patch_X:  # subtype: patch embeddings (and the per-patch QCT features)
                scores, proba[m] = cv_patch_classifier(patch_X[m], y_sub, fold, C=patch_C,
                                                       max_train=max_train_patches, seed=seed)
                metrics = ["auc_macro", *[f"auc_{n}" for n in SUBTYPE_NAMES], "accuracy"]
                _summarise(m, task, scores, metrics, int((y_sub >= 0).sum()), rows, long, sizes[task])
    settings = dict(tasks=format_tasks(tasks), folds=folds, seed=seed, pool=pool, include_qct=include_qct,
                    pca_components=pca_components, penalizer=penalizer, C=C, patch_C=patch_C,
                    subtype_threshold=subtype_threshold, max_train_patches=max_train_patches,
                    features=sorted(features or {}), compose={k: list(v) for k, v in (compose or {}).items()},
                    num_subjects=len(sids), num_groups=int(len(np.unique(groups))),
                    group_column=GROUP_COLUMN if GROUP_COLUMN in table.columns else None, store=str(store.root))
    return DownstreamResult(
        table=pd.DataFrame(rows, columns=TABLE_COLUMNS),
        per_fold=pd.DataFrame(long, columns=["method", "task", "metric", "fold", "value", "n_train", "n_test"]),
        sids=sids, fold=fold, time=time, event=event, risk=risk, subtype_true=y_sub, subtype_proba=proba,
        settings=settings, survival_task=survival[0] if survival else "survival", groups=groups)
