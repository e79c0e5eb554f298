"""Partial fields of view, built from the synthetic cohort by cutting slices or columns off a CT:
per-patch ``patch_fov_fraction`` against the known crop, ``fov_lung_coverage`` against the kept
share of the lung, the QC reasons, and density figures that never count padding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from drasclr_lib.data.patch_store import PatchStore, write_store_meta, write_subject
from drasclr_lib.downstream.subtypes import patch_qct_features
from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.preprocess.io import read_ct, read_label
from drasclr_lib.preprocess.pipeline import DEFAULT_MIN_COVERAGE, process_scan
from drasclr_lib.preprocess.resample import fov_mask, resample_isotropic

PAD = 16
FAILING = ("partial_fov", "low_registration_dice")


def _names(reasons):
    return [r.split(":")[0] for r in reasons]


@pytest.fixture(scope="module")
def cut_scans(tmp_path_factory):
    """syn0001 whole and cut four ways (bottom 35 % of its lung, top, one side), registered to an
    atlas built from syn0000; with the kept share of the lung of each."""
    from drasclr_lib.data.synthetic import make_cohort

    root = tmp_path_factory.mktemp("fov_cohort")
    manifest = make_cohort(root / "cohort", n_subjects=2, seed=5, size=0.4, spacing=(1.5, 1.5, 3.0), workers=1,
                           progress=False)
    paths = pd.read_csv(manifest).set_index("sid")[["image", "lung_mask"]].map(lambda p: str(manifest.parent / p))
    atlas = Atlas.from_subject(paths.loc["syn0000", "image"], paths.loc["syn0000", "lung_mask"], sid="syn0000", pad=PAD)
    ct = read_ct(paths.loc["syn0001", "image"])  # LPS: k runs from the feet to the head
    lung = read_label(paths.loc["syn0001", "lung_mask"], ct)
    arr = sitk.GetArrayFromImage(lung) > 0
    ks = np.flatnonzero(arr.any((1, 2)))
    i_s = np.flatnonzero(arr.any((0, 1)))
    k_cut = int(ks.min() + 0.35 * (ks.max() - ks.min()))
    crops = {
        "whole": (slice(None), slice(None), slice(None)),
        "bottom": (slice(None), slice(None), slice(k_cut, None)),  # lung bases removed
        "top": (slice(None), slice(None), slice(None, int(ks.max() - 0.3 * (ks.max() - ks.min())))),  # apices
        "side": (slice(int(i_s.min() + 0.2 * (i_s.max() - i_s.min())), None), slice(None), slice(None)),
    }
    out = {}
    for name, sl in crops.items():
        native, mask = ct[sl], lung[sl]
        scan = process_scan(native, atlas, lung_mask=mask, sid=name, pad=PAD)
        kept = float((sitk.GetArrayFromImage(mask) > 0).sum()) / arr.sum()
        out[name] = {"scan": scan, "native": native, "kept": kept}
    return {"atlas": atlas, "scans": out, "root": root}


def _expected_fov(native: sitk.Image, grid: sitk.Image, corners: np.ndarray, P: int) -> np.ndarray:
    """The share of each patch inside ``native``'s extent (its voxel centres +/- half a voxel),
    computed from geometry alone: a product of per-axis shares of the patch's voxel centres."""
    size = np.array(native.GetSize())
    ends = np.array([native.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                     for c in (-0.5 * np.ones(3), size - 0.5)])
    lo, hi = ends.min(0), ends.max(0)
    origin, spacing = np.array(grid.GetOrigin()), np.array(grid.GetSpacing())
    assert np.allclose(np.array(grid.GetDirection()).reshape(3, 3), np.eye(3))  # LPS, axis-aligned
    n = np.arange(P)
    out = np.ones(len(corners))
    for axis in range(3):
        centres = origin[axis] + (corners[:, axis, None] + n[None]) * spacing[axis]  # (L, P) mm
        out *= ((centres >= lo[axis]) & (centres <= hi[axis])).mean(1)
    return out


def test_fov_mask_follows_the_extent_and_the_reconstruction_circle():
    hu = np.full((10, 12, 14), -1000.0, np.float32)
    hu[:, :3, :3] = -2048  # outside the reconstruction circle, as scanners store it
    native = sitk.GetImageFromArray(hu)
    native.SetSpacing((1.0, 1.0, 2.0))
    ct_1mm = resample_isotropic(native, 1.0, pad=5)
    inside = sitk.GetArrayFromImage(fov_mask(native, ct_1mm))
    assert inside.shape == sitk.GetArrayViewFromImage(ct_1mm).shape
    # the padding, up to half a native voxel past the outer voxel centres (1 mm in k, 0.5 mm in j, i)
    assert inside[:4].sum() == 0 and np.array_equal(inside[4], inside[5])
    assert inside[:, :5].sum() == 0 and inside[:, :, :5].sum() == 0
    assert inside[8, 12, 12] == 1  # a scanned voxel
    assert inside[8, 6, 6] == 0  # the -2048 HU corner
    assert fov_mask(native, ct_1mm, outside_hu=None)[6, 6, 8] == 1
    # outside the mask the resampled CT is the padding value, -1024 HU
    ct = sitk.GetArrayViewFromImage(ct_1mm)
    corner = np.zeros_like(inside, dtype=bool)
    corner[:, 5:8, 5:8] = True
    assert np.all(ct[(inside == 0) & ~corner] == -1024)


