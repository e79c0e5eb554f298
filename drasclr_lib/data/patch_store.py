"""The patch store: the on-disk format preprocessing writes and training, embedding and
segmentation read.

Layout of a store folder::

    store.json            format version, patch size, atlas corners (L, 3), locations (L, 3),
                          neighbour lists (L, K), where the atlas came from
    subjects.csv          one row per completed subject: ``sid``, manifest labels, QC columns
    failures.csv          ``sid, stage, error`` for every subject that failed (may be absent)
    patches/<sid>.npy     patches_hu (L, P, P, P) int16, HU clipped to [-1024, 240]
    labels/<sid>.npy      label patches (L, P, P, P) uint8, when the manifest has a label map
    subjects/<sid>.json   per-subject record (QC, geometry, transform); written last, so its
                          presence marks the subject complete

Every file is written atomically, so a killed preprocessing run leaves complete subjects and
nothing half-written. Patches are memory-mapped on read: a batch of one location across many
subjects touches only those patches, never whole cohorts (the published code loaded every
subject's patches of a location into RAM).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from drasclr_lib.utils import atomic_path, load_json, save_json, save_npy

__all__ = [
    "PatchStore",
    "FORMAT_VERSION",
    "write_store_meta",
    "write_subject",
    "subject_done",
    "finalize_store",
    "patch_table",
]

FORMAT_VERSION = 1
PATCH_DTYPE = np.int16
LABEL_DTYPE = np.uint8


def _safe_sid(sid: str) -> str:
    sid = str(sid)
    if not sid or "/" in sid or "\\" in sid or sid in {".", ".."}:
        raise ValueError(f"subject id {sid!r} cannot be used as a file name")
    return sid


def write_store_meta(
    root: str | os.PathLike,
    atlas_corners: np.ndarray,
    locs: np.ndarray,
    neighbors: np.ndarray,
    *,
    patch_size: int = 32,
    **info: Any,
) -> Path:
    """Write ``store.json``.

    Args:
        root: store folder (created when missing).
        atlas_corners: (L, 3) int voxel corners of the patches in the atlas, (i, j, k) order.
        locs: (L, 3) float normalised locations in [-1, 1] (SPEC step 6).
        neighbors: (L, K) int indices of each location's nearest atlas neighbours.
        patch_size: edge of the cubic patches in voxels (1 mm).
        **info: anything else worth keeping (atlas source file, preprocessing settings).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    atlas_corners = np.asarray(atlas_corners)
    locs = np.asarray(locs, dtype=np.float32)
    neighbors = np.asarray(neighbors, dtype=np.int64)
    if atlas_corners.ndim != 2 or atlas_corners.shape[1] != 3:
        raise ValueError(f"atlas_corners must be (L, 3), got {atlas_corners.shape}")
    if locs.shape != atlas_corners.shape:
        raise ValueError(f"locs {locs.shape} and atlas_corners {atlas_corners.shape} differ in shape")
    if neighbors.ndim != 2 or neighbors.shape[0] != len(atlas_corners):
        raise ValueError(f"neighbors must be (L, K) with L={len(atlas_corners)}, got {neighbors.shape}")
    meta = {
        "format_version": FORMAT_VERSION,
        "patch_size": int(patch_size),
        "num_locations": int(len(atlas_corners)),
        "atlas_corners": atlas_corners.astype(int).tolist(),
        "locs": locs.tolist(),
        "neighbors": neighbors.tolist(),
        **info,
    }
    return save_json(meta, root / "store.json")


def write_subject(
    root: str | os.PathLike,
    sid: str,
    patches_hu: np.ndarray,
    *,
    label_patches: np.ndarray | None = None,
    record: dict | None = None,
) -> Path:
    """Write one subject's patches atomically; the record JSON goes last and marks completion.

    Args:
        root: store folder.
        sid: subject id (used as the file name).
        patches_hu: (L, P, P, P) HU patches; stored as int16 after clipping to [-1024, 240].
        label_patches: optional (L, P, P, P) integer label patches, stored as uint8.
        record: JSON-serialisable dict (QC, geometry, transform) saved as ``subjects/<sid>.json``.

    Returns:
        Path of the patch file.
    """
    root = Path(root)
    sid = _safe_sid(sid)
    patches_hu = np.asarray(patches_hu)
    if patches_hu.ndim != 4 or len(set(patches_hu.shape[1:])) != 1:
        raise ValueError(f"subject {sid}: patches must be (L, P, P, P), got {patches_hu.shape}")
    patches = np.clip(patches_hu, -1024, 240).astype(PATCH_DTYPE)
    path = save_npy(patches, root / "patches" / f"{sid}.npy")
    if label_patches is not None:
        label_patches = np.asarray(label_patches)
        if label_patches.shape != patches.shape:
            raise ValueError(f"subject {sid}: label patches {label_patches.shape} differ from patches {patches.shape}")
        save_npy(label_patches.astype(LABEL_DTYPE), root / "labels" / f"{sid}.npy")
    rec = {"sid": sid, "num_locations": int(patches.shape[0]), **(record or {})}
    save_json(rec, root / "subjects" / f"{sid}.json")
    return path


def subject_done(root: str | os.PathLike, sid: str) -> bool:
    """True when the subject's record and patches are both on disk (a resumable run skips it)."""
    root = Path(root)
    return (root / "subjects" / f"{sid}.json").exists() and (root / "patches" / f"{sid}.npy").exists()


