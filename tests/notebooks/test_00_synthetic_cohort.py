"""Notebook 00: the synthetic cohort is written and behaves like the disease model says."""

from __future__ import annotations

import pandas as pd

from tests.notebooks.ci_params import CI_PARAMS
from tests.notebooks.conftest import read_metrics


def test_00_synthetic_cohort(run_notebook, notebook_out):
    nb_out = run_notebook("00_synthetic_cohort")
    m = read_metrics(nb_out)
    n = CI_PARAMS["00_synthetic_cohort"]["N_SUBJECTS"]
    assert m["n_subjects"] == n
    manifest = notebook_out / "synthetic_cohort" / "manifest.csv"
    df = pd.read_csv(manifest)
    assert len(df) == n and df["sid"].is_unique
    for col in ("image", "lung_mask", "label_map", "lobe_map"):
        assert all((manifest.parent / p).exists() for p in df[col]), col
    for fig in ("subject_labels.png", "subject_lobes.png", "distributions.png", "kaplan_meier.png"):
        assert (nb_out / fig).stat().st_size > 5000, fig
    assert m["spearman_laa950_severity"] > 0.7
    assert m["spearman_laa950_emph_fraction"] > 0.8
    # the clinical table follows the documented model: what is left is its noise (sd 10) ...
    assert 6 < m["fev1pp_noise_sd"] < 14 and abs(m["fev1pp_noise_mean"]) < 6, m
    # ... and density is not the whole story: what %LAA-950 leaves follows the airway disease
    assert m["spearman_residual_airway"] < -0.3, m
    assert m["gold_rule_violations"] == 0
    assert m["label_hu_mean"] < m["unlabelled_lung_hu_mean"] - 100
    assert 600 < m["mean_lung_volume_ml"] < 2500  # demo size
    assert sum(m["gold_counts"].values()) == n
