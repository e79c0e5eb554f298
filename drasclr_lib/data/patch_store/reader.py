"""Reading a store: :class:`PatchStore` (memory-mapped patches, records, typed accessors) and
:func:`patch_table` (per-patch facts of every subject).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from drasclr_lib.data.patch_store.layout import (FAILURE_COLUMNS, FAILURES_TABLE, FORMAT_VERSION, STORE_META,
                                                 SUBJECTS_TABLE, label_file, patch_file, record_file, subject_done)
from drasclr_lib.data.patch_store.records import MIN_PATCH_FOV, PATCH_ARRAYS, SubjectRecord
from drasclr_lib.utils import load_json

__all__ = ["PatchStore", "patch_table"]


class PatchStore:
    """Read access to a patch store folder (see the module docstring for the layout).

    Attributes:
        root: the store folder.
        sids: list of N subject ids, in ``subjects.csv`` order.
        table: ``pandas.DataFrame`` indexed by ``sid``: labels and QC of the N subjects.
        atlas_corners: (L, 3) int64 atlas voxel corners.
        locs: (L, 3) float32 normalised locations in [-1, 1].
        neighbors: (L, K) int64 nearest atlas neighbours of each location.
        patch_size: P, edge of the patches in voxels.

    Example:
        >>> store = PatchStore("outputs/patch_store")  # doctest: +SKIP
        >>> batch = store.location_batch([0, 3, 7], loc=12)   # (3, 32, 32, 32) int16
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path = self.root / STORE_META
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.root} is not a patch store: {meta_path} is missing (run preprocessing first)")
        self.meta = load_json(meta_path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')} != {FORMAT_VERSION}")
        self.patch_size = int(self.meta["patch_size"])
        self.atlas_corners = np.asarray(self.meta["atlas_corners"], dtype=np.int64)
        self.locs = np.asarray(self.meta["locs"], dtype=np.float32)
        self.neighbors = np.asarray(self.meta["neighbors"], dtype=np.int64)
        table_path = self.root / SUBJECTS_TABLE
        if table_path.exists():
            table = pd.read_csv(table_path, dtype={"sid": str})
        else:  # a store still being written: completed subjects only
            sids = sorted(p.stem for p in (self.root / "subjects").glob("[!.]*.json") if subject_done(self.root, p.stem))
            table = pd.DataFrame({"sid": sids})
        self.table = table.set_index("sid", drop=False)
        self.sids: list[str] = [str(s) for s in self.table["sid"]]
        self._index = {sid: i for i, sid in enumerate(self.sids)}
        self._patches = lru_cache(maxsize=None)(self._open_patches)
        self._labels = lru_cache(maxsize=None)(self._open_labels)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_subjects(self) -> int:
        return len(self.sids)

    @property
    def num_locations(self) -> int:
        return len(self.atlas_corners)

    def __len__(self) -> int:
        return self.num_subjects

    def __repr__(self) -> str:
        return f"PatchStore({str(self.root)!r}, subjects={self.num_subjects}, locations={self.num_locations}, patch={self.patch_size})"

    @property
    def has_labels(self) -> bool:
        """True when every subject has label patches."""
        return bool(self.sids) and all((label_file(self.root, s)).exists() for s in self.sids)

    # -- access ------------------------------------------------------------------------------
    def index(self, subject: int | str) -> int:
        """Position of a subject given by id (or already by position, checked).

        Raises:
            KeyError: naming an id that is not in the store.
            IndexError: for a position outside ``0 .. N - 1``.
        """
        if isinstance(subject, (int, np.integer)):
            if not 0 <= int(subject) < self.num_subjects:
                raise IndexError(f"subject index {int(subject)} is outside 0..{self.num_subjects - 1} in {self.root}")
            return int(subject)
        try:
            return self._index[str(subject)]
        except KeyError:
            raise KeyError(f"subject {subject!r} is not in the patch store {self.root}") from None

    def _resolve(self, subject: int | str) -> str:
        return self.sids[self.index(subject)]

    def _open_patches(self, sid: str) -> np.ndarray:
        arr = np.load(patch_file(self.root, sid), mmap_mode="r")
        if arr.shape[0] != self.num_locations:
            raise ValueError(f"subject {sid}: {arr.shape[0]} patches but the store has {self.num_locations} locations")
        return arr

    def _open_labels(self, sid: str) -> np.ndarray | None:
        path = label_file(self.root, sid)
        return np.load(path, mmap_mode="r") if path.exists() else None

    def patches(self, subject: int | str) -> np.ndarray:
        """patches_hu (L, P, P, P) int16 of one subject (memory-mapped, read-only)."""
        return self._patches(self._resolve(subject))

    def label_patches(self, subject: int | str) -> np.ndarray | None:
        """Label patches (L, P, P, P) uint8 of one subject, or ``None`` when it has none."""
        return self._labels(self._resolve(subject))

    def get(self, subject: int | str, loc: int) -> np.ndarray:
        """One patch (P, P, P) int16."""
        return np.asarray(self.patches(subject)[int(loc)])

    def location_batch(self, subjects: Sequence[int], loc: int) -> np.ndarray:
        """Patches of one location across subjects: (B, P, P, P) int16 (reads only those patches)."""
        return np.stack([self.patches(int(s))[int(loc)] for s in subjects])

    def label_batch(self, subjects: Sequence[int], loc: int) -> np.ndarray:
        """Label patches of one location across subjects: (B, P, P, P) uint8."""
        out = []
        for s in subjects:
            lab = self.label_patches(int(s))
            if lab is None:
                raise FileNotFoundError(f"subject {self.sids[int(s)]} has no label patches in {self.root}")
            out.append(lab[int(loc)])
        return np.stack(out)

    def record(self, subject: int | str) -> SubjectRecord:
        """The per-subject record (QC, geometry, transform) written by preprocessing.

        Raises:
            ValueError: naming the file when a per-patch list has the wrong length.
        """
        path = record_file(self.root, self._resolve(subject))
        return SubjectRecord.from_dict(load_json(path), path=path)

    def corners(self, subject: int | str, *, atlas_fallback: bool = False) -> np.ndarray:
        """(L, 3) int64 (i, j, k) patch corners in the subject's padded 1 mm grid.

        Args:
            subject: index or id.
            atlas_fallback: for a record without ``corners_subject`` (stores not written by
                preprocessing), return the atlas corners instead of raising.

        Raises:
            ValueError: naming the record file when it has no corners and no fallback is asked.
        """
        rec = self.record(subject)
        if rec.corners_subject is not None:
            return rec.corners_subject
        if atlas_fallback:
            return self.atlas_corners.copy()
        raise ValueError(f"subject {rec.sid}: record {self.root / 'subjects' / (rec.sid + '.json')} has no "
                         "corners_subject (not written by preprocessing)")

    def subject_grid(self, subject: int | str, pixel_type: int | None = None):
        """An empty SimpleITK image on the subject's padded 1 mm grid, where its patches were cut.

        Raises:
            ValueError: naming the record file when it has no ``grid_1mm``.
        """
        rec = self.record(subject)
        try:
            return rec.grid_image(pixel_type)
        except ValueError as err:
            raise ValueError(f"{err}: {self.root / 'subjects' / (rec.sid + '.json')}") from None

    @property
    def min_patch_fov(self) -> float:
        """The store's invalid-patch threshold: ``store.json``'s ``min_patch_fov`` (written by
        preprocessing), else :data:`~drasclr_lib.data.patch_store.records.MIN_PATCH_FOV` (0.5)."""
        value = self.meta.get("min_patch_fov")
        return MIN_PATCH_FOV if value is None else float(value)

    def valid_patches(self, subject: int | str) -> np.ndarray:
        """(L,) bool: the subject's patches at least :attr:`min_patch_fov` inside the scanned
        volume (``patch_fov_fraction``). The one place the invalid-patch policy is read from a
        store; stores written before the field of view was recorded have every patch valid."""
        return self.record(subject).valid_patches(self.min_patch_fov)

    def valid_mask(self, subjects: Sequence[int | str] | None = None) -> np.ndarray:
        """(N, L) bool :meth:`valid_patches` of the given subjects (default: all, in store order)."""
        idx = range(self.num_subjects) if subjects is None else subjects
        rows = [self.valid_patches(s) for s in idx]
        return np.stack(rows) if rows else np.zeros((0, self.num_locations), dtype=bool)

    def patch_values(self, subject: int | str, key: str) -> np.ndarray | None:
        """One per-patch list of the subject's record as an (L,) array, or ``None`` when absent.

        Args:
            subject: index or id.
            key: one of :data:`PATCH_ARRAYS` (``patch_lung_fraction``, ``patch_emph_fraction``,
                ``patch_lobe``, ``patch_laa950``, ``patch_fov_fraction``); float64 with NaN unknown
                (``patch_lobe``: int64, 0 unknown; ``patch_fov_fraction``: float32).
        """
        if key not in PATCH_ARRAYS:
            raise KeyError(f"unknown per-patch value {key!r}; one of {PATCH_ARRAYS}")
        return getattr(self.record(subject), key)

    def failures(self) -> pd.DataFrame:
        """``failures.csv`` as a DataFrame (empty when no subject failed)."""
        path = self.root / FAILURES_TABLE
        if not path.exists():
            return pd.DataFrame(columns=FAILURE_COLUMNS)
        return pd.read_csv(path, dtype={"sid": str})

    def __getstate__(self):  # DataLoader workers re-open the memory maps themselves
        state = self.__dict__.copy()
        state.pop("_patches", None)
        state.pop("_labels", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._patches = lru_cache(maxsize=None)(self._open_patches)
        self._labels = lru_cache(maxsize=None)(self._open_labels)


def patch_table(store, subjects: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Per-patch facts of the store's subjects, for colouring maps and scoring embeddings.

    Values come from the per-subject records written by preprocessing. ``laa950`` is NaN at
    invalid patches (:meth:`PatchStore.valid_patches`: mostly padding, which reads as emphysema).
    When a record lacks
    ``patch_emph_fraction``, it is computed from the label patches (labelled voxels over the
    patch's lung voxels, using ``patch_lung_fraction`` when the record has it, else over all
    voxels); without label patches it is NaN. A missing ``patch_lobe`` is 0 (unknown).

    Args:
        store: a ``PatchStore``.
        subjects: optional subject indices; default all.

    Returns:
        dict of (N, L) arrays: ``emph_fraction`` (float, NaN unknown), ``lobe`` (int, 0 unknown),
        ``lung_fraction`` (float, NaN unknown), ``laa950`` (float %, NaN unknown), and
        ``height`` (float, the location's atlas z corner, the same for every subject),
        ``fov_fraction`` (float32, 1 for records without it) and ``valid`` (bool).
    """
    idx = list(range(store.num_subjects)) if subjects is None else [int(s) for s in subjects]
    N, L = len(idx), store.num_locations
    emph = np.full((N, L), np.nan)
    lobe = np.zeros((N, L), dtype=np.int64)
    lung = np.full((N, L), np.nan)
    laa = np.full((N, L), np.nan)
    fov = np.ones((N, L), dtype=np.float32)
    valid = np.ones((N, L), dtype=bool)

    for row, s in enumerate(idx):
        rec = store.record(s)
        if rec.patch_fov_fraction is not None:
            fov[row] = rec.patch_fov_fraction
        valid[row] = rec.valid_patches(getattr(store, "min_patch_fov", MIN_PATCH_FOV))
        if rec.patch_lung_fraction is not None:
            lung[row] = rec.patch_lung_fraction
        if rec.patch_lobe is not None:
            lobe[row] = rec.patch_lobe
        if rec.patch_laa950 is not None:
            laa[row] = rec.patch_laa950
        if rec.patch_emph_fraction is not None:
            emph[row] = rec.patch_emph_fraction
        else:
            labels = store.label_patches(s)
            if labels is not None:
                labelled = (np.asarray(labels).reshape(L, -1) > 0).mean(axis=1)
                denom = lung[row] if rec.patch_lung_fraction is not None else np.ones(L)
                with np.errstate(divide="ignore", invalid="ignore"):
                    emph[row] = np.where(denom > 0, np.clip(labelled / denom, 0, 1), np.nan)
    laa[~valid] = np.nan
    height = np.broadcast_to(store.atlas_corners[:, 2].astype(np.float64), (N, L)).copy()
    return {"emph_fraction": emph, "lobe": lobe, "lung_fraction": lung, "laa950": laa, "height": height,
            "fov_fraction": fov, "valid": valid}
