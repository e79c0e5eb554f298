"""Notebook 06 as committed: a cohort on the published atlas, embedded with a checkpoint in the
released format (a stand-in the notebook writes, and says so), without any training.

The notebook needs no other notebook's output (it makes a small synthetic cohort when notebook 00's
is missing), so it is executed on its own here rather than through ``run_notebook``, which would run
notebooks 00-05 first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.preprocess.atlas_source import PUBLISHED_SOURCE, published_landmarks
from drasclr_lib.runner import REPO_NOTEBOOKS, execute_notebook
from tests.notebooks.ci_params import CI_PARAMS
from tests.notebooks.conftest import read_metrics

STEM = "06_released_weights"


def _printed(executed: Path) -> str:
    """Everything the executed notebook's code cells printed or displayed."""
    text = []
    for cell in json.loads(executed.read_text())["cells"]:
        for output in cell.get("outputs", []):
            text.append("".join(output.get("text", [])))
            text.append("".join(output.get("data", {}).get("text/plain", [])))
    return "\n".join(text)


def test_06_released_weights(notebook_out):
    params = CI_PARAMS[STEM]
    out = execute_notebook(REPO_NOTEBOOKS / f"{STEM}.ipynb", notebook_out, None, cell_timeout=900, progress=False)
    m = read_metrics(out)
    n = params["N_SUBJECTS"]

    # the published atlas: the store's 581 locations are the published landmarks, in their order
    store = PatchStore(out / "patch_store")
    assert store.meta["atlas_source"] == PUBLISHED_SOURCE == m["atlas_source"]
    assert np.array_equal(store.atlas_corners, published_landmarks())
    assert m["atlas_is_published"] is True and m["atlas_warnings"] == []  # no warning on the published atlas
    assert m["n_failed"] == 0 and m["n_subjects"] == store.num_subjects == n
    assert m["reg_dice_min"] > 0.75, m["reg_dice_min"]  # measured 0.85 for both subjects (adult atlas, small body)

    # every patch embedded: finite exactly where the patch is at least half inside the scan (the demo-size
    # synthetic bodies on the adult atlas leave a patch or two mostly outside, which embed as NaN)
    assert m["n_locations"] == 581 and m["dim"] == 128
    emb = EmbeddingSet.load(out / "embeddings.npz")
    assert emb.h.shape == (n, 581, 128) and emb.sids == store.sids
    valid = store.valid_mask()
    assert np.array_equal(np.isfinite(emb.h).all(-1), valid) and not np.isfinite(emb.h[~valid]).any()
    assert m["finite_fraction"] == m["valid_fraction"] == valid.mean() > 0.95
    # subjects differ: the stand-in's BatchNorm is calibrated (initial statistics give near-constant h)
    assert m["subject_spread"] > 1e-3 and np.isclose(m["subject_spread"], np.nanmean(emb.h.std(axis=0)), rtol=1e-4)

    # the stand-in is a checkpoint in the released layout, and it is noted as such everywhere
    assert m["stand_in"] is True and "stand-in" in m["weights"] and emb.meta["stand_in"] is True
    assert m["checkpoint_format"] == "published"
    state = torch.load(m["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert {k.split(".")[1] for k in state} == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert all(k.startswith("module.") for k in state) and state["module.queue_ptr"].shape == (581,)
    printed = _printed(out / f"{STEM}.executed.ipynb")
    assert "STAND-IN" in printed and "RANDOM weights" in printed
    assert "github.com/batmanlab/DrasCLR" in printed and "README of" in printed  # where the real file is
    assert f"Embedded {n} subjects x 581 locations x 128 dimensions" in printed  # the closing statement
    for name in ("umap_patches.png", "map_subjects.png"):
        assert name in m["figures"] and (out / name).stat().st_size > 10_000, name
