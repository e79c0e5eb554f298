"""Whole-scan inference: blending maths, output naming and geometry, and a synthetic subject end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.preprocess.atlas_source import resolve_atlas
from drasclr_lib.preprocess.pipeline import process_scan
from drasclr_lib.segmentation import inference as inf


# -- blending --------------------------------------------------------------------------------------
def test_blender_mean_of_overlapping_patches():
    P, C = 4, 2
    corners = np.array([[0, 0, 0], [2, 0, 0]])  # (i, j, k): overlap on i = 2, 3
    b = inf.PatchBlender((4, 4, 8), corners, P, C)
    p1 = np.zeros((1, C, P, P, P), np.float32)
    p1[:, 1] = 0.8
    p1[:, 0] = 0.2
    p2 = np.zeros((1, C, P, P, P), np.float32)
    p2[:, 1] = 0.2
    p2[:, 0] = 0.8
    b.add(p1, corners[:1])
    b.add(p2, corners[1:])
    cov = b.coverage()
    assert cov.shape == (4, 4, 8)
    np.testing.assert_array_equal(cov[0, 0], [1, 1, 2, 2, 1, 1, 0, 0])
    mean = b.mean_probs()
    np.testing.assert_allclose(mean[1, 0, 0], [0.8, 0.8, 0.5, 0.5, 0.2, 0.2, 0, 0], atol=1e-6)
    np.testing.assert_allclose(mean.sum(0), 1.0, atol=1e-6)
    lab = b.labels()
    np.testing.assert_array_equal(lab[0, 0, [0, 1, 4, 5, 6, 7]], [1, 1, 0, 0, 0, 0])
    assert lab.dtype == np.uint8


def test_blender_drops_parts_outside_the_grid():
    P = 4
    corners = np.array([[-2, 5, 1]])  # i starts before the grid, j runs past it (size 7)
    b = inf.PatchBlender((6, 7, 5), corners, P, 2)
    probs = np.zeros((1, 2, P, P, P), np.float32)
    probs[:, 1] = 1
    b.add(probs, corners)
    lab = b.labels()
    expect = np.zeros((6, 7, 5), np.uint8)
    expect[1:5, 5:7, 0:2] = 1
    np.testing.assert_array_equal(lab, expect)
    with pytest.raises(ValueError, match="probs"):
        b.add(probs[:, :1], corners)


def test_default_output_path(tmp_path):
    assert inf.default_output_path(tmp_path / "a.b.nii.gz") == tmp_path / "a.b_emphysema_seg.nii.gz"
    assert inf.default_output_path(tmp_path / "scan.nrrd") == tmp_path / "scan_emphysema_seg.nii.gz"
    assert inf.default_output_path(tmp_path / "dicom_dir") == tmp_path / "dicom_dir_emphysema_seg.nii.gz"


def test_input_geometry_is_the_file_as_stored(tmp_path):
    img = sitk.Image([7, 6, 5], sitk.sitkInt16)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-like, not the pipeline's LPS
    path = tmp_path / "x.nii.gz"
    sitk.WriteImage(img, str(path))
    ref = inf.input_geometry(path)
    back = sitk.ReadImage(str(path))
    assert ref.GetSize() == back.GetSize()
    np.testing.assert_allclose(ref.GetSpacing(), back.GetSpacing())
    np.testing.assert_allclose(ref.GetOrigin(), back.GetOrigin())
    np.testing.assert_allclose(ref.GetDirection(), back.GetDirection())


# -- end to end on a small synthetic subject ------------------------------------------------------
class ConstantSegmenter(nn.Module):
    """Predicts one class everywhere (with a location check)."""

    def __init__(self, cls: int, num_classes: int = 2):
        super().__init__()
        self.cls, self.num_classes = cls, num_classes
        self.seen_locs = []

    def forward(self, x, loc):
        assert x.shape[1:] == (1, 32, 32, 32) and loc.shape == (x.shape[0], 3)
        self.seen_locs.append(loc.clone())
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:])
        out[:, self.cls] = 5.0
        return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Two small synthetic subjects; the atlas is built from the first and saved like a store's."""
    from drasclr_lib.data.synthetic import make_cohort

    root = tmp_path_factory.mktemp("seg_cohort")
    manifest = make_cohort(root / "cohort", n_subjects=2, seed=5, size=0.4, spacing=(1.5, 1.5, 3.0), workers=1,
                           progress=False)
    df = pd.read_csv(manifest)
    paths = df.set_index("sid")[["image", "lung_mask", "label_map"]].map(lambda p: str(manifest.parent / p))
    atlas = Atlas.from_subject(paths.loc["syn0000", "image"], paths.loc["syn0000", "lung_mask"], sid="syn0000")
    atlas.save(root / "store")
    return {"paths": paths.loc["syn0001"], "atlas": atlas, "atlas_dir": root / "store", "root": root}


