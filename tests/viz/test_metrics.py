"""Embedding probes on synthetic features with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.viz.metrics import embedding_metrics, knn_accuracy, ridge_cv_score, subsample_patches


def _grid(n_subj=10, n_loc=6):
    si, li = np.meshgrid(np.arange(n_subj), np.arange(n_loc), indexing="ij")
    return si.ravel(), li.ravel()


def test_knn_decodes_location_from_location_features_not_from_noise():
    rng = np.random.default_rng(0)
    si, li = _grid()
    centres = rng.normal(size=(6, 16))
    X = centres[li] + 0.1 * rng.normal(size=(len(li), 16))
    res = knn_accuracy(X, li, si, k=3)
    assert res["accuracy"] == 1.0 and res["chance"] < 0.25 and res["n"] == 60
    noise = knn_accuracy(rng.normal(size=X.shape), li, si, k=3)
    assert noise["accuracy"] < 0.45


def test_ridge_recovers_linear_target_and_groups_prevent_leakage():
    rng = np.random.default_rng(1)
    si, li = _grid(12, 8)
    X = rng.normal(size=(len(si), 10))
    y = X @ rng.normal(size=10) + 0.1 * rng.normal(size=len(si))
    res = ridge_cv_score(X, y, si)
    assert res["r2"] > 0.95 and res["spearman"] > 0.95
    # features that only identify the subject, target that is a per-subject constant: grouped CV
    # cannot exploit the subject identity, so R² is not positive (ungrouped CV would be near 1)
    ident = rng.normal(size=(12, 30))[si] + 0.01 * rng.normal(size=(len(si), 30))
    target = rng.normal(size=12)[si]
    assert ridge_cv_score(ident, target, si)["r2"] < 0.1


def test_ridge_drops_nan_and_validates():
    rng = np.random.default_rng(2)
    si, _ = _grid(6, 4)
    X = rng.normal(size=(24, 3))
    y = X[:, 0].copy()
    y[:5] = np.nan
    assert ridge_cv_score(X, y, si)["n"] == 19
    with pytest.raises(ValueError, match="2 subjects"):
        ridge_cv_score(X, X[:, 0], np.zeros(24))
    with pytest.raises(ValueError, match="not all equal"):
        ridge_cv_score(X, np.ones(24), si)
    with pytest.raises(ValueError, match="groups"):
        knn_accuracy(X, np.zeros(24), si[:3])


def test_subsample_patches():
    si, li = subsample_patches(5, 7, 10, seed=0)
    assert len(si) == 10 and len(set(zip(si, li))) == 10 and si.max() < 5 and li.max() < 7
    si2, li2 = subsample_patches(5, 7, 10, seed=0)
    np.testing.assert_array_equal(si, si2)
    assert len(subsample_patches(5, 7, None)[0]) == 35


def test_embedding_metrics_ranks_informative_over_uninformative_features():
    rng = np.random.default_rng(3)
    N, L, D = 10, 6, 12
    emph = rng.random((N, L))
    loc_code = rng.normal(size=(L, D))
    good = loc_code[None] + np.einsum("nl,d->nld", emph, rng.normal(size=D)) + 0.05 * rng.normal(size=(N, L, D))
    bad = loc_code[None] + 0.05 * rng.normal(size=(N, L, D))
    table = {"emph_fraction": emph, "lobe": np.tile(np.arange(L) % 3 + 1, (N, 1))}
    kw = dict(sids=[f"s{i}" for i in range(N)], locs=np.zeros((L, 3)), atlas_corners=np.zeros((L, 3)))
    m_good = embedding_metrics(EmbeddingSet(h=good, **kw), table, max_patches=None)
    m_bad = embedding_metrics(EmbeddingSet(h=bad, **kw), table, max_patches=None)
    assert m_good["emph_r2"] > 0.8 > 0.1 > m_bad["emph_r2"]
    assert m_bad["location_knn_acc"] == 1.0 and m_bad["lobe_knn_acc"] == 1.0
    assert m_good["n_patches"] == N * L and 0 < m_good["location_chance"] < 0.3


def test_patch_intensity_features_match_the_patches(toy_store):
    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.viz.metrics import patch_intensity_features

    store = PatchStore(toy_store)
    f = patch_intensity_features(store)
    assert f.shape == (store.num_subjects, store.num_locations, 4)
    patch = store.get(3, 5).astype(np.float64)
    np.testing.assert_allclose(f[3, 5], [patch.mean(), patch.std(), (patch < -950).mean(), (patch < -900).mean()],
                               rtol=1e-4)
    # the toy store's emphysema (voxels near -990 HU) grows with the subject index
    assert f[-1, :, 2].mean() > f[0, :, 2].mean() + 0.2


def test_embedding_metrics_leave_out_nan_patches():
    """Patches embedded as NaN (outside the field of view) are not scored, and do not break the probes."""
    rng = np.random.default_rng(3)
    N, L, D = 10, 6, 12
    emph = rng.random((N, L))
    h = rng.normal(size=(L, D))[None] + np.einsum("nl,d->nld", emph, rng.normal(size=D))
    h[0, :2] = np.nan
    table = {"emph_fraction": emph, "lobe": np.tile(np.arange(L) % 3 + 1, (N, 1))}
    kw = dict(sids=[f"s{i}" for i in range(N)], locs=np.zeros((L, 3)), atlas_corners=np.zeros((L, 3)))
    m = embedding_metrics(EmbeddingSet(h=h, **kw), table, max_patches=None)
    assert m["n_patches"] == N * L - 2 and m["emph_r2"] > 0.8
