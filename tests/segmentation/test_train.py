"""Fine-tuning and patch-level evaluation on the toy store: targets, Dice maths, learning signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.segmentation.model import build_segmenter
from drasclr_lib.segmentation.train import (SegConfig, candidate_pairs, dice_scores, evaluate_segmenter, patch_targets,
                                            predict_patches, train_segmenter)


def test_patch_targets():
    lab = np.array([0, 1, 2, 3, 7], dtype=np.uint8)
    assert patch_targets(lab, 2).tolist() == [0, 1, 1, 1, 1]
    assert patch_targets(lab, 4).tolist() == [0, 1, 2, 3, 3]
    assert patch_targets(lab, 2).dtype == np.int64


def test_dice_scores_against_hand_counts():
    truth = np.array([0, 1, 1, 1, 0, 2, 2, 0])
    pred = np.array([0, 1, 1, 0, 1, 2, 0, 0])
    # class 1: TP 2, FP 1, FN 1 -> 4/6 ; class 2: TP 1, FP 0, FN 1 -> 2/3 ; class 3 absent -> 1
    d = dice_scores(pred, truth, 4)
    assert d["dice_centrilobular"] == pytest.approx(4 / 6)
    assert d["dice_panlobular"] == pytest.approx(2 / 3)
    assert d["dice_paraseptal"] == 1.0
    assert d["dice"] == pytest.approx((4 / 6 + 2 / 3 + 1) / 3)
    assert dice_scores(truth > 0, truth > 0, 2)["dice"] == 1.0
    assert dice_scores(np.zeros(8, int), truth > 0, 2)["dice"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice_scores(pred[:3], truth, 2)


def test_candidate_pairs_uses_lung_fraction(tmp_path):
    from drasclr_lib.testing import make_toy_store
    from drasclr_lib.utils import load_json, save_json

    root = make_toy_store(tmp_path / "s", n_subjects=2, grid=(2, 1, 2), patch_size=8)
    rec = load_json(root / "subjects" / "toy000.json")
    rec["patch_lung_fraction"] = [0.0, 0.5, 0.01, 0.9]
    save_json(rec, root / "subjects" / "toy000.json")
    store = PatchStore(root)
    assert candidate_pairs(store, [0], 0.05)[:, 1].tolist() == [1, 3]
    assert candidate_pairs(store, [0], 0.0)[:, 1].tolist() == [0, 1, 2, 3]
    assert candidate_pairs(store, [1], 0.05)[:, 1].tolist() == [0, 1, 2, 3]  # no fractions recorded: all
    assert set(candidate_pairs(store, [0, 1], 0.05)[:, 0]) == {0, 1}


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SegConfig(num_classes=3)
    with pytest.raises(ValueError, match="positive"):
        SegConfig(steps=0)
    with pytest.raises(ValueError, match="fg_oversample"):
        SegConfig(fg_oversample=1.5)
    with pytest.raises(ValueError, match="fg_weight"):
        SegConfig(fg_weight=0)
    with pytest.raises(ValueError, match="eval_patches"):
        SegConfig(eval_patches=-1)
    with pytest.raises(ValueError, match="host_memory"):
        SegConfig(host_memory="never")


def test_train_errors(toy_store):
    store = PatchStore(toy_store)
    model = build_segmenter("random", num_classes=2)
    with pytest.raises(ValueError, match="at least one"):
        train_segmenter(model, store, [], SegConfig(steps=1))
    with pytest.raises(ValueError, match="num_classes"):
        train_segmenter(model, store, [0], SegConfig(steps=1, num_classes=4))


def test_predict_patches_are_probabilities(toy_store):
    store = PatchStore(toy_store)
    model = build_segmenter("random", num_classes=4, seed=1)
    probs = predict_patches(model, store.patches(0)[:3], store.locs[:3], batch_size=2, device="cpu")
    assert probs.shape == (3, 4, 32, 32, 32) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_training_learns_the_toy_emphysema(toy_store):
    """Toy emphysema voxels are ~-990 HU among ~-850 HU lung: a few steps must lower the loss
    and the held-out Dice must beat the untrained model's."""
    store = PatchStore(toy_store)
    cfg = SegConfig(steps=14, batch_size=4, device="cpu", seed=0)
    test = [9, 11]
    model = build_segmenter("random", num_classes=2, seed=0)
    before = evaluate_segmenter(model, store, test, device="cpu")["dice"].mean()
    hist = train_segmenter(model, store, [6, 7, 8, 10], cfg, progress=False)
    assert len(hist) == cfg.steps and all(np.isfinite(h["loss"]) for h in hist)
    losses = [h["loss"] for h in hist]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05
    scores = evaluate_segmenter(model, store, test, device="cpu")
    assert list(scores["sid"]) == [store.sids[i] for i in test]
    assert scores["dice"].between(0, 1).all()
    assert scores["dice"].mean() > max(before, 0.5)
    assert np.mean([h["batch_dice"] for h in hist[-4:]]) > 0.5


