"""Reading CT scans and label maps into SimpleITK images, with the bad-input checks.

Every image is returned in one common orientation, **LPS** (``sitk.DICOMOrient(img, "LPS")``):
voxel index i grows towards the patient's Left, j towards Posterior, k towards Superior, and the
direction matrix becomes the identity for an axis-aligned scan (an oblique scan keeps its small
rotation: the closest axis permutation/flip is chosen). Reorienting only permutes and flips the
voxel axes; every voxel keeps its physical position, so spacing, origin and world coordinates
stay right. The NumPy array of ``sitk.GetArrayFromImage`` is then (k, j, i) = (S, P, L): axial
slices are ``array[k]``. The atlas goes through the same :func:`reorient`.

Checks done by :func:`read_ct` (each raises :class:`PreprocessError` with ``stage="read"``, the
subject id and the file): missing file or folder; unreadable, truncated or corrupt file; an empty
folder or a folder holding no DICOM series; a DICOM folder holding more than one series (their
SeriesInstanceUIDs are listed); a 2D image or a 3D image with a single slice; zero or negative
voxel spacing (read from the raw NIfTI header with nibabel, before SimpleITK silently replaces
it); NaN or infinite values; intensities that are not Hounsfield units (see :func:`check_hu`).

DICOM series are placed on their true slice positions (:func:`_read_dicom_folder`): the files are
sorted along the slice normal; two files at one position, slices without a position or with
different orientations are refused; uneven steps and missing slices are **resampled on the true
positions** (linear along the normal) when the largest gap is at most
:data:`MAX_SLICE_GAP_FACTOR` median steps, else **refused with the gap named** (positions and
the two files); a gantry tilt (slice positions shifted in-plane, not along the normal; the tag
(0018,1120) is recorded but the positions decide) is **corrected** by shifting each slice and
cropping to the area all slices cover, up to :data:`MAX_GANTRY_TILT_DEG`. What was found is
attached as image metadata (``META_*`` keys, :func:`scan_metadata`) for the QC checks.

Intensity scaling: SimpleITK applies the DICOM Rescale Slope/Intercept (0028,1053 / 0028,1052)
and the NIfTI ``scl_slope`` / ``scl_inter`` when it reads, so values are HU as stored.

Length (~550 lines): one idea, a file on disk made a trustworthy HU volume; the NIfTI header
checks and the DICOM slice placement are each the reader's defence against what SimpleITK accepts
silently, and split off they would be read apart from the reader they guard.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from drasclr_lib.preprocess.errors import PreprocessError

__all__ = ["read_ct", "read_label", "reorient", "check_hu", "check_finite", "scan_metadata", "ORIENTATION",
           "MIN_AIR_FRACTION", "AIR_HU", "MAX_SLICE_GAP_FACTOR", "SLICE_STEP_TOLERANCE", "SHEAR_TOLERANCE",
           "MAX_GANTRY_TILT_DEG"]

#: The common orientation of every image handled by the pipeline.
ORIENTATION = "LPS"
#: A CT must have at least this fraction of its voxels below :data:`AIR_HU` (air around the body,
#: in the lungs or airways). MR and unscaled CT (all values >= 0) fail this test.
MIN_AIR_FRACTION = 1e-3
#: The HU value under which a voxel counts as air for :func:`check_hu`.
AIR_HU = -500.0

#: A DICOM series whose largest gap between neighbouring slices is more than this many times its
#: median slice step is refused, naming the gap's positions and files. Up to it (one or two missing
#: slices) the volume is resampled on the true slice positions by linear interpolation along the
#: normal: across a gap of 3 steps (7.5 mm at 2.5 mm) the interpolated slices are as blurred as a
#: thick-slice scan, which the checks flag anyway; across more, anatomy (vessels, bullae) would be
#: invented over centimetres.
MAX_SLICE_GAP_FACTOR = 3.0
#: Slice steps differing from the median step by more than this fraction make a series "uneven"
#: (resampled on the true positions); smaller differences are the rounding of the position tags.
SLICE_STEP_TOLERANCE = 0.05
#: In-plane offsets of the slice positions larger than this fraction of a pixel mean the stack is
#: sheared (gantry tilt) and is corrected; smaller ones are rounding.
SHEAR_TOLERANCE = 0.1
#: Gantry tilts up to this (degrees; scanners tilt at most about 30) are corrected, more are refused.
MAX_GANTRY_TILT_DEG = 30.0

#: Metadata keys :func:`read_ct` attaches to the image (``img.GetMetaData(key)``, strings) for the
#: checks of :mod:`drasclr_lib.preprocess.checks`; read them with :func:`scan_metadata`.
META_SLICE_THICKNESS = "drasclr.slice_thickness_mm"  # DICOM SliceThickness (0018,0050)
META_SLICE_SPACING = "drasclr.slice_spacing_mm"  # median step between slice positions
META_SLICE_GAP = "drasclr.max_slice_gap_mm"  # set only when the series was resampled (uneven / missing slices)
META_GANTRY_TILT = "drasclr.gantry_tilt_deg"  # set only when in-plane shifts were corrected
META_TILT_TAG = "drasclr.gantry_tilt_tag_deg"  # DICOM GantryDetectorTilt (0018,1120), as written
META_PATIENT_POSITION = "drasclr.patient_position"  # DICOM PatientPosition (0018,5100): HFS, HFP, FFS, ...

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")


def reorient(img: sitk.Image) -> sitk.Image:
    """Reorient an image to the common :data:`ORIENTATION` (LPS), physical geometry kept.

    Args:
        img: a 3D SimpleITK image (any pixel type).

    Returns:
        The same voxels with permuted/flipped axes; ``GetDirection()`` is the identity for an
        axis-aligned input; every voxel keeps its physical position.
    """
    if img.GetDimension() != 3:
        raise ValueError(f"reorient needs a 3D image, got {img.GetDimension()}D")
    return sitk.DICOMOrient(img, ORIENTATION)


def check_hu(values: np.ndarray, *, sid: str | None = None, path=None) -> None:
    """Raise unless ``values`` look like a CT in Hounsfield units.

    Rule: at least :data:`MIN_AIR_FRACTION` (0.1 %) of the voxels must be below :data:`AIR_HU`
    (-500 HU). Every chest CT holds air (around the body, in the lungs and airways, or the
    -1024/-2048/-3024 padding outside the reconstruction circle), while MR images and CT stored
    without its rescale intercept (raw 0..4095 values) have no negative values at all.
    Also rejects NaN and infinite values.

    Args:
        values: the image voxels, any shape.
        sid, path: named in the error.

    Raises:
        PreprocessError: stage ``"read"``.
    """
    values = np.asarray(values)
    check_finite(values, sid=sid, path=path)
    air_fraction = float(np.count_nonzero(values < AIR_HU)) / max(values.size, 1)
    if air_fraction < MIN_AIR_FRACTION:
        lo, hi = float(values.min()), float(values.max())
        raise PreprocessError(
            f"intensities do not look like CT Hounsfield units: range [{lo:g}, {hi:g}], "
            f"{100 * air_fraction:.3f}% of voxels below {AIR_HU:g} HU (a CT needs >= {100 * MIN_AIR_FRACTION:g}% air). "
            "Is this an MR image, or a CT stored without its rescale slope/intercept?",
            stage="read", sid=sid, path=path)


def check_finite(values: np.ndarray, *, sid: str | None = None, path=None) -> None:
    """Raise :class:`PreprocessError` (stage ``"read"``) when ``values`` hold NaN or infinities."""
    finite = np.isfinite(values)
    if not finite.all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int((~finite).sum()) - n_nan
        raise PreprocessError(
            f"image holds {n_nan} NaN and {n_inf} infinite voxel values; a CT must be finite HU everywhere",
            stage="read", sid=sid, path=path)


def scan_metadata(img: sitk.Image) -> dict:
    """What the reader learnt about a scan beyond its voxels, from :func:`read_ct`'s metadata.

    Returns:
        dict with ``slice_thickness_mm`` (SliceThickness tag, else the largest voxel spacing),
        ``slice_spacing_mm`` (median step between slices, else the largest voxel spacing),
        ``max_slice_gap_mm`` (NaN unless a DICOM series was resampled on uneven positions),
        ``gantry_tilt_deg`` (corrected tilt, 0 when none), ``gantry_tilt_tag_deg`` (NaN without
        the tag) and ``patient_position`` (str, "" when unknown).
    """
    def num(key, default):
        try:
            return float(img.GetMetaData(key)) if img.HasMetaDataKey(key) else default
        except ValueError:
            return default

    largest = float(max(img.GetSpacing()))
    return {"slice_thickness_mm": num(META_SLICE_THICKNESS, largest),
            "slice_spacing_mm": num(META_SLICE_SPACING, largest),
            "max_slice_gap_mm": num(META_SLICE_GAP, float("nan")),
            "gantry_tilt_deg": num(META_GANTRY_TILT, 0.0),
            "gantry_tilt_tag_deg": num(META_TILT_TAG, float("nan")),
            "patient_position": img.GetMetaData(META_PATIENT_POSITION).strip().upper()
            if img.HasMetaDataKey(META_PATIENT_POSITION) else ""}


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def _nifti_truncated(path: Path, expected: int) -> bool:
    """True when the (decompressed) file is shorter than header + voxel data.

    Needed because SimpleITK reads a truncated ``.nii.gz`` without an error (missing voxels come
    back as garbage). For gzip the trailer's ISIZE is compared first (cheap); only on a mismatch
    is the stream decompressed to be sure.
    """
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size < expected
    import zlib

    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() < 18:
            return True
        fh.seek(-4, 2)
        if int.from_bytes(fh.read(4), "little") == expected % (1 << 32):
            return False
        fh.seek(0)
        dec = zlib.decompressobj(wbits=31)
        total = 0
        try:
            while chunk := fh.read(1 << 22):
                total += len(dec.decompress(chunk))
                while dec.eof and dec.unused_data:  # concatenated gzip members
                    rest = dec.unused_data
                    dec = zlib.decompressobj(wbits=31)
                    total += len(dec.decompress(rest))
        except zlib.error:
            return True
        return total < expected or not dec.eof


def _check_nifti_header(path: Path, sid) -> None:
    """Checks SimpleITK cannot be trusted with: header, spacing, truncation, NaN/inf.

    SimpleITK (niftilib) replaces a non-positive pixdim by 1 and NaN/inf voxels by 0 without a
    word, and reads a truncated ``.nii.gz``; so the raw header and, for floating-point files,
    the voxels are checked here with nibabel.
    """
    import nibabel as nib

    try:
        nimg = nib.load(str(path))
        hdr = nimg.header
    except Exception as exc:  # nibabel raises many types for broken files
        raise PreprocessError(f"cannot read the NIfTI header ({type(exc).__name__}: {exc}); the file is corrupt or not NIfTI",
                              stage="read", sid=sid, path=path) from exc
    try:  # nibabel's loaded header has pixdim "fixed" to abs values: read the raw one
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = type(hdr).from_fileobj(fh, check=False)
    except Exception as exc:
        raise PreprocessError(f"cannot read the NIfTI header ({type(exc).__name__}: {exc}); the file is corrupt",
                              stage="read", sid=sid, path=path) from exc
    dim = [int(d) for d in raw["dim"]]
    ndim = dim[0]
    pixdim = [float(p) for p in raw["pixdim"][1:1 + min(max(ndim, 1), 3)]]
    if not np.all(np.isfinite(pixdim)) or any(p <= 0 for p in pixdim):
        raise PreprocessError(f"invalid voxel spacing in the NIfTI header: pixdim {pixdim} (must be > 0 mm)",
                              stage="read", sid=sid, path=path)
    n_vox = int(np.prod([max(d, 1) for d in dim[1:1 + max(ndim, 1)]]))
    expected = int(hdr["vox_offset"]) + n_vox * int(hdr["bitpix"]) // 8
    if _nifti_truncated(path, expected):
        raise PreprocessError(f"the NIfTI file is truncated or corrupt: it holds fewer than the {expected} bytes "
                              "its header announces", stage="read", sid=sid, path=path)
    if hdr.get_data_dtype().kind in "fc":
        try:
            data = np.asanyarray(nimg.dataobj)
        except Exception as exc:
            raise PreprocessError(f"cannot read the NIfTI voxels ({type(exc).__name__}: {exc}); the file is corrupt",
                                  stage="read", sid=sid, path=path) from exc
        check_finite(data, sid=sid, path=path)


def _dicom_header(name: str) -> dict:
    """Position, orientation, pixel spacing and the tags the checks use, of one DICOM file."""
    r = sitk.ImageFileReader()
    r.SetFileName(name)
    r.ReadImageInformation()

    def tag(key):
        return r.GetMetaData(key).strip() if r.HasMetaDataKey(key) else None

    def floats(key):
        v = tag(key)
        try:
            return [float(x) for x in v.split("\\")] if v else None
        except ValueError:
            return None

    return {"ipp": floats("0020|0032"), "iop": floats("0020|0037"), "thickness": floats("0018|0050"),
            "position": tag("0018|5100"), "tilt_tag": floats("0018|1120")}


def _series_geometry(names: list[str], sid, folder: Path) -> dict:
    """Slice positions of a DICOM series along its normal, gaps, and in-plane shifts (gantry tilt).

    Returns:
        dict: ``order`` (file indices sorted along the normal), ``s`` (positions along the normal,
        mm, sorted), ``uv`` ((N, 2) in-plane offsets of each sorted slice from the first, mm),
        ``row``, ``col``, ``normal`` (unit vectors), ``ipp0`` (first sorted slice's position),
        ``headers`` (per file).

    Raises:
        PreprocessError: slices without a position or with different orientations, or two slices
            at one position.
    """
    headers = [_dicom_header(n) for n in names]
    missing = [Path(n).name for n, h in zip(names, headers) if h["ipp"] is None or h["iop"] is None]
    if missing:
        raise PreprocessError(f"{len(missing)} DICOM file(s) have no ImagePositionPatient/ImageOrientationPatient "
                              f"(e.g. {missing[0]}); cannot place the slices", stage="read", sid=sid, path=folder)
    iops = np.array([h["iop"] for h in headers], dtype=np.float64)
    if np.abs(iops - iops[0]).max() > 1e-3:
        bad = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        raise PreprocessError(f"the slices have different orientations (ImageOrientationPatient of {Path(names[bad]).name} "
                              f"differs from {Path(names[0]).name}); one series must be one stack",
                              stage="read", sid=sid, path=folder)
    row, col = iops[0, :3], iops[0, 3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    ipp = np.array([h["ipp"] for h in headers], dtype=np.float64)
    s_all = ipp @ normal
    order = np.argsort(s_all, kind="stable")
    s = s_all[order]
    steps = np.diff(s)
    if steps.size and steps.min() < 1e-3:
        k = int(np.argmin(steps))
        a, b = Path(names[order[k]]).name, Path(names[order[k + 1]]).name
        raise PreprocessError(f"two slices at one position ({s[k]:.2f} mm along the slice normal): {a} and {b}; "
                              "remove the duplicate", stage="read", sid=sid, path=folder)
    d = ipp[order] - ipp[order[0]]
    uv = np.stack([d @ row, d @ col], axis=1)
    return {"order": order, "s": s, "uv": uv, "row": row, "col": col, "normal": normal, "ipp0": ipp[order[0]],
            "headers": [headers[i] for i in order]}


def _gantry_tilt_deg(geo: dict) -> float:
    """The tilt (degrees) implied by in-plane slice shifts: atan(shift / distance along the normal)."""
    extent = float(geo["s"][-1] - geo["s"][0])
    shift = float(np.linalg.norm(geo["uv"][-1]))
    return float(np.degrees(np.arctan2(shift, extent))) if extent > 0 else 0.0


def _restack(vol: np.ndarray, geo: dict, pixel: tuple[float, float]) -> tuple[sitk.Image, float]:
    """Resample sorted slices (``vol`` (K, J, I)) on their true positions onto a regular box.

    In-plane: each slice is shifted by its offset (gantry tilt: the slices are parallel planes, so a
    translation per slice is exact) and the box is cropped to the area every slice covers, so no
    value is invented. Along the normal: linear interpolation between the two neighbouring true
    slice positions onto a regular spacing (the median step).

    Returns:
        (image, spacing along the normal in mm).
    """
    from scipy import ndimage as ndi

    dx, dy = pixel
    n_k, n_j, n_i = vol.shape
    u, v = geo["uv"][:, 0], geo["uv"][:, 1]
    u_lo, u_hi = float(u.max()), float(u.min()) + (n_i - 1) * dx
    v_lo, v_hi = float(v.max()), float(v.min()) + (n_j - 1) * dy
    out_i = int(np.floor((u_hi - u_lo) / dx + 1e-6)) + 1
    out_j = int(np.floor((v_hi - v_lo) / dy + 1e-6)) + 1
    shifted = np.empty((n_k, out_j, out_i), dtype=np.float32)
    jj, ii = np.meshgrid(np.arange(out_j, dtype=np.float64), np.arange(out_i, dtype=np.float64), indexing="ij")
    for k in range(n_k):
        if abs(u[k] - u_lo) < 1e-6 and abs(v[k] - v_lo) < 1e-6 and out_i == n_i and out_j == n_j:
            shifted[k] = vol[k]
            continue
        coords = np.stack([jj + (v_lo - v[k]) / dy, ii + (u_lo - u[k]) / dx])
        shifted[k] = ndi.map_coordinates(vol[k], coords, order=1, mode="nearest")
    s = geo["s"]
    step = float(np.median(np.diff(s)))
    n_out = int(np.floor((s[-1] - s[0]) / step + 1e-6)) + 1
    targets = s[0] + step * np.arange(n_out)
    hi = np.clip(np.searchsorted(s, targets, side="left"), 1, n_k - 1)
    lo = hi - 1
    w = ((targets - s[lo]) / (s[hi] - s[lo])).astype(np.float32)[:, None, None]
    out = (1.0 - w) * shifted[lo] + w * shifted[hi]
    img = sitk.GetImageFromArray(out.astype(np.float32))
    img.SetSpacing((dx, dy, step))
    img.SetOrigin(tuple(float(x) for x in geo["ipp0"] + u_lo * geo["row"] + v_lo * geo["col"]))
    img.SetDirection(tuple(float(x) for x in np.stack([geo["row"], geo["col"], geo["normal"]], axis=1).ravel()))
    return img, step


def _read_dicom_folder(folder: Path, sid) -> sitk.Image:
    """One DICOM series, placed on its true slice positions (see :data:`MAX_SLICE_GAP_FACTOR`)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    if not files:
        raise PreprocessError("the DICOM folder is empty", stage="read", sid=sid, path=folder)
    try:
        series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise PreprocessError(f"cannot scan the folder for DICOM series: {exc}", stage="read", sid=sid, path=folder) from exc
    if not series:
        raise PreprocessError(f"no DICOM series found in the folder ({len(files)} files, none readable as DICOM)",
                              stage="read", sid=sid, path=folder)
    if len(series) > 1:
        raise PreprocessError(
            f"the DICOM folder holds {len(series)} series (SeriesInstanceUIDs: {', '.join(series)}); "
            "put each series in its own folder and give the CT series' folder in the manifest",
            stage="read", sid=sid, path=folder)
    names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    meta: dict[str, str] = {}
    geo = None
    if len(names) > 1:
        try:
            geo = _series_geometry(names, sid, folder)
        except RuntimeError as exc:
            raise PreprocessError(f"cannot read the DICOM headers of series {series[0]}: {exc}", stage="read", sid=sid,
                                  path=folder) from exc
        names = [names[i] for i in geo["order"]]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # rescale slope/intercept are applied by GDCM
    warn = sitk.ProcessObject.GetGlobalWarningDisplay()
    if geo is not None and len(names) > 2 and np.ptp(np.diff(geo["s"])) > 1e-3:
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "non uniform sampling" warning: handled below
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise PreprocessError(f"cannot read the DICOM series {series[0]}: {exc}", stage="read", sid=sid, path=folder) from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warn)
    if geo is None:
        return img
    head = geo["headers"][0]
    if head["position"]:
        meta[META_PATIENT_POSITION] = head["position"]
    if head["thickness"]:
        meta[META_SLICE_THICKNESS] = f"{head['thickness'][0]:g}"
    if head["tilt_tag"]:
        meta[META_TILT_TAG] = f"{head['tilt_tag'][0]:g}"
    steps = np.diff(geo["s"])
    step = float(np.median(steps))
    gap = float(steps.max())
    if gap > MAX_SLICE_GAP_FACTOR * step + 1e-3:
        k = int(np.argmax(steps))
        raise PreprocessError(
            f"a gap of {gap:.2f} mm between slices at {geo['s'][k]:.2f} and {geo['s'][k + 1]:.2f} mm along the slice "
            f"normal (files {Path(names[k]).name} and {Path(names[k + 1]).name}); the series' slice step is "
            f"{step:.2f} mm and gaps over {MAX_SLICE_GAP_FACTOR:g} steps are refused (missing slices?)",
            stage="read", sid=sid, path=folder)
    uneven = float(np.abs(steps - step).max()) > SLICE_STEP_TOLERANCE * step
    pixel = img.GetSpacing()[:2]
    sheared = float(np.abs(geo["uv"]).max()) > SHEAR_TOLERANCE * min(pixel)
    if sheared:
        tilt = _gantry_tilt_deg(geo)
        if tilt > MAX_GANTRY_TILT_DEG:
            raise PreprocessError(f"gantry tilt of {tilt:.1f} degrees (slice positions not along the slice normal) is "
                                  f"more than the {MAX_GANTRY_TILT_DEG:g} degrees corrected", stage="read", sid=sid,
                                  path=folder)
        meta[META_GANTRY_TILT] = f"{tilt:.2f}"
    if uneven:
        meta[META_SLICE_GAP] = f"{gap:.3f}"
    meta[META_SLICE_SPACING] = f"{step:.4f}"
    if uneven or sheared:
        img, _ = _restack(sitk.GetArrayFromImage(img), geo, pixel)
    for key, value in meta.items():
        img.SetMetaData(key, value)
    return img


