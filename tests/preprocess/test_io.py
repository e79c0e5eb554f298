"""Reading CT and labels: orientation, HU scaling, and every bad input named by sid and file."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.io import read_ct, read_label, reorient, scan_metadata


def ct_array(shape=(12, 16, 20), seed=0):
    """(k, j, i) float32 'CT': air around a soft-tissue block holding an air pocket."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0, dtype=np.float32)
    a[2:-2, 3:-3, 4:-4] = 40.0
    a[4:-4, 6:-6, 8:-8] = -850.0
    return a + rng.normal(0, 5, shape).astype(np.float32)


def write_nifti(path, data_kji, *, zooms=(0.8, 0.8, 2.5), affine=None, slope=None, inter=None):
    data = np.ascontiguousarray(np.transpose(data_kji, (2, 1, 0)))  # nibabel order (i, j, k)
    aff = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0]) if affine is None else affine
    img = nib.Nifti1Image(data, aff)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def expect_error(path, match, sid="SUBJ-42"):
    with pytest.raises(PreprocessError) as info:
        read_ct(path, sid=sid)
    err = info.value
    assert err.stage == "read" and err.sid == sid and err.path == str(path)
    assert sid in str(err) and str(path) in str(err)
    assert match in str(err), str(err)
    return err


def test_nifti_read_in_hu_lps(tmp_path):
    a = ct_array()
    p = write_nifti(tmp_path / "ct.nii.gz", a)
    img = read_ct(p, sid="A")
    assert img.GetPixelID() == sitk.sitkFloat32 and img.GetDimension() == 3
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)  # LPS
    # RAS affine diag(-0.8,-0.8,2.5) is already LPS-identity in ITK: voxels unchanged
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(img), a, atol=1e-3)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-6)


def test_reorientation_keeps_physical_positions(tmp_path):
    a = ct_array()
    aff = np.array([[0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, -2.5, 30], [0, 0, 0, 1.0]])  # flipped axes
    p = write_nifti(tmp_path / "flip.nii.gz", a, affine=aff)
    raw = sitk.ReadImage(str(p))
    img = read_ct(p)
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    for idx in [(0, 0, 0), (5, 7, 3), (19, 15, 11)]:
        pt = raw.TransformIndexToPhysicalPoint(idx)
        assert img.GetPixel(img.TransformPhysicalPointToIndex(pt)) == pytest.approx(raw.GetPixel(idx), abs=1e-3)
    assert reorient(raw).GetDirection() == img.GetDirection()


def test_nifti_scl_slope_applied(tmp_path):
    a = ct_array()
    stored = np.round((a + 1024.0) / 2.0).astype(np.int16)  # HU = 2 * stored - 1024
    p = write_nifti(tmp_path / "scaled.nii.gz", stored.astype(np.int16), slope=2.0, inter=-1024.0)
    img = read_ct(p)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(img), stored * 2.0 - 1024.0, atol=1e-3)


def test_mha_and_label_on_reference(tmp_path):
    a = ct_array()
    ct = sitk.GetImageFromArray(a)
    ct.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(ct, str(tmp_path / "ct.mha"))
    img = read_ct(tmp_path / "ct.mha")
    lab = (a < -500).astype(np.uint8)
    p = write_nifti(tmp_path / "lab.nii.gz", lab, zooms=(0.8, 0.8, 2.5),
                    affine=np.diag([-0.8, -0.8, 2.5, 1.0]))
    out = read_label(p, img, sid="L")
    assert out.GetPixelID() == sitk.sitkUInt8 and out.GetSize() == img.GetSize()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(out), lab)
    # a label on a coarser grid is resampled (nearest) onto the reference
    small = sitk.GetImageFromArray(np.ones((7, 10, 12), np.uint8))  # covers the reference
    small.SetSpacing((1.6, 1.6, 5.0))
    small.SetOrigin((-0.4, -0.4, -1.25))
    sitk.WriteImage(small, str(tmp_path / "small.nrrd"))
    out2 = read_label(tmp_path / "small.nrrd", img)
    assert out2.GetSize() == img.GetSize() and np.all(sitk.GetArrayViewFromImage(out2) == 1)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.nii.gz", "not found")


def test_truncated_nifti(tmp_path):
    p = write_nifti(tmp_path / "t.nii.gz", ct_array((30, 40, 40)))
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    expect_error(p, "corrupt")


def test_garbage_nifti(tmp_path):
    p = tmp_path / "g.nii.gz"
    p.write_bytes(b"this is not an image" * 20)
    expect_error(p, "corrupt")


def test_2d_and_single_slice(tmp_path):
    img2d = sitk.GetImageFromArray(ct_array()[0])
    sitk.WriteImage(img2d, str(tmp_path / "slice.nrrd"))
    expect_error(tmp_path / "slice.nrrd", "2D")
    p = write_nifti(tmp_path / "one.nii.gz", ct_array()[:1])
    expect_error(p, "single slice")


def test_mr_like_intensities(tmp_path):
    mr = np.random.default_rng(0).uniform(0, 4095, (12, 16, 20)).astype(np.float32)
    p = write_nifti(tmp_path / "mr.nii.gz", mr)
    expect_error(p, "Hounsfield")