def _geometry(img):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def test_segment_scan_geometry_and_lung_coverage(synthetic, tmp_path):
    paths, atlas = synthetic["paths"], synthetic["atlas"]
    model = ConstantSegmenter(1)
    out = inf.segment_scan(model, paths["image"], atlas=synthetic["atlas_dir"], out_path=tmp_path / "seg.nii.gz",
                           lung_mask_path=paths["lung_mask"], device="cpu", batch_size=16, sid="syn0001")
    seg = sitk.ReadImage(str(out))
    src = sitk.ReadImage(paths["image"])
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == src.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), src.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), src.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(seg.GetDirection(), src.GetDirection(), atol=1e-6)
    # every atlas location was predicted with its own normalised location
    seen = torch.cat(model.seen_locs).numpy()
    np.testing.assert_allclose(seen, atlas.locs, atol=1e-6)
    # foreground == (lung mask on the 1 mm grid) & (covered by a patch), taken back to the input grid
    scan = process_scan(paths["image"], atlas, lung_mask=paths["lung_mask"], sid="syn0001")
    lung = sitk.GetArrayFromImage(scan.lung_1mm) > 0
    covered = np.zeros_like(lung)
    for i, j, k in scan.corners_subject:
        covered[max(k, 0):k + 32, max(j, 0):j + 32, max(i, 0):i + 32] = True
    expect = sitk.GetImageFromArray((lung & covered).astype(np.uint8))
    expect.CopyInformation(scan.ct_1mm)
    expect = sitk.Resample(expect, src, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    fg = sitk.GetArrayFromImage(seg)
    # input voxel centres fall exactly half-way between 1 mm voxels (1.5 mm spacing): the nearest
    # neighbour of such a tie may differ by float noise between two equal geometries
    mismatch = np.count_nonzero(fg != sitk.GetArrayFromImage(expect))
    assert mismatch <= 1e-3 * np.count_nonzero(fg)
    # and it lies in the subject's lung: almost all of the given mask, nothing far outside it
    given = sitk.GetArrayFromImage(sitk.ReadImage(paths["lung_mask"])) > 0
    assert fg.sum() > 0.9 * given.sum()
    dilated = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.ReadImage(paths["lung_mask"]) > 0, [1, 1, 1])) > 0
    assert np.all(dilated[fg > 0])


def test_segment_scan_background_model_and_default_path(synthetic):
    paths = synthetic["paths"]
    out = inf.segment_scan(ConstantSegmenter(0), paths["image"], atlas=synthetic["atlas"],
                           lung_mask_path=paths["lung_mask"], device="cpu")
    assert out == inf.default_output_path(paths["image"]) and out.exists()
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(out))).any()
    assert not list(out.parent.glob(".*part*"))  # atomic write left no temporary file


def test_segment_scan_with_a_segmenter(synthetic, tmp_path):
    from drasclr_lib.segmentation.model import build_segmenter

    paths = synthetic["paths"]
    model = build_segmenter("random", num_classes=4, seed=0)
    out = inf.segment_scan(model, paths["image"], atlas=synthetic["atlas"], out_path=tmp_path / "s.nii.gz",
                           lung_mask_path=paths["lung_mask"], device="cpu")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    given = sitk.GetArrayFromImage(sitk.ReadImage(paths["lung_mask"])) > 0
    assert seg.shape == given.shape and seg.max() <= 3


def test_resolve_atlas_of_a_store_folder(synthetic, tmp_path):
    atlas = resolve_atlas(synthetic["atlas_dir"])
    np.testing.assert_array_equal(atlas.corners, synthetic["atlas"].corners)
    with pytest.raises(FileNotFoundError, match="no saved atlas"):
        resolve_atlas(tmp_path)


def test_segment_scan_leaves_invalid_patches_unlabelled(synthetic, tmp_path):
    """A scan missing its lung bases: patches mostly outside it are not segmented, and lung
    voxels only they reach stay 0 (with a model that calls every voxel class 1)."""
    from drasclr_lib.data.patch_store.records import MIN_PATCH_FOV

    paths = synthetic["paths"]
    img, mask = sitk.ReadImage(paths["image"]), sitk.ReadImage(paths["lung_mask"])
    ks = np.flatnonzero((sitk.GetArrayViewFromImage(mask) > 0).any((1, 2)))
    k_cut = int(ks.min() + 0.3 * (ks.max() - ks.min()))
    files = {}
    for name, im in (("image", img), ("lung_mask", mask)):
        files[name] = tmp_path / f"cut_{name}.nii.gz"
        sitk.WriteImage(im[:, :, k_cut:], str(files[name]))
    model = ConstantSegmenter(1)
    out = inf.segment_scan(model, files["image"], atlas=synthetic["atlas"], out_path=tmp_path / "seg.nii.gz",
                           lung_mask_path=files["lung_mask"], device="cpu", sid="cut")
    scan = process_scan(files["image"], synthetic["atlas"], lung_mask=files["lung_mask"], sid="cut")
    valid = np.asarray(scan.patch_fov_fraction) >= MIN_PATCH_FOV
    assert (~valid).any() and valid.any()
    assert len(torch.cat(model.seen_locs)) == valid.sum()  # only valid patches went through the model
    lung = sitk.GetArrayFromImage(scan.lung_1mm) > 0
    by_valid, by_any = np.zeros_like(lung), np.zeros_like(lung)
    for n, (i, j, k) in enumerate(scan.corners_subject):
        box = (slice(max(k, 0), k + 32), slice(max(j, 0), j + 32), slice(max(i, 0), i + 32))
        by_any[box] = True
        if valid[n]:
            by_valid[box] = True
    only_invalid = lung & by_any & ~by_valid
    assert only_invalid.sum() > 100  # scanned lung that only invalid patches reach
    src = sitk.ReadImage(str(files["image"]))
    expect = sitk.GetImageFromArray((lung & by_valid).astype(np.uint8))
    expect.CopyInformation(scan.ct_1mm)
    expect = sitk.GetArrayFromImage(sitk.Resample(expect, src, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                  sitk.sitkUInt8))
    fg = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.count_nonzero(fg != expect) <= 1e-3 * np.count_nonzero(fg)
    gone = sitk.GetImageFromArray(only_invalid.astype(np.uint8))
    gone.CopyInformation(scan.ct_1mm)
    gone = sitk.GetArrayFromImage(sitk.Resample(gone, src, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    assert gone.sum() > 0 and fg[gone > 0].sum() <= 1e-3 * gone.sum()
