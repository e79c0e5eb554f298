"""Notebook 02 on notebook 01's store: a short CPU run whose loss goes down, a loadable checkpoint."""

from __future__ import annotations

import math

import pandas as pd
import torch

from tests.notebooks.ci_params import CI_PARAMS
from tests.notebooks.conftest import read_metrics


def test_02_pretraining(run_notebook, notebook_out):
    m = read_metrics(run_notebook("02_pretraining"))
    ci = CI_PARAMS["02_pretraining"]
    assert m["steps"] == ci["MAX_STEPS"]
    assert m["trained_now"] is True
    # learning signal: the mean loss of the last quarter of the run is below the first quarter's
    assert m["loss_last"] < m["loss_first"], (m["loss_first"], m["loss_last"])
    assert math.isfinite(m["loss_last"]) and m["samples_per_s"] > 0
    assert 0 <= m["acc1_last"] <= 100
    out = notebook_out / "02_pretraining"
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "drasclr" and ckpt["step"] == ci["MAX_STEPS"]
    assert ckpt["state_dict"]["queue"].shape[2] == m["num_locations"]
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == ci["MAX_STEPS"] and hist["loss"].notna().all()
    assert (out / "config.json").exists()
    assert (out / "training_curves.png").stat().st_size > 1000
