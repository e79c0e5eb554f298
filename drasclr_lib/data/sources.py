"""Data sources: from a notebook's ``DATA_MANIFEST`` to the standard subject table.

A source is named (``"synthetic"``, ``"lung-pet-ct-dx"``, or a YAML file of ``data_manifest/``
such as ``"copdgene"``) or given as a file: a CSV/TSV subject table, or a YAML *source file* that
points at a table (paths may use ``${ENV_VAR}``) and maps its column names, codes and units to
ours. :func:`resolve_manifest` turns the name into a file; :func:`read_manifest` reads that file
and validates it into the standard form of :mod:`drasclr_lib.data.manifest`.

The YAML format is documented in ``data_manifest/README.md``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from drasclr_lib.data.manifest import (ManifestError, close_match, is_missing, parse_number, read_table,
                                      validate_manifest)

__all__ = [
    "read_manifest",
    "resolve_manifest",
    "load_source",
    "expand_env",
    "manifest_dir",
]

_YAML_SUFFIXES = (".yaml", ".yml")
#: The manifest a folder given as ``DATA_MANIFEST`` stands for (a cohort folder of ``make_cohort``).
_FOLDER_MANIFESTS = ("manifest.csv", "manifest.tsv")

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
    """The folder of data-source YAML files (``data_manifest/``, one file per data source).

    In a clone it is the top-level ``data_manifest/`` folder; an installed wheel carries the same
    files as package data, ``drasclr_lib/data_manifest/`` (``pyproject.toml`` maps the folder to
    that package), found here through :mod:`importlib.resources`, so ``resolve_manifest("copdgene")``
    works after ``pip install`` too (Colab).

    Returns:
        The folder (it may be missing only in a broken installation).
    """
    from importlib import resources

    packaged = resources.files("drasclr_lib") / "data_manifest"  # a wheel (or a regular install)
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "data_manifest"  # the clone (editable install, PYTHONPATH)


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
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
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
        return repr(parse_number(value) * factor)
    except (TypeError, ValueError):
        return value


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _match_case(mapping: dict[str, str], df: pd.DataFrame) -> dict[str, str]:
    """``mapping`` with each source column a table lacks replaced by the one table column equal to it
    but for case (a YAML source written for ``FEV1pp_utah`` reads a table saying ``fev1pp_utah``)."""
    lowered: dict[str, list[str]] = {}
    for col in df.columns:
        lowered.setdefault(col.lower(), []).append(col)
    out = {}
    for src, dst in mapping.items():
        found = lowered.get(src.lower(), [])
        out[found[0] if src not in df.columns and len(found) == 1 else src] = dst
    return out


def _read_source(path: Path, check_files: bool = True) -> pd.DataFrame:
    """The subject table a YAML source file points at, mapped to our columns and validated."""
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

    df = read_table(table)
    df.columns = [str(c).strip() for c in df.columns]
    columns: dict[str, str] = {str(k): str(v) for k, v in (spec.get("columns") or {}).items()}
    optional = {str(k): str(v) for k, v in (spec.get("optional_columns") or {}).items()}
    columns, optional = _match_case(columns, df), _match_case(optional, df)
    absent = [src for src in columns if src not in df.columns and columns[src] not in df.columns]
    if absent:
        hints = [f"{src!r} (did you mean {c!r}?)" if (c := close_match(src, list(df.columns), 0.6)) else repr(src)
                 for src in absent]
        raise ManifestError(f"{context}: columns {', '.join(hints)} named in 'columns' are not in {table} "
                            f"(found {list(df.columns)})")
    # optional_columns: same mapping, silently skipped when the table lacks them
    columns.update({k: v for k, v in optional.items() if k in df.columns})
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
                values.append(template.format(**{k: ("" if is_missing(v) else str(v).strip()) for k, v in row.items()}))
            except (KeyError, IndexError, ValueError) as err:
                raise ManifestError(f"{context}: row {i + 1} (line {i + 2}), column {col!r}: cannot fill "
                                    f"template {template!r}: {err!r}") from err
        df[col] = values
    return validate_manifest(df, base=base, source=str(path), table=table, check_files=check_files)


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV (or a YAML data-source file) into the standard form.

    Args:
        path: a ``.csv``/``.tsv`` table with at least ``sid`` and ``image`` columns, or a
            ``.yaml``/``.yml`` data-source file (see ``data_manifest/README.md``).
        check_files: reject rows whose files do not exist (default). ``False`` keeps them, with
            their absolute paths, for a runner that reports each missing file against its subject
            (``preprocess_cohort`` lists them in ``failures.csv``) instead of rejecting the cohort.

    Returns:
        One row per subject with every column of
        :data:`~drasclr_lib.data.manifest.STANDARD_COLUMNS` (absent ones NaN;
        paths absolute str, numbers float64, ``sex`` ``"M"``/``"F"``, ``split``
        ``"train"``/``"val"``/``"test"``), followed by any extra columns of the table.

    Raises:
        ManifestError: a required column is missing, a referenced file does not exist (with
            ``check_files``), a sid is empty or duplicated, a label cannot be parsed or is out of range, or (YAML) the
            table or an environment variable is not available; the message names the row
            (1-based data row, file line, sid) and the column of each problem.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ManifestError(f"manifest not found: {path}" + ("" if path.is_absolute() else
                            f" (relative to the working directory {Path.cwd()}: {Path.cwd() / path})"))
    if path.is_dir():
        raise ManifestError(f"{path} is a folder; give the manifest file inside it (a .csv/.tsv table or a "
                            f".yaml data-source file)")
    if path.suffix.lower() in _YAML_SUFFIXES:
        return _read_source(path.resolve(), check_files=check_files)
    df = read_table(path)
    return validate_manifest(df, base=path.resolve().parent, source=str(path), table=path, check_files=check_files)


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
            scan, fetched when missing), a path to a ``.csv``/``.tsv``/``.yaml``/``.yml`` file
            (a relative one is relative to the working directory), a folder holding a
            ``manifest.csv``, or the name of a source in ``data_manifest/`` (``"copdgene"``,
            ``"luna16"`` ..., any case, ``-`` or ``_``, with or without ``.yaml``).
        out_root: root of the output folder for the synthetic cohort (default ``$DRASCLR_OUT``).
        cache_dir: cache folder for the real scan (default, see
            :func:`drasclr_lib.data.real.default_cache_dir`).
        make_synthetic: ``out_dir -> manifest path``; default calls
            ``drasclr_lib.data.synthetic.make_cohort(out_dir)``.

    Returns:
        The manifest's absolute path (for a source name, the YAML file; read it with
        :func:`read_manifest`).

    Raises:
        ManifestError: the path does not exist or the name is unknown; the message lists every
            file tried (absolute) and the known source names, with the closest one.
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
    tried: list[str] = []
    where = Path(os.path.abspath(path))  # relative: from the working directory (shown normalised)
    tried.append(str(where) if path.is_absolute() else f"{where} (relative to the working directory)")
    if where.is_file():
        return where.resolve()
    if where.is_dir():
        for name in _FOLDER_MANIFESTS:
            if (where / name).is_file():
                return (where / name).resolve()
        tried.append(f"{where / _FOLDER_MANIFESTS[0]} (the folder's manifest)")
    folder = manifest_dir()
    known = ["synthetic", "lung-pet-ct-dx"]
    if folder.is_dir():
        known += sorted(p.stem for p in folder.glob("*.y*ml") if p.stem not in {"synthetic", "lung_pet_ct_dx"})
    is_name = len(path.parts) == 1 and path.suffix.lower() in ("",) + _YAML_SUFFIXES
    if is_name:
        stem = key[: -len(path.suffix)] if path.suffix else key
        for candidate in dict.fromkeys((stem, stem.replace("-", "_"))):
            for suffix in _YAML_SUFFIXES:
                source = folder / f"{candidate}{suffix}"
                if source.is_file():
                    return source.resolve()
                tried.append(f"{source} (data source {candidate!r})")
    close = close_match(text, known, 0.6) if is_name else None
    what = f"unknown data manifest {text!r}: not a file, and not a source name" if is_name \
        else f"manifest not found: {text!r}"
    raise ManifestError(f"{what}; tried:\n  " + "\n  ".join(tried)
                        + f"\nknown source names: {known}" + (f" (did you mean {close!r}?)" if close else ""))
