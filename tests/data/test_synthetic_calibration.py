"""The synthetic cohort is as hard as real COPD: density explains part of FEV1pp, not all of it.

The figures of the issue (R² of %LAA-950 + volume in [0.25, 0.45] on 200 subjects, a further
>= 0.2 from the image-visible disease, a significant Cox gain for the subtypes) are measured by
``python -m drasclr_lib.data.synthetic.calibration``; here a smaller, faster cohort checks the
same direction with bounds that the previous, density-generated labels (R² 0.83) cannot meet.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from drasclr_lib.data.synthetic import make_cohort
from drasclr_lib.data.synthetic.calibration import calibration_report, cox_lr_test, oof_r2
from drasclr_lib.data.synthetic.clinical import ORACLE_COLUMNS


def test_oof_r2_matches_the_signal_share_and_is_near_zero_without_signal():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 2))
    y = 2.0 * x[:, 0] + rng.standard_normal(400) * 2.0  # explained share 4 / (4 + 4) = 0.5
    assert oof_r2(x, y) == pytest.approx(0.5, abs=0.07)
    assert oof_r2(rng.standard_normal((400, 2)), y) < 0.02


def test_cox_lr_test_finds_an_extra_hazard_and_not_a_null_one():
    rng = np.random.default_rng(1)
    n = 300
    df = pd.DataFrame({"a": rng.standard_normal(n), "b": rng.standard_normal(n), "c": rng.standard_normal(n)})
    t = rng.exponential(1.0 / np.exp(0.5 * df["a"] + 0.8 * df["b"]))
    c = rng.uniform(0.5, 3.0, n)
    df["time"], df["event"] = np.minimum(t, c), (t <= c).astype(int)
    real = cox_lr_test(df, ["a"], ["b"])
    null = cox_lr_test(df, ["a", "b"], ["c"])
    assert real["df"] == 1 and real["p"] < 1e-6 and real["hr_per_sd"]["b"] > 1.5
    assert null["p"] > 0.01


def test_calibration_report_names_missing_columns():
    with pytest.raises(ValueError, match="mucus_plugging"):
        calibration_report(pd.DataFrame({"FEV1pp": [1.0], "laa950": [1.0]}))


@pytest.fixture(scope="module")
def cohort_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    return pd.read_csv(make_cohort(out, 80, seed=3, size=0.45, workers=2, progress=False))


def test_density_explains_part_of_fev1_and_the_visible_disease_more(cohort_table):
    rep = calibration_report(cohort_table)
    assert set(ORACLE_COLUMNS) <= set(cohort_table.columns)
    # density matters but does not decide: the old density-generated labels gave 0.83
    assert 0.15 < rep["r2_density"] < 0.6, rep
    # airway walls, mucus plugging and the subtype mix carry a large further share ...
    assert rep["r2_visible_gain"] > 0.15, rep
    # ... and some of FEV1pp is noise that no image feature carries
    assert rep["r2_oracle"] < 0.9, rep
    # survival depends on the subtype pattern beyond %LAA-950 and age
    assert rep["cox_subtypes"]["p"] < 0.05, rep["cox_subtypes"]
    hr = rep["cox_subtypes"]["hr_per_sd"]
    assert hr["emph_panlobular"] > hr["emph_paraseptal"], hr


def test_fev1pp_is_the_documented_model_plus_its_noise(cohort_table):
    from drasclr_lib.data.synthetic.clinical import COEF, expected_fev1pp

    inside = cohort_table["FEV1pp"].between(12.5, 129.5)  # not clipped
    noise = (cohort_table["FEV1pp"] - expected_fev1pp(cohort_table))[inside]
    assert abs(noise.mean()) < 3 and 0.75 * COEF["fev1_sd"] < noise.std() < 1.25 * COEF["fev1_sd"], noise.describe()
    # the mucus term is part of the model: leaving it out shifts the residual by 40 x mean(m)
    wrong = (cohort_table["FEV1pp"] - expected_fev1pp(cohort_table, {"fev1_m": 0.0}))[inside]
    assert wrong.mean() < -5
