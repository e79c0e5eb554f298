import numpy as np
import pytest

from drasclr_lib.downstream.folds import make_folds
from drasclr_lib.downstream.prediction import cv_classification, cv_regression, macro_auc_ovr


def test_ridge_recovers_linear_signal_and_not_noise():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 20))
    y = X @ rng.normal(size=20) + 0.1 * rng.normal(size=80)
    fold = make_folds(80, k=5, seed=0)
    scores, pred = cv_regression(X, y, fold)
    assert len(scores) == 5 and scores.r2.mean() > 0.9
    assert np.isfinite(pred).all()
    noise = rng.normal(size=80)
    scores, _ = cv_regression(X, noise, fold)
    assert scores.r2.mean() < 0.05


def test_missing_labels_are_dropped_not_crashed_on():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    y = X[:, 0] * 3 + 0.1 * rng.normal(size=40)
    y[::7] = np.nan
    fold = make_folds(40, k=4, seed=0)
    scores, pred = cv_regression(X, y, fold)
    assert np.isnan(pred[::7]).all() and np.isfinite(pred[np.isfinite(y)]).all()
    assert scores.r2.mean() > 0.8
    cls = np.where(X[:, 1] > 0, 1.0, 0.0)
    cls[::5] = np.nan
    scores, proba = cv_classification(X, cls, fold, C=1.0)
    assert np.isnan(proba[::5]).all()
    assert scores.accuracy.mean() > 0.8 and scores.auc_macro.mean() > 0.9


def test_classification_handles_classes_missing_from_a_fold():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 4))
    y = (X[:, 0] > 0).astype(float)
    y[0] = 2.0  # a class with a single subject: absent from every training fold but one
    fold = make_folds(30, k=5, seed=0)
    scores, proba = cv_classification(X, y, fold)
    assert proba.shape == (30, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert proba[0, 2] == 0.0  # never seen in training -> probability 0
    assert np.isfinite(scores.auc_macro).all()


def test_one_class_training_fold_predicts_that_class():
    X = np.arange(10, dtype=float)[:, None]
    y = np.array([0.0] * 8 + [1.0] * 2)
    fold = np.array([0] * 8 + [1] * 2)
    scores, proba = cv_classification(X, y, fold)
    np.testing.assert_array_equal(proba[8:], [[1.0, 0.0]] * 2)


def test_macro_auc_skips_unscorable_classes():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1, 0], [0.8, 0.2, 0], [0.3, 0.7, 0], [0.1, 0.9, 0]])
    auc, per = macro_auc_ovr(y, p, np.array([0, 1, 2]))
    assert auc == 1.0 and set(per) == {0, 1}


def test_shape_errors():
    with pytest.raises(ValueError):
        cv_regression(np.zeros((5, 2)), np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError):
        cv_classification(np.zeros((5, 2)), np.zeros(5), np.zeros(5), C=0)
