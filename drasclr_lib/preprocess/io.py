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

Intensity scaling: SimpleITK applies the DICOM Rescale Slope/Intercept (0028,1053 / 0028,1052)
and the NIfTI ``scl_slope`` / ``scl_inter`` when it reads, so values are HU as stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from drasclr_lib.preprocess.errors import PreprocessError

__all__ = ["read_ct", "read_label", "reorient", "check_hu", "check_finite", "ORIENTATION", "MIN_AIR_FRACTION", "AIR_HU"]

#: The common orientation of every image handled by the pipeline.
ORIENTATION = "LPS"
#: A CT must have at least this fraction of its voxels below :data:`AIR_HU` (air around the body,
#: in the lungs or airways). MR and unscaled CT (all values >= 0) fail this test.
MIN_AIR_FRACTION = 1e-3
#: The HU value under which a voxel counts as air for :func:`check_hu`.
AIR_HU = -500.0

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


def _read_dicom_folder(folder: Path, sid) -> sitk.Image:
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
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.SetOutputPixelType(sitk.sitkFloat32)  # rescale slope/intercept are applied by GDCM
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise PreprocessError(f"cannot read the DICOM series {series[0]}: {exc}", stage="read", sid=sid, path=folder) from exc


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
        physical spacing (mm), origin and direction.

    Raises:
        PreprocessError: stage ``"read"`` for a missing, unreadable, truncated or corrupt file;
            an empty folder or one with several DICOM series; a 2D or single-slice image; zero or
            negative spacing; NaN/inf values; non-CT intensities (:func:`check_hu`).
    """
    img, p = _read_any(path, sid, sitk.sitkFloat32)
    check_hu(sitk.GetArrayViewFromImage(img), sid=sid, path=p)
    return reorient(img)


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
