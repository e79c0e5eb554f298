import numpy as np
import pytest
from lifelines.utils import concordance_index

from drasclr_lib.downstream.folds import make_folds
from drasclr_lib.downstream.survival import cv_cox, harrell_c, km_logrank, risk_groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lifelines_c_index_matches_independent_harrell_with_censoring_and_ties(seed):
    rng = np.random.default_rng(seed)
    n = 60
    time = rng.integers(1, 15, size=n).astype(float)  # integer times -> many tied times
    event = (rng.random(n) < 0.6).astype(float)       # ~40 % censored
    risk = np.round(rng.normal(size=n), 1)            # tied risks too
    ours = harrell_c(time, risk, event)
    theirs = concordance_index(time, -risk, event)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_harrell_c_known_values_and_errors():
    t = np.array([1.0, 2.0, 3.0])
    assert harrell_c(t, np.array([3.0, 2.0, 1.0]), np.ones(3)) == 1.0
    assert harrell_c(t, np.array([1.0, 2.0, 3.0]), np.ones(3)) == 0.0
    # subject 0 censored: only pair (1, 2) is comparable
    assert harrell_c(t, np.array([0.0, 2.0, 1.0]), np.array([0, 1, 1])) == 1.0
    with pytest.raises(ValueError):
        harrell_c(t, t, np.zeros(3))


def _cohort(n, seed, signal=1.5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)  # disease factor: the direction of largest variance, as PCA assumes
    X = z[:, None] * rng.normal(1.0, 0.2, size=10) + 0.5 * rng.normal(size=(n, 10))
    hazard = np.exp(signal * z)
    t_event = rng.exponential(1 / hazard)
    t_cens = rng.exponential(1.5, size=n)
    time = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(float)
    return X, time, event


def test_cv_cox_learns_risk_with_censoring_and_missing_survival():
    X, time, event = _cohort(90, 0)
    assert 0.2 < 1 - event.mean() < 0.8  # real censoring
    time[:4] = np.nan  # unknown follow-up
    fold = make_folds(90, k=5, seed=0)
    scores, risk = cv_cox(X, time, event, fold, n_components=4, penalizer=0.1)
    assert np.isnan(risk[:4]).all() and np.isfinite(risk[4:]).all()
    assert len(scores) == 5 and scores.c_index.mean() > 0.65
    # risk direction: higher partial hazard = shorter survival, so pooled C is above 0.5
    assert harrell_c(time[4:], risk[4:], event[4:]) > 0.65
    Xn = np.random.default_rng(9).normal(size=X.shape)
    scores, _ = cv_cox(Xn, time, event, fold, n_components=4)
    assert abs(scores.c_index.mean() - 0.5) < 0.12


def test_risk_groups_and_logrank():
    X, time, event = _cohort(90, 1, signal=2.0)
    g = risk_groups(X[:, 0])
    assert set(g) == {0, 1, 2} and np.bincount(g).tolist() == [30, 30, 30]
    fits, p = km_logrank(time, event, g)
    assert set(fits) == {0, 1, 2} and p < 0.01
    # the high-risk tertile dies first
    assert fits[2].median_survival_time_ < fits[0].median_survival_time_
    g2 = risk_groups(np.r_[np.nan, X[1:, 0]])
    assert g2[0] == -1
