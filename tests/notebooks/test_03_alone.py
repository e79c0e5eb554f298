"""Notebook 03 run alone, as on a fresh Colab runtime where only a patch store was brought along:
it trains the missing DrasCLR checkpoint itself (with notebook 02's committed settings), says so,
writes everything under its own output root, and then does its own work.

Making the cohort and the store too (the rest of the chain ``input_checkpoint`` walks) is checked
at a small size in ``tests/test_notebook_setup.py``; here the session's store of notebook 01 is
copied in, so the 16-subject preprocessing is not paid twice.
"""

from __future__ import annotations

import shutil

import numpy as np

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.runner import REPO_NOTEBOOKS, execute_notebook
from tests.notebooks.ci_params import CI_PARAMS
from tests.notebooks.conftest import printed, read_metrics


def test_03_runs_alone_with_only_a_store(run_notebook, notebook_out, tmp_path):
    run_notebook("01_preprocessing")
    out_root = tmp_path / "fresh_runtime"
    shutil.copytree(notebook_out / "patch_store", out_root / "patch_store")
    out = execute_notebook(REPO_NOTEBOOKS / "03_embeddings.ipynb", out_root, None, cell_timeout=900, progress=False)
    text = printed(out / "03_embeddings.executed.ipynb")
    # what it made, and how long it took
    assert "notebook 02's checkpoint is missing: a short pretraining" in text
    assert text.count("[inputs] done in") == 1 and "notebook 01's patch store" not in text
    n = CI_PARAMS["00_synthetic_cohort"]["N_SUBJECTS"]
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
