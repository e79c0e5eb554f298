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
``time``          survival follow-up time in years (>= 0; a median above 30 is refused as days
                  or months)
``event``         1 = event (death) observed, 0 = censored (``dead``/``alive``, ``yes``/``no`` ...:
                  :data:`EVENT_SPELLINGS`)
``split``         ``train`` / ``val`` / ``test``
``emph_fraction`` ground truth: fraction of lung voxels that are emphysema, in [0, 1]
``emph_*``        per-subtype fractions (``emph_centrilobular`` ...), in [0, 1]
``group``         patient id (str, optional): scans sharing a group are one patient's visits, kept in
                  one cross-validation fold and never each other's pretraining negatives; empty =
                  the subject is its own group
================  ===========================================================================


Every standard column is present in the result; empty cells and absent columns are NaN. Extra
columns are kept unchanged after the standard ones. Relative paths are resolved against a base
folder (the manifest's folder, or a YAML source's ``root``). Any problem raises
:class:`ManifestError` naming the row (1-based data row, file line and sid) and the column; all
problems found are listed, not only the first.

Messages meant to help a first manifest: column names are matched ignoring case (``SID`` is read
as ``sid``, ``fev1pp`` as ``FEV1pp``), and a missing required column or an extra column close to a
standard name gets a hint naming the close match; a table separated by tabs, semicolons or bars
is detected from its header (:func:`read_table`); ``time`` values that look like days or months
are refused with the factor to divide by. What was adapted silently (a column renamed, a
separator detected) is a *note*: a line of ``df.attrs["manifest_notes"]`` of the validated table,
all of them in one :class:`ManifestWarning`. This file is past 350 lines because these
messages belong with the checks they explain.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "ManifestError",
    "ManifestWarning",
    "validate_manifest",
    "read_table",
    "is_missing",
    "parse_number",
    "REQUIRED_COLUMNS",
    "PATH_COLUMNS",
    "NUMERIC_COLUMNS",
    "STANDARD_COLUMNS",
    "GROUP_COLUMN",
    "EVENT_SPELLINGS",
    "MAX_TIME_YEARS",
    "close_match",
    "detect_separator",
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
#: Patient id: the scans of one patient share it (optional; missing = the subject is its own group).
GROUP_COLUMN = "group"
STANDARD_COLUMNS = (
    REQUIRED_COLUMNS
    + PATH_COLUMNS[1:]
    + tuple(NUMERIC_COLUMNS)
    + EMPH_SUBTYPE_COLUMNS
    + CATEGORICAL_COLUMNS
    + (GROUP_COLUMN,)
)
_SEX = {"m": "M", "male": "M", "1": "M", "f": "F", "female": "F", "0": "F"}
_SPLIT = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
#: Accepted spellings of ``event`` (case-insensitive), besides the numbers 0 and 1.
EVENT_SPELLINGS = {
    "dead": 1, "deceased": 1, "died": 1, "death": 1, "yes": 1, "true": 1,
    "alive": 0, "living": 0, "censored": 0, "no": 0, "false": 0,
}
#: ``time`` is in years: a median follow-up above this is taken for days or months.
MAX_TIME_YEARS = 30.0
#: Names people give the required columns (a hint only; nothing is renamed from them).
_SYNONYMS = {
    "sid": ("subject", "subject_id", "subjectid", "id", "case", "case_id", "scan_id", "patient_id", "sample"),
    "image": ("image_path", "img", "ct", "ct_path", "scan", "path", "file", "filename", "nifti", "volume"),
}
_MAX_LISTED = 20
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


class ManifestError(ValueError):
    """A manifest or data-source file that cannot be used; the message says where and why.

    Attributes:
        problems: every problem found, one line each (the message lists the first 20).
        notes: what was adapted while reading (renamed columns, a detected separator).
    """

    def __init__(self, message: str, *, problems: list[str] | None = None, notes: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]
        self.notes = list(notes or [])


class ManifestWarning(UserWarning):
    """A manifest was read after an adaptation worth knowing (a renamed column, a detected separator)."""


_SEPARATORS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "bar"}


def detect_separator(header: str) -> str:
    """The column separator of a table from its header line: the most frequent of ``, \\t ; |``.

    Column names rarely hold any of them, so the header decides (a comma wins ties, and a header
    of one column is comma-separated).
    """
    counts = {sep: header.count(sep) for sep in _SEPARATORS}
    best = max(counts, key=lambda sep: (counts[sep], sep == ","))
    return best if counts[best] else ","


