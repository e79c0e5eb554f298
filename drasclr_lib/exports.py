"""Embeddings as tables other tools read: subject-level CSV / Parquet with the manifest's labels,
and patch-level Parquet with each patch's location, atlas corner and lobe.

An :class:`~drasclr_lib.embed.EmbeddingSet` (``embeddings.npz``) is NumPy-only. These tables take
it to R (``arrow::read_parquet``, ``readr::read_csv``), pandas, Stata or a spreadsheet:

* **subject level** (:func:`subject_table`): one row per subject, ``sid``, the subject's label
  columns from the store's ``subjects.csv`` (see :func:`label_columns`), then the pooled embedding
  (:func:`~drasclr_lib.embed.pool_subjects`): ``h_0 .. h_{D-1}`` for ``pool="mean"``,
  ``h_mean_0 .. h_mean_{D-1}, h_max_0 .. h_max_{D-1}`` for ``pool="meanmax"``, pooled over the
  subject's valid patches (invalid ones, mostly outside the scan, are NaN in ``h`` and skipped).
* **patch level** (:func:`patch_table_long`): one row per (subject, location), subject-major:
  ``sid``, ``location`` (index 0 .. L-1 into the atlas locations), ``corner_i, corner_j, corner_k``
  (the location's atlas voxel corner), ``lobe`` (majority lobe 1-5, 0 unknown), ``lung_fraction``,
  ``laa950`` (%, NaN at invalid patches), ``emph_fraction`` (NaN unknown), ``fov_fraction`` (share
  of the patch inside the scanned volume; all from
  :func:`~drasclr_lib.data.patch_store.patch_table`), then ``h_0 .. h_{D-1}`` (NaN at invalid
  patches). Join it to the
  subject table on ``sid`` for the labels.

:func:`export_embeddings` writes either one atomically, as CSV (``.csv``, ``.csv.gz``) or Parquet
(``.parquet``, ``.pq``; the export's facts and ``EmbeddingSet.meta`` are kept in the file's
schema metadata under the key ``drasclr``), or the ``EmbeddingSet`` itself as ``.npz``. The
``drasclr embed --format csv|parquet|npz --level subject|patch`` command calls it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from drasclr_lib.data.manifest import PATH_COLUMNS, close_match
from drasclr_lib.embed import EmbeddingSet, pool_subjects
from drasclr_lib.utils import atomic_path

__all__ = ["QC_COLUMNS", "FORMATS", "export_format", "label_columns", "subject_table", "patch_table_long",
           "export_embeddings"]

#: Columns of ``subjects.csv`` that preprocessing wrote about the scan (quality control), not the
#: manifest: kept out of the label columns unless ``qc=True``.
QC_COLUMNS = ("lung_volume_l", "laa950", "reg_dice", "mask_dice", "mask_source", "qc_pass", "qc_reasons",
              "fov_lung_coverage", "mean_patch_inside")
#: Columns never exported as labels: the id (exported first anyway), the store's bookkeeping and
#: file paths (machine-specific, and a path can carry a patient's name).
_NEVER = ("sid", "num_locations", *PATH_COLUMNS)
_STAGE_TIME = re.compile(r"^time_.+_s$")  # per-stage seconds (time_register_s); not `time` (survival)
FORMATS = ("csv", "parquet", "npz")
_SUFFIXES = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
_PATCH_FACTS = ("lobe", "lung_fraction", "laa950", "emph_fraction", "fov_fraction")


def label_columns(table: pd.DataFrame, *, qc: bool = False) -> list[str]:
    """The label columns of a store's subject table (``PatchStore.table``, i.e. ``subjects.csv``).

    ``subjects.csv`` joins what preprocessing recorded per scan to the manifest's columns. The
    label columns are the manifest's: the standard labels (``FEV1pp``, ``GOLD``, ``age``,
    ``sex``, ``time``, ``event``, ``split`` ...) and any extra column the manifest had (a
    ``group`` / patient id, your own outcomes). Left out: ``sid`` (exported first anyway),
    ``num_locations``, the file paths (``image``, ``lung_mask``, ``label_map``, ``lobe_map``), the
    per-stage timings ``time_<stage>_s`` and, unless ``qc=True``, the QC columns
    :data:`QC_COLUMNS` (lung volume, LAA-950, registration Dice, ``qc_pass`` ...).

    Args:
        table: the subject table.
        qc: also return the QC columns present.

    Returns:
        Column names, in the table's order.
    """
    skip = set(_NEVER) | (set() if qc else set(QC_COLUMNS))
    return [str(c) for c in table.columns if str(c) not in skip and not _STAGE_TIME.match(str(c))]


# -- checks -----------------------------------------------------------------------------------
def _as_embeddings(emb) -> EmbeddingSet:
    if isinstance(emb, EmbeddingSet):
        return emb
    if isinstance(emb, (str, os.PathLike)):
        return EmbeddingSet.load(emb)
    raise TypeError(f"expected an EmbeddingSet or the path of an embeddings .npz, got {type(emb).__name__}")


def _as_store(store):
    if store is None:
        return None
    from drasclr_lib.data.patch_store import PatchStore

    return store if isinstance(store, PatchStore) else PatchStore(store)


def _check_pair(emb: EmbeddingSet, store) -> list[int]:
    """Store positions of ``emb``'s subjects, after checking the two belong together.

    Raises:
        ValueError: when the locations differ (embeddings of another store or atlas).
        KeyError: naming the embedded subjects the store does not have.
    """
    if store.num_locations != emb.num_locations or not np.array_equal(store.atlas_corners, emb.atlas_corners):
        raise ValueError(f"the embeddings ({emb.num_locations} locations, made from {emb.meta.get('store', '?')}) "
                         f"are not of the patch store {store.root} ({store.num_locations} locations): the atlas "
                         "locations differ; give the store the embeddings were made from")
    missing = [s for s in emb.sids if s not in store.table.index]
    if missing:
        raise KeyError(f"{len(missing)} embedded subject(s) are not in the patch store {store.root}: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [store.index(s) for s in emb.sids]


def _h_names(dim: int, pool: str) -> list[str]:
    if pool == "meanmax":
        return [f"h_mean_{i}" for i in range(dim)] + [f"h_max_{i}" for i in range(dim)]
    return [f"h_{i}" for i in range(dim)]


def _pick_columns(table: pd.DataFrame, columns: Sequence[str], where) -> list[str]:
    columns = [str(c) for c in columns]
    have = [str(c) for c in table.columns]
    bad = []
    for c in columns:
        if c not in have:
            close = close_match(c, have)
            bad.append(f"{c!r}" + (f" (did you mean {close!r}?)" if close else ""))
    if bad:
        raise KeyError(f"column(s) {', '.join(bad)} are not in the subject table of {where} "
                       f"(it has: {', '.join(have)})")
    return columns


# -- tables -----------------------------------------------------------------------------------
def subject_table(emb, store=None, *, pool: str = "mean", columns: Sequence[str] | None = None,
                  qc: bool = False) -> pd.DataFrame:
    """One row per embedded subject: ``sid``, label columns, pooled embedding.

    Rows follow ``emb.sids``; labels are looked up by ``sid`` (not by position), so embeddings of
    a subset of the store, or in another order, get their own subjects' labels.

    Args:
        emb: an :class:`~drasclr_lib.embed.EmbeddingSet` ``h (N, L, D)`` (or the path of its ``.npz``).
        store: the ``PatchStore`` (or its path) the embeddings were made from, for the labels;
            ``None`` gives ``sid`` and the embedding only.
        pool: ``"mean"`` (D columns ``h_<i>``) or ``"meanmax"`` (2D columns ``h_mean_<i>``,
            ``h_max_<i>``), see :func:`~drasclr_lib.embed.pool_subjects`.
        columns: the subject-table columns to export; default :func:`label_columns` of the store's
            table.
        qc: with the default columns, also export the QC columns (:data:`QC_COLUMNS`).

    Returns:
        DataFrame with N rows: ``sid`` (str), the label columns (their dtypes from
        ``subjects.csv``), then the embedding columns (float32).

    Raises:
        ValueError: for an unknown ``pool``, a store of other locations, or a label column named
            like an embedding column.
        KeyError: naming embedded subjects missing from the store, or asked columns it lacks.
    """
    emb, store = _as_embeddings(emb), _as_store(store)
    pooled = pool_subjects(emb.h, pool)  # validates `pool`
    out = pd.DataFrame({"sid": pd.Series(emb.sids, dtype=object)})
    h_cols = _h_names(emb.dim, pool)
    if store is not None:
        _check_pair(emb, store)
        table = store.table
        cols = label_columns(table, qc=qc) if columns is None else _pick_columns(table, columns, store.root)
        cols = [c for c in cols if c != "sid"]
        clash = sorted(set(cols) & set(h_cols))
        if clash:
            raise ValueError(f"label column(s) {clash} of {store.root} have the names of embedding columns; "
                             "rename them in the manifest or pass columns=[...] without them")
        labels = table.loc[emb.sids, cols].reset_index(drop=True)
        out = pd.concat([out, labels], axis=1)
    emb_df = pd.DataFrame(pooled.astype(np.float32), columns=h_cols)
    return pd.concat([out, emb_df], axis=1)


def patch_table_long(emb, store=None, *, subjects: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (subject, location), subject-major: where the patch is, and its embedding.

    Args:
        emb: an :class:`~drasclr_lib.embed.EmbeddingSet` ``h (N, L, D)`` (or the path of its ``.npz``).
        store: the ``PatchStore`` (or its path) the embeddings were made from, for the per-patch
            facts; ``None`` gives ``lobe`` 0 and NaN facts.
        subjects: optional rows of ``emb`` (positions 0 .. N-1) to include; default all.

    Returns:
        DataFrame with ``len(subjects) * L`` rows: ``sid`` (str), ``location`` (int64, 0 .. L-1),
        ``corner_i, corner_j, corner_k`` (int64 atlas voxel corner), ``lobe`` (int64, 1-5, 0
        unknown), ``lung_fraction``, ``laa950`` (%, NaN at invalid patches), ``emph_fraction``,
        ``fov_fraction`` (float64, NaN unknown), ``h_0 .. h_{D-1}`` (float32, NaN at invalid
        patches).

    Raises:
        ValueError: for a store of other locations.
        KeyError: naming embedded subjects missing from the store.
        IndexError: for a row outside ``0 .. N-1``.
    """
    emb, store = _as_embeddings(emb), _as_store(store)
    rows = list(range(emb.num_subjects)) if subjects is None else [int(s) for s in subjects]
    bad = [r for r in rows if not 0 <= r < emb.num_subjects]
    if bad:
        raise IndexError(f"subject rows {bad[:5]} are outside 0..{emb.num_subjects - 1}")
    n, L, D = len(rows), emb.num_locations, emb.dim
    facts = {"lobe": np.zeros((n, L), np.int64), **{k: np.full((n, L), np.nan) for k in _PATCH_FACTS[1:]}}
    if store is not None:
        from drasclr_lib.data.patch_store import patch_table

        positions = _check_pair(emb, store)
        table = patch_table(store, subjects=[positions[r] for r in rows])
        facts = {k: np.asarray(table[k], dtype=np.int64 if k == "lobe" else np.float64) for k in _PATCH_FACTS}
    corners = emb.atlas_corners
    out = pd.DataFrame({
        "sid": pd.Series(np.repeat(np.asarray(emb.sids, dtype=object)[rows], L), dtype=object),
        "location": np.tile(np.arange(L, dtype=np.int64), n),
        "corner_i": np.tile(corners[:, 0], n), "corner_j": np.tile(corners[:, 1], n),
        "corner_k": np.tile(corners[:, 2], n),
        **{k: facts[k].reshape(-1) for k in _PATCH_FACTS},
    })
    h = pd.DataFrame(emb.h[rows].reshape(n * L, D), columns=_h_names(D, "mean"))
    return pd.concat([out, h], axis=1)