def test_nan_values(tmp_path):
    a = ct_array()
    a[3, 4, 5] = np.nan
    expect_error(write_nifti(tmp_path / "nan.nii.gz", a), "NaN")


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_zero_or_negative_spacing(tmp_path, bad):
    p = write_nifti(tmp_path / f"sp{bad}.nii", ct_array())
    blob = bytearray(p.read_bytes())
    blob[84:88] = np.float32(bad).tobytes()  # pixdim[2] (nibabel would rewrite it from the affine)
    p.write_bytes(bytes(blob))
    with open(p, "rb") as fh:  # the bad value is really in the file
        assert float(nib.Nifti1Header.from_fileobj(fh, check=False)["pixdim"][2]) == bad
    expect_error(p, "spacing")


def write_dicom_series(folder, arr_kji, series_uid, *, slope=1.0, intercept=-1024.0):
    """One int16 CT series, as in SimpleITK's DicomSeriesFromArray example.

    ITK's GDCM writer stores ``(HU - intercept) / slope`` when the rescale tags are set, and the
    reader applies them again, so a round trip returns the HU values.
    """
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.round(arr_kji).astype(np.int16))
    img.SetSpacing((0.8, 0.8, 2.5))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    for z in range(img.GetDepth()):
        sl = img[:, :, z]
        for tag, value in [("0008|0060", "CT"), ("0008|0020", now[0]), ("0008|0030", now[1]),
                           ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", series_uid),
                           ("0020|0013", str(z + 1)), ("0020|0032", f"0\\0\\{z * 2.5}"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|1052", str(intercept)),
                           ("0028|1053", str(slope)), ("0028|1054", "HU"), ("0018|0050", "2.5"),
                           ("0008|0018", f"{series_uid}.{z + 1}")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_with_rescale(tmp_path):
    a = ct_array()
    write_dicom_series(tmp_path / "d", a, "1.2.826.0.1.3680043.2.1125.2.1001", slope=2.0, intercept=-1024.0)
    img = read_ct(tmp_path / "d", sid="D1")
    assert img.GetSize() == (20, 16, 12)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(img), np.round(a), atol=2.0)  # HU, slope 2 rounding
    assert sitk.GetArrayViewFromImage(img).min() < -900
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)


def test_dicom_folder_with_two_series(tmp_path):
    uids = ["1.2.826.0.1.3680043.2.1125.2.2001", "1.2.826.0.1.3680043.2.1125.2.2002"]
    for u in uids:
        write_dicom_series(tmp_path / "two", ct_array(), u)
    err = expect_error(tmp_path / "two", "2 series")
    assert all(u in str(err) for u in uids)


def test_empty_folder_and_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "notes.txt").write_text("hello")
    expect_error(tmp_path / "txt", "no DICOM series")


# ---- DICOM slices on their true positions: gaps, uneven steps, gantry tilt (issue 13) ----

