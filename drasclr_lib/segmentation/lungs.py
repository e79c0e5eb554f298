"""Lung masks cut at a subject's store patches, read once per process.

Scoring a segmenter (:func:`~drasclr_lib.segmentation.train.evaluate_segmenter`) and the
rule-based baselines zero predictions outside the lung; a label-efficiency experiment scores the
same test subjects once per model and once per rule, so each mask is read, resampled and cut once
and kept (bit-packed) for the next call.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from drasclr_lib.data.patch_store import PatchStore, cut_patches

__all__ = ["lung_patches", "LUNG_PATCH_CACHE_BYTES"]

#: bytes of bit-packed lung patches :func:`lung_patches` keeps between calls, least recently used
#: dropped first: a label-efficiency experiment scores the same test subjects once per model and
#: once per rule (reading and resampling one mask took 0.4-0.7 s; in bench_paper's documented
#: setting those re-reads were about 170 s of the 489 s segmentation stage).
LUNG_PATCH_CACHE_BYTES = 512 * 2**20
_LUNG_CACHE: OrderedDict = OrderedDict()


def lung_patches(store: PatchStore, subject: int | str, lung_mask_path: str | Path) -> np.ndarray:
    """The subject's lung mask cut at its store patches: (L, P, P, P) bool, (k, j, i) order.

    The mask file is read like a CT (reoriented to LPS), put on the subject's padded 1 mm grid
    (``grid_1mm`` of its record, nearest neighbour) and cut at ``corners_subject``, exactly as
    preprocessing cut the CT. The result is kept in memory (bit-packed, up to
    :data:`LUNG_PATCH_CACHE_BYTES`) for the next call with the same file (path, size and
    modification time), grid and corners.

    Raises:
        ValueError: when the subject's record lacks ``grid_1mm`` or ``corners_subject``.
    """
    import SimpleITK as sitk

    from drasclr_lib.preprocess.pipeline import on_subject_grid

    grid, corners = store.subject_grid(subject), store.corners(subject)
    key = _lung_cache_key(lung_mask_path, grid, corners, store.patch_size)
    if key is not None and key in _LUNG_CACHE:
        _LUNG_CACHE.move_to_end(key)
        packed, shape = _LUNG_CACHE[key]
        return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)
    on_grid = sitk.GetArrayFromImage(on_subject_grid(lung_mask_path, grid, kind="label"))
    out = cut_patches(on_grid, corners, store.patch_size, 0)[0] > 0
    if key is not None:
        _LUNG_CACHE[key] = (np.packbits(out), out.shape)
        while sum(v[0].nbytes for v in _LUNG_CACHE.values()) > LUNG_PATCH_CACHE_BYTES:
            _LUNG_CACHE.popitem(last=False)
    return out


def _lung_cache_key(path, grid, corners: np.ndarray, patch_size: int) -> tuple | None:
    """What makes two :func:`lung_patches` calls the same; ``None`` (no caching) for a file that cannot be stat-ed."""
    try:
        path = Path(path).resolve()
        st = path.stat()
    except (OSError, TypeError):
        return None
    geometry = (grid.GetSize(), grid.GetSpacing(), grid.GetOrigin(), grid.GetDirection())
    return (str(path), st.st_mtime_ns, st.st_size, geometry, np.asarray(corners).tobytes(), int(patch_size))