def _read_file(path: Path, sid, pixel_type) -> sitk.Image:
    if _is_nifti(path):
        _check_nifti_header(path, sid)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()
        detail = next((m for m in msg if "ERROR" in m or "error" in m), msg[-1] if msg else "")
        raise PreprocessError(f"cannot read the image (truncated or corrupt file?): {detail.strip()}",
                              stage="read", sid=sid, path=path) from exc
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:  # 3D stored as 4D with one time point
        img = img[:, :, :, 0]
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise PreprocessError(f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel",
                              stage="read", sid=sid, path=path)
    return sitk.Cast(img, pixel_type)


def _check_geometry(img: sitk.Image, sid, path) -> None:
    if img.GetDimension() != 3:
        raise PreprocessError(f"expected a 3D volume, got a {img.GetDimension()}D image of size {img.GetSize()}",
                              stage="read", sid=sid, path=path)
    size = img.GetSize()
    if min(size) < 2:
        raise PreprocessError(f"expected a 3D volume, got size {size} (a single slice); give the whole series",
                              stage="read", sid=sid, path=path)
    spacing = img.GetSpacing()
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise PreprocessError(f"invalid voxel spacing {spacing} (must be > 0 mm)", stage="read", sid=sid, path=path)


def _read_any(path, sid, pixel_type) -> tuple[sitk.Image, Path]:
    if path is None or str(path).strip() in ("", "nan", "None"):
        raise PreprocessError("no image path given", stage="read", sid=sid, path=None)
    path = Path(path).expanduser()
    if not path.exists():
        raise PreprocessError("file or folder not found", stage="read", sid=sid, path=path)
    if path.is_dir():
        img = _read_dicom_folder(path, sid)
        if pixel_type != sitk.sitkFloat32:
            img = sitk.Cast(img, pixel_type)
    else:
        img = _read_file(path, sid, pixel_type)
    _check_geometry(img, sid, path)
    return img, path


