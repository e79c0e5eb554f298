"""Patches as boxes in a volume: cut them out (:func:`cut_patches`), put them back
(:func:`paste_patches`), or sum them for blending (:func:`add_patches`).

A patch is an axis-aligned cube of P voxels (or a (Pk, Pj, Pi) box) with its (i, j, k) corner in a
(k, j, i) array (SimpleITK's array order); the part of a box outside the volume is clipped. The
three functions share one geometry (:func:`_boxes`), so a patch pasted back lands exactly where it
was cut.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cut_patches", "paste_patches", "add_patches"]


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
