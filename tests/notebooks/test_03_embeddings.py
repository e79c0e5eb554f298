"""Notebook 03 with CI parameters: embeddings on disk, figures, and probes that beat chance and the baseline."""

from __future__ import annotations

import numpy as np

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.embed import EmbeddingSet
from tests.notebooks.ci_params import ALIGNMENT_MARGIN, MAX_NEGATIVE_SIMILARITY
from tests.notebooks.conftest import read_metrics


def test_03_embeddings(run_notebook):
    out = run_notebook("03_embeddings")
    m = read_metrics(out)
    store = PatchStore(out.parent / "patch_store")
    emb = EmbeddingSet.load(out / "embeddings.npz")
    assert emb.sids == store.sids
    assert emb.h.shape == (store.num_subjects, store.num_locations, 128) and np.isfinite(emb.h).all()
    assert m["n_subjects"] == store.num_subjects and m["n_locations"] == store.num_locations
    # subjects differ (a broken encoder or an untrained BatchNorm gives near-constant h)
    assert emb.h.std(axis=0).mean() > 1e-3
    for name in ("umap_patches.png", "umap_subjects.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert any(p.name.startswith("explorer_") for p in out.glob("*.png"))

    for enc in ("pretrained", "random"):
        r = m[enc]
        # location decoding far above chance for both (conditional convolutions see the location)
        assert r["location_knn_acc"] > max(0.5, 5 * r["location_chance"]), (enc, r)
        assert np.isfinite(r["emph_r2"]) and -1 < r["emph_r2"] <= 1
    # the disease probe works: four density numbers per patch predict the held-out subjects'
    # emphysema fraction (a misaligned target or a broken probe gives R2 <= 0)
    assert m["intensity"]["emph_r2"] > 0.2 and m["intensity"]["emph_spearman"] > 0.5, m["intensity"]
    # At CI scale (40 steps, 16 subjects) neither encoder predicts the emphysema fraction (R2 ~ 0
    # for both), so the gain is recorded here, not claimed (benchmarks/bench_disease_signal.py
    # records a longer run; a committed result is documentation, not a test)
    assert np.isclose(m["emph_r2_gain"], m["pretrained"]["emph_r2"] - m["random"]["emph_r2"])
    # What the pretrained encoder does that random weights do not, on the same augmented views: it
    # aligns a patch's two views (measured at CI's budget: 0.97 against 0.54). Random weights
    # loaded in place of the checkpoint, or a pretraining run that never moved its weights, score
    # the baseline's alignment (a frozen run of notebook 02 measured +0.009 over it).
    views = m["views"]
    assert views["pretrained"]["n_locations"] == views["random"]["n_locations"] >= 8
    assert m["alignment_gain"] > ALIGNMENT_MARGIN, views
    assert views["pretrained"]["negative_similarity"] < MAX_NEGATIVE_SIMILARITY, views  # not one vector for all