def read_ct(path: str | os.PathLike, *, sid: str | None = None) -> sitk.Image:
    """Read a CT scan in Hounsfield units, reoriented to LPS.

    Args:
        path: a NIfTI file (``.nii``/``.nii.gz``), an NRRD/MHA/MHD file, or a folder holding one
            DICOM series.
        sid: subject id, named in errors.

    Returns:
        A 3D ``sitkFloat32`` image in HU, orientation LPS (see the module docstring), with its
        physical spacing (mm), origin and direction; it carries the reader's findings as
        metadata (:func:`scan_metadata`).

    Raises:
        PreprocessError: stage ``"read"`` for a missing, unreadable, truncated or corrupt file;
            an empty folder or one with several DICOM series; a DICOM gap over
            :data:`MAX_SLICE_GAP_FACTOR` steps, duplicate slice positions, a tilt over
            :data:`MAX_GANTRY_TILT_DEG`; a 2D or single-slice image; zero or negative spacing;
            NaN/inf values; non-CT intensities (:func:`check_hu`).
    """
    img, p = _read_any(path, sid, sitk.sitkFloat32)
    check_hu(sitk.GetArrayViewFromImage(img), sid=sid, path=p)
    out = reorient(img)
    for key in img.GetMetaDataKeys():
        if key.startswith("drasclr."):
            out.SetMetaData(key, img.GetMetaData(key))
    return out


