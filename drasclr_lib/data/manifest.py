"""The standard subject table (a *manifest*): its columns, and the validation every table goes through.

Every data source, whatever its own column names, ends as one table with one row per subject
(:func:`drasclr_lib.data.sources.read_manifest` reads a CSV or a ``data_manifest/`` YAML source
file and calls :func:`validate_manifest`):

================  ===========================================================================
column            meaning
================  ===========================================================================
``sid``           subject id (str, unique, required)
``image``         absolute path of the CT: NIfTI, NRRD/MHA/MHD or a DICOM series folder (required)
``lung_mask``     path; 0 outside, 1 right lung, 2 left lung (optional)
``label_map``     path; 0 none, 1 centrilobular, 2 panlobular, 3 paraseptal emphysema (optional)
``lobe_map``      path; 0 outside, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL (optional)
``FEV1pp``        FEV1 % predicted (>= 0)
``FEV1_FVC``      FEV1/FVC as a ratio in [0, 1.5] (not a percentage)
``GOLD``          GOLD stage, integer 0-4
``emph_grade``    visual emphysema grade, integer 0-5
``paraseptal_grade``  visual paraseptal grade, integer 0-3
``age``           years (>= 0)
``sex``           ``M`` or ``F`` (``male``/``female``/``m``/``f``, and ``1`` = M / ``0`` = F accepted)
``pack_years``    smoking pack-years (>= 0)
``time``          survival follow-up time in years (>= 0)
``event``         1 = event (death) observed, 0 = censored
``split``         ``train`` / ``val`` / ``test``
``emph_fraction`` ground truth: fraction of lung voxels that are emphysema, in [0, 1]
``emph_*``        per-subtype fractions (``emph_centrilobular`` ...), in [0, 1]
================  ===========================================================================


Every standard column is present in the result; empty cells and absent columns are NaN. Extra
columns are kept unchanged after the standard ones. Relative paths are resolved against a base
folder (the manifest's folder, or a YAML source's ``root``). Any problem raises
:class:`ManifestError` naming the row (1-based data row, file line and sid) and the column; all
problems found are listed, not only the first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "ManifestError",
    "validate_manifest",
    "read_table",
    "is_missing",
    "parse_number",
    "REQUIRED_COLUMNS",
    "PATH_COLUMNS",
    "NUMERIC_COLUMNS",
    "STANDARD_COLUMNS",
]

REQUIRED_COLUMNS = ("sid", "image")
PATH_COLUMNS = ("image", "lung_mask", "label_map", "lobe_map")
# column -> (low, high, integer-valued); None means unbounded on that side
NUMERIC_COLUMNS: dict[str, tuple[float | None, float | None, bool]] = {
    "FEV1pp": (0.0, None, False),
    "FEV1_FVC": (0.0, 1.5, False),
    "GOLD": (0, 4, True),
    "emph_grade": (0, 5, True),
    "paraseptal_grade": (0, 3, True),
    "age": (0.0, None, False),
    "pack_years": (0.0, None, False),
    "time": (0.0, None, False),
    "event": (0, 1, True),
    "emph_fraction": (0.0, 1.0, False),
}
EMPH_SUBTYPE_COLUMNS = ("emph_centrilobular", "emph_panlobular", "emph_paraseptal")
CATEGORICAL_COLUMNS = ("sex", "split")
STANDARD_COLUMNS = (
    REQUIRED_COLUMNS
    + PATH_COLUMNS[1:]
    + tuple(NUMERIC_COLUMNS)
    + EMPH_SUBTYPE_COLUMNS
    + CATEGORICAL_COLUMNS
)
_SEX = {"m": "M", "male": "M", "1": "M", "f": "F", "female": "F", "0": "F"}
_SPLIT = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_MAX_LISTED = 20


class ManifestError(ValueError):
    """A manifest or data-source file that cannot be used; the message says where and why."""


def read_table(path: Path) -> pd.DataFrame:
    """Read a ``.csv`` (or ``.tsv``/``.tab``, tab-separated) subject table with every cell as text.

    Parsing the cells, and its errors, is left to :func:`validate_manifest`, per cell.

    Raises:
        ManifestError: when the file cannot be read or parsed as a table.
    """
    sep = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, skipinitialspace=True, comment=None)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read the subject table: {err}") from err


def is_missing(value: Any) -> bool:
    """Whether a cell is empty: ``None``, NaN, or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


