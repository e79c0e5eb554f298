"""Cross-validation folds shared by every method of a comparison.

Folds are drawn once per cohort from a seed (over subjects, stratified when a stratum is given)
and then reused for every method and every task, so differences between methods are never
differences between splits. Subjects whose label for a task is missing stay in their fold and are
simply left out of that task (see :func:`task_split`).

With patient groups (the manifest's ``group`` column: several scans of one patient), whole groups
are assigned to folds, so no patient is in the training and the test side of a split.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

__all__ = ["make_folds", "iter_folds", "task_split"]


def _merge_rare(strata: np.ndarray, k: int) -> np.ndarray:
    """Pool strata with fewer than ``k`` members into one; if that pool is still too small, add it
    to the largest stratum (so StratifiedKFold can always place every stratum)."""
    strata = np.asarray(strata).astype(str)
    values, counts = np.unique(strata, return_counts=True)
    rare = set(values[counts < k])
    if not rare:
        return strata
    out = np.where(np.isin(strata, list(rare)), "__rare__", strata)
    values, counts = np.unique(out, return_counts=True)
    if "__rare__" in values and counts[list(values).index("__rare__")] < k:
        common = [(c, v) for v, c in zip(values, counts) if v != "__rare__"]
        if common:
            out = np.where(out == "__rare__", max(common)[1], out)
    return out


def _group_strata(codes: np.ndarray, strata: np.ndarray | None, n_groups: int) -> np.ndarray | None:
    """One stratum per group: the most frequent stratum of its members (ties: the first member's)."""
    if strata is None:
        return None
    out = np.empty(n_groups, dtype=object)
    for g in range(n_groups):
        members = [str(s) for s in strata[codes == g]]
        counts = {s: members.count(s) for s in members}
        out[g] = max(counts, key=lambda s: (counts[s], -members.index(s)))
    return out


def make_folds(n: int, *, k: int = 5, seed: int = 0, strata: np.ndarray | None = None,
               groups: np.ndarray | None = None) -> np.ndarray:
    """Assign N subjects to ``k`` folds, once, reproducibly.

    Args:
        n: number of subjects N.
        k: number of folds (2 <= k <= N, or the number of groups).
        seed: seed of the shuffling; the same seed gives the same folds.
        strata: optional (N,) stratum per subject (e.g. GOLD stage; NaN is a stratum of its own).
            Strata with fewer than ``k`` subjects are pooled so that stratification never fails.
        groups: optional (N,) group per subject (patient id; any hashable values, e.g. the codes of
            :func:`drasclr_lib.training.data.subject_groups`). The members of a group share one fold;
            groups, not subjects, are shuffled and stratified (a group's stratum is its members'
            most frequent one). When every group has one member the folds are those without groups.

    Returns:
        fold (N,) int64 in [0, k): the test fold of every subject; every fold is non-empty.

    Raises:
        ValueError: for k < 2, k > n (or more folds than groups), or strata or groups of the wrong
            length.
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    n, k = int(n), int(k)
    if k < 2:
        raise ValueError(f"k must be >= 2 folds, got {k}")
    if k > n:
        raise ValueError(f"cannot make {k} folds from {n} subjects")
    if strata is not None:
        strata = np.asarray(strata, dtype=object)
        if strata.shape != (n,):
            raise ValueError(f"strata must have shape ({n},), got {strata.shape}")
    if groups is not None:
        groups = np.asarray(groups, dtype=object)
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
        codes, uniques = pd.factorize(pd.Series([str(g) for g in groups]), sort=False)
        if len(uniques) < n:  # some group has several subjects: fold the groups
            if k > len(uniques):
                raise ValueError(f"cannot make {k} folds from {len(uniques)} patient groups ({n} subjects)")
            group_fold = make_folds(len(uniques), k=k, seed=seed, strata=_group_strata(codes, strata, len(uniques)))
            return group_fold[codes]
    fold = np.full(n, -1, dtype=np.int64)
    idx = np.arange(n)
    if strata is not None:
        strata = _merge_rare(np.array([str(s) for s in strata]), k)
        if len(np.unique(strata)) > 1:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            for f, (_, test) in enumerate(splitter.split(idx, strata)):
                fold[test] = f
            return fold
    for f, (_, test) in enumerate(KFold(n_splits=k, shuffle=True, random_state=seed).split(idx)):
        fold[test] = f
    return fold


def iter_folds(fold: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(f, train_idx, test_idx)`` for each fold id in ``fold (N,)``, in increasing order."""
    fold = np.asarray(fold)
    for f in np.unique(fold):
        yield int(f), np.flatnonzero(fold != f), np.flatnonzero(fold == f)


def task_split(fold: np.ndarray, valid: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Like :func:`iter_folds`, restricted to subjects with ``valid (N,) bool`` labels.

    The fold of each subject is unchanged; subjects with a missing label are dropped from both
    the training and the test side. Folds left with an empty side are skipped.
    """
    valid = np.asarray(valid, dtype=bool)
    for f, train, test in iter_folds(fold):
        train, test = train[valid[train]], test[valid[test]]
        if len(train) and len(test):
            yield f, train, test
