"""The one error type of preprocessing: which subject, which file, which stage failed.

Every bad input (missing file, corrupt NIfTI, 2D image, non-CT intensities, NaNs, bad spacing,
a DICOM folder with two series, no lungs in the field of view, a failed registration) raises
:class:`PreprocessError`, so the cohort runner can catch exactly this type, write one line to
``failures.csv`` (``sid, stage, error``) and go on with the other subjects.
"""

from __future__ import annotations

import os

__all__ = ["PreprocessError", "STAGES"]

#: The stages a :class:`PreprocessError` can name, in pipeline order.
STAGES = ("read", "resample", "lung_mask", "register", "patches", "write")


class PreprocessError(Exception):
    """A subject could not be preprocessed.

    Args:
        message: what is wrong and, where it helps, what to do about it.
        stage: one of :data:`STAGES` (``"read"``, ``"resample"``, ``"lung_mask"``,
            ``"register"``, ``"patches"``, ``"write"``).
        sid: the subject id, when known.
        path: the file or folder concerned, when known.

    Attributes:
        message, stage, sid, path: as given (``path`` as ``str`` or ``None``).

    Raises:
        ValueError: for a stage that is not one of :data:`STAGES`.

    Example:
        >>> str(PreprocessError("no lungs found", stage="lung_mask", sid="S01", path="/d/S01.nii.gz"))
        "[lung_mask] subject 'S01' (/d/S01.nii.gz): no lungs found"
    """

    def __init__(self, message: str, *, stage: str, sid: str | None = None,
                 path: str | os.PathLike | None = None) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.message = str(message)
        self.stage = stage
        self.sid = None if sid is None else str(sid)
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.message)

    def __str__(self) -> str:
        where = []
        if self.sid is not None:
            where.append(f"subject {self.sid!r}")
        if self.path is not None:
            where.append(f"({self.path})")
        prefix = f"[{self.stage}] " + (" ".join(where) + ": " if where else "")
        return prefix + self.message

    def __reduce__(self):  # picklable across worker processes (keyword-only __init__)
        return (_rebuild, (self.message, self.stage, self.sid, self.path))


def _rebuild(message, stage, sid, path):
    return PreprocessError(message, stage=stage, sid=sid, path=path)