def read_table(path: Path) -> pd.DataFrame:
    """Read a subject table with every cell as text, whatever its separator.

    The separator is detected from the header line (:func:`detect_separator`): a ``.csv`` saved
    by a spreadsheet with semicolons or tabs is read as such, with a note
    (``df.attrs["manifest_notes"]``) when it is not what the suffix says. A UTF-8 byte-order mark
    (Excel's "CSV UTF-8") is dropped. Parsing the cells, and its errors, is left to
    :func:`validate_manifest`, per cell.

    Raises:
        ManifestError: when the file cannot be read or parsed as a table.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            header = fh.readline()
        sep = detect_separator(header)
        df = pd.read_csv(path, sep=sep, dtype=str, skipinitialspace=True, comment=None, encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read the subject table: {err}") from err
    expected = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    df.attrs["manifest_notes"] = [] if sep == expected else [
        f"{path.name} is {_SEPARATORS[sep]}-separated (detected from its header); read as such"]
    return df


def is_missing(value: Any) -> bool:
    """Whether a cell is empty: ``None``, NaN, or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


class _Problems:
    """Collects ``row N (line L, sid S), column C: message`` lines."""

    def __init__(self, source: str, table: Path, line_offset: int = 2, notes: list[str] | None = None):
        self.source, self.table, self.line_offset = source, table, line_offset
        self.items: list[str] = []
        self.sids: list[str] = []
        self.notes: list[str] = list(notes or [])

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
        if self.notes:
            msg += "\n  notes:\n    " + "\n    ".join(self.notes)
        raise ManifestError(msg, problems=self.items, notes=self.notes)


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
            hint = " (a decimal comma? write it with a point)" if _DECIMAL_COMMA.match(str(value).strip()) else ""
            problems.add(i, col, f"cannot parse {value!r} as a number{hint}")
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


def _check_event(df: pd.DataFrame, problems: _Problems) -> pd.Series:
    """``event`` as 0.0/1.0: the numbers 0 and 1 or a spelling of :data:`EVENT_SPELLINGS`."""
    out = np.full(len(df), np.nan)
    accepted = "0, 1, " + ", ".join(f"{k}" for k in EVENT_SPELLINGS)
    for i, value in enumerate(df["event"].tolist()):
        if is_missing(value):
            continue
        key = str(value).strip().lower()
        if key in EVENT_SPELLINGS:
            out[i] = EVENT_SPELLINGS[key]
            continue
        try:
            number = parse_number(key)
        except (TypeError, ValueError):
            number = None
        if number in (0.0, 1.0):
            out[i] = number
            continue
        hint = ("; a 1/2 coding (R's Surv: 2 = dead) must be recoded to 0/1" if number == 2.0 else "")
        problems.add(i, "event", f"{value!r} is not an event code: 1 = event (death) observed, 0 = censored "
                                 f"(accepted spellings, any case: {accepted}){hint}")
    return pd.Series(out, index=df.index, dtype=float)


def _check_time_unit(values: pd.Series, problems: _Problems) -> None:
    """One problem when the follow-up times look like days or months rather than years."""
    known = values.dropna()
    if known.empty or float(known.median()) <= MAX_TIME_YEARS:
        return
    median, high = float(known.median()), float(known.max())
    if median > 400:
        unit = "days: divide by 365.25"
    else:
        unit = "months (divide by 12) or days (divide by 365.25)"
    problems.add(None, "time", f"the values look like {unit} (median {median:g}, max {high:g}); 'time' is the "
                               f"follow-up in years (a data_manifest YAML source converts with "
                               f"'scale: {{time: 0.0027378507871321013}}' for days)")


def _check_group(df: pd.DataFrame, col: str) -> pd.Series:
    """Patient ids as stripped text; a number exported as ``"1001.0"`` reads ``"1001"``; empty -> NaN."""
    out: list[Any] = []
    for value in df[col].tolist():
        if is_missing(value):
            out.append(np.nan)
            continue
        text = str(value).strip()
        out.append(text[:-2] if re.fullmatch(r"-?\d+\.0", text) else text)
    return pd.Series(out, index=df.index, dtype=object)


def close_match(name: str, choices, cutoff: float = 0.6) -> str | None:
    """The one of ``choices`` closest to ``name``, for a "did you mean" hint; ``None`` when none is close.

    A choice equal to ``name`` once case and every character but letters and digits are dropped
    (``FEV1_pp`` and ``FEV1pp``) wins; else ``difflib``'s closest with a similarity ratio of at
    least ``cutoff``, ignoring case.
    """
    def norm(text: str) -> str:
        return re.sub(r"[^0-9a-z]", "", text.lower())

    for choice in choices:
        if norm(choice) == norm(name):
            return choice
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[found[0]] if found else None


