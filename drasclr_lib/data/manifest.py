"""Subject manifests: one table per data source, validated into one standard form.

A manifest is a CSV with one row per subject, or a YAML *source file* (``data_manifest/*.yaml``)
that points at such a table and maps its column names to ours. :func:`read_manifest` returns
the standard form every notebook reads:

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
columns are kept unchanged after the standard ones. Relative paths are resolved against the
manifest's folder (or the YAML file's ``root``). Any problem raises :class:`ManifestError`
naming the row (1-based data row, file line and sid) and the column; all problems found are
listed, not only the first.

The YAML format is documented in ``data_manifest/README.md``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

__all__ = [
    "ManifestError",
    "read_manifest",
    "resolve_manifest",
    "load_source",
    "expand_env",
    "manifest_dir",
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
_YAML_SUFFIXES = (".yaml", ".yml")
_MAX_LISTED = 20


class ManifestError(ValueError):
    """A manifest or data-source file that cannot be used; the message says where and why."""


# --------------------------------------------------------------------------------------------
# environment variables and source files
# --------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, *, context: str = "", how_to_obtain: str = "") -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in ``text``, then a leading ``~``.

    Args:
        text: a path template such as ``"${COPDGENE_ROOT}/subjects.csv"``.
        context: where the template comes from, for the error message.
        how_to_obtain: appended to the error so the reader knows how to get the data.

    Raises:
        ManifestError: when a ``${VAR}`` without default is not set (or empty).
    """

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        msg = f"{context}: environment variable {name} is not set (needed by {text!r})"
        if how_to_obtain:
            msg += f"\nHow to obtain this data:\n{how_to_obtain.strip()}"
        raise ManifestError(msg)

    return os.path.expanduser(_ENV_RE.sub(sub, str(text)))


def manifest_dir() -> Path:
    """The ``data_manifest/`` folder of the source tree (one YAML file per data source)."""
    return Path(__file__).resolve().parents[2] / "data_manifest"


