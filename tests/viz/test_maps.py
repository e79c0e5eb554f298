"""UMAP maps: coordinates, fall-back, figure layout."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.viz.maps import patch_maps, save_figure, subject_maps, umap_2d


def _sets(N=8, L=5, D=6, seed=0):
    rng = np.random.default_rng(seed)
    kw = dict(sids=[f"s{i}" for i in range(N)], locs=np.zeros((L, 3)), atlas_corners=rng.integers(0, 50, (L, 3)))
    return {"pretrained": EmbeddingSet(h=rng.normal(size=(N, L, D)), **kw),
            "random weights": EmbeddingSet(h=rng.normal(size=(N, L, D)), **kw)}


def test_umap_2d_separates_clusters_and_is_reproducible():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 0.1, (20, 5)) + 3, rng.normal(0, 0.1, (20, 5)) - 3])
    X[:, 0] += np.r_[np.zeros(20), 6 * np.ones(20)]  # cosine-distinguishable clusters
    xy, how = umap_2d(X, n_neighbors=5, seed=1)
    assert how == "UMAP" and xy.shape == (40, 2)
    gap = np.linalg.norm(xy[:20].mean(0) - xy[20:].mean(0))
    spread = max(xy[:20].std(0).max(), xy[20:].std(0).max())
    assert gap > 3 * spread
    np.testing.assert_allclose(umap_2d(X, n_neighbors=5, seed=1)[0], xy)


def test_umap_2d_falls_back_to_pca_for_tiny_inputs():
    xy, how = umap_2d(np.array([[0.0, 0, 1], [1, 0, 0], [2, 0, 0]]))
    assert how == "PCA" and xy.shape == (3, 2)
    with pytest.raises(ValueError, match="M >= 2"):
        umap_2d(np.zeros((1, 3)))


def test_patch_and_subject_maps(tmp_path):
    sets = _sets()
    N, L = 8, 5
    table = {"lobe": np.tile(np.arange(L) % 2 + 1, (N, 1)), "height": np.tile(np.arange(L, dtype=float), (N, 1)),
             "emph_fraction": np.random.default_rng(0).random((N, L))}
    fig, coords = patch_maps(sets, table, max_points=30, seed=0, n_neighbors=5)
    assert len(coords["subject"]) == 30 and coords["pretrained"].shape == coords["random weights"].shape == (30, 2)
    assert len([a for a in fig.axes if a.get_title()]) == 6  # 2 encoders x (lobe, height, emphysema)
    assert save_figure(fig, tmp_path / "patches.png").stat().st_size > 1000
    subjects = pd.DataFrame({"sid": [f"s{i}" for i in range(N)][::-1], "emph_fraction": np.linspace(0, 0.4, N),
                             "GOLD": [0, 1, 2, np.nan, 4, 0, 1, 2]})
    fig, coords = subject_maps(sets, subjects, method="meanmax", n_neighbors=4)
    assert coords["pretrained"].shape == (N, 2)
    assert len([a for a in fig.axes if a.get_title()]) == 4
    bad = dict(sets)
    bad["other"] = EmbeddingSet(h=np.zeros((3, L, 6)), sids=["a", "b", "c"], locs=np.zeros((L, 3)),
                                atlas_corners=np.zeros((L, 3)))
    with pytest.raises(ValueError, match="other"):
        patch_maps(bad, table)


def test_maps_leave_out_patches_and_subjects_embedded_as_nan():
    """Patches outside the field of view embed as NaN: the maps draw the others instead of failing."""
    sets = _sets()
    N, L = 8, 5
    for s in sets.values():
        s.h[2, :3] = np.nan  # three invalid patches of s2
        s.h[5] = np.nan  # s5: no valid patch at all
    table = {"lobe": np.ones((N, L), int), "height": np.zeros((N, L)), "emph_fraction": np.zeros((N, L))}
    fig, coords = patch_maps(sets, table, max_points=None, seed=0, n_neighbors=5)
    assert len(coords["subject"]) == N * L - 3 - L
    assert np.isfinite(coords["pretrained"]).all()
    assert not ((coords["subject"] == 5).any() or ((coords["subject"] == 2) & (coords["location"] < 3)).any())
    fig, coords = subject_maps(sets, pd.DataFrame({"sid": [f"s{i}" for i in range(N)]}), n_neighbors=4)
    xy = coords["pretrained"]
    assert xy.shape == (N, 2) and np.isnan(xy[5]).all() and np.isfinite(np.delete(xy, 5, 0)).all()
