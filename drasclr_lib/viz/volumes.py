"""A subject's volume for viewing, and where its patches lie in it.

:func:`load_subject_volume` gives the explorer (:mod:`drasclr_lib.viz.explorer`) something to
draw: the CT re-read from the manifest path in the store's ``image`` column and resampled
(linear) onto the subject's padded 1 mm grid recorded by preprocessing
(:meth:`~drasclr_lib.data.patch_store.PatchStore.subject_grid`), so the boxes at the subject's
patch corners (:meth:`~drasclr_lib.data.patch_store.PatchStore.corners`) sit where the patches
were cut. When the image or the geometry is not available, the subject's own patches are pasted
at their corners (:func:`~drasclr_lib.data.patch_store.paste_patches`) into a mosaic volume.
:func:`similarity_slice` paints per-patch values over an axial slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drasclr_lib.data.patch_store import add_patches, paste_patches

__all__ = ["SubjectVolume", "load_subject_volume", "similarity_slice"]


@dataclass
class SubjectVolume:
    """A subject's volume and where its patches lie in it.

    Attributes:
        sid: subject id.
        hu: (K, J, I) int16 HU volume in SimpleITK array order (axial slices along axis 0).
        corners: (L, 3) int64 patch corners (i, j, k) in ``hu``'s voxel grid.
        patch_size: P.
        source: ``"CT"`` (the re-read scan) or ``"patch mosaic"`` (patches pasted at their corners).
    """

    sid: str
    hu: np.ndarray
    corners: np.ndarray
    patch_size: int
    source: str

    def patches_on_slice(self, k: int) -> np.ndarray:
        """Indices of the patches whose box crosses axial slice ``k``."""
        kc = self.corners[:, 2]
        return np.flatnonzero((kc <= k) & (k < kc + self.patch_size))

    def center_slice(self, loc: int) -> int:
        """The axial slice through the centre of patch ``loc`` (clipped to the volume)."""
        return int(np.clip(self.corners[loc, 2] + self.patch_size // 2, 0, self.hu.shape[0] - 1))


def _ct_volume(store, s: int) -> SubjectVolume:
    """Re-read the CT of subject ``s`` and resample it onto its recorded 1 mm grid."""
    import SimpleITK as sitk

    from drasclr_lib.preprocess.pipeline import on_subject_grid

    sid = store.sids[s]
    if "image" not in store.table.columns:
        raise FileNotFoundError(f"subject {sid}: the store's subjects.csv has no 'image' column")
    path = store.table.loc[sid, "image"]
    if not isinstance(path, str) or not Path(path).exists():
        raise FileNotFoundError(f"subject {sid}: CT file {path!r} (subjects.csv 'image') does not exist")
    grid, corners = store.subject_grid(s), store.corners(s)
    res = on_subject_grid(path, grid, kind="ct", sid=sid)
    hu = np.clip(np.rint(sitk.GetArrayFromImage(res)), -1024, 3071).astype(np.int16)
    return SubjectVolume(sid, hu, corners, store.patch_size, "CT")


def _mosaic_volume(store, s: int) -> SubjectVolume:
    """Paste the subject's patches at their corners (subject grid when known, else atlas grid)."""
    corners = store.corners(s, atlas_fallback=True)
    P = store.patch_size
    local = corners - corners.min(axis=0)
    shape_kji = tuple(int(v) for v in (local.max(axis=0) + P)[::-1])
    hu = paste_patches(store.patches(s), local, shape_kji, fill=-1024, dtype=np.int16)
    return SubjectVolume(store.sids[s], hu, local, P, "patch mosaic")


def load_subject_volume(store, subject: int | str, *, source: str = "auto") -> SubjectVolume:
    """The volume the explorer draws for one subject.

    Args:
        store: a ``PatchStore``.
        subject: index or id.
        source: ``"ct"`` (re-read and resample the scan; raises when impossible), ``"patches"``
            (mosaic of the stored patches), or ``"auto"`` (CT when possible, else the mosaic).

    Returns:
        :class:`SubjectVolume`.

    Raises:
        ValueError: for an unknown ``source``.
        FileNotFoundError, ValueError: with ``source="ct"`` when the scan or its geometry is missing.
    """
    if source not in {"auto", "ct", "patches"}:
        raise ValueError(f"source must be 'auto', 'ct' or 'patches', got {source!r}")
    s = store.index(subject)
    if source == "patches":
        return _mosaic_volume(store, s)
    if source == "ct":
        return _ct_volume(store, s)
    try:
        return _ct_volume(store, s)
    except Exception as exc:  # noqa: BLE001 - any reason the scan cannot be shown: fall back, say why
        import warnings

        warnings.warn(f"explorer: showing a mosaic of the stored patches instead of the CT ({exc})", stacklevel=2)
        return _mosaic_volume(store, s)


def similarity_slice(volume: SubjectVolume, values: np.ndarray, k: int) -> np.ndarray:
    """Paint each patch box crossing axial slice ``k`` with its value (overlaps averaged).

    Args:
        volume: the subject's volume and corners.
        values: (L,) value per patch (e.g. cosine similarity).
        k: axial slice index.

    Returns:
        (J, I) float array, NaN where no patch lies.
    """
    _, J, I = volume.hu.shape
    P = volume.patch_size
    crossing = volume.patches_on_slice(k)
    acc = np.zeros((1, J, I))
    cnt = np.zeros((1, J, I), dtype=np.int64)
    boxes = np.broadcast_to(np.asarray(values, dtype=np.float64)[crossing, None, None, None], (len(crossing), P, P, P))
    add_patches(acc, cnt, boxes, volume.corners[crossing] - [0, 0, k])  # the slice is k = 0 of a 1-slice volume
    with np.errstate(invalid="ignore"):
        return np.where(cnt[0] > 0, acc[0] / np.maximum(cnt[0], 1), np.nan)