def write_dicom_slices(folder, slices_kji, positions, *, uid="1.2.826.0.1.3680043.2.1125.2.3001", extra=None,
                       pixel=0.8):
    """One int16 series, slice ``k`` written at ImagePositionPatient ``positions[k]`` (mm, LPS)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    names = []
    for z, (sl_arr, pos) in enumerate(zip(slices_kji, positions)):
        sl = sitk.GetImageFromArray(np.round(sl_arr).astype(np.int16)[None])[:, :, 0]
        sl.SetSpacing((pixel, pixel))
        tags = [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"), ("0020|000e", uid),
                ("0020|0013", str(z + 1)), ("0020|0032", "\\".join(f"{c:.4f}" for c in pos)),
                ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|1052", "-1024"), ("0028|1053", "1"),
                ("0018|0050", "2.5"), ("0008|0018", f"{uid}.{z + 1}")] + list((extra or {}).items())
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        name = folder / f"slice_{z:03d}.dcm"
        writer.SetFileName(str(name))
        writer.Execute(sl)
        names.append(name)
    return names


def ramp_slices(z_mm, shape=(16, 20)):
    """Slices whose tissue block holds a value linear in the physical z (mm): 2 HU per mm."""
    out = []
    for z in z_mm:
        a = np.full(shape, -1000.0, dtype=np.float32)
        a[3:-3, 4:-4] = 2.0 * z - 200.0
        out.append(a)
    return out


def test_dicom_missing_slice_resampled_on_true_positions(tmp_path):
    z = np.arange(12) * 2.5
    names = write_dicom_slices(tmp_path / "gap", ramp_slices(z), [(0, 0, zz) for zz in z],
                               extra={"0018|5100": "HFS"})
    names[5].unlink()  # z = 12.5 mm is missing
    img = read_ct(tmp_path / "gap", sid="G1")
    arr = sitk.GetArrayViewFromImage(img)
    assert img.GetSize() == (20, 16, 12)  # the regular 2.5 mm grid is restored, not 11 slices
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(arr[:, 8, 10], 2.0 * z - 200.0, atol=1.0)  # the missing slice interpolated
    meta = scan_metadata(img)
    assert meta["max_slice_gap_mm"] == pytest.approx(5.0) and meta["slice_spacing_mm"] == pytest.approx(2.5)
    assert meta["patient_position"] == "HFS" and meta["slice_thickness_mm"] == pytest.approx(2.5)


def test_dicom_uneven_steps_resampled_on_true_positions(tmp_path):
    z = np.array([0.0, 2.5, 5.0, 8.0, 10.0, 12.5, 15.0, 17.0, 20.0, 22.5])
    write_dicom_slices(tmp_path / "uneven", ramp_slices(z), [(0, 0, zz) for zz in z])
    img = read_ct(tmp_path / "uneven", sid="U1")
    out_z = img.GetOrigin()[2] + img.GetSpacing()[2] * np.arange(img.GetSize()[2])
    np.testing.assert_allclose(img.GetSpacing()[2], 2.5, atol=1e-4)
    # every output slice holds the value of its own physical position (the ramp is linear in z)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(img)[:, 8, 10], 2.0 * out_z - 200.0, atol=1.0)


def test_dicom_large_gap_refused_with_gap_named(tmp_path):
    z = np.arange(12) * 2.5
    names = write_dicom_slices(tmp_path / "hole", ramp_slices(z), [(0, 0, zz) for zz in z])
    for k in (4, 5, 6, 7):
        names[k].unlink()  # 12.5 mm hole between 7.5 and 20.0 mm
    err = expect_error(tmp_path / "hole", "gap of 12.50 mm", sid="H1")
    assert "7.50 and 20.00 mm" in str(err) and "slice_003.dcm" in str(err) and "slice_008.dcm" in str(err)


def test_dicom_duplicate_position_refused(tmp_path):
    z = [0.0, 2.5, 2.5, 5.0, 7.5]
    write_dicom_slices(tmp_path / "dup", ramp_slices(z), [(0, 0, zz) for zz in z])
    expect_error(tmp_path / "dup", "two slices at one position", sid="D2")


def test_dicom_gantry_tilt_corrected(tmp_path):
    """A vertical rod, fixed in physical space, written as a tilted gantry does: each slice's
    position shifted along y. The reader must give a straight rod at its physical place."""
    tilt = 15.0
    z = np.arange(12) * 2.5
    shift_y = z * np.tan(np.radians(tilt))  # mm
    pixel, shape = 0.8, (40, 40)
    rod_xy = (16.0, 14.0)  # mm
    slices = []
    for sy in shift_y:
        a = np.full(shape, 40.0, dtype=np.float32)
        a[:, :4] = -1000.0
        jj, ii = np.mgrid[0:shape[0], 0:shape[1]]
        x, y = ii * pixel, jj * pixel + sy
        a[(x - rod_xy[0]) ** 2 + (y - rod_xy[1]) ** 2 < 2.5 ** 2] = 1000.0
        slices.append(a)
    write_dicom_slices(tmp_path / "tilt", slices, [(0, sy, zz) for sy, zz in zip(shift_y, z)],
                       extra={"0018|1120": f"{tilt}"})
    img = read_ct(tmp_path / "tilt", sid="T1")
    meta = scan_metadata(img)
    assert meta["gantry_tilt_deg"] == pytest.approx(tilt, abs=0.1) and meta["gantry_tilt_tag_deg"] == tilt
    arr = sitk.GetArrayFromImage(img)
    assert img.GetSize()[1] < shape[0]  # cropped to the area every slice covers: nothing invented
    jj, ii = np.mgrid[0:arr.shape[1], 0:arr.shape[2]]
    for k in range(arr.shape[0]):
        w = np.clip(arr[k] - 40.0, 0, None)  # the rod's intensity-weighted centre (linear-interpolation exact)
        centre = img.TransformContinuousIndexToPhysicalPoint(
            (float((w * ii).sum() / w.sum()), float((w * jj).sum() / w.sum()), float(k)))
        # straight and at its physical place (uncorrected, it would drift 7.4 mm over the stack);
        # 0.35 mm: the written disk itself is pixelated at 0.8 mm
        np.testing.assert_allclose(centre[:2], rod_xy, atol=0.35)


def test_dicom_tilt_beyond_limit_refused(tmp_path):
    z = np.arange(6) * 2.5
    shift_y = z * np.tan(np.radians(40.0))
    write_dicom_slices(tmp_path / "t40", ramp_slices(z, (40, 40)), [(0, sy, zz) for sy, zz in zip(shift_y, z)])
    expect_error(tmp_path / "t40", "gantry tilt of 40.0 degrees", sid="T2")


def test_nifti_metadata_from_spacing(tmp_path):
    p = write_nifti(tmp_path / "thick.nii.gz", ct_array(), zooms=(0.7, 0.7, 5.0))
    meta = scan_metadata(read_ct(p, sid="N1"))
    assert meta["slice_thickness_mm"] == pytest.approx(5.0) and meta["patient_position"] == ""
    assert np.isnan(meta["max_slice_gap_mm"]) and meta["gantry_tilt_deg"] == 0.0