# -- files ------------------------------------------------------------------------------------
def export_format(path: str | os.PathLike, format: str | None = None, *, default: str | None = None) -> str:
    """The format of an export file: ``format`` when given, else the one its suffix names.

    Args:
        path: the output file (``.csv``/``.csv.gz``, ``.parquet``/``.pq``, ``.npz``).
        format: ``"csv"``, ``"parquet"``, ``"npz"`` or ``None`` (from the suffix).
        default: the format of a suffix that names none (``None``: raise).

    Raises:
        ValueError: for an unknown format, a suffix of another format than ``format`` (writing CSV
            into ``x.npz`` is a mistake), or an unknown suffix without ``format`` or ``default``.
    """
    path = Path(path)
    name = path.name.lower()
    by_suffix = next((f for s, f in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])) if name.endswith(s)), None)
    if format is None:
        if by_suffix is None and default is None:
            raise ValueError(f"cannot tell the format of {path} from its suffix; give a format among {FORMATS} "
                             f"or a suffix among {sorted(_SUFFIXES)}")
        return by_suffix or default
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {FORMATS}")
    if by_suffix is not None and by_suffix != format:
        raise ValueError(f"{path} has the suffix of a {by_suffix} file but the format {format!r} was asked; "
                         "make them agree")
    return format