def test_frozen_encoder_is_not_updated(toy_store):
    store = PatchStore(toy_store)
    model = build_segmenter("random", num_classes=2, seed=0)
    enc0 = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" not in k and "num_batches" not in k}
    dec0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    train_segmenter(model, store, [1, 2], SegConfig(steps=2, batch_size=2, encoder_lr_scale=0.0, device="cpu"),
                    progress=False)
    enc1 = model.encoder.state_dict()
    assert all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert any(not torch.equal(dec0[k], v) for k, v in model.head.state_dict().items())


def test_candidate_pairs_skip_patches_outside_the_field_of_view(tmp_path):
    """Fine-tuning and scoring never use a patch that is mostly padding (outside the scan)."""
    from drasclr_lib.segmentation.baselines import baseline_dice
    from drasclr_lib.testing import make_toy_store
    from drasclr_lib.utils import load_json, save_json

    root = make_toy_store(tmp_path / "s", n_subjects=3, grid=(2, 1, 2), patch_size=8, with_labels=True)
    rec = load_json(root / "subjects" / "toy000.json")
    rec["patch_lung_fraction"] = [0.0, 0.5, 0.9, 0.9]
    rec["patch_fov_fraction"] = [1.0, 0.2, 0.5, 1.0]  # location 1 invalid, 2 exactly half inside: valid
    save_json(rec, root / "subjects" / "toy000.json")
    rec = load_json(root / "subjects" / "toy001.json")
    rec["patch_fov_fraction"] = [0.0, 0.1, 0.2, 0.3]  # nothing scanned
    save_json(rec, root / "subjects" / "toy001.json")
    store = PatchStore(root)
    assert candidate_pairs(store, [0], 0.05)[:, 1].tolist() == [2, 3]
    assert candidate_pairs(store, ["toy000"], 0.0)[:, 1].tolist() == [0, 2, 3]
    assert candidate_pairs(store, [1], 0.05).shape == (0, 2)
    assert set(candidate_pairs(store, [0, 1, 2], 0.05)[:, 0]) == {0, 2}
    assert baseline_dice(store, [0, 1, 2], rule="laa950").sid.tolist() == ["toy000", "toy002"]


def test_kept_host_memory_fine_tunes_and_predicts_the_same_numbers(toy_store):
    """``host_memory`` (freed memory kept for reuse on the CPU) changes no number of a run."""
    store = PatchStore(toy_store)
    runs = {}
    for host_memory in ("keep", "system"):
        model = build_segmenter("random", num_classes=2, seed=0)
        hist = train_segmenter(model, store, [6, 7], SegConfig(steps=3, batch_size=4, device="cpu", seed=0,
                                                                host_memory=host_memory), progress=False)
        probs = predict_patches(model, store.patches(9)[:4], store.locs[:4], device="cpu", host_memory=host_memory)
        runs[host_memory] = ([h["loss"] for h in hist], probs)
    assert runs["keep"][0] == runs["system"][0]
    np.testing.assert_array_equal(runs["keep"][1], runs["system"][1])