def read_label(path: str | os.PathLike, reference: sitk.Image, *, sid: str | None = None,
               tolerance_mm: float = 0.1) -> sitk.Image:
    """Read a label map (lung mask, emphysema labels, lobes) onto the grid of ``reference``.

    The map is reoriented to LPS like :func:`read_ct`. When its grid matches ``reference``
    (same size; spacing, origin and direction within ``tolerance_mm``) the voxels are kept as they
    are and the reference's geometry is copied; otherwise it is resampled onto ``reference`` with
    nearest-neighbour interpolation (value 0 outside).

    Args:
        path: label map file (any format :func:`read_ct` reads, values 0..255).
        reference: the image the labels belong to (usually the output of :func:`read_ct`).
        sid: subject id, named in errors.
        tolerance_mm: largest accepted difference in spacing/origin (mm) and direction cosines.

    Returns:
        ``sitkUInt8`` image on the grid of ``reference``.

    Raises:
        PreprocessError: stage ``"read"`` for an unreadable file, labels outside 0..255 or not
            integer, or a map that does not overlap the reference (all labels lost).
    """
    img, p = _read_any(path, sid, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(img)
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255 or np.any(arr != np.round(arr)):
        raise PreprocessError("a label map must hold integer values in 0..255", stage="read", sid=sid, path=p)
    lab = reorient(sitk.Cast(img, sitk.sitkUInt8))
    same = (lab.GetSize() == reference.GetSize()
            and np.allclose(lab.GetSpacing(), reference.GetSpacing(), atol=tolerance_mm)
            and np.allclose(lab.GetOrigin(), reference.GetOrigin(), atol=tolerance_mm)
            and np.allclose(lab.GetDirection(), reference.GetDirection(), atol=1e-3))
    if same:
        lab.CopyInformation(reference)
        return lab
    had = int(np.count_nonzero(sitk.GetArrayViewFromImage(lab)))
    out = sitk.Resample(lab, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if had and not np.any(sitk.GetArrayViewFromImage(out)):
        raise PreprocessError("the label map does not overlap the CT (different physical space?)",
                              stage="read", sid=sid, path=p)
    return out