def finalize_store(root: str | os.PathLike, table: pd.DataFrame | None = None) -> Path:
    """Write ``subjects.csv``: every completed subject, with its record's flat QC values joined
    to ``table`` (the manifest's labels, one row per ``sid``).

    Returns:
        Path of ``subjects.csv``.
    """
    root = Path(root)
    rows = []
    for rec_path in sorted((root / "subjects").glob("[!.]*.json")):  # skip .part temporaries
        rec = load_json(rec_path)
        if not (root / "patches" / f"{rec['sid']}.npy").exists():
            continue
        rows.append({k: v for k, v in rec.items() if isinstance(v, (str, int, float, bool)) or v is None})
    qc = pd.DataFrame(rows, columns=None if rows else ["sid"])
    if table is not None and len(qc):
        labels = table.copy()
        labels["sid"] = labels["sid"].astype(str)
        dup = [c for c in labels.columns if c in qc.columns and c != "sid"]
        qc = qc.merge(labels.drop(columns=dup), on="sid", how="left")
    qc = qc.sort_values("sid").reset_index(drop=True) if len(qc) else qc
    with atomic_path(root / "subjects.csv") as tmp:
        qc.to_csv(tmp, index=False)
    return root / "subjects.csv"


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
        meta_path = self.root / "store.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.root} is not a patch store: {meta_path} is missing (run preprocessing first)")
        self.meta = load_json(meta_path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {self.meta.get('format_version')} != {FORMAT_VERSION}")
        self.patch_size = int(self.meta["patch_size"])
        self.atlas_corners = np.asarray(self.meta["atlas_corners"], dtype=np.int64)
        self.locs = np.asarray(self.meta["locs"], dtype=np.float32)
        self.neighbors = np.asarray(self.meta["neighbors"], dtype=np.int64)
        table_path = self.root / "subjects.csv"
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
        return bool(self.sids) and all((self.root / "labels" / f"{s}.npy").exists() for s in self.sids)

    # -- access ------------------------------------------------------------------------------
    def index(self, sid: str) -> int:
        """Position of subject ``sid``; raises ``KeyError`` naming it when absent."""
        try:
            return self._index[str(sid)]
        except KeyError:
            raise KeyError(f"subject {sid!r} is not in the patch store {self.root}") from None

    def _resolve(self, subject: int | str) -> str:
        if isinstance(subject, (int, np.integer)):
            return self.sids[int(subject)]
        self.index(subject)
        return str(subject)

    def _open_patches(self, sid: str) -> np.ndarray:
        arr = np.load(self.root / "patches" / f"{sid}.npy", mmap_mode="r")
        if arr.shape[0] != self.num_locations:
            raise ValueError(f"subject {sid}: {arr.shape[0]} patches but the store has {self.num_locations} locations")
        return arr

    def _open_labels(self, sid: str) -> np.ndarray | None:
        path = self.root / "labels" / f"{sid}.npy"
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

    def record(self, subject: int | str) -> dict:
        """The per-subject record (QC, geometry, transform) written by preprocessing."""
        return load_json(self.root / "subjects" / f"{self._resolve(subject)}.json")

    def failures(self) -> pd.DataFrame:
        """``failures.csv`` as a DataFrame (empty when no subject failed)."""
        path = self.root / "failures.csv"
        if not path.exists():
            return pd.DataFrame(columns=["sid", "stage", "error"])
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

    Values come from the per-subject records written by preprocessing. When a record lacks
    ``patch_emph_fraction``, it is computed from the label patches (labelled voxels over the
    patch's lung voxels, using ``patch_lung_fraction`` when the record has it, else over all
    voxels); without label patches it is NaN. A missing ``patch_lobe`` is 0 (unknown).

    Args:
        store: a ``PatchStore``.
        subjects: optional subject indices; default all.

    Returns:
        dict of (N, L) arrays: ``emph_fraction`` (float, NaN unknown), ``lobe`` (int, 0 unknown),
        ``lung_fraction`` (float, NaN unknown), ``laa950`` (float %, NaN unknown), and
        ``height`` (float, the location's atlas z corner, the same for every subject).
    """
    idx = list(range(store.num_subjects)) if subjects is None else [int(s) for s in subjects]
    N, L = len(idx), store.num_locations
    emph = np.full((N, L), np.nan)
    lobe = np.zeros((N, L), dtype=np.int64)
    lung = np.full((N, L), np.nan)
    laa = np.full((N, L), np.nan)

    def _list(rec, key, sid):
        if rec.get(key) is None:
            return None
        arr = np.asarray(rec[key], dtype=np.float64)
        if arr.shape != (L,):
            raise ValueError(f"subject {sid}: record {key} has shape {arr.shape}, expected ({L},) "
                             f"in {store.root / 'subjects' / (sid + '.json')}")
        return arr

    for row, s in enumerate(idx):
        sid = store.sids[s]
        rec = store.record(s)
        lf = _list(rec, "patch_lung_fraction", sid)
        if lf is not None:
            lung[row] = lf
        lb = _list(rec, "patch_lobe", sid)
        if lb is not None:
            lobe[row] = np.nan_to_num(lb).astype(np.int64)
        la = _list(rec, "patch_laa950", sid)
        if la is not None:
            laa[row] = la
        ef = _list(rec, "patch_emph_fraction", sid)
        if ef is not None:
            emph[row] = ef
        else:
            labels = store.label_patches(s)
            if labels is not None:
                labelled = (np.asarray(labels).reshape(L, -1) > 0).mean(axis=1)
                denom = lung[row] if lf is not None else np.ones(L)
                with np.errstate(divide="ignore", invalid="ignore"):
                    emph[row] = np.where(denom > 0, np.clip(labelled / denom, 0, 1), np.nan)
    height = np.broadcast_to(store.atlas_corners[:, 2].astype(np.float64), (N, L)).copy()
    return {"emph_fraction": emph, "lobe": lobe, "lung_fraction": lung, "laa950": laa, "height": height}
