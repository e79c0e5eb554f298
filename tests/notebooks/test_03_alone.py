"""Notebook 03 run alone in an empty output folder, as on a fresh Colab runtime: it makes the
synthetic cohort, the patch store and a short pretraining itself (with notebooks 00-02's committed
settings), says so, and then does its own work."""

from __future__ import annotations

import numpy as np

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.runner import REPO_NOTEBOOKS, execute_notebook
from tests.notebooks.ci_params import CI_PARAMS
from tests.notebooks.conftest import printed, read_metrics


def test_03_runs_alone_in_an_empty_output_folder(tmp_path):
    out_root = tmp_path / "fresh_runtime"
    out = execute_notebook(REPO_NOTEBOOKS / "03_embeddings.ipynb", out_root, None, cell_timeout=900, progress=False)
    text = printed(out / "03_embeddings.executed.ipynb")
    # what it made, and how long it took
    for what in ("notebook 00 has not run here: making the synthetic cohort", "notebook 01's patch store is missing",
                 "notebook 02's checkpoint is missing: a short pretraining"):
        assert what in text, what
    assert text.count("[inputs] done in") == 3
    n = CI_PARAMS["00_synthetic_cohort"]["N_SUBJECTS"]
    assert (out_root / "synthetic_cohort" / "manifest.csv").is_file()
    store = PatchStore(out_root / "patch_store")
    assert store.num_subjects == n and store.failures().empty
    assert (out_root / "02_pretraining" / "checkpoint.pt").is_file()
    # ... and then its own work, on what it made
    m = read_metrics(out)
    assert m["n_subjects"] == n and m["checkpoint"] == str((out_root / "02_pretraining" / "checkpoint.pt").resolve())
    emb = EmbeddingSet.load(out / "embeddings.npz")
    assert emb.h.shape == (n, store.num_locations, 128) and np.isfinite(emb.h).all()
    assert any(p.name.startswith("explorer_") for p in out.glob("*.png"))  # static explorer under papermill
    assert "outputs: " + str(out_root.resolve()) in text  # the output root printed at the top