def load_source(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML data-source file and check its fields (no table is read).

    Returns:
        The YAML mapping as a dict.

    Raises:
        ManifestError: when the file is not a mapping, lacks ``name`` or has fields of the
            wrong type (``columns``, ``paths``, ``recode`` must be mappings).
    """
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ManifestError(f"{path}: cannot read data-source file: {err}") from err
    if not isinstance(spec, dict):
        raise ManifestError(f"{path}: a data-source file must be a YAML mapping, got {type(spec).__name__}")
    if not spec.get("name"):
        raise ManifestError(f"{path}: field 'name' is required")
    for key in ("columns", "optional_columns", "paths", "recode", "scale"):
        if spec.get(key) is not None and not isinstance(spec[key], dict):
            raise ManifestError(f"{path}: field {key!r} must be a mapping, got {type(spec[key]).__name__}")
    recode = spec.get("recode") or {}
    for col, mapping in recode.items():
        if not isinstance(mapping, dict):
            raise ManifestError(f"{path}: recode.{col} must be a mapping of value -> value")
    return spec


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _read_table(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    try:
        # everything as text: parsing and its errors are ours, per cell
        return pd.read_csv(path, sep=sep, dtype=str, skipinitialspace=True, comment=None)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: cannot read the subject table: {err}") from err


def _recode_value(value: Any, mapping: dict[str, Any]) -> Any:
    if not isinstance(value, str):
        return value
    key = value.strip()
    if key in mapping:
        return mapping[key]
    try:  # "1.0" in the table matches a YAML key 1
        number = float(key)
        if number.is_integer() and str(int(number)) in mapping:
            return mapping[str(int(number))]
    except ValueError:
        pass
    return value


def _scale_value(value: Any, factor: float) -> Any:
    """``value * factor`` for a parsable number; anything else is left for validation to report."""
    try:
        return repr(_parse_number(value) * factor)
    except (TypeError, ValueError):
        return value


def _is_missing(value: Any) -> bool:
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


def _parse_number(text: str) -> float:
    value = float(str(text).strip())
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _check_numeric(df: pd.DataFrame, col: str, bounds: tuple, problems: _Problems) -> pd.Series:
    low, high, integer = bounds
    out = np.full(len(df), np.nan)
    for i, value in enumerate(df[col].tolist()):
        if _is_missing(value):
            continue
        try:
            number = _parse_number(value)
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
        if _is_missing(value):
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
        if _is_missing(value):
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


def _validate(df: pd.DataFrame, *, base: Path, source: str, table: Path, check_files: bool = True) -> pd.DataFrame:
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

    sids = [("" if _is_missing(s) else str(s).strip()) for s in df["sid"].tolist()]
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


def _from_source(path: Path, check_files: bool = True) -> pd.DataFrame:
    spec = load_source(path)
    how = str(spec.get("how_to_obtain") or spec.get("obtain") or "")
    context = f"{path} (data source {spec['name']!r})"
    if not spec.get("table"):
        raise ManifestError(f"{context}: has no 'table' (a subject CSV to read)."
                            + (f"\nHow to obtain this data:\n{how.strip()}" if how else ""))
    table = Path(expand_env(spec["table"], context=context, how_to_obtain=how))
    if not table.is_absolute():
        table = path.parent / table
    if not table.exists():
        msg = f"{context}: subject table not found: {table}"
        if how:
            msg += f"\nHow to obtain this data:\n{how.strip()}"
        raise ManifestError(msg)
    if spec.get("root"):
        base = Path(expand_env(spec["root"], context=context, how_to_obtain=how))
        if not base.is_absolute():
            base = path.parent / base
        if not base.is_dir():
            raise ManifestError(f"{context}: image root folder not found: {base}"
                                + (f"\nHow to obtain this data:\n{how.strip()}" if how else ""))
    else:
        base = table.parent

    df = _read_table(table)
    df.columns = [str(c).strip() for c in df.columns]
    columns: dict[str, str] = {str(k): str(v) for k, v in (spec.get("columns") or {}).items()}
    absent = [src for src in columns if src not in df.columns and columns[src] not in df.columns]
    if absent:
        raise ManifestError(f"{context}: columns {absent} named in 'columns' are not in {table} "
                            f"(found {list(df.columns)})")
    # optional_columns: same mapping, silently skipped when the table lacks them
    columns.update({str(k): str(v) for k, v in (spec.get("optional_columns") or {}).items() if str(k) in df.columns})
    df = df.rename(columns={k: v for k, v in columns.items() if k in df.columns})
    for col, mapping in (spec.get("recode") or {}).items():
        if col in df.columns:
            mapping = {str(k): (np.nan if v is None or (isinstance(v, str) and v.lower() in {"nan", ""}) else str(v))
                       for k, v in mapping.items()}
            df[col] = df[col].map(lambda v, m=mapping: _recode_value(v, m))
    for col, factor in (spec.get("scale") or {}).items():  # unit conversion, e.g. days -> years
        if col in df.columns:
            df[col] = df[col].map(lambda v, f=float(factor): _scale_value(v, f))
    for col, template in (spec.get("paths") or {}).items():
        if col in df.columns:
            continue  # the table's own column wins
        template = str(template)
        values = []
        for i, row in enumerate(df.to_dict("records")):
            try:
                values.append(template.format(**{k: ("" if _is_missing(v) else str(v).strip()) for k, v in row.items()}))
            except (KeyError, IndexError, ValueError) as err:
                raise ManifestError(f"{context}: row {i + 1} (line {i + 2}), column {col!r}: cannot fill "
                                    f"template {template!r}: {err!r}") from err
        df[col] = values
    return _validate(df, base=base, source=str(path), table=table, check_files=check_files)


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV (or a YAML data-source file) into the standard form.

    Args:
        path: a ``.csv``/``.tsv`` table with at least ``sid`` and ``image`` columns, or a
            ``.yaml``/``.yml`` data-source file (see ``data_manifest/README.md``).
        check_files: reject rows whose files do not exist (default). ``False`` keeps them, with
            their absolute paths, for a runner that reports each missing file against its subject
            (``preprocess_cohort`` lists them in ``failures.csv``) instead of rejecting the cohort.

    Returns:
        One row per subject with every column of :data:`STANDARD_COLUMNS` (absent ones NaN;
        paths absolute str, numbers float64, ``sex`` ``"M"``/``"F"``, ``split``
        ``"train"``/``"val"``/``"test"``), followed by any extra columns of the table.

    Raises:
        ManifestError: a required column is missing, a referenced file does not exist (with
            ``check_files``), a sid is
            empty or duplicated, a label cannot be parsed or is out of range, or (YAML) the
            table or an environment variable is not available; the message names the row
            (1-based data row, file line, sid) and the column of each problem.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}")
    if path.suffix.lower() in _YAML_SUFFIXES:
        return _from_source(path.resolve(), check_files=check_files)
    df = _read_table(path)
    return _validate(df, base=path.resolve().parent, source=str(path), table=path, check_files=check_files)


# --------------------------------------------------------------------------------------------
# names -> manifest files
# --------------------------------------------------------------------------------------------


def _make_synthetic(out_dir: Path) -> Path:
    from drasclr_lib.data.synthetic import make_cohort

    return Path(make_cohort(out_dir))


def resolve_manifest(
    name_or_path: str | os.PathLike,
    out_root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    make_synthetic: Callable[[Path], Path] | None = None,
) -> Path:
    """Turn a notebook's ``DATA_MANIFEST`` parameter into a manifest file.

    Args:
        name_or_path: ``"synthetic"`` (the generated default cohort, created with
            ``make_cohort``'s defaults when missing), ``"lung-pet-ct-dx"`` (the one real offline
            scan, fetched when missing), a path to a ``.csv``/``.tsv``/``.yaml``/``.yml`` file, or
            the name of a source in ``data_manifest/`` (``"copdgene"``, ``"luna16"`` ...).
        out_root: root of the output folder for the synthetic cohort (default ``$DRASCLR_OUT``).
        cache_dir: cache folder for the real scan (default, see
            :func:`drasclr_lib.data.real.default_cache_dir`).
        make_synthetic: ``out_dir -> manifest path``; default calls
            ``drasclr_lib.data.synthetic.make_cohort(out_dir)``.

    Returns:
        The manifest's absolute path (for a source name, the YAML file; read it with
        :func:`read_manifest`).

    Raises:
        ManifestError: the path does not exist or the name is unknown (the message lists the
            known names).
    """
    from drasclr_lib.utils import output_dir

    text = str(name_or_path).strip()
    key = text.lower().replace("_", "-")
    if key == "synthetic":
        out_dir = output_dir("synthetic_cohort", root=out_root)
        manifest = out_dir / "manifest.csv"
        if not manifest.exists():
            made = Path((make_synthetic or _make_synthetic)(out_dir))
            manifest = made if made.suffix else made / "manifest.csv"
            if not manifest.exists():
                raise ManifestError(f"synthetic cohort generation did not produce {manifest}")
        return manifest.resolve()
    if key == "lung-pet-ct-dx":
        from drasclr_lib.data.real import fetch_lung_pet_ct_dx

        return Path(fetch_lung_pet_ct_dx(cache_dir)).resolve()

    path = Path(text).expanduser()
    if path.suffix.lower() in (".csv", ".tsv") + _YAML_SUFFIXES or path.exists():
        if not path.is_file():
            raise ManifestError(f"manifest not found: {path}")
        return path.resolve()
    folder = manifest_dir()
    for candidate in (key, key.replace("-", "_")):
        for suffix in _YAML_SUFFIXES:
            if (folder / f"{candidate}{suffix}").is_file():
                return (folder / f"{candidate}{suffix}").resolve()
    known = ["synthetic", "lung-pet-ct-dx"]
    if folder.is_dir():
        known += sorted(p.stem for p in folder.glob("*.y*ml") if p.stem not in {"synthetic", "lung_pet_ct_dx"})
    raise ManifestError(f"unknown data manifest {text!r}: not a file, and not one of {known}")