class _Problems:
    """Collects ``row N (line L, sid S), column C: message`` lines."""

    def __init__(self, source: str, table: Path, line_offset: int = 2):
        self.source, self.table, self.line_offset = source, table, line_offset
        self.items: list[str] = []
        self.sids: list[str] = []

    def add(self, row: int | None, column: str, message: str) -> None:
        if row is None:
            self.items.append(f"column {column!r}: {message}")
            return
        sid = self.sids[row] if row < len(self.sids) else ""
        sid_txt = f", sid {sid!r}" if sid else ""
        self.items.append(f"row {row + 1} (line {row + self.line_offset}{sid_txt}), column {column!r}: {message}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:_MAX_LISTED]
        more = len(self.items) - len(shown)
        where = self.source if self.source == str(self.table) else f"{self.source} (table {self.table})"
        msg = f"invalid manifest {where}: {len(self.items)} problem(s)\n  " + "\n  ".join(shown)
        if more:
            msg += f"\n  ... and {more} more"
        raise ManifestError(msg)


def parse_number(text: str) -> float:
    """A cell's finite number; raises ``ValueError`` (or ``TypeError``) for anything else."""
    value = float(str(text).strip())
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _check_numeric(df: pd.DataFrame, col: str, bounds: tuple, problems: _Problems) -> pd.Series:
    low, high, integer = bounds
    out = np.full(len(df), np.nan)
    for i, value in enumerate(df[col].tolist()):
        if is_missing(value):
            continue
        try:
            number = parse_number(value)
        except (TypeError, ValueError):
            problems.add(i, col, f"cannot parse {value!r} as a number")
            continue
        if integer and not float(number).is_integer():
            problems.add(i, col, f"{value!r} must be a whole number")
            continue
        if (low is not None and number < low) or (high is not None and number > high):
            rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            hint = " (give FEV1/FVC as a ratio, not a percentage)" if col == "FEV1_FVC" and number > 1.5 else ""
            problems.add(i, col, f"{value!r} is outside the allowed range {rng}{hint}")
            continue
        out[i] = number
    return pd.Series(out, index=df.index, dtype=float)


def _check_categorical(df: pd.DataFrame, col: str, allowed: dict[str, str], problems: _Problems) -> pd.Series:
    out: list[Any] = []
    for i, value in enumerate(df[col].tolist()):
        if is_missing(value):
            out.append(np.nan)
            continue
        key = str(value).strip().lower()
        if key.endswith(".0") and key[:-2] in allowed:  # "1.0" from a numeric export
            key = key[:-2]
        if key not in allowed:
            problems.add(i, col, f"{value!r} is not one of {sorted(set(allowed.values()))} "
                                 f"(accepted spellings: {sorted(allowed)})")
            out.append(np.nan)
        else:
            out.append(allowed[key])
    return pd.Series(out, index=df.index, dtype=object)


def _check_paths(df: pd.DataFrame, col: str, base: Path, problems: _Problems, required: bool,
                 check_files: bool = True) -> pd.Series:
    out: list[Any] = []
    for i, value in enumerate(df[col].tolist()):
        if is_missing(value):
            if required:
                problems.add(i, col, "is empty (a path is required)")
            out.append(np.nan)
            continue
        raw = os.path.expanduser(str(value).strip())
        path = Path(raw)
        if not path.is_absolute():
            path = base / path
        path = Path(os.path.abspath(path))
        if check_files and not path.exists():
            problems.add(i, col, f"file not found: {path}")
        out.append(str(path))
    return pd.Series(out, index=df.index, dtype=object)


def validate_manifest(df: pd.DataFrame, *, base: Path, source: str, table: Path,
                      check_files: bool = True) -> pd.DataFrame:
    """Check a subject table in our column names and bring it to the standard form.

    Args:
        df: one row per subject, cells as text (as :func:`read_table` gives them), at least the
            ``sid`` and ``image`` columns.
        base: folder that relative paths are resolved against.
        source: the file named in error messages (the manifest or the YAML source file).
        table: the subject table read (named too when it differs from ``source``).
        check_files: reject rows whose files do not exist.

    Returns:
        One row per subject with every column of :data:`STANDARD_COLUMNS` (absent ones NaN;
        paths absolute str, numbers float64, ``sex`` ``"M"``/``"F"``, ``split``
        ``"train"``/``"val"``/``"test"``), followed by any extra columns of ``df``.

    Raises:
        ManifestError: a required column is missing or duplicated, a referenced file does not
            exist (with ``check_files``), a sid is empty, duplicated or not a file name, a label
            cannot be parsed or is out of range; every problem is listed with its row and column.
    """
    problems = _Problems(source, table)
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    dup_cols = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup_cols:
        for c in dup_cols:
            problems.add(None, c, "appears more than once in the header (after column mapping)")
        problems.raise_if_any()
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        for c in missing:
            problems.add(None, c, f"required column is missing (columns found: {list(df.columns)})")
        problems.raise_if_any()

    sids = [("" if is_missing(s) else str(s).strip()) for s in df["sid"].tolist()]
    problems.sids = sids
    seen: dict[str, int] = {}
    for i, sid in enumerate(sids):
        if not sid:
            problems.add(i, "sid", "is empty")
        elif "/" in sid or "\\" in sid or sid in {".", ".."}:
            problems.add(i, "sid", f"{sid!r} cannot be used as a file name")
        elif sid in seen:
            problems.add(i, "sid", f"duplicated sid {sid!r} (first at row {seen[sid] + 1})")
        else:
            seen[sid] = i
    out = pd.DataFrame(index=df.index)
    out["sid"] = pd.Series(sids, index=df.index, dtype=object)

    for col in PATH_COLUMNS:
        if col in df.columns:
            out[col] = _check_paths(df, col, base, problems, required=col in REQUIRED_COLUMNS,
                                    check_files=check_files)
        else:
            out[col] = pd.Series(np.nan, index=df.index, dtype=object)

    numeric = dict(NUMERIC_COLUMNS)
    for col in list(EMPH_SUBTYPE_COLUMNS) + list(df.columns):
        if col.startswith("emph_") and col not in numeric and col != "emph_grade":
            numeric[col] = (0.0, 1.0, False)
    for col, bounds in numeric.items():
        out[col] = _check_numeric(df, col, bounds, problems) if col in df.columns else np.nan
    out["sex"] = _check_categorical(df, "sex", _SEX, problems) if "sex" in df.columns else np.nan
    out["split"] = _check_categorical(df, "split", _SPLIT, problems) if "split" in df.columns else np.nan

    problems.raise_if_any()
    extra = [c for c in df.columns if c not in out.columns]
    for c in extra:
        out[c] = df[c]
    return out.reset_index(drop=True)
