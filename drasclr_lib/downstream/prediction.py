"""Subject-level prediction from pooled embeddings (or any subject features) with k-fold CV.

- Continuous targets (FEV1 % predicted, FEV1/FVC): ridge regression on standardised features,
  the penalty chosen inside each training fold by efficient leave-one-out CV
  (:func:`ridge_cv_model`, alphas :data:`RIDGE_ALPHAS` = 10^-2 .. 10^5); score R² on the test fold.
  The same model is the disease probe of patch embeddings (:func:`drasclr_lib.viz.metrics.ridge_cv_score`).
- Ordinal / categorical targets (GOLD stage, visual emphysema and paraseptal grades): multinomial
  logistic regression on standardised features (L2, fixed ``C``, documented default 0.1 — strong
  regularisation for a few dozen subjects and 128-256 features); scores accuracy and the macro
  one-vs-rest AUC over the classes that can be scored in the test fold.

Missing labels (NaN) are dropped per task; missing feature values are imputed with the training
fold's median. Every function takes the fold assignment made once by
:func:`drasclr_lib.downstream.folds.make_folds`, so all methods see the same splits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from drasclr_lib.downstream.folds import task_split

__all__ = ["RIDGE_ALPHAS", "ridge_cv_model", "cv_regression", "cv_classification", "macro_auc_ovr"]

#: Ridge penalties tried by :func:`ridge_cv_model`, 10^-2 .. 10^5 in half decades: one grid for
#: subject-level prediction (tens of subjects) and the patch probe (thousands of patches). It is the
#: union of the two grids used before (10^-2..10^4 here, 10^-2..10^5 in the probe); the top decade
#: lets many, weakly informative embedding features shrink towards the mean prediction.
RIDGE_ALPHAS = np.logspace(-2, 5, 15)


def _check_xy(X: np.ndarray, y: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    fold = np.asarray(fold)
    if X.ndim != 2:
        raise ValueError(f"features must be (N, D), got {X.shape}")
    if y.shape != (len(X),) or fold.shape != (len(X),):
        raise ValueError(f"labels {y.shape} and folds {fold.shape} must both be ({len(X)},)")
    return X, y, fold


def ridge_cv_model(alphas=None):
    """An unfitted cross-validated ridge regression: median imputation, standardisation, ``RidgeCV``.

    ``fit(X (n, D), y (n,))`` imputes missing feature values with the training medians, standardises
    the features and picks the penalty among ``alphas`` by efficient leave-one-out CV on the
    training rows only; ``predict(X (m, D)) -> (m,)``.

    Args:
        alphas: candidate penalties; default :data:`RIDGE_ALPHAS`.

    Returns:
        A scikit-learn ``Pipeline``.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    alphas = RIDGE_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64)
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                         RidgeCV(alphas=alphas))


def cv_regression(X: np.ndarray, y: np.ndarray, fold: np.ndarray, *, min_test: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """Cross-validated ridge regression.

    Args:
        X: (N, D) subject features.
        y: (N,) continuous target; NaN = missing, dropped.
        fold: (N,) fold of each subject.
        min_test: folds with fewer labelled test subjects are skipped (R² needs variance).

    Returns:
        ``(scores, pred)``: scores has one row per evaluated fold with columns ``fold, r2, n_test``;
        pred (N,) out-of-fold predictions (NaN where the label is missing or the fold skipped).

    Raises:
        ValueError: for inconsistent shapes.
    """
    from sklearn.metrics import r2_score

    X, y, fold = _check_xy(X, y, fold)
    pred = np.full(len(y), np.nan)
    rows = []
    for f, train, test in task_split(fold, np.isfinite(y)):
        if len(test) < min_test or len(train) < 3:
            continue
        model = ridge_cv_model().fit(X[train], y[train])
        pred[test] = model.predict(X[test])
        if np.ptp(y[test]) == 0:
            continue
        rows.append({"fold": f, "r2": float(r2_score(y[test], pred[test])), "n_test": len(test)})
    return pd.DataFrame(rows, columns=["fold", "r2", "n_test"]), pred


def macro_auc_ovr(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[float, dict]:
    """Macro one-vs-rest AUC over the classes that can be scored.

    A class is scored when the test labels hold both members and non-members of it; classes
    absent from the test fold (or present in every test subject) are skipped rather than
    breaking the average.

    Args:
        y_true: (n,) labels.
        proba: (n, C) predicted probabilities, column c for ``classes[c]``.
        classes: (C,) the class of each column.

    Returns:
        ``(macro_auc, per_class)``: the mean over scored classes (NaN when none can be scored)
        and ``{class: auc}`` for the scored ones.
    """
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    per = {}
    for c, cls in enumerate(classes):
        pos = y_true == cls
        if pos.any() and (~pos).any():
            per[cls] = float(roc_auc_score(pos, proba[:, c]))
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def _fit_predict_proba(X_train, y_train, X_test, classes, C: float) -> np.ndarray:
    """Probabilities (n_test, len(classes)); classes never seen in training get probability 0."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    proba = np.zeros((len(X_test), len(classes)))
    seen = np.unique(y_train)
    col = {cls: i for i, cls in enumerate(classes)}
    if len(seen) == 1:  # a one-class training fold predicts that class
        proba[:, col[seen[0]]] = 1.0
        return proba
    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                          LogisticRegression(C=C, max_iter=2000))
    model.fit(X_train, y_train)
    p = model.predict_proba(X_test)
    for j, cls in enumerate(model.classes_):
        proba[:, col[cls]] = p[:, j]
    return proba


def cv_classification(X: np.ndarray, y: np.ndarray, fold: np.ndarray, *, C: float = 0.1) -> tuple[pd.DataFrame, np.ndarray]:
    """Cross-validated multinomial logistic regression.

    Args:
        X: (N, D) subject features.
        y: (N,) class labels (integers stored as float are fine); NaN = missing, dropped.
        fold: (N,) fold of each subject.
        C: inverse L2 penalty of the logistic regression (features standardised).

    Returns:
        ``(scores, proba)``: scores has one row per evaluated fold with columns
        ``fold, accuracy, auc_macro, n_test, n_classes_scored``; proba (N, C) out-of-fold
        probabilities over the classes present in the labelled subjects (NaN rows for the
        unlabelled), classes in increasing order.

    Raises:
        ValueError: for inconsistent shapes or C <= 0.
    """
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    X, y, fold = _check_xy(X, y, fold)
    valid = np.isfinite(y)
    classes = np.unique(y[valid])
    proba = np.full((len(y), len(classes)), np.nan)
    rows = []
    if len(classes) < 2:
        return pd.DataFrame(rows, columns=["fold", "accuracy", "auc_macro", "n_test", "n_classes_scored"]), proba
    for f, train, test in task_split(fold, valid):
        p = _fit_predict_proba(X[train], y[train], X[test], classes, C)
        proba[test] = p
        acc = float(np.mean(classes[p.argmax(1)] == y[test]))
        auc, per = macro_auc_ovr(y[test], p, classes)
        rows.append({"fold": f, "accuracy": acc, "auc_macro": auc, "n_test": len(test), "n_classes_scored": len(per)})
    return pd.DataFrame(rows, columns=["fold", "accuracy", "auc_macro", "n_test", "n_classes_scored"]), proba
