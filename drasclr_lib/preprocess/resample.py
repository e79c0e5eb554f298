"""Resampling to an isotropic grid with padding (SPEC preprocessing step 1), and the mask of what
the scanner actually covered on that grid (:func:`fov_mask`).

Padding is -1024 HU, the same value as air: once resampled, a voxel the scanner never saw cannot
be told from lung air by its value. :func:`fov_mask` therefore carries "inside the original
scanned volume" through the same resampling as a mask of its own, which the pipeline uses for
the per-patch field of view (``patch_fov_fraction``), the subject's lung coverage and every
density figure.
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

__all__ = ["resample_isotropic", "isotropic_grid", "fov_mask", "available_cores", "PAD_VOXELS", "OUTSIDE_SCAN_HU"]

#: Voxels of -1024 HU padding on every side of a subject's 1 mm volume (60 in the paper): the one
#: default of the resampling, the per-scan pipeline, the cohort runner, inference and the CLI.
PAD_VOXELS = 60

#: Native CT voxels below this (HU) lie outside the scanner's reconstruction circle: scanners store
#: them as -2000, -2048 or -3024 (DICOM pixel padding); air reads about -1000 HU and its noise never
#: reaches -1500.
OUTSIDE_SCAN_HU = -1500.0

_INTERPOLATORS = {
    "bspline": sitk.sitkBSpline,  # cubic B-spline: CT
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,  # label maps
}


def available_cores() -> int:
    """Number of CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def isotropic_grid(img: sitk.Image, spacing: float = 1.0, pad: int = PAD_VOXELS) -> dict:
    """The output grid of :func:`resample_isotropic`.

    The grid keeps the input's direction; its voxel centres cover the input's voxel-centre extent
    (from index 0 to size-1 on every axis) plus ``pad`` voxels on every side.

    Args:
        img: 3D input image.
        spacing: output spacing in mm (isotropic), > 0.
        pad: number of voxels added on every side, >= 0.

    Returns:
        dict with ``size`` (3 ints), ``spacing`` (3 floats), ``origin`` (3 floats, mm),
        ``direction`` (9 floats).

    Raises:
        ValueError: for spacing <= 0 or pad < 0 or a non-3D image.
    """
    if img.GetDimension() != 3:
        raise ValueError(f"need a 3D image, got {img.GetDimension()}D")
    if not spacing > 0:
        raise ValueError(f"spacing must be > 0 mm, got {spacing}")
    if pad < 0 or int(pad) != pad:
        raise ValueError(f"pad must be a non-negative integer, got {pad}")
    in_size = np.array(img.GetSize(), dtype=np.float64)
    in_spacing = np.array(img.GetSpacing(), dtype=np.float64)
    extent = (in_size - 1) * in_spacing  # mm between first and last voxel centre
    size = np.floor(extent / spacing + 1e-6).astype(int) + 1 + 2 * int(pad)
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.array(img.GetOrigin(), dtype=np.float64) - direction @ np.full(3, pad * spacing)
    return {"size": [int(s) for s in size], "spacing": [float(spacing)] * 3,
            "origin": origin.tolist(), "direction": direction.ravel().tolist()}


def resample_isotropic(img: sitk.Image, spacing: float = 1.0, *, interpolator: str = "bspline",
                       pad: int = PAD_VOXELS, pad_value: float | None = None) -> sitk.Image:
    """Resample a 3D image to isotropic voxels and pad it on every side.

    Uses ``sitk.ResampleImageFilter`` with all available cores. The output grid is
    :func:`isotropic_grid` (same direction as the input, covering the input extent plus ``pad``
    voxels on every side); voxels outside the input get ``pad_value``.

    Args:
        img: 3D image (CT in HU, or a label map).
        spacing: output spacing in mm (1.0 in the paper).
        interpolator: ``"bspline"`` (cubic, for CT), ``"linear"`` or ``"nearest"`` (label maps).
        pad: voxels of padding on every side (60 in the paper).
        pad_value: value outside the input; default -1024 (air, HU) for ``"bspline"`` and
            ``"linear"``, 0 for ``"nearest"``.

    Returns:
        The resampled image: ``sitkFloat32`` for ``"bspline"``/``"linear"``, the input pixel type
        for ``"nearest"``.

    Raises:
        ValueError: for an unknown interpolator, spacing <= 0, pad < 0 or a non-3D image.
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}")
    grid = isotropic_grid(img, spacing, pad)
    if pad_value is None:
        pad_value = 0.0 if interpolator == "nearest" else -1024.0
    if interpolator == "nearest":
        src, out_type = img, img.GetPixelID()
    else:
        src = img if img.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(img, sitk.sitkFloat32)
        out_type = sitk.sitkFloat32
    f = sitk.ResampleImageFilter()
    f.SetNumberOfThreads(available_cores())
    f.SetSize(grid["size"])
    f.SetOutputSpacing(grid["spacing"])
    f.SetOutputOrigin(grid["origin"])
    f.SetOutputDirection(grid["direction"])
    f.SetInterpolator(_INTERPOLATORS[interpolator])
    f.SetDefaultPixelValue(float(pad_value))
    f.SetOutputPixelType(out_type)
    f.SetTransform(sitk.Transform())
    return f.Execute(src)


def fov_mask(native: sitk.Image, reference: sitk.Image, *, outside_hu: float | None = OUTSIDE_SCAN_HU) -> sitk.Image:
    """Where a resampled grid lies inside the originally scanned volume.

    A voxel of ``reference`` is inside when nearest-neighbour resampling of ``native`` reaches it
    (the same extent, half a native voxel beyond the outer voxel centres, that the CT's own
    resampling treats as inside) and the native voxel it lands on is not padding outside the
    reconstruction circle (value below ``outside_hu``).

    Args:
        native: the CT as read (HU, any geometry overlapping ``reference``).
        reference: the target grid (the padded 1 mm CT).
        outside_hu: native values below this are outside the scan (:data:`OUTSIDE_SCAN_HU`);
            ``None``: only the volume's extent counts.

    Returns:
        ``sitkUInt8`` image on ``reference``'s grid: 1 inside the scanned volume, 0 in the padding.
    """
    if outside_hu is None:
        inside = sitk.Image(native.GetSize(), sitk.sitkUInt8) + 1
        inside.CopyInformation(native)
    else:
        inside = sitk.BinaryThreshold(native, lowerThreshold=float(outside_hu), upperThreshold=3.0e38,
                                      insideValue=1, outsideValue=0)
    f = sitk.ResampleImageFilter()
    f.SetNumberOfThreads(available_cores())
    f.SetReferenceImage(reference)
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    f.SetOutputPixelType(sitk.sitkUInt8)
    f.SetTransform(sitk.Transform())
    return f.Execute(inside)
