"""Writing a store: its meta data, one subject at a time, failures, and the final tables.

Every file is written atomically; a subject's record goes last and marks it complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drasclr_lib.data.patch_store.layout import (FAILURE_COLUMNS, FAILURES_TABLE, FORMAT_VERSION, LABEL_DTYPE,
                                                 PATCH_DTYPE, STORE_META, SUBJECT_FOLDERS, SUBJECTS_TABLE,
                                                 failure_file, label_file, patch_file, record_file, safe_sid,
                                                 subject_done)
from drasclr_lib.data.patch_store.records import SubjectRecord
from drasclr_lib.utils import atomic_path, load_json, save_json, save_npy

__all__ = ["write_store_meta", "ensure_store_meta", "write_subject", "remove_stale_temps", "record_failure",
           "clear_failure", "write_failures_table", "finalize_store"]


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
    return save_json(meta, root / STORE_META)


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
    sid = safe_sid(sid)
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
    path = save_npy(patches, patch_file(root, sid))
    if label_patches is not None:
        save_npy(label_patches.astype(LABEL_DTYPE), label_file(root, sid))
    save_json(rec.to_dict(), record_file(root, sid))
    return path


def ensure_store_meta(root: str | os.PathLike, atlas_corners: np.ndarray, locs: np.ndarray, neighbors: np.ndarray, *,
                      patch_size: int = 32, **info: Any) -> Path:
    """Write ``store.json`` (:func:`write_store_meta`), or, when the folder already holds one (a
    resumed or sharded run), check that it was made with the same atlas corners.

    Raises:
        ValueError: when ``root`` already holds a store made with other atlas corners.
    """
    meta_path = Path(root) / STORE_META
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
    for sub in SUBJECT_FOLDERS:
        folder = root / sub
        if folder.is_dir():
            for tmp in folder.glob(f".{sid}.*.part*"):
                tmp.unlink(missing_ok=True)


def record_failure(root: str | os.PathLike, sid: str, stage: str, message: str) -> Path:
    """Write ``failures/<sid>.json`` (``sid, stage, error``) for a subject that failed."""
    return save_json({"sid": str(sid), "stage": stage, "error": message}, failure_file(Path(root), sid))


def clear_failure(root: str | os.PathLike, sid: str) -> None:
    """Forget an earlier failure of ``sid`` (it has now succeeded)."""
    (failure_file(Path(root), sid)).unlink(missing_ok=True)


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
    with atomic_path(root / FAILURES_TABLE) as tmp:
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
        if not (patch_file(root, rec.sid)).exists():
            continue
        rows.append(rec.flat())
    qc = pd.DataFrame(rows, columns=None if rows else ["sid"])
    if table is not None and len(qc):
        labels = table.copy()
        labels["sid"] = labels["sid"].astype(str)
        dup = [c for c in labels.columns if c in qc.columns and c != "sid"]
        qc = qc.merge(labels.drop(columns=dup), on="sid", how="left")
    qc = qc.sort_values("sid").reset_index(drop=True) if len(qc) else qc
    with atomic_path(root / SUBJECTS_TABLE) as tmp:
        qc.to_csv(tmp, index=False)
    return root / SUBJECTS_TABLE


