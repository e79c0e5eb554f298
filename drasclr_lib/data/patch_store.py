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
    failures/<sid>.json   the error of a subject that failed (removed when it later succeeds)
    atlas_mask.nii.gz     the atlas the store was made with, when it was built from the cohort
    atlas_landmarks.npy   or given as files (:data:`ATLAS_MASK_FILE`, :data:`ATLAS_LANDMARKS_FILE`;
    atlas.json            :data:`ATLAS_INFO_FILE`: where an atlas built from the cohort came from)

Every file is written atomically, so a killed preprocessing run leaves complete subjects and
nothing half-written (at worst an unrenamed temporary file, see :func:`remove_stale_temps`). Patches are memory-mapped on read: a batch of one location across many
subjects touches only those patches, never whole cohorts (the published code loaded every
subject's patches of a location into RAM).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from drasclr_lib.utils import atomic_path, load_json, save_json, save_npy

__all__ = [
    "PatchStore",
    "SubjectRecord",
    "FORMAT_VERSION",
    "write_store_meta",
    "ensure_store_meta",
    "write_subject",
    "subject_done",
    "remove_stale_temps",
    "record_failure",
    "clear_failure",
    "write_failures_table",
    "finalize_store",
    "ATLAS_MASK_FILE",
    "ATLAS_LANDMARKS_FILE",
    "ATLAS_INFO_FILE",
    "patch_table",
]

FORMAT_VERSION = 1
PATCH_DTYPE = np.int16
LABEL_DTYPE = np.uint8
#: File names of the atlas saved in a store (``Atlas.save`` writes the first two).
ATLAS_MASK_FILE = "atlas_mask.nii.gz"
ATLAS_LANDMARKS_FILE = "atlas_landmarks.npy"
ATLAS_INFO_FILE = "atlas.json"
FAILURE_COLUMNS = ["sid", "stage", "error"]


def _safe_sid(sid: str) -> str:
    sid = str(sid)
    if not sid or "/" in sid or "\\" in sid or sid in {".", ".."}:
        raise ValueError(f"subject id {sid!r} cannot be used as a file name")
    return sid


# per-patch lists of a record, each (L,)
PATCH_ARRAYS = ("patch_lung_fraction", "patch_emph_fraction", "patch_lobe", "patch_laa950")


@dataclass
class SubjectRecord:
    """What preprocessing recorded about one subject (``subjects/<sid>.json``).

    Every field but ``sid`` and ``num_locations`` may be absent (``None``): stores written by hand
    or by tests hold only some. Fields absent from the file are absent from :meth:`to_dict`, so a
    record read and written again is the same file.

    Attributes:
        sid: subject id. num_locations: L.
        image: path of the CT the patches were cut from.
        lung_volume_l: lung volume in litres. laa950: % of lung voxels below -950 HU.
        reg_dice: Dice of the registered lung mask with the atlas mask.
        mask_dice: Dice of the segmented with the given lung mask (NaN when not compared).
        mask_source: ``"manifest"`` or ``"segmented"``. qc_pass: ``reg_dice >= qc_dice``.
        mean_patch_inside: mean fraction of a patch's voxels inside the padded 1 mm volume.
        corners_subject: (L, 3) int64 (i, j, k) patch corners in the subject's padded 1 mm grid.
        patch_lung_fraction, patch_emph_fraction, patch_laa950: (L,) float64 (NaN unknown).
        patch_lobe: (L,) int64 majority lobe (0 unknown).
        grid_1mm: ``{origin, spacing, direction, size}`` of the padded 1 mm grid (see
            :meth:`grid_image`).
        transform: SimpleITK affine (``transform_to_dict``), atlas physical -> subject physical.
        registration: registration details (metric, iterations, ...).
        times: seconds per stage (``time_<stage>_s`` in the file).
        extra: any other key of the file, kept as read.
    """

    sid: str
    num_locations: int
    image: str | None = None
    lung_volume_l: float | None = None
    laa950: float | None = None
    reg_dice: float | None = None
    mask_dice: float | None = None
    mask_source: str | None = None
    qc_pass: bool | None = None
    mean_patch_inside: float | None = None
    corners_subject: np.ndarray | None = None
    patch_lung_fraction: np.ndarray | None = None
    patch_emph_fraction: np.ndarray | None = None
    patch_lobe: np.ndarray | None = None
    patch_laa950: np.ndarray | None = None
    grid_1mm: dict | None = None
    transform: dict | None = None
    registration: dict | None = None
    times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    _SCALARS = ("image", "lung_volume_l", "laa950", "reg_dice", "mask_dice", "mask_source", "qc_pass",
                "mean_patch_inside")

    def __post_init__(self):
        self.sid = _safe_sid(self.sid)
        L = int(self.num_locations)
        self.num_locations = L
        if self.corners_subject is not None:
            corners = np.asarray(self.corners_subject, dtype=np.int64)
            if corners.shape != (L, 3):
                raise ValueError(f"subject {self.sid}: corners_subject has shape {corners.shape}, expected ({L}, 3)")
            self.corners_subject = corners
        for key in PATCH_ARRAYS:
            value = getattr(self, key)
            if value is None:
                continue
            try:
                arr = (np.array([np.nan if v is None else v for v in value], dtype=np.float64)
                       if isinstance(value, (list, tuple)) else np.asarray(value, dtype=np.float64))
            except (TypeError, ValueError):
                arr = np.asarray(value, dtype=object)
            if arr.shape != (L,):
                raise ValueError(f"subject {self.sid}: record {key} has shape {arr.shape}, expected ({L},)")
            setattr(self, key, np.nan_to_num(arr).astype(np.int64) if key == "patch_lobe" else arr)

    @classmethod
    def from_dict(cls, data: dict, *, path: str | os.PathLike | None = None) -> "SubjectRecord":
        """A record from its JSON form (``subjects/<sid>.json``).

        Raises:
            ValueError: naming ``path`` when a per-patch list has the wrong length.
        """
        data = dict(data)
        known = {"sid", "num_locations", *cls._SCALARS, "corners_subject", *PATCH_ARRAYS, "grid_1mm", "transform",
                 "registration"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        times = {k[len("time_"):-len("_s")]: data.pop(k) for k in list(data)
                 if k.startswith("time_") and k.endswith("_s")}
        num = kwargs.pop("num_locations", None)
        if num is None:
            corners = kwargs.get("corners_subject")
            num = len(corners) if corners is not None else 0
        try:
            return cls(num_locations=num, times=times, extra=data, **kwargs)
        except ValueError as err:
            raise ValueError(f"{err} (in {path})" if path else str(err)) from None

    def to_dict(self) -> dict:
        """The JSON form: the fields that are set, per-patch arrays as lists (NaN -> ``None``)."""
        out: dict[str, Any] = {"sid": self.sid, "num_locations": self.num_locations}
        for key in self._SCALARS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.corners_subject is not None:
            out["corners_subject"] = self.corners_subject.tolist()
        for key in PATCH_ARRAYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = [int(v) for v in value] if key == "patch_lobe" else _floats(value)
        for key in ("grid_1mm", "transform", "registration"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        out.update({f"time_{stage}_s": float(s) for stage, s in self.times.items()})
        return out

    def flat(self) -> dict:
        """The scalar values (one row of ``subjects.csv``)."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (str, int, float, bool)) or v is None}

    def grid_image(self, pixel_type: int | None = None):
        """An empty SimpleITK image on the subject's padded 1 mm grid (``grid_1mm``).

        Args:
            pixel_type: SimpleITK pixel type (default ``sitkUInt8``).

        Raises:
            ValueError: when the record has no ``grid_1mm``.
        """
        import SimpleITK as sitk

        g = self.grid_1mm
        if g is None:
            raise ValueError(f"subject {self.sid}: its record has no grid_1mm (not written by preprocessing)")
        img = sitk.Image([int(v) for v in g["size"]], sitk.sitkUInt8 if pixel_type is None else pixel_type)
        img.SetOrigin([float(v) for v in g["origin"]])
        img.SetSpacing([float(v) for v in g["spacing"]])
        img.SetDirection([float(v) for v in np.asarray(g["direction"], dtype=np.float64).ravel()])
        return img


def _floats(a) -> list:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]



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
    record: SubjectRecord | dict | None = None,
) -> Path:
    """Write one subject's patches atomically; the record JSON goes last and marks completion.

    Args:
        root: store folder.
        sid: subject id (used as the file name).
        patches_hu: (L, P, P, P) HU patches; stored as int16 after clipping to [-1024, 240].
        label_patches: optional (L, P, P, P) integer label patches, stored as uint8.
        record: a :class:`SubjectRecord`, or the fields of one as a dict (QC, geometry,
            transform), saved as ``subjects/<sid>.json``.

    Returns:
        Path of the patch file.

    Raises:
        ValueError: naming the subject, for patches that are not (L, P, P, P), label patches of
            another shape, or a record whose per-patch lists are not of length L.
    """
    root = Path(root)
    sid = _safe_sid(sid)
    patches_hu = np.asarray(patches_hu)
    if patches_hu.ndim != 4 or len(set(patches_hu.shape[1:])) != 1:
        raise ValueError(f"subject {sid}: patches must be (L, P, P, P), got {patches_hu.shape}")
    if isinstance(record, SubjectRecord):
        rec = record
    else:
        fields = {k: v for k, v in (record or {}).items() if k not in ("sid", "num_locations")}
        rec = SubjectRecord.from_dict({"sid": sid, "num_locations": int(patches_hu.shape[0]), **fields})
    if rec.sid != sid or rec.num_locations != patches_hu.shape[0]:
        raise ValueError(f"subject {sid}: record of {rec.sid!r} with {rec.num_locations} locations does not match "
                         f"{patches_hu.shape[0]} patches")
    patches = np.clip(patches_hu, -1024, 240).astype(PATCH_DTYPE)
    if label_patches is not None:
        label_patches = np.asarray(label_patches)
        if label_patches.shape != patches.shape:
            raise ValueError(f"subject {sid}: label patches {label_patches.shape} differ from patches {patches.shape}")
    path = save_npy(patches, root / "patches" / f"{sid}.npy")
    if label_patches is not None:
        save_npy(label_patches.astype(LABEL_DTYPE), root / "labels" / f"{sid}.npy")
    save_json(rec.to_dict(), root / "subjects" / f"{sid}.json")
    return path


def subject_done(root: str | os.PathLike, sid: str) -> bool:
    """True when the subject's record and patches are both on disk (a resumable run skips it)."""
    root = Path(root)
    return (root / "subjects" / f"{sid}.json").exists() and (root / "patches" / f"{sid}.npy").exists()


def ensure_store_meta(root: str | os.PathLike, atlas_corners: np.ndarray, locs: np.ndarray, neighbors: np.ndarray, *,
                      patch_size: int = 32, **info: Any) -> Path:
    """Write ``store.json`` (:func:`write_store_meta`), or, when the folder already holds one (a
    resumed or sharded run), check that it was made with the same atlas corners.

    Raises:
        ValueError: when ``root`` already holds a store made with other atlas corners.
    """
    meta_path = Path(root) / "store.json"
    if meta_path.exists():
        old = load_json(meta_path)
        if np.asarray(old.get("atlas_corners")).tolist() != np.asarray(atlas_corners).tolist():
            raise ValueError(f"{root} already holds a patch store made with another atlas "
                             f"({old.get('atlas_source')!r}); use a new output folder or the same atlas")
        return meta_path
    return write_store_meta(root, atlas_corners, locs, neighbors, patch_size=patch_size, **info)


def remove_stale_temps(root: str | os.PathLike, sid: str) -> None:
    """Remove the temporary files a killed run left for this subject (atomic writes never renamed
    them: ``.<sid>.*.part*`` in ``patches/``, ``labels/``, ``subjects/``)."""
    root = Path(root)
    for sub in ("patches", "labels", "subjects"):
        folder = root / sub
        if folder.is_dir():
            for tmp in folder.glob(f".{sid}.*.part*"):
                tmp.unlink(missing_ok=True)


def record_failure(root: str | os.PathLike, sid: str, stage: str, message: str) -> Path:
    """Write ``failures/<sid>.json`` (``sid, stage, error``) for a subject that failed."""
    return save_json({"sid": str(sid), "stage": stage, "error": message}, Path(root) / "failures" / f"{sid}.json")


def clear_failure(root: str | os.PathLike, sid: str) -> None:
    """Forget an earlier failure of ``sid`` (it has now succeeded)."""
    (Path(root) / "failures" / f"{sid}.json").unlink(missing_ok=True)


def write_failures_table(root: str | os.PathLike) -> pd.DataFrame:
    """Gather ``failures/<sid>.json`` into ``failures.csv`` (atomic), dropping subjects now complete.

    Returns:
        The table written: columns ``sid, stage, error``, one row per failed subject (sorted by sid).
    """
    root = Path(root)
    rows = []
    folder = root / "failures"
    if folder.is_dir():
        for p in sorted(folder.glob("[!.]*.json")):
            try:
                rec = load_json(p)
            except ValueError:  # not JSON (edited by hand): skipped
                continue
            if subject_done(root, rec["sid"]):
                p.unlink(missing_ok=True)
                continue
            rows.append({k: rec[k] for k in FAILURE_COLUMNS})
    table = pd.DataFrame(rows, columns=FAILURE_COLUMNS)
    with atomic_path(root / "failures.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def finalize_store(root: str | os.PathLike, table: pd.DataFrame | None = None) -> Path:
    """Write ``subjects.csv``: every completed subject, with its record's flat QC values joined
    to ``table`` (the manifest's labels, one row per ``sid``).

    Returns:
        Path of ``subjects.csv``.
    """
    root = Path(root)
    rows = []
    for rec_path in sorted((root / "subjects").glob("[!.]*.json")):  # skip .part temporaries
        rec = SubjectRecord.from_dict(load_json(rec_path), path=rec_path)
        if not (root / "patches" / f"{rec.sid}.npy").exists():
            continue
        rows.append(rec.flat())
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

    def record(self, subject: int | str) -> SubjectRecord:
        """The per-subject record (QC, geometry, transform) written by preprocessing.

        Raises:
            ValueError: naming the file when a per-patch list has the wrong length.
        """
        path = self.root / "subjects" / f"{self._resolve(subject)}.json"
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

    def patch_values(self, subject: int | str, key: str) -> np.ndarray | None:
        """One per-patch list of the subject's record as an (L,) array, or ``None`` when absent.

        Args:
            subject: index or id.
            key: one of :data:`PATCH_ARRAYS` (``patch_lung_fraction``, ``patch_emph_fraction``,
                ``patch_lobe``, ``patch_laa950``); float64 with NaN unknown (``patch_lobe``:
                int64, 0 unknown).
        """
        if key not in PATCH_ARRAYS:
            raise KeyError(f"unknown per-patch value {key!r}; one of {PATCH_ARRAYS}")
        return getattr(self.record(subject), key)

    def failures(self) -> pd.DataFrame:
        """``failures.csv`` as a DataFrame (empty when no subject failed)."""
        path = self.root / "failures.csv"
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

    for row, s in enumerate(idx):
        rec = store.record(s)
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
    height = np.broadcast_to(store.atlas_corners[:, 2].astype(np.float64), (N, L)).copy()
    return {"emph_fraction": emph, "lobe": lobe, "lung_fraction": lung, "laa950": laa, "height": height}