def _parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency of the package
        raise ImportError("Parquet export needs pyarrow: pip install 'pyarrow>=14' (or use format='csv')") from None
    return pa, pq


def _arrow(df: pd.DataFrame, facts: dict):
    pa, _ = _parquet()
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"drasclr"] = json.dumps(facts).encode()
    return table.replace_schema_metadata(meta)


def _dictionary_columns(table) -> list[str]:
    """Columns worth dictionary encoding: all but the embedding values, which never repeat (trying
    a dictionary on them first made patch files a third larger)."""
    return [name for name in table.column_names if not re.match(r"^h_(mean_|max_)?\d+$", name)]


def export_embeddings(emb, store, path: str | os.PathLike, *, level: str | None = None, format: str | None = None,
                      pool: str = "mean", columns: Sequence[str] | None = None, qc: bool = False,
                      chunk_subjects: int = 256) -> Path:
    """Write embeddings as a table (CSV / Parquet) or as the ``EmbeddingSet`` file (npz), atomically.

    Args:
        emb: an :class:`~drasclr_lib.embed.EmbeddingSet` (or the path of its ``.npz``).
        store: the ``PatchStore`` (or its path) the embeddings were made from, or ``None`` (no
            labels, no patch facts).
        path: output file; its suffix gives the format when ``format`` is ``None``
            (``.csv``/``.csv.gz``, ``.parquet``/``.pq``, ``.npz``).
        level: ``"subject"`` (:func:`subject_table`) or ``"patch"`` (:func:`patch_table_long`);
            default ``"subject"`` for CSV/Parquet and ``"patch"`` for npz, which always holds
            every patch (``EmbeddingSet.save``, the file notebooks 04-05 read).
        format: ``"csv"``, ``"parquet"`` or ``"npz"``; default from the suffix.
        pool, columns, qc: the subject table's pooling and label columns (see :func:`subject_table`).
        chunk_subjects: patch-level Parquet is written this many subjects per row group, so a
            large cohort (9,000 subjects x 581 locations) never sits in memory as one table.

    Returns:
        ``path``.

    Raises:
        ValueError: for an unknown or contradictory format / level, or a store of other locations.
        KeyError: naming embedded subjects missing from the store.
    """
    path = Path(path)
    emb = _as_embeddings(emb)
    fmt = export_format(path, format)
    level = level or ("patch" if fmt == "npz" else "subject")
    if level not in ("subject", "patch"):
        raise ValueError(f"unknown level {level!r}; use 'subject' or 'patch'")
    if fmt == "npz":
        if level != "patch":
            raise ValueError("an npz export is the EmbeddingSet itself (every patch); write the subject level "
                             "as csv or parquet")
        return emb.save(path)
    store = _as_store(store)
    facts = {"level": level, "pool": pool if level == "subject" else None, "dim": emb.dim,
             "num_subjects": emb.num_subjects, "num_locations": emb.num_locations, "embedding_meta": emb.meta}
    if level == "subject":
        df = subject_table(emb, store, pool=pool, columns=columns, qc=qc)
        with atomic_path(path) as tmp:
            if fmt == "csv":
                df.to_csv(tmp, index=False)
            else:
                table = _arrow(df, facts)
                _parquet()[1].write_table(table, tmp, use_dictionary=_dictionary_columns(table))
        return path
    if chunk_subjects < 1:
        raise ValueError(f"chunk_subjects must be positive, got {chunk_subjects}")
    chunks = [range(i, min(i + chunk_subjects, emb.num_subjects))
              for i in range(0, emb.num_subjects, chunk_subjects)] or [range(0)]
    with atomic_path(path) as tmp:
        if fmt == "csv":
            for i, rows in enumerate(chunks):
                patch_table_long(emb, store, subjects=rows).to_csv(tmp, index=False, mode="w" if i == 0 else "a",
                                                                   header=i == 0)
        else:
            _, pq = _parquet()
            writer = None
            try:
                for rows in chunks:
                    table = _arrow(patch_table_long(emb, store, subjects=rows), facts)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=_dictionary_columns(table))
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
    return path
