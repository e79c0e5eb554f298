"""The lobe/position rule (``laa950_position``) for the 4-class task, on a small synthetic cohort
with all three subtypes, and its pieces: depth below the pleura, the superior axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from drasclr_lib.data.patch_store import PatchStore, cut_patches
from drasclr_lib.segmentation import baselines as bl
from drasclr_lib.segmentation.lungs import lung_patches
from drasclr_lib.segmentation.train import candidate_pairs
from drasclr_lib.testing import make_toy_store

FAST_REG = {"shrink": (4,), "smoothing": (2,), "iterations": 60}  # as tests/preprocess/test_cohort.py


@pytest.fixture(scope="module")
def subtype_store(tmp_path_factory):
    """Two small synthetic subjects (scale 0.4) with every subtype, preprocessed; their lung masks."""
    from drasclr_lib.data.synthetic import make_cohort
    from drasclr_lib.preprocess.cohort import preprocess_cohort

    root = tmp_path_factory.mktemp("subtypes")
    manifest = make_cohort(root / "cohort", n_subjects=2, seed=5, size=0.4, spacing=(1.5, 1.5, 3.0), workers=1,
                           progress=False, severity=0.8, subtype_mix=(1, 1, 1))
    store = preprocess_cohort(manifest, root / "store", atlas="auto", registration_kwargs=FAST_REG, pad=16,
                              progress=False)
    df = pd.read_csv(manifest).set_index("sid")
    assert (df[["emph_centrilobular", "emph_panlobular", "emph_paraseptal"]] > 0.03).all().all()
    return store, {sid: str(manifest.parent / df.loc[sid, "lung_mask"]) for sid in store.sids}


def test_position_rule_separates_the_subtypes(subtype_store):
    store, masks = subtype_store
    kw = {"num_classes": 4, "lung_masks": masks}
    laa = bl.baseline_dice(store, store.sids, rule="laa950", **kw)
    pos = bl.baseline_dice(store, store.sids, rule="laa950_position", **kw)
    assert list(pos.columns) == list(laa.columns) == ["sid", "dice", "dice_centrilobular", "dice_panlobular",
                                                       "dice_paraseptal"]
    assert (laa[["dice_panlobular", "dice_paraseptal"]] == 0).all().all()  # density alone: class 1 only
    np.testing.assert_allclose(pos["dice"], pos.iloc[:, 2:].mean(axis=1))  # macro mean over the 3 subtypes
    assert (pos["dice"] > laa["dice"] + 0.1).all()
    # every subtype is found: each class well above what its share of emphysema would give by chance
    assert (pos[["dice_centrilobular", "dice_panlobular", "dice_paraseptal"]] > 0.2).all().all()


def test_position_rule_classes_by_depth_and_height(subtype_store):
    store, masks = subtype_store
    s, sid = 0, store.sids[0]
    locs = candidate_pairs(store, [s], 0.05)[:, 1]
    pred = bl.rule_prediction(store, s, locs, rule="laa950_position", num_classes=4, lung_mask=masks[sid])
    lung, depth = (a[locs] for a in bl.lung_depth_patches(store, s, masks[sid]))
    emph = (store.patches(s)[locs] < -950) & lung
    np.testing.assert_array_equal(pred > 0, emph)  # the voxels of laa950
    subpleural = emph & (depth <= bl.PLEURA_MM)
    assert subpleural.any() and (pred[subpleural] == 3).all()
    assert (pred[emph & ~subpleural] != 3).all()
    # deeper emphysema: centrilobular at the head end, panlobular at the feet end
    height = store.locs[locs, 2][:, None, None, None] * np.ones_like(pred)
    deep = emph & ~subpleural
    top, bottom = height >= np.quantile(height[deep], 0.8), height <= np.quantile(height[deep], 0.2)
    assert (pred[deep & top] == 1).all() and (pred[deep & bottom] == 2).all()
    # and that is the right way round for this cohort: the truth has the same order
    lab = store.label_patches(s)[locs]
    assert height[lab == 1].mean() > height[lab == 2].mean() + 0.3


def test_superior_axis(subtype_store, tmp_path):
    store, _ = subtype_store
    assert bl.superior_axis(store) == (2, 1.0)  # atlas built from a subject: LPS, k towards the head
    # checked against the data: the subject corners' k (LPS: feet -> head) rises with locs[:, 2]
    grid = store.subject_grid(0)
    assert grid.GetDirection()[8] == pytest.approx(1.0)
    assert np.corrcoef(store.locs[:, 2], store.corners(0)[:, 2])[0, 1] > 0.95
    toy = PatchStore(make_toy_store(tmp_path / "toy", n_subjects=1, grid=(2, 1, 1), patch_size=8))
    assert bl.superior_axis(toy) == (2, 1.0)  # no atlas geometry: the published/LPS convention
    published_las = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]
    toy.meta["atlas_geometry"] = {"direction": published_las}
    assert bl.superior_axis(toy) == (2, 1.0)
    toy.meta["atlas_geometry"] = {"direction": [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0]}  # j runs head -> feet
    assert bl.superior_axis(toy) == (1, -1.0)


def test_depth_is_measured_on_the_whole_lung(tmp_path):
    """Patch borders inside the lung are not pleura: the depth equals the distance transform of the
    subject's whole mask on its grid, cut at the patches."""
    root = make_toy_store(tmp_path / "store", n_subjects=1, grid=(2, 1, 2), patch_size=8, scans=tmp_path / "scans")
    store = PatchStore(root)
    mask_path = store.table.loc["toy000", "lung_mask"]
    lung, depth = bl.lung_depth_patches(store, 0, mask_path)
    np.testing.assert_array_equal(lung, lung_patches(store, 0, mask_path))
    from drasclr_lib.preprocess.pipeline import on_subject_grid

    whole = sitk.GetArrayFromImage(on_subject_grid(mask_path, store.subject_grid(0), kind="label")) > 0
    expect = cut_patches(ndimage.distance_transform_edt(whole).astype(np.float32), store.corners(0), 8, 0.0)[0]
    np.testing.assert_allclose(depth, expect, atol=1e-5)
    assert (depth[~lung] == 0).all() and depth[lung].min() == 1.0
    faces = np.zeros(lung.shape[1:], bool)
    faces[[0, -1], :, :] = faces[:, [0, -1], :] = faces[:, :, [0, -1]] = True
    assert (depth[:, faces] > bl.PLEURA_MM).any()  # lung voxels on a patch face, deep inside the lung


def test_two_classes_is_laa950_and_errors(subtype_store):
    store, masks = subtype_store
    for kw in ({"lung_masks": masks}, {}):
        pd.testing.assert_frame_equal(bl.baseline_dice(store, store.sids, rule="laa950_position", **kw),
                                      bl.baseline_dice(store, store.sids, rule="laa950", **kw))
    with pytest.raises(ValueError, match="lung mask of subject syn0000"):
        bl.baseline_dice(store, store.sids, rule="laa950_position", num_classes=4)
    with pytest.raises(ValueError, match="rule must be one of"):
        bl.baseline_dice(store, store.sids, rule="laa950_lobes", num_classes=4, lung_masks=masks)
