"""Survival from subject features: cross-validated Cox model, concordance, Kaplan-Meier.

Inside each training fold the features are median-imputed, standardised and reduced with PCA
(fitted on the training fold only), then a penalised Cox proportional-hazards model
(``lifelines.CoxPHFitter``, ridge penalty) is fitted. The test fold's risk is the predicted
partial hazard; a higher hazard means shorter survival, so the concordance index is
``lifelines.utils.concordance_index(time, -risk, event)``. Censored subjects (``event = 0``)
take part exactly as Harrell's C allows: only pairs whose shorter time is an observed event are
compared. :func:`harrell_c` is an independent O(n²) implementation used to check lifelines.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from drasclr_lib.downstream.folds import task_split

__all__ = ["harrell_c", "cv_cox", "risk_groups", "km_logrank"]


def harrell_c(time: np.ndarray, risk: np.ndarray, event: np.ndarray) -> float:
    """Harrell's concordance index of a risk score, O(n²), ties as lifelines treats them.

    A pair (i, j) is comparable when subject i had an observed event at ``time[i]`` and subject j
    left the study later (``time[j] > time[i]``, event or censored) or was censored at the same
    time (``time[j] == time[i]``, ``event[j] == 0``). Two events at the same time are not
    comparable. A comparable pair is concordant when ``risk[i] > risk[j]`` (the earlier failure had
    the higher risk) and counts one half when the risks are equal.

    Args:
        time: (n,) follow-up times.
        risk: (n,) risk scores (higher = expected to fail sooner).
        event: (n,) 1 when the event was observed, 0 when censored.

    Returns:
        The C-index in [0, 1].

    Raises:
        ValueError: when no pair is comparable or the shapes differ.
    """
    time = np.asarray(time, dtype=np.float64)
    risk = np.asarray(risk, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    if not (time.shape == risk.shape == event.shape) or time.ndim != 1:
        raise ValueError(f"time {time.shape}, risk {risk.shape} and event {event.shape} must be equal 1-D shapes")
    num = 0.0
    pairs = 0
    for i in np.flatnonzero(event):
        later = (time > time[i]) | ((time == time[i]) & ~event)
        pairs += int(later.sum())
        num += float(np.sum(risk[i] > risk[later]) + 0.5 * np.sum(risk[i] == risk[later]))
    if pairs == 0:
        raise ValueError("no comparable pairs: every subject is censored or all events are tied")
    return num / pairs


def _cox_fit_predict(X_train, t_train, e_train, X_test, *, n_components: int, penalizer: float) -> np.ndarray:
    from lifelines import CoxPHFitter
    from sklearn.decomposition import PCA
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = int(max(1, min(n_components, X_train.shape[1], len(X_train) - 2)))
    reducer = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), PCA(n_components=k, random_state=0))
    z_train = reducer.fit_transform(X_train)
    z_test = reducer.transform(X_test)
    keep = z_train.std(axis=0) > 1e-8  # constant components (e.g. a constant feature) break the fit
    if not keep.any():
        return np.zeros(len(X_test))  # nothing varies: every test subject gets the same risk
    z_train, z_test, k = z_train[:, keep], z_test[:, keep], int(keep.sum())
    cols = [f"pc{i}" for i in range(k)]
    df = pd.DataFrame(z_train, columns=cols)
    df["time"], df["event"] = t_train, e_train
    last = None
    for pen in (penalizer, penalizer * 10, penalizer * 100):  # rare non-convergence: penalise harder
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cph = CoxPHFitter(penalizer=pen).fit(df, duration_col="time", event_col="event")
            return np.asarray(cph.predict_partial_hazard(pd.DataFrame(z_test, columns=cols)), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - lifelines raises ConvergenceError and LinAlg errors
            last = exc
    raise RuntimeError(f"Cox model did not converge even with penalizer {penalizer * 100}: {last}")


def cv_cox(X: np.ndarray, time: np.ndarray, event: np.ndarray, fold: np.ndarray, *, n_components: int = 8,
           penalizer: float = 0.1) -> tuple[pd.DataFrame, np.ndarray]:
    """Cross-validated penalised Cox model on PCA-reduced features.

    Args:
        X: (N, D) subject features.
        time: (N,) follow-up time (years); NaN = unknown, dropped.
        event: (N,) 1 death observed, 0 censored; NaN = unknown, dropped.
        fold: (N,) fold of each subject (the folds shared by every method).
        n_components: PCA components kept (capped by D and the training-fold size).
        penalizer: lifelines' ridge penalty.

    Returns:
        ``(scores, risk)``: one row per fold with a comparable pair, columns
        ``fold, c_index, n_test, n_events``; risk (N,) out-of-fold partial hazards (NaN where
        unknown). Folds without any event in training are skipped.

    Raises:
        ValueError: for inconsistent shapes or a negative time.
    """
    from lifelines.utils import concordance_index

    X = np.asarray(X, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=np.float64)
    fold = np.asarray(fold)
    if X.ndim != 2 or not (time.shape == event.shape == fold.shape == (len(X),)):
        raise ValueError(f"X {X.shape}, time {time.shape}, event {event.shape}, fold {fold.shape} disagree")
    valid = np.isfinite(time) & np.isfinite(event)
    if np.any(time[valid] < 0):
        raise ValueError("survival times must be non-negative")
    risk = np.full(len(X), np.nan)
    rows = []
    for f, train, test in task_split(fold, valid):
        if event[train].sum() < 1 or len(train) < 4:
            continue
        risk[test] = _cox_fit_predict(X[train], time[train], event[train], X[test], n_components=n_components,
                                      penalizer=penalizer)
        try:
            c = concordance_index(time[test], -risk[test], event[test])
        except ZeroDivisionError:  # no comparable pair in this test fold
            continue
        rows.append({"fold": f, "c_index": float(c), "n_test": len(test), "n_events": int(event[test].sum())})
    return pd.DataFrame(rows, columns=["fold", "c_index", "n_test", "n_events"]), risk


def risk_groups(risk: np.ndarray, n_groups: int = 3) -> np.ndarray:
    """Split subjects into risk quantile groups (0 = lowest risk), -1 where the risk is NaN.

    Args:
        risk: (N,) risk scores.
        n_groups: 3 for tertiles.
    """
    risk = np.asarray(risk, dtype=np.float64)
    group = np.full(len(risk), -1, dtype=np.int64)
    ok = np.isfinite(risk)
    if ok.sum() >= n_groups:
        ranks = pd.Series(risk[ok]).rank(method="first").to_numpy()
        group[ok] = np.minimum(((ranks - 1) * n_groups / ok.sum()).astype(int), n_groups - 1)
    return group


def km_logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[dict, float]:
    """Kaplan-Meier fits per group and a multivariate log-rank test between the groups.

    Args:
        time: (N,) follow-up times; event: (N,) 0/1; group: (N,) group id, -1 = left out.

    Returns:
        ``(fits, p_value)``: ``{group: KaplanMeierFitter}`` and the log-rank p-value (NaN when fewer
        than two groups have subjects).
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=np.float64)
    group = np.asarray(group)
    ok = (group >= 0) & np.isfinite(time) & np.isfinite(event)
    fits = {}
    for g in np.unique(group[ok]):
        m = ok & (group == g)
        fits[int(g)] = KaplanMeierFitter().fit(time[m], event[m], label=f"group {g}")
    if len(fits) < 2:
        return fits, float("nan")
    res = multivariate_logrank_test(time[ok], group[ok], event[ok])
    return fits, float(res.p_value)
