"""Intervals for scores from repeated cross-validation: per method, and for paired differences.

A benchmark scores every method on the same folds: R repeats of K-fold cross-validation
(``J = R * K`` train/test splits), each learned encoder with S pretraining seeds. Its long table
(``per_fold``) has one score per ``(method, seed, repeat, fold, task, metric)`` with the fold's
``n_train`` and ``n_test`` (labelled subjects). Everything here is computed from that table alone,
so a reader can recompute every interval from the per-fold CSV.

**Why not a plain t-interval over the J scores.** The J test folds are not independent samples:
every subject is tested once per repeat and the training sets of two splits overlap by most of
their subjects, so the scores are positively correlated and their sample variance understates the
variance of their mean. Nadeau & Bengio (Machine Learning 52, 2003) model the correlation as
``rho = n_test / (n_train + n_test)`` and obtain the *corrected resampled t-test* (Bouckaert &
Frank, PAKDD 2004, for repeated k-fold): with ``x_1..x_J`` the per-split values (a score, or a
paired difference of two methods on the same split),

    mean  = (1/J) sum x_j
    S²    = sample variance of the x_j (ddof 1)
    var   = (1/J + n_test / n_train) S²
    CI    = mean ± t_{J-1, 1-α/2} sqrt(var),   t = mean / sqrt(var) with J - 1 degrees of freedom

``n_test / n_train`` is the ratio of the mean test and training sizes over the splits. With one
repeat of 5 folds the correction multiplies the naive variance ``S²/J`` by 2; with 5 x 5 it
multiplies it by 7.25: more repeats shrink the interval far less than more subjects do.

**Seeds.** Pretraining seeds are a second source of variance. Scores are first averaged over the
seeds within each split (``(repeat, fold)`` cell) and the corrected t-test is applied to the J cell
means, so the interval is for the seed-averaged method (the quantity the table reports: its mean
over all (seed, repeat, fold) scores, equal to the mean of the cell means when every cell has every
seed). The seed-to-seed standard deviation (SD over seeds of each seed's mean over all splits) is
reported beside it, so a reader sees how much one pretraining run would differ.

**Paired differences** ``a - b`` are taken per ``(seed, repeat, fold)`` when both methods have
seeds (seed s of DrasCLR against seed s of MoCo: same data order, same folds), and per
``(repeat, fold)`` against a method without seeds (``qct``, ``oracle``: the same value is
subtracted from every seed's score). Then as above: seed average per split, corrected t-test.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["corrected_t_interval", "cell_means", "seed_sd", "summarise_scores", "paired_differences",
           "PER_FOLD_COLUMNS", "SUMMARY_COLUMNS", "PAIRED_COLUMNS"]

#: Columns of the per-fold long table the functions below read (``seed`` NaN for seedless methods).
PER_FOLD_COLUMNS = ["method", "seed", "repeat", "fold", "task", "metric", "value", "n_train", "n_test"]
SUMMARY_COLUMNS = ["method", "task", "metric", "mean", "ci_low", "ci_high", "se", "dof", "n_scores", "n_splits",
                   "n_seeds", "seed_sd", "n_test_mean", "n_train_mean"]
PAIRED_COLUMNS = ["a", "b", "task", "metric", "diff", "ci_low", "ci_high", "se", "t", "p", "dof", "n_splits",
                  "n_seeds", "seed_sd", "n_test_mean", "n_train_mean"]


def corrected_t_interval(x: Sequence[float], n_train: float, n_test: float, level: float = 0.95) -> dict:
    """Nadeau-Bengio corrected resampled t interval of the mean of J per-split values.

    Args:
        x: (J,) one value per train/test split (a score or a paired difference); NaN are dropped.
        n_train: (mean) number of training subjects per split.
        n_test: (mean) number of test subjects per split.
        level: coverage of the interval.

    Returns:
        ``{"mean", "ci_low", "ci_high", "se", "t", "p", "dof", "n"}``: ``se`` the corrected
        standard error ``sqrt((1/J + n_test/n_train) S²)``, ``t = mean / se`` with ``dof = J - 1``
        and its two-sided p-value. With J < 2 the interval, ``se``, ``t`` and ``p`` are NaN; with
        ``S² = 0`` the interval is the point itself.

    Raises:
        ValueError: for ``n_train <= 0``, ``n_test < 0`` or a level outside (0, 1).
    """
    from scipy import stats

    if not n_train > 0 or not n_test >= 0:
        raise ValueError(f"n_train must be > 0 and n_test >= 0, got n_train={n_train}, n_test={n_test}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    J = len(x)
    nan = float("nan")
    mean = float(x.mean()) if J else nan
    if J < 2:
        return {"mean": mean, "ci_low": nan, "ci_high": nan, "se": nan, "t": nan, "p": nan, "dof": J - 1, "n": J}
    se = float(np.sqrt((1.0 / J + n_test / n_train) * x.var(ddof=1)))
    half = float(stats.t.ppf(0.5 + level / 2, J - 1)) * se
    if se > 0:
        t = mean / se
        p = float(2 * stats.t.sf(abs(t), J - 1))
    else:
        t, p = (nan, 1.0) if mean == 0 else (float(np.sign(mean)) * np.inf, 0.0)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "se": se, "t": float(t), "p": p,
            "dof": J - 1, "n": J}


def cell_means(rows: pd.DataFrame, column: str = "value") -> pd.DataFrame:
    """Average ``column`` over seeds within each ``(repeat, fold)`` split (finite values only).

    Returns:
        DataFrame ``repeat, fold, value, n_train, n_test`` (one row per split with a finite value).
    """
    ok = rows[np.isfinite(rows[column].to_numpy(dtype=np.float64))]
    g = ok.groupby(["repeat", "fold"], sort=True)
    return g.agg(value=(column, "mean"), n_train=("n_train", "mean"), n_test=("n_test", "mean")).reset_index()


def seed_sd(rows: pd.DataFrame, column: str = "value") -> tuple[int, float]:
    """``(number of seeds, SD over seeds of each seed's mean over its splits)``; SD NaN with < 2 seeds."""
    ok = rows[np.isfinite(rows[column].to_numpy(dtype=np.float64)) & rows["seed"].notna()]
    per_seed = ok.groupby("seed")[column].mean()
    return int(len(per_seed)), float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")


def _check(per_fold: pd.DataFrame) -> None:
    missing = [c for c in PER_FOLD_COLUMNS if c not in per_fold.columns]
    if missing:
        raise KeyError(f"the per-fold table lacks columns {missing}; expected {PER_FOLD_COLUMNS}")


def summarise_scores(per_fold: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Mean and corrected 95 % interval of every ``(method, task, metric)`` of a per-fold table.

    Args:
        per_fold: long table with :data:`PER_FOLD_COLUMNS`.
        level: coverage of the intervals.

    Returns:
        DataFrame with :data:`SUMMARY_COLUMNS`, in the order the methods first appear: ``mean``
        over every finite (seed, repeat, fold) score, the interval of the seed-averaged split
        means (:func:`corrected_t_interval`), ``n_scores``, ``n_splits``, ``n_seeds`` and
        ``seed_sd``.

    Raises:
        KeyError: when a column is missing.
    """
    _check(per_fold)
    out = []
    for (method, task, metric), rows in per_fold.groupby(["method", "task", "metric"], sort=False):
        cells = cell_means(rows)
        vals = rows["value"].to_numpy(dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        n_seeds, sd = seed_sd(rows)
        base = {"method": method, "task": task, "metric": metric, "n_scores": int(len(vals)),
                "n_splits": int(len(cells)), "n_seeds": n_seeds, "seed_sd": sd}
        if len(cells) == 0:
            out.append({**base, "mean": float("nan")})
            continue
        ci = corrected_t_interval(cells["value"], cells["n_train"].mean(), cells["n_test"].mean(), level)
        out.append({**base, "mean": float(vals.mean()), "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                    "se": ci["se"], "dof": ci["dof"], "n_test_mean": float(cells["n_test"].mean()),
                    "n_train_mean": float(cells["n_train"].mean())})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _has_seeds(rows: pd.DataFrame) -> bool:
    return bool(rows["seed"].notna().any())


def paired_differences(per_fold: pd.DataFrame, pairs: Sequence[tuple[str, str]], level: float = 0.95) -> pd.DataFrame:
    """Paired differences ``a - b`` with corrected intervals, for every task and metric both have.

    Args:
        per_fold: long table with :data:`PER_FOLD_COLUMNS`.
        pairs: ``[(a, b), ...]`` method names; a pair with a method absent from the table is skipped.
        level: coverage of the intervals.

    Returns:
        DataFrame with :data:`PAIRED_COLUMNS`: ``diff`` the mean of the seed-averaged split
        differences, its interval, ``t``, two-sided ``p``, ``seed_sd`` (SD over seeds of each
        seed's mean difference; NaN when neither method has seeds).

    Raises:
        KeyError: when a column is missing.
    """
    _check(per_fold)
    out = []
    methods = set(per_fold["method"])
    for a, b in pairs:
        if a not in methods or b not in methods:
            continue
        A, B = per_fold[per_fold["method"] == a], per_fold[per_fold["method"] == b]
        keys = ["task", "metric", "repeat", "fold"]
        if _has_seeds(A) and _has_seeds(B):
            keys.append("seed")
        extra = [] if "seed" in keys else ["seed"]  # one side has no seeds: its value is paired with every seed
        m = A[keys + extra + ["value", "n_train", "n_test"]].merge(B[keys + extra + ["value"]], on=keys,
                                                                   suffixes=("_a", "_b"))
        if extra:
            m["seed"] = m["seed_a"].combine_first(m["seed_b"])
        m["diff"] = m["value_a"] - m["value_b"]
        for (task, metric), rows in m.groupby(["task", "metric"], sort=False):
            cells = cell_means(rows, "diff")
            n_seeds, sd = seed_sd(rows, "diff")
            base = {"a": a, "b": b, "task": task, "metric": metric, "n_splits": int(len(cells)), "n_seeds": n_seeds,
                    "seed_sd": sd}
            if len(cells) == 0:
                out.append({**base, "diff": float("nan")})
                continue
            ci = corrected_t_interval(cells["value"], cells["n_train"].mean(), cells["n_test"].mean(), level)
            out.append({**base, "diff": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "se": ci["se"],
                        "t": ci["t"], "p": ci["p"], "dof": ci["dof"], "n_test_mean": float(cells["n_test"].mean()),
                        "n_train_mean": float(cells["n_train"].mean())})
    return pd.DataFrame(out, columns=PAIRED_COLUMNS)