def _match_columns(columns: list[str], problems: _Problems) -> dict[str, str]:
    """Renames ``{table column: standard column}`` of the columns equal to a standard one but for case.

    A column that matches a standard one already present, or two columns that match the same
    standard one, are problems; a column that is merely close to a standard name gets a note.
    """
    standard = {c.lower(): c for c in STANDARD_COLUMNS}
    matches: dict[str, list[str]] = defaultdict(list)
    for col in columns:
        if col not in STANDARD_COLUMNS and col.lower() in standard:
            matches[standard[col.lower()]].append(col)
    rename = {}
    for target, found in matches.items():
        if target in columns:
            problems.add(None, found[0], f"differs from the standard column {target!r} only in case, and the table "
                                         f"has {target!r} too: drop or rename one")
        elif len(found) > 1:
            problems.add(None, target, f"columns {found} all read as {target!r} (names are matched ignoring "
                                       "case): keep one")
        else:
            rename[found[0]] = target
            problems.notes.append(f"column {found[0]!r} read as {target!r} (names are matched ignoring case)")
    for col in columns:
        if col in STANDARD_COLUMNS or col in rename or col.lower() in standard:
            continue
        close = close_match(col, [c for c in STANDARD_COLUMNS if c not in columns and c not in rename.values()], 0.85)
        if close is not None:
            problems.notes.append(f"column {col!r} is not a standard column and is kept as an extra one; "
                                  f"did you mean {close!r}? (rename it to use it as that label)")
    return rename


def _missing_hint(required: str, columns: list[str]) -> str:
    """`` (did you mean 'X'?)`` for a missing required column, from known synonyms or a close name."""
    for col in columns:
        if col.lower() in _SYNONYMS.get(required, ()):
            return f"; did you mean {col!r}? rename it to {required!r}"
    close = close_match(required, columns, 0.6)
    return f"; did you mean {close!r}? rename it to {required!r}" if close else ""


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
            ``sid`` and ``image`` columns (any case: ``SID`` is read as ``sid``). Notes of
            :func:`read_table` in ``df.attrs["manifest_notes"]`` are carried on.
        base: folder that relative paths are resolved against.
        source: the file named in error messages (the manifest or the YAML source file).
        table: the subject table read (named too when it differs from ``source``).
        check_files: reject rows whose files do not exist.

    Returns:
        One row per subject with every column of :data:`STANDARD_COLUMNS` (absent ones NaN;
        paths absolute str, numbers float64, ``sex`` ``"M"``/``"F"``, ``split``
        ``"train"``/``"val"``/``"test"``, ``event`` 0.0/1.0, ``group`` str), followed by any
        extra columns of ``df``. ``attrs["manifest_notes"]``: what was adapted (also issued,
        together, as one :class:`ManifestWarning`).

    Raises:
        ManifestError: a required column is missing (with a hint naming a close column) or
            duplicated, two columns differ only in case, a referenced file does not exist (with
            ``check_files``), a sid is empty, duplicated or not a file name, a label cannot be
            parsed or is out of range, ``event`` is not a known spelling (the accepted ones are
            listed), ``time`` looks like days or months; every problem is listed with its row and
            column (all of them in the error's ``problems``).
    """
    problems = _Problems(source, table, notes=df.attrs.get("manifest_notes", []))
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    dup_cols = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup_cols:
        for c in dup_cols:
            problems.add(None, c, "appears more than once in the header (after column mapping)")
        problems.raise_if_any()
    df = df.rename(columns=_match_columns(list(df.columns), problems))
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        for c in missing:
            problems.add(None, c, f"required column is missing (columns found: {list(df.columns)})"
                                  + _missing_hint(c, list(df.columns)))
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
        if col not in df.columns:
            out[col] = np.nan
        elif col == "event":
            out[col] = _check_event(df, problems)
        else:
            out[col] = _check_numeric(df, col, bounds, problems)
    if "time" in df.columns:
        _check_time_unit(out["time"], problems)
    out["sex"] = _check_categorical(df, "sex", _SEX, problems) if "sex" in df.columns else np.nan
    out["split"] = _check_categorical(df, "split", _SPLIT, problems) if "split" in df.columns else np.nan
    out[GROUP_COLUMN] = (_check_group(df, GROUP_COLUMN) if GROUP_COLUMN in df.columns
                         else pd.Series(np.nan, index=df.index, dtype=object))

    problems.raise_if_any()
    extra = [c for c in df.columns if c not in out.columns]
    for c in extra:
        out[c] = df[c]
    out = out.reset_index(drop=True)
    out.attrs["manifest_notes"] = list(problems.notes)
    if problems.notes:
        warnings.warn(f"{source}: " + "; ".join(problems.notes), ManifestWarning, stacklevel=3)
    return out
