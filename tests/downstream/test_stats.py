"""Corrected resampled t intervals: a case worked by hand, the seed averaging, the pairing."""

import numpy as np
import pandas as pd
import pytest

from drasclr_lib.downstream.stats import (PER_FOLD_COLUMNS, corrected_t_interval, paired_differences,
                                          summarise_scores)

T3 = 3.182446305284263  # t_{3, 0.975}


def test_known_case_by_hand():
    # x = 1, 2, 3, 4 (J = 4): mean 2.5, S² = 5/3; n_test / n_train = 10 / 40 = 1/4
    # corrected variance (1/4 + 1/4) * 5/3 = 5/6, se = 0.912871; half-width = t_{3,.975} * se = 2.905167
    r = corrected_t_interval([1, 2, 3, 4], n_train=40, n_test=10)
    se = np.sqrt(5 / 6)
    assert r["mean"] == pytest.approx(2.5)
    assert r["se"] == pytest.approx(se, rel=1e-12)
    assert r["ci_low"] == pytest.approx(2.5 - T3 * se, rel=1e-9)
    assert r["ci_high"] == pytest.approx(2.5 + T3 * se, rel=1e-9)
    assert r["ci_high"] == pytest.approx(5.405167, abs=1e-5)
    assert r["dof"] == 3 and r["n"] == 4
    assert r["t"] == pytest.approx(2.5 / se)
    # the naive interval (no n_test / n_train term) is narrower: 2.5 ± 2.054
    naive = T3 * np.sqrt(5 / 3 / 4)
    assert r["ci_high"] - 2.5 > naive + 0.8


def test_correction_grows_with_test_share_and_not_with_repeats():
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    a = corrected_t_interval(x, n_train=80, n_test=20)
    b = corrected_t_interval(x, n_train=80, n_test=0)  # n_test 0: the naive t interval
    assert b["se"] == pytest.approx(x.std(ddof=1) / 5)
    assert a["se"] == pytest.approx(np.sqrt((1 / 25 + 0.25) * x.var(ddof=1)))
    # doubling J by repeating the same values barely narrows the corrected interval (the term 1/4 stays)
    c = corrected_t_interval(np.concatenate([x, x]), n_train=80, n_test=20)
    assert c["se"] > 0.85 * a["se"]


def test_degenerate_cases_and_errors():
    r = corrected_t_interval([0.7], n_train=10, n_test=2)
    assert r["mean"] == 0.7 and np.isnan(r["ci_low"]) and np.isnan(r["se"])
    r = corrected_t_interval([0.5, 0.5, np.nan, 0.5], n_train=10, n_test=2)
    assert r["n"] == 3 and r["ci_low"] == r["ci_high"] == 0.5
    with pytest.raises(ValueError, match="n_train"):
        corrected_t_interval([1, 2], n_train=0, n_test=2)
    with pytest.raises(ValueError, match="level"):
        corrected_t_interval([1, 2], n_train=5, n_test=2, level=1.5)


def _table():
    """2 repeats x 2 folds; 'a' and 'b' with seeds 0, 1; 'q' without seeds."""
    rows = []
    for r in range(2):
        for f in range(2):
            for s in range(2):
                rows.append(("a", s, r, f, "T", "m", 1.0 + 0.1 * f + 0.2 * s + 0.05 * r, 30, 10))
                rows.append(("b", s, r, f, "T", "m", 0.5 + 0.3 * f - 0.1 * s, 30, 10))
            rows.append(("q", np.nan, r, f, "T", "m", 0.2 * f + 0.1 * r, 30, 10))
    return pd.DataFrame(rows, columns=PER_FOLD_COLUMNS)


def test_summary_averages_seeds_within_each_split():
    pf = _table()
    s = summarise_scores(pf).set_index("method")
    a = pf[pf.method == "a"]
    cells = a.groupby(["repeat", "fold"]).value.mean().to_numpy()
    want = corrected_t_interval(cells, 30, 10)
    assert s.loc["a", "mean"] == pytest.approx(a.value.mean())
    assert s.loc["a", "ci_low"] == pytest.approx(want["ci_low"])
    assert s.loc["a", "ci_high"] == pytest.approx(want["ci_high"])
    assert s.loc["a", "n_scores"] == 8 and s.loc["a", "n_splits"] == 4 and s.loc["a", "n_seeds"] == 2
    # seed means 1.075 and 1.275: SD 0.2 / sqrt(2)
    assert s.loc["a", "seed_sd"] == pytest.approx(0.2 / np.sqrt(2))
    assert s.loc["q", "n_seeds"] == 0 and np.isnan(s.loc["q", "seed_sd"])


def test_paired_differences_pair_by_seed_and_broadcast_seedless():
    pf = _table()
    d = paired_differences(pf, [("a", "b"), ("a", "q"), ("q", "a"), ("a", "missing")]).set_index(["a", "b"])
    assert len(d) == 3
    # a - b per (seed, repeat, fold): 0.5 - 0.2 f + 0.3 s + 0.05 r; seed average 0.65 - 0.2 f + 0.05 r
    cells = [0.65 - 0.2 * f + 0.05 * r for r in range(2) for f in range(2)]
    want = corrected_t_interval(cells, 30, 10)
    row = d.loc[("a", "b")]
    assert row["diff"] == pytest.approx(0.575)
    assert row["ci_low"] == pytest.approx(want["ci_low"]) and row["ci_high"] == pytest.approx(want["ci_high"])
    assert row["seed_sd"] == pytest.approx(0.3 / np.sqrt(2))
    # a - q: the seedless q subtracted from each seed: 1 - 0.1 f + 0.2 s - 0.05 r
    assert d.loc[("a", "q"), "diff"] == pytest.approx(1.0 - 0.05 + 0.1 - 0.025)
    assert d.loc[("a", "q"), "n_seeds"] == 2
    assert d.loc[("q", "a"), "diff"] == pytest.approx(-d.loc[("a", "q"), "diff"])
    assert d.loc[("q", "a"), "ci_high"] == pytest.approx(-d.loc[("a", "q"), "ci_low"])


def test_missing_columns_raise():
    with pytest.raises(KeyError, match="n_train"):
        summarise_scores(_table().drop(columns=["n_train"]))
