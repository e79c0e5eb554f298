"""Atlas landmarks: the anatomical locations shared by every subject.

The grid rule (:func:`atlas_landmarks`), the location condition fed to the encoder
(:func:`normalize_locations`) and the anatomical neighbour lists (:func:`nearest_neighbors`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["normalize_locations", "nearest_neighbors"]


def normalize_locations(atlas_corners: np.ndarray) -> np.ndarray:
    """Location condition of every atlas patch (SPEC step 6, checkpoint-compatible).

    ``loc_i = corner_i / corners.max(axis=0) * 2 - 1`` with the per-axis maximum over all
    locations, exactly as the published code, so released checkpoints see the inputs they
    were trained on.

    Args:
        atlas_corners: (L, 3) voxel corners of the patches in the atlas.

    Returns:
        loc (L, 3) float32, in [-1, 1].

    Raises:
        ValueError: for a wrong shape or an axis whose maximum corner is not positive.
    """
    corners = np.asarray(atlas_corners, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 3 or len(corners) == 0:
        raise ValueError(f"atlas_corners must be a non-empty (L, 3) array, got shape {corners.shape}")
    cmax = corners.max(axis=0)
    if np.any(cmax <= 0):
        raise ValueError(f"every axis needs a positive maximum corner to normalise, got max {cmax.tolist()}")
    return (corners / cmax * 2.0 - 1.0).astype(np.float32)


def nearest_neighbors(atlas_corners: np.ndarray, k: int = 2) -> np.ndarray:
    """The ``k`` nearest atlas locations of every location, itself excluded.

    Distance is Euclidean between atlas corners; ties are broken by the lower index, so the
    lists are deterministic.

    Args:
        atlas_corners: (L, 3) voxel corners.
        k: number of neighbours (the paper uses 2).

    Returns:
        neighbors (L, k) int64 indices into the locations.
    """
    corners = np.asarray(atlas_corners, dtype=np.float64)
    n = len(corners)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} locations, got {k}")
    d2 = ((corners[:, None, :] - corners[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(n), d2.shape), d2), axis=1)
    return order[:, :k].astype(np.int64)
