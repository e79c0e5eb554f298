"""Cutting atlas patches from a subject: corner mapping, translation, out-of-scan fill, summaries."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.data.patch_store import cut_patches
from drasclr_lib.preprocess.patches import extract_patches, map_corners, resample_to_grid


def _image(arr_kji, origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), dtype=None):
    img = sitk.GetImageFromArray(arr_kji if dtype is None else arr_kji.astype(dtype))
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.fixture
def scene():
    """A 1 mm 'CT' (k, j, i) = (40, 50, 60) with distinct values, a mask and an atlas on its own grid."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1100, 400, size=(40, 50, 60)).astype(np.float32)
    ct = _image(hu, origin=(-30.0, 12.0, 100.0))
    lung = np.zeros_like(hu, dtype=np.uint8)
    lung[5:35, 5:45, 5:55] = 1
    mask = _image(lung, origin=(-30.0, 12.0, 100.0))
    corners = np.array([[0, 0, 0], [10, 12, 4], [20, 14, 6], [44, 30, 20]])  # (i, j, k), patch 8
    atlas = Atlas(mask=mask, corners=corners, source="test", patch_size=8)
    return ct, hu, mask, atlas


def test_identity_transform_equals_direct_cutting(scene):
    ct, hu, mask, atlas = scene
    out = extract_patches(ct, atlas, sitk.AffineTransform(3), lung_1mm=mask)
    assert out["patches_hu"].dtype == np.int16 and out["patches_hu"].shape == (4, 8, 8, 8)
    assert np.array_equal(out["corners_subject"], atlas.corners)
    for n, (i, j, k) in enumerate(atlas.corners):
        want = np.clip(hu[k:k + 8, j:j + 8, i:i + 8], -1024, 240)
        assert np.array_equal(out["patches_hu"][n], want.astype(np.int16))
    # also identical with no transform at all and with sitk.RegionOfInterest (the published cut)
    assert np.array_equal(extract_patches(ct, atlas, None)["patches_hu"], out["patches_hu"])
    roi = sitk.GetArrayFromImage(sitk.RegionOfInterest(ct, [8, 8, 8], [10, 12, 4]))
    assert np.array_equal(out["patches_hu"][1], np.clip(roi, -1024, 240).astype(np.int16))


def test_known_translation_shifts_the_patch(scene):
    ct, hu, _, atlas = scene
    tx = sitk.TranslationTransform(3, (3.0, -2.0, 5.0))  # atlas point p -> subject point p + t
    out = extract_patches(ct, atlas, tx)
    assert np.array_equal(out["corners_subject"], atlas.corners + [3, -2, 5])
    i, j, k = atlas.corners[1] + [3, -2, 5]
    assert np.array_equal(out["patches_hu"][1], np.clip(hu[k:k + 8, j:j + 8, i:i + 8], -1024, 240).astype(np.int16))


def test_corner_mapping_with_flipped_atlas_axes_cuts_the_same_anatomy(scene):
    ct, hu, mask, _ = scene
    # an atlas grid whose i axis points the other way (like a LAS file against LPS subjects)
    flipped = sitk.Flip(mask, [True, False, False])
    assert flipped.GetDirection()[0] == -1
    corners_flipped = np.array([[60 - 8 - 10, 12, 4]])  # the same box as corner (10, 12, 4) on the subject grid
    atlas = Atlas(mask=mask, corners=corners_flipped, source="flipped", patch_size=8,
                  corner_geometry={"origin": list(flipped.GetOrigin()), "spacing": [1.0] * 3,
                                   "direction": list(flipped.GetDirection()), "size": list(flipped.GetSize())})
    out = extract_patches(ct, atlas, None)
    assert out["corners_subject"].tolist() == [[10, 12, 4]]


def test_out_of_volume_is_air_and_label_zero(scene):
    ct, hu, mask, atlas = scene
    tx = sitk.TranslationTransform(3, (-4.0, 0.0, 0.0))
    lab = _image((hu > 0).astype(np.uint8), origin=ct.GetOrigin())
    out = extract_patches(ct, atlas, tx, label_1mm=lab)
    p = out["patches_hu"][0]  # corner (-4, 0, 0): first 4 columns (i) outside
    assert np.all(p[:, :, :4] == -1024)
    assert np.array_equal(p[:, :, 4:], np.clip(hu[0:8, 0:8, 0:4], -1024, 240).astype(np.int16))
    assert np.all(out["label_patches"][0][:, :, :4] == 0)
    assert out["inside_fraction"][0] == pytest.approx(0.5)
    far, inside = cut_patches(hu, np.array([[500, 500, 500]]), 8, -1024)
    assert np.all(far == -1024) and inside[0] == 0


