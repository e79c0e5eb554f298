"""The store's layout: file names, formats and where each subject's files live.

See :mod:`drasclr_lib.data.patch_store` for the folder layout. Every path into a store is built
here, so the layout is written once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "PATCH_DTYPE", "LABEL_DTYPE", "STORE_META", "SUBJECTS_TABLE", "FAILURES_TABLE",
           "FAILURE_COLUMNS", "ATLAS_MASK_FILE", "ATLAS_LANDMARKS_FILE", "ATLAS_INFO_FILE", "safe_sid", "patch_file",
           "label_file", "record_file", "failure_file", "subject_done", "SUBJECT_FOLDERS"]

FORMAT_VERSION = 1
PATCH_DTYPE = np.int16
LABEL_DTYPE = np.uint8
STORE_META = "store.json"
SUBJECTS_TABLE = "subjects.csv"
FAILURES_TABLE = "failures.csv"
FAILURE_COLUMNS = ["sid", "stage", "error"]
#: File names of the atlas saved in a store (``Atlas.save`` writes the first two).
ATLAS_MASK_FILE = "atlas_mask.nii.gz"
ATLAS_LANDMARKS_FILE = "atlas_landmarks.npy"
ATLAS_INFO_FILE = "atlas.json"
#: The per-subject folders (a killed write can leave temporaries in each).
SUBJECT_FOLDERS = ("patches", "labels", "subjects")


def safe_sid(sid: str) -> str:
    """``sid`` as a string, checked to be usable as a file name.

    Raises:
        ValueError: for an empty id, ``.``/``..`` or one holding a path separator.
    """
    sid = str(sid)
    if not sid or "/" in sid or "\\" in sid or sid in {".", ".."}:
        raise ValueError(f"subject id {sid!r} cannot be used as a file name")
    return sid


def patch_file(root: str | os.PathLike, sid: str) -> Path:
    """``patches/<sid>.npy``: patches_hu (L, P, P, P) int16."""
    return Path(root) / "patches" / f"{sid}.npy"


def label_file(root: str | os.PathLike, sid: str) -> Path:
    """``labels/<sid>.npy``: label patches (L, P, P, P) uint8."""
    return Path(root) / "labels" / f"{sid}.npy"


def record_file(root: str | os.PathLike, sid: str) -> Path:
    """``subjects/<sid>.json``: the subject's record, written last (it marks the subject complete)."""
    return Path(root) / "subjects" / f"{sid}.json"


def failure_file(root: str | os.PathLike, sid: str) -> Path:
    """``failures/<sid>.json``: the error of a subject that failed."""
    return Path(root) / "failures" / f"{sid}.json"


def subject_done(root: str | os.PathLike, sid: str) -> bool:
    """True when the subject's record and patches are both on disk (a resumable run skips it)."""
    return record_file(root, sid).exists() and patch_file(root, sid).exists()
