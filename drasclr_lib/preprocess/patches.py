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
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from drasclr_lib.intensity import HU_MAX, HU_MIN

__all__ = ["map_corners", "cut_patches", "paste_patches", "add_patches", "extract_patches", "resample_to_grid"]


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


def _boxes(corners_ijk: np.ndarray, patch_shape, shape_kji) -> list[tuple[int, tuple, tuple]]:
    """Where each patch overlaps a (k, j, i) volume: ``(n, volume slices, patch slices)`` per patch
    that overlaps it at all (the one geometry :func:`cut_patches`, :func:`paste_patches` and
    :func:`add_patches` share; patches reaching past the volume are clipped).

    Args:
        corners_ijk: (L, 3) int (i, j, k) corners.
        patch_shape: P (a cube) or the patches' (k, j, i) shape.
        shape_kji: the volume's (K, J, I) shape.
    """
    corners = np.asarray(corners_ijk, dtype=np.int64).reshape(-1, 3)
    size = np.broadcast_to(np.asarray(patch_shape, dtype=np.int64), (3,))
    shape = np.asarray(shape_kji, dtype=np.int64)
    out = []
    for n, (i, j, k) in enumerate(corners):
        lo = np.array([k, j, i])
        v_lo, v_hi = np.maximum(lo, 0), np.minimum(lo + size, shape)
        if np.any(v_hi <= v_lo):
            continue
        p_lo = v_lo - lo
        p_hi = p_lo + (v_hi - v_lo)
        out.append((n, tuple(slice(int(a), int(b)) for a, b in zip(v_lo, v_hi)),
                    tuple(slice(int(a), int(b)) for a, b in zip(p_lo, p_hi))))
    return out


def cut_patches(volume_kji: np.ndarray, corners_ijk: np.ndarray, patch_size: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned cubes of a (k, j, i) array at (i, j, k) corners; outside voxels get ``fill``.

    Args:
        volume_kji: 3D array in SimpleITK array order (k, j, i).
        corners_ijk: (L, 3) int corners (i, j, k).
        patch_size: P.
        fill: value of voxels outside the volume.

    Returns:
        patches (L, P, P, P) in (k, j, i) order, same dtype as the volume, and
        inside_fraction (L,) float32: fraction of each patch's voxels inside the volume.
    """
    vol = np.asarray(volume_kji)
    L, P = len(np.asarray(corners_ijk).reshape(-1, 3)), int(patch_size)
    out = np.full((L, P, P, P), fill, dtype=vol.dtype)
    inside = np.zeros(L, dtype=np.float32)
    for n, v, p in _boxes(corners_ijk, P, vol.shape):
        out[(n, *p)] = vol[v]
        inside[n] = float(np.prod([s.stop - s.start for s in v])) / P**3
    return out, inside


def paste_patches(patches: np.ndarray, corners_ijk: np.ndarray, shape_kji, *, fill=0, dtype=None) -> np.ndarray:
    """The inverse of :func:`cut_patches`: patches put back into a volume at their corners.

    Where patches overlap, a later one overwrites an earlier one; parts outside the volume are
    dropped. To paste into a box of a larger grid, give corners relative to the box
    (``corners - box_corner``) and the box's shape.

    Args:
        patches: (L, *C, Pk, Pj, Pi) patches in (k, j, i) order (``C``: optional leading channels;
            usually cubes, Pk = Pj = Pi = P).
        corners_ijk: (L, 3) int (i, j, k) corners in the volume's grid.
        shape_kji: (K, J, I) shape of the volume.
        fill: value where no patch reaches.
        dtype: of the volume (default the patches').

    Returns:
        (*C, K, J, I) array.
    """
    patches = np.asarray(patches)
    lead = patches.shape[1:-3]
    vol = np.full((*lead, *(int(v) for v in shape_kji)), fill, dtype=dtype or patches.dtype)
    for n, v, p in _boxes(corners_ijk, patches.shape[-3:], shape_kji):
        vol[(Ellipsis, *v)] = patches[(n, Ellipsis, *p)]
    return vol


def add_patches(total: np.ndarray, counts: np.ndarray | None, patches: np.ndarray, corners_ijk: np.ndarray) -> None:
    """Sum patches into ``total`` in place (for blending overlapping patches by their mean).

    Args:
        total: (*C, K, J, I) float array, updated in place.
        counts: (K, J, I) int array, incremented where a patch covers a voxel (``None``: skip).
        patches: (L, *C, Pk, Pj, Pi) in (k, j, i) order.
        corners_ijk: (L, 3) int (i, j, k) corners in ``total``'s grid (parts outside are dropped).
    """
    patches = np.asarray(patches)
    for n, v, p in _boxes(corners_ijk, patches.shape[-3:], total.shape[-3:]):
        total[(Ellipsis, *v)] += patches[(n, Ellipsis, *p)]
        if counts is not None:
            counts[v] += 1


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
                    lung_1mm: sitk.Image | None = None) -> dict:
    """Cut every atlas patch from one subject, with per-patch summaries.

    Args:
        ct_1mm: the subject's padded 1 mm CT in HU (float or int).
        atlas: :class:`~drasclr_lib.preprocess.atlas.Atlas`.
        transform: atlas physical -> subject physical (``None`` = identity).
        patch_size: P (default ``atlas.patch_size``).
        label_1mm: optional emphysema label map on the same grid (0 none, 1..3 subtypes).
        lobe_1mm: optional lobe map on the same grid (0 outside, 1..5 lobes).
        lung_1mm: optional lung mask on the same grid (nonzero = lung).

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
        ``inside_fraction`` (L,) fraction of each patch inside the scan.

    Raises:
        ValueError: when a label, lobe or lung map is not on the CT's grid.
    """
    P = atlas.patch_size if patch_size is None else int(patch_size)
    labels = _check_grid(label_1mm, ct_1mm, "label map")
    lobes = _check_grid(lobe_1mm, ct_1mm, "lobe map")
    lung = _check_grid(lung_1mm, ct_1mm, "lung mask")
    corners = map_corners(atlas, transform, ct_1mm, patch_size=P)

    hu = sitk.GetArrayViewFromImage(ct_1mm)
    raw, inside = cut_patches(hu, corners, P, HU_MIN)
    patches_hu = np.rint(np.clip(raw, HU_MIN, HU_MAX)).astype(np.int16)
    L = len(corners)
    flat = patches_hu.reshape(L, -1)

    out = {"patches_hu": patches_hu, "corners_subject": corners, "label_patches": None,
           "inside_fraction": inside}
    nan = np.full(L, np.nan, dtype=np.float64)
    if lung is not None:
        lung_p = cut_patches(lung, corners, P, 0)[0].reshape(L, -1) > 0
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
