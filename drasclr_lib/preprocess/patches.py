"""Cut the atlas patches out of a subject (SPEC step 5).

Every atlas location is carried into the subject through the registration transform (atlas
physical point -> subject physical point) and an axis-aligned cube of ``patch_size`` voxels is
cut from the subject's padded 1 mm volume there; HU are clipped to [-1024, 240] and stored as
int16. Patches are NumPy arrays in SimpleITK's array order (k, j, i), as the published code
stored them (``sitk.GetArrayFromImage`` of each region).

Where the patch goes. The published code mapped the patch *corner*. This is the same thing when
atlas and subject axes point the same way and the affine does not scale, but not when the atlas
file is stored with flipped axes (the published atlas is LAS, subjects are reoriented to LPS):
the corner is then the far end of the box on the flipped axis. We therefore map the patch
*centre* (corner + (P - 1) / 2) and put the subject corner at ``round(centre - (P - 1) / 2)``,
which equals the published corner mapping in the aligned case and cuts the same anatomy in
every case.

Field of view. Given the scan's field-of-view mask on the same grid (``inside_1mm``,
:func:`~drasclr_lib.preprocess.resample.fov_mask`), it is cut with the very same boxes as the CT:
``fov_fraction`` is the share of each patch's voxels the scanner saw (padding, -1024 HU like air,
is not). Without it, ``fov_fraction`` falls back to the share inside the padded grid.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from drasclr_lib.data.patch_store.boxes import cut_patches
from drasclr_lib.intensity import HU_MAX, HU_MIN

__all__ = ["map_corners", "extract_patches", "resample_to_grid"]


def resample_to_grid(label: sitk.Image, reference: sitk.Image, *, default: int = 0) -> sitk.Image:
    """Put a label map on the grid of ``reference`` (nearest neighbour, uint8).

    Args:
        label: integer label image (any geometry overlapping ``reference``).
        reference: the target grid (e.g. the padded 1 mm CT).
        default: value outside ``label``.

    Returns:
        uint8 image with the geometry of ``reference``.
    """
    return sitk.Resample(sitk.Cast(label, sitk.sitkUInt8), reference, sitk.Transform(), sitk.sitkNearestNeighbor,
                         int(default), sitk.sitkUInt8)


def map_corners(atlas, transform, subject: sitk.Image, *, patch_size: int | None = None) -> np.ndarray:
    """Subject voxel corners of every atlas patch.

    atlas corner index -> atlas physical centre -> ``transform`` -> subject physical point ->
    subject continuous index -> corner ``round(index - (P - 1) / 2)``.

    Args:
        atlas: :class:`~drasclr_lib.preprocess.atlas.Atlas`.
        transform: maps atlas physical points to subject physical points (anything with
            ``TransformPoint``; ``None`` = identity).
        subject: the subject's 1 mm grid.
        patch_size: defaults to ``atlas.patch_size``.

    Returns:
        corners_subject (L, 3) int64, (i, j, k) indices in the subject grid (may lie partly
        outside it).
    """
    p = atlas.patch_size if patch_size is None else int(patch_size)
    centers = atlas.index_to_physical(atlas.corners + (p - 1) / 2.0)
    if transform is not None:
        centers = np.array([transform.TransformPoint(tuple(float(v) for v in c)) for c in centers], dtype=np.float64)
    origin = np.asarray(subject.GetOrigin(), dtype=np.float64)
    spacing = np.asarray(subject.GetSpacing(), dtype=np.float64)
    direction = np.asarray(subject.GetDirection(), dtype=np.float64).reshape(3, 3)
    cidx = np.linalg.solve(direction, (centers - origin).T).T / spacing  # continuous (i, j, k)
    return np.floor(cidx - (p - 1) / 2.0 + 0.5).astype(np.int64)


def _check_grid(img: sitk.Image | None, ref: sitk.Image, name: str) -> np.ndarray | None:
    if img is None:
        return None
    if img.GetSize() != ref.GetSize() or not np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3) or \
            not np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-4):
        raise ValueError(f"{name} is not on the CT's 1 mm grid (size {img.GetSize()} vs {ref.GetSize()}, origin "
                         f"{img.GetOrigin()} vs {ref.GetOrigin()}); use resample_to_grid(label, ct_1mm) first")
    return sitk.GetArrayViewFromImage(img)


def extract_patches(ct_1mm: sitk.Image, atlas, transform, *, patch_size: int | None = None,
                    label_1mm: sitk.Image | None = None, lobe_1mm: sitk.Image | None = None,
                    lung_1mm: sitk.Image | None = None, inside_1mm: sitk.Image | None = None) -> dict:
    """Cut every atlas patch from one subject, with per-patch summaries.

    Args:
        ct_1mm: the subject's padded 1 mm CT in HU (float or int).
        atlas: :class:`~drasclr_lib.preprocess.atlas.Atlas`.
        transform: atlas physical -> subject physical (``None`` = identity).
        patch_size: P (default ``atlas.patch_size``).
        label_1mm: optional emphysema label map on the same grid (0 none, 1..3 subtypes).
        lobe_1mm: optional lobe map on the same grid (0 outside, 1..5 lobes).
        lung_1mm: optional lung mask on the same grid (nonzero = lung).
        inside_1mm: optional field-of-view mask on the same grid (nonzero = inside the scanned
            volume); lung voxels outside it are not counted.

    Returns:
        dict with
        ``patches_hu`` (L, P, P, P) int16 in (k, j, i) order, clipped to [-1024, 240]
        (voxels outside the scan are -1024);
        ``corners_subject`` (L, 3) int64 (i, j, k) in the 1 mm grid;
        ``label_patches`` (L, P, P, P) uint8 or ``None`` (outside = 0);
        ``lung_fraction`` (L,) fraction of lung voxels per patch (NaN without a lung mask);
        ``emph_fraction`` (L,) fraction of a patch's lung voxels with label > 0 (NaN without a
        label map or without lung in the patch);
        ``lobe`` (L,) int64 majority lobe among the patch's lobe voxels (0 when unknown);
        ``laa950`` (L,) percent of the patch's lung voxels below -950 HU (NaN without lung);
        ``inside_fraction`` (L,) float32 fraction of each patch inside the padded grid;
        ``fov_fraction`` (L,) float32 fraction of each patch inside the scanned volume
        (``inside_1mm``; without it, ``inside_fraction``).

    Raises:
        ValueError: when a label, lobe or lung map is not on the CT's grid.
    """
    P = atlas.patch_size if patch_size is None else int(patch_size)
    labels = _check_grid(label_1mm, ct_1mm, "label map")
    lobes = _check_grid(lobe_1mm, ct_1mm, "lobe map")
    lung = _check_grid(lung_1mm, ct_1mm, "lung mask")
    fov = _check_grid(inside_1mm, ct_1mm, "field-of-view mask")
    corners = map_corners(atlas, transform, ct_1mm, patch_size=P)

    hu = sitk.GetArrayViewFromImage(ct_1mm)
    raw, inside = cut_patches(hu, corners, P, HU_MIN)
    patches_hu = np.rint(np.clip(raw, HU_MIN, HU_MAX)).astype(np.int16)
    L = len(corners)
    flat = patches_hu.reshape(L, -1)

    out = {"patches_hu": patches_hu, "corners_subject": corners, "label_patches": None,
           "inside_fraction": inside, "fov_fraction": inside}
    fov_p = None
    if fov is not None:
        fov_p = cut_patches(fov, corners, P, 0)[0].reshape(L, -1) > 0
        out["fov_fraction"] = fov_p.mean(1, dtype=np.float64).astype(np.float32)
    nan = np.full(L, np.nan, dtype=np.float64)
    if lung is not None:
        lung_p = cut_patches(lung, corners, P, 0)[0].reshape(L, -1) > 0
        if fov_p is not None:
            lung_p &= fov_p  # only scanned lung counts
        n_lung = lung_p.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["lung_fraction"] = n_lung / float(P**3)
            out["laa950"] = np.where(n_lung > 0, 100.0 * (lung_p & (flat < -950)).sum(1) / n_lung, np.nan)
    else:
        lung_p, n_lung = None, None
        out["lung_fraction"], out["laa950"] = nan.copy(), nan.copy()
    if labels is not None:
        lab_p = cut_patches(labels, corners, P, 0)[0].astype(np.uint8)
        out["label_patches"] = lab_p
        if lung_p is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                out["emph_fraction"] = np.where(n_lung > 0, (lung_p & (lab_p.reshape(L, -1) > 0)).sum(1) / n_lung, np.nan)
        else:
            out["emph_fraction"] = nan.copy()
    else:
        out["emph_fraction"] = nan.copy()
    if lobes is not None:
        lobe_p = cut_patches(lobes, corners, P, 0)[0].reshape(L, -1).astype(np.int64)
        nlab = int(max(lobe_p.max(initial=0), 0)) + 1
        rows = np.arange(L, dtype=np.int64)[:, None] * nlab
        counts = np.bincount((lobe_p + rows).ravel(), minlength=L * nlab).reshape(L, nlab)
        counts[:, 0] = 0
        out["lobe"] = np.where(counts.sum(1) > 0, counts.argmax(1), 0).astype(np.int64)
    else:
        out["lobe"] = np.zeros(L, dtype=np.int64)
    return out
