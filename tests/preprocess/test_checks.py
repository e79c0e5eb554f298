"""QC reasons: the token format, and the checks on the scan itself against cases built from the
synthetic cohort (HU offset, expiration, thick slices, prone, table in the body), DICOM series
(gaps, tilt) and the offline real scan. A whole normal scan must give no reason."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from drasclr_lib.preprocess import checks, io
from drasclr_lib.preprocess.checks import (FAILING_REASONS, count_reasons, input_reasons, join_reasons, parse_reason,
                                           qc_pass_from, reason, reason_value, split_reasons)
from drasclr_lib.preprocess.io import read_ct
from drasclr_lib.preprocess.pipeline import scan_to_1mm

# ---- the token format -------------------------------------------------------------------------


def test_reason_tokens_round_trip():
    assert reason("partial_fov", 0.8234) == "partial_fov:0.82"
    assert reason("low_registration_dice", 0.714) == "low_registration_dice:0.71"
    assert reason("thick_slices", 5) == "thick_slices:5.0mm"
    assert reason("hu_offset", 85.4) == "hu_offset:+85" and reason("hu_offset", -61.6) == "hu_offset:-62"
    assert reason("gantry_tilt", 15) == "gantry_tilt:15.0deg" and reason("expiratory?") == "expiratory?"
    assert parse_reason("partial_fov:0.82") == ("partial_fov", "0.82") and parse_reason("prone") == ("prone", None)
    assert reason_value("thick_slices:5.0mm") == 5.0 and reason_value("hu_offset:-62") == -62.0
    assert np.isnan(reason_value("expiratory?"))
    with pytest.raises(ValueError):
        reason("a:b")
    cell = join_reasons(["partial_fov:0.82", "thick_slices:5.0mm"])
    assert cell == "partial_fov:0.82;thick_slices:5.0mm" and split_reasons(cell) == ["partial_fov:0.82",
                                                                                     "thick_slices:5.0mm"]
    assert split_reasons(float("nan")) == [] and split_reasons("") == [] and split_reasons(None) == []


def test_failing_and_warning_reasons():
    assert FAILING_REASONS == {"partial_fov", "low_registration_dice"}
    assert qc_pass_from([]) and qc_pass_from(["thick_slices:5.0mm", "expiratory?", "hu_offset:+85"])
    assert not qc_pass_from(["thick_slices:5.0mm", "partial_fov:0.41"])
    assert not qc_pass_from(["low_registration_dice:0.71"])


def test_count_reasons_counts_subjects_per_name():
    counts = count_reasons([["partial_fov:0.8", "thick_slices:5.0mm"], "partial_fov:0.6;prone", [], float("nan")])
    assert counts == {"partial_fov": 2, "prone": 1, "thick_slices": 1}
    assert list(counts)[0] == "partial_fov"  # most frequent first


# ---- scans ------------------------------------------------------------------------------------

#: Subject 1 of the default cohort (seed 0) breathes least deeply of the first twenty (inspiration
#: -0.75): the whole normal scan closest to the expiratory threshold.
SUBJECT = 1


@pytest.fixture(scope="module")
def normal(tmp_path_factory):
    """(native, Scan1mm) of a whole, normal synthetic scan (default cohort, seed 0)."""
    from drasclr_lib.data.synthetic.cohort import SIZES, generate_subject

    out = tmp_path_factory.mktemp("syn")
    rec = generate_subject(out, 0, SUBJECT, SIZES["demo"], (0.8, 0.8, 2.5), {})
    image, lung = out / rec["image"], out / rec["lung_mask"]
    return read_ct(image, sid=rec["sid"]), scan_to_1mm(image, lung_mask=lung, sid=rec["sid"], pad=10)


def shifted(img: sitk.Image, offset: float) -> sitk.Image:
    out = sitk.Cast(img, sitk.sitkFloat32) + float(offset)
    out.CopyInformation(img)
    return out


def with_table(native: sitk.Image, side: str, gap_mm: float) -> sitk.Image:
    """The scan with 48 mm of air added in front and behind, and a 10 mm table plate wider than
    the body ``gap_mm`` behind (``side="posterior"``) or in front of it; gap 0: touching."""
    arr = sitk.GetArrayFromImage(native)  # (k, j, i), j grows posterior
    pad = 60
    rng = np.random.default_rng(0)
    big = np.full((arr.shape[0], arr.shape[1] + 2 * pad, arr.shape[2]), -1000.0, dtype=np.float32)
    big += rng.normal(0, 10, big.shape).astype(np.float32)
    big[:, pad:pad + arr.shape[1]] = arr
    rows = np.nonzero((big > -500).any(axis=(0, 2)))[0]
    dy = native.GetSpacing()[1]
    gap, thick = int(round(gap_mm / dy)), int(round(10 / dy))
    j0 = rows[-1] + 1 + gap if side == "posterior" else rows[0] - gap - thick
    big[:, j0:j0 + thick, 2:-2] = 150.0
    out = sitk.GetImageFromArray(big)
    out.SetSpacing(native.GetSpacing())
    out.SetDirection(native.GetDirection())
    out.SetOrigin(native.TransformIndexToPhysicalPoint((0, -pad, 0)))
    return out


def test_a_whole_normal_scan_has_no_reason(normal):
    native, scan = normal
    assert input_reasons(native, scan.ct_1mm, scan.lung_1mm) == []


def test_hu_offset_flagged_with_its_value(normal):
    native, scan = normal
    truth = 8.47  # the generator's calibration offset of this subject (manifest hu_offset)
    air, n = checks.air_hu(native)
    assert n > 10_000 and air + 1000 == pytest.approx(truth, abs=4)
    reasons = input_reasons(shifted(native, 85), shifted(scan.ct_1mm, 85), scan.lung_1mm)
    assert len(reasons) == 1 and reasons[0].startswith("hu_offset:+")
    assert reason_value(reasons[0]) == pytest.approx(85 + truth, abs=4)  # and not 'expiratory?'
    low = input_reasons(shifted(native, -70), shifted(scan.ct_1mm, -70), scan.lung_1mm)
    assert [parse_reason(r)[0] for r in low] == ["hu_offset"] and reason_value(low[0]) < -55


def test_hu_offset_from_the_trachea_when_no_air_surrounds_the_body(normal):
    """A reconstruction circle tight around the body: everything outside it is the scanner's fill
    value (-3024 HU), so the trachea is the air reference."""
    from scipy import ndimage as ndi

    native, scan = normal
    _, _, body = checks._work(native, None)  # the body on the ~2 mm work grid (native[:, ::2, ::2] here)
    assert native.GetSpacing()[:2] == pytest.approx((0.8, 0.8))
    body = ndi.binary_dilation(body, structure=np.ones((1, 3, 3), bool), iterations=2)
    full = sitk.GetArrayFromImage(shifted(native, 85))
    keep = np.repeat(np.repeat(body, 2, axis=1), 2, axis=2)[:, :full.shape[1], :full.shape[2]]
    full[~keep] = -3024.0
    tight = sitk.GetImageFromArray(full)
    tight.CopyInformation(native)
    assert np.isnan(checks.air_hu(tight)[0])
    air, n = checks.trachea_air_hu(tight, scan.lung_1mm)
    assert n >= 30 and air + 1000 == pytest.approx(85 + 8.47, abs=10)
    reasons = input_reasons(tight, shifted(scan.ct_1mm, 85), scan.lung_1mm)
    assert [parse_reason(r)[0] for r in reasons] == ["hu_offset"] and reason_value(reasons[0]) > 75


def test_expiratory_scan_flagged(normal):
    native, scan = normal
    lung = sitk.Cast(scan.lung_1mm > 0, sitk.sitkFloat32)
    denser = scan.ct_1mm + 110.0 * lung  # less air in the lungs: about -700 HU, an expiratory scan
    denser.CopyInformation(scan.ct_1mm)
    assert input_reasons(native, denser, scan.lung_1mm) == ["expiratory?"]


def test_thick_slices_flagged(normal):
    native, scan = normal
    size = list(native.GetSize())
    size[2] = int(size[2] * native.GetSpacing()[2] / 5.0)
    thick = sitk.Resample(native, size, sitk.Transform(), sitk.sitkLinear, native.GetOrigin(),
                          (*native.GetSpacing()[:2], 5.0), native.GetDirection(), -1000.0)
    assert input_reasons(thick, scan.ct_1mm, scan.lung_1mm) == ["thick_slices:5.0mm"]
    native_tagged = sitk.Image(native)
    native_tagged.SetMetaData(io.META_SLICE_THICKNESS, "3.75")  # a 3.75 mm reconstruction at 2.5 mm steps
    assert input_reasons(native_tagged, scan.ct_1mm, scan.lung_1mm) == ["thick_slices:3.8mm"]


def test_patient_position_from_the_dicom_tag(normal):
    native, scan = normal
    for position, expected in (("HFS", []), ("FFS", []), ("HFP", ["prone"]), ("FFP", ["prone"]),
                               ("HFDL", ["decubitus"])):
        tagged = sitk.Image(native)
        tagged.SetMetaData(io.META_PATIENT_POSITION, position)
        assert input_reasons(tagged, scan.ct_1mm, scan.lung_1mm) == expected, position


def test_prone_seen_from_the_table_without_a_tag(normal):
    native, scan = normal
    supine, prone = with_table(native, "posterior", 12), with_table(native, "anterior", 12)
    assert checks.table_side(supine)[0] == "posterior" and checks.table_side(prone)[0] == "anterior"
    assert input_reasons(supine, scan.ct_1mm, scan.lung_1mm) == []
    assert input_reasons(prone, scan.ct_1mm, scan.lung_1mm) == ["prone"]
    tagged = sitk.Image(prone)
    tagged.SetMetaData(io.META_PATIENT_POSITION, "HFS")  # the tag, when present, decides
    assert input_reasons(tagged, scan.ct_1mm, scan.lung_1mm) == []


def test_table_merged_into_the_body_flagged(normal):
    native, scan = normal
    fused = with_table(native, "posterior", 0)
    assert checks.table_in_body(fused) >= 0.5 and checks.table_in_body(with_table(native, "posterior", 12)) == 0
    assert input_reasons(fused, scan.ct_1mm, scan.lung_1mm) == ["table_in_body"]


def test_dicom_gap_and_tilt_reported(tmp_path, normal):
    from tests.preprocess.test_io import ramp_slices, write_dicom_slices

    native, scan = normal
    z = np.arange(10) * 2.5
    names = write_dicom_slices(tmp_path / "gap", ramp_slices(z), [(0, 0, zz) for zz in z])
    names[4].unlink()
    gap = read_ct(tmp_path / "gap")
    assert input_reasons(gap, scan.ct_1mm, scan.lung_1mm)[:1] == ["slice_gap:5.0mm"]
    shift = z * np.tan(np.radians(12.0))
    write_dicom_slices(tmp_path / "tilt", ramp_slices(z, (40, 40)), [(0, s, zz) for s, zz in zip(shift, z)])
    tilt = read_ct(tmp_path / "tilt")
    assert input_reasons(tilt, scan.ct_1mm, scan.lung_1mm)[:1] == ["gantry_tilt:12.0deg"]


def test_density_counts_only_scanned_lung(normal):
    """An expiratory scan whose lower lungs were not scanned: the padding (-1024 HU) must not be
    counted as lung, or it hides the dense lung that was scanned."""
    native, scan = normal
    lung = sitk.GetArrayViewFromImage(scan.lung_1mm) > 0
    per_slice = lung.sum(axis=(1, 2))
    cut = int(np.searchsorted(np.cumsum(per_slice), 0.6 * per_slice.sum()))  # 60 % of the lung unscanned
    ct = sitk.GetArrayFromImage(scan.ct_1mm) + 110.0 * lung  # expiratory
    ct[:cut] = -1024.0
    inside = np.ones(ct.shape, dtype=np.uint8)
    inside[:cut] = 0
    images = []
    for arr in (ct.astype(np.float32), inside):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(scan.ct_1mm)
        images.append(img)
    assert input_reasons(native, images[0], scan.lung_1mm, images[1]) == ["expiratory?"]
    assert input_reasons(native, images[0], scan.lung_1mm) == []  # what counting the padding would hide


def test_offline_real_scan_has_only_its_true_warning():
    """The Lung-PET-CT-Dx scan (notebooks 00-06) is 5 mm thick: that warning, nothing else."""
    from drasclr_lib.data import real

    cache = real.default_cache_dir()
    if not real._is_complete(cache):
        try:
            real.fetch_lung_pet_ct_dx(cache)
        except real.FetchError as err:
            pytest.skip(f"the offline real scan is not available: {err}")
    folder = cache / real.SERIES_DIR
    native = read_ct(folder, sid=real.SID)
    scan = scan_to_1mm(folder, sid=real.SID, pad=10)
    assert checks.table_side(native)[0] == "posterior"  # HFS, and the image agrees
    assert input_reasons(native, scan.ct_1mm, scan.lung_1mm) == ["thick_slices:5.0mm"]