def test_patch_summaries(scene):
    ct, hu, mask, atlas = scene
    lung = sitk.GetArrayFromImage(mask)
    labels = np.zeros_like(lung)
    labels[:, :, :20] = 1  # 'emphysema' in i < 20
    lobes = np.zeros_like(lung)
    lobes[lung > 0] = 4
    lobes[:, :15, :] = np.where(lung[:, :15, :] > 0, 2, 0)  # lobe 2 for j < 15, lobe 4 beyond
    out = extract_patches(ct, atlas, None, label_1mm=_image(labels, ct.GetOrigin()), lobe_1mm=_image(lobes, ct.GetOrigin()),
                          lung_1mm=mask)
    for n, (i, j, k) in enumerate(atlas.corners):
        lp = lung[k:k + 8, j:j + 8, i:i + 8] > 0
        assert out["lung_fraction"][n] == pytest.approx(lp.mean())
        if lp.any():
            hp = np.clip(hu[k:k + 8, j:j + 8, i:i + 8], -1024, 240)
            assert out["laa950"][n] == pytest.approx(100 * (hp[lp] < -950).mean())
            assert out["emph_fraction"][n] == pytest.approx((labels[k:k + 8, j:j + 8, i:i + 8][lp] > 0).mean())
            vals, counts = np.unique(lobes[k:k + 8, j:j + 8, i:i + 8][lp], return_counts=True)
            assert out["lobe"][n] == vals[np.argmax(counts)]
        else:
            assert np.isnan(out["laa950"][n]) and np.isnan(out["emph_fraction"][n]) and out["lobe"][n] == 0
    assert out["label_patches"].dtype == np.uint8
    bare = extract_patches(ct, atlas, None)
    assert bare["label_patches"] is None and np.all(np.isnan(bare["emph_fraction"])) and np.all(bare["lobe"] == 0)


def test_grid_mismatch_raises(scene):
    ct, hu, mask, atlas = scene
    other = _image(np.zeros((40, 50, 61), np.uint8))
    with pytest.raises(ValueError, match="not on the CT's 1 mm grid"):
        extract_patches(ct, atlas, None, label_1mm=other)
    on_grid = resample_to_grid(other, ct)
    assert on_grid.GetSize() == ct.GetSize()


def test_map_corners_rounds_to_nearest(scene):
    ct, _, _, atlas = scene
    tx = sitk.TranslationTransform(3, (0.6, 0.4, -0.6))
    assert np.array_equal(map_corners(atlas, tx, ct), atlas.corners + [1, 0, -1])


def test_field_of_view_cut_with_the_same_boxes(scene):
    """``fov_fraction`` is the share of each patch inside the scanned volume, and lung outside it
    does not count (padding inside the grid reads as air, i.e. as emphysema)."""
    ct, hu, mask, atlas = scene
    inside = np.ones_like(hu, dtype=np.uint8)
    inside[:, :, :14] = 0  # the scanner saw nothing at i < 14 (but the grid goes on)
    fov = _image(inside, origin=ct.GetOrigin())
    out = extract_patches(ct, atlas, None, lung_1mm=mask, inside_1mm=fov)
    plain = extract_patches(ct, atlas, None, lung_1mm=mask)
    lung = sitk.GetArrayFromImage(mask) > 0
    for n, (i, j, k) in enumerate(atlas.corners):
        box = (slice(k, k + 8), slice(j, j + 8), slice(i, i + 8))
        assert out["fov_fraction"][n] == pytest.approx(inside[box].sum() / 8**3)
        assert out["lung_fraction"][n] == pytest.approx((lung[box] & (inside[box] > 0)).sum() / 8**3)
    np.testing.assert_array_equal(out["inside_fraction"], plain["inside_fraction"])
    assert out["fov_fraction"].dtype == np.float32
    assert out["fov_fraction"].tolist() == [0.0, 0.5, 1.0, 1.0]  # corners i = 0, 10, 20, 44
    np.testing.assert_array_equal(plain["fov_fraction"], plain["inside_fraction"])  # without a mask: the grid's
    with pytest.raises(ValueError, match="field-of-view mask"):
        extract_patches(ct, atlas, None, inside_1mm=_image(inside[:-1], origin=ct.GetOrigin()))
