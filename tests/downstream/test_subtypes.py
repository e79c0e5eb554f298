import numpy as np
import pytest

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.downstream.folds import make_folds
from drasclr_lib.downstream.subtypes import (cv_patch_classifier, dominant_subtype, patch_qct_features,
                                             subtype_targets)


def _patch(counts, P=8):
    lab = np.zeros(P**3, np.uint8)
    start = 0
    for c, n in counts.items():
        lab[start:start + n] = c
        start += n
    return lab.reshape(P, P, P)


def test_dominant_subtype_on_hand_made_patches():
    patches = np.stack([
        _patch({}),                      # no emphysema
        _patch({1: 50, 3: 20}),          # centrilobular dominates
        _patch({2: 40, 1: 10}),          # panlobular
        _patch({3: 60, 1: 59, 2: 59}),   # paraseptal by one voxel
        _patch({1: 10}),                 # 10 of 400 lung voxels = 2.5 % < 5 % -> none
        _patch({2: 10, 3: 10}),          # tie -> lower label
    ])
    lung = np.array([512, 512, 512, 512, 400, 100])
    np.testing.assert_array_equal(dominant_subtype(patches, lung, threshold=0.05), [0, 1, 2, 3, 0, 2])
    assert dominant_subtype(patches[4], 400, threshold=0.02) == 1
    assert dominant_subtype(patches[1], 512, threshold=0.5) == 0


def test_dominant_subtype_rejects_bad_input():
    with pytest.raises(ValueError):
        dominant_subtype(np.full((1, 2, 2, 2), 5), [8])
    with pytest.raises(ValueError):
        dominant_subtype(np.zeros((2, 2, 2, 2)), [8])


def test_targets_and_qct_features_from_toy_store(toy_store):
    store = PatchStore(toy_store)
    y = subtype_targets(store, threshold=0.05)
    assert y.shape == (12, 18)
    assert (y[0] == 0).all() and (y[-1] == 1).all()  # healthy subject vs 50 % emphysema
    q = patch_qct_features(store)
    assert q.shape == (12, 18, 2)
    assert q[-1, :, 0].mean() > q[0, :, 0].mean() + 20  # %LAA-950 follows disease
    assert np.all((q[..., 1] >= 0) & (q[..., 1] <= 1))


def test_patch_classifier_learns_separable_subtypes_with_subject_folds():
    rng = np.random.default_rng(0)
    N, L, D = 20, 30, 6
    y = rng.integers(0, 4, size=(N, L))
    y[0, :5] = -1  # unlabelled patches are ignored
    H = rng.normal(size=(N, L, D)) * 0.3
    H[..., :4] += np.eye(4)[np.clip(y, 0, 3)] * 2
    fold = make_folds(N, k=4, seed=0)
    scores, proba = cv_patch_classifier(H, y, fold, max_train=200)
    assert len(scores) == 4
    assert scores.auc_macro.mean() > 0.95 and scores.accuracy.mean() > 0.8
    assert np.isfinite(proba).all()  # every patch of a test subject gets a prediction (labelled or not)
    np.testing.assert_allclose(proba[1].sum(-1), 1.0, atol=1e-5)
    noise_scores, _ = cv_patch_classifier(rng.normal(size=(N, L, D)), y, fold)
    assert noise_scores.auc_macro.mean() < 0.65


def test_patch_classifier_skips_invalid_patches():
    """Invalid patches (NaN embeddings) are neither trained on nor scored; their probabilities are NaN."""
    rng = np.random.default_rng(1)
    N, L, D = 20, 30, 6
    y = rng.integers(0, 4, size=(N, L))
    H = rng.normal(size=(N, L, D)) * 0.3
    H[..., :4] += np.eye(4)[y] * 2
    bad = rng.random((N, L)) < 0.15
    H[bad] = np.nan
    fold = make_folds(N, k=4, seed=0)
    scores, proba = cv_patch_classifier(H, y, fold, max_train=200)
    assert np.isnan(proba[bad]).all() and np.isfinite(proba[~bad]).all()
    assert scores.n_test.sum() == (~bad).sum() and scores.auc_macro.mean() > 0.95