def test_whole_scan_passes_with_no_reason(cut_scans):
    scan = cut_scans["scans"]["whole"]["scan"]
    rec = scan.record()
    assert scan.fov_lung_coverage > 0.99
    assert not set(_names(rec.qc_reasons)) & set(FAILING) and rec.qc_pass
    assert rec.patch_fov_fraction.min() >= 0.5  # some patches reach past the synthetic scan's ends, none by half
    assert rec.valid_patches().all()
    assert rec.mean_patch_inside == pytest.approx(float(np.mean(scan.patch_fov_fraction)))
    assert scan.registration["fov_masked"] is False  # a whole lung registers as before


@pytest.mark.parametrize("name", ["bottom", "top", "side"])
def test_patch_fractions_match_the_known_crop(cut_scans, name):
    case = cut_scans["scans"][name]
    scan, P = case["scan"], cut_scans["atlas"].patch_size
    want = _expected_fov(case["native"], scan.ct_1mm, scan.corners_subject, P)
    got = np.asarray(scan.patch_fov_fraction, dtype=np.float64)
    # patches wholly in the removed part read ~0, wholly kept ~1 (measured: 0.0 and 1.0 exactly)
    assert np.all(got[want == 0] < 0.05) and np.all(got[want == 1] > 0.95)
    assert (want < 0.5).any() and (want == 1).any()  # the crop does cut through the patches
    # every patch within one voxel row of the geometry (measured: max difference 0.0)
    np.testing.assert_allclose(got, want, atol=1.0 / P + 1e-6)
    # the padded-grid fraction cannot tell: it counts the padding as inside
    over = np.asarray(scan.inside_fraction) - got
    assert over.min() >= 0 and over[want < 0.5].max() > 0.2


@pytest.mark.parametrize("name", ["bottom", "top", "side"])
def test_lung_coverage_matches_the_kept_lung_and_fails_qc(cut_scans, name):
    case = cut_scans["scans"][name]
    scan = case["scan"]
    # the field of view carried into the atlas covers what was kept of the lung (measured:
    # bottom 0.829 / kept 0.805, top 0.778 / 0.792, side 0.862 / 0.871)
    assert abs(scan.fov_lung_coverage - case["kept"]) < 0.05, (scan.fov_lung_coverage, case["kept"])
    assert scan.registration["fov_masked"] is True
    assert scan.reg_dice > 0.9  # the scanned part is well aligned: not flagged as a bad registration
    rec = scan.record()
    assert case["kept"] < DEFAULT_MIN_COVERAGE
    assert f"partial_fov:{scan.fov_lung_coverage:.2f}" in rec.qc_reasons
    assert "low_registration_dice" not in _names(rec.qc_reasons)
    assert rec.qc_pass is False
    # a lower threshold lets the subject pass with the same figures
    assert "partial_fov" not in _names(scan.record(min_coverage=0.5).qc_reasons)


def test_scanned_lung_only_in_volume_and_laa950(cut_scans):
    whole, bottom = cut_scans["scans"]["whole"]["scan"], cut_scans["scans"]["bottom"]["scan"]
    lung = sitk.GetArrayViewFromImage(bottom.lung_1mm) > 0
    inside = sitk.GetArrayViewFromImage(bottom.inside_1mm) > 0
    assert not np.any(lung & ~inside)
    assert bottom.lung_volume_l == pytest.approx(whole.lung_volume_l * cut_scans["scans"]["bottom"]["kept"], rel=0.05)


def test_padding_never_counts_as_emphysema(cut_scans, tmp_path):
    """Per-patch %LAA-950 of a store holding the cut scan: invalid patches are NaN and partly
    padded valid ones count their scanned lung only (the HU proxy counts -1024 HU padding)."""
    scan, atlas = cut_scans["scans"]["bottom"]["scan"], cut_scans["atlas"]
    write_store_meta(tmp_path, atlas.corners, atlas.locs, atlas.neighbors(2), patch_size=atlas.patch_size)
    write_subject(tmp_path, "bottom", scan.patches_hu, record=scan.record())
    store = PatchStore(tmp_path)
    valid = store.valid_patches("bottom")
    fov = np.asarray(scan.patch_fov_fraction)
    assert (~valid).any() and np.array_equal(valid, fov >= 0.5)
    qct = patch_qct_features(store, ["bottom"])[0]
    assert np.isnan(qct[~valid]).all() and np.isfinite(qct[valid]).all()
    partly = valid & (fov < 0.95) & (np.nan_to_num(scan.patch_lung_fraction) > 0.02)
    assert partly.any()
    np.testing.assert_allclose(qct[partly, 0], scan.patch_laa950[partly], atol=1e-3)
    # what padding would have done: the HU proxy's %LAA-950 of those patches is far higher
    hu = scan.patches_hu.reshape(len(fov), -1)[partly]
    proxy = 100.0 * (hu < -950).sum(1) / np.maximum((hu < -500).sum(1), 1)
    assert np.all(proxy > scan.patch_laa950[partly] + 10)
    from drasclr_lib.data.patch_store import patch_table

    assert np.isnan(patch_table(store)["laa950"][0][~valid]).all()
