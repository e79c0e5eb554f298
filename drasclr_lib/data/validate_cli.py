"""``drasclr validate MANIFEST``: the manifest checks alone, every problem listed.

Runs exactly what every pipeline step runs on a manifest
(:func:`drasclr_lib.data.sources.read_manifest` and its validation in
:mod:`drasclr_lib.data.manifest`), without touching an image, and prints either a short summary
of the subjects and their labels or every problem found (row, line, sid and column of each).

Exit codes: ``0`` the manifest is valid; ``1`` it was read but has problems (all listed); ``2`` it
cannot be read at all (not found, a folder, not a table / not YAML).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pandas as pd

from drasclr_lib.data.manifest import (NUMERIC_COLUMNS, PATH_COLUMNS, STANDARD_COLUMNS, ManifestError,
                                      ManifestWarning, read_table)
from drasclr_lib.data.sources import read_manifest, resolve_manifest

__all__ = ["cli_main", "locate", "summary", "Unreadable", "EXIT_VALID", "EXIT_PROBLEMS", "EXIT_UNREADABLE"]

EXIT_VALID, EXIT_PROBLEMS, EXIT_UNREADABLE = 0, 1, 2

#: Names that :func:`resolve_manifest` would generate or download rather than read.
_GENERATED = {"synthetic", "lung-pet-ct-dx"}
_YAML_SUFFIXES = (".yaml", ".yml")


class Unreadable(Exception):
    """The manifest cannot be read at all (exit code 2); the message says why."""


def locate(name: str | os.PathLike) -> Path:
    """The manifest file ``name`` stands for (:func:`resolve_manifest`): a path (a relative one is taken
    from the working directory), a cohort folder holding ``manifest.csv``, or the name of a
    ``data_manifest/`` source (``copdgene``). ``synthetic`` and ``lung-pet-ct-dx`` are refused: the
    toolkit writes those itself, and resolving them would generate or download data.

    Raises:
        Unreadable: when there is no such file or source (the message lists what was tried).
    """
    text = str(name).strip()
    if text.lower().replace("_", "-") in _GENERATED and not Path(text).expanduser().exists():
        raise Unreadable(f"{text!r} is written by the toolkit itself (drasclr synth / drasclr fetch-real); validate "
                         "the manifest.csv they write instead")
    try:
        return resolve_manifest(text)
    except ManifestError as err:
        raise Unreadable(str(err)) from None


def _check_readable(path: Path) -> None:
    """Raise :class:`Unreadable` when ``path`` is not a table (CSV/TSV) or not YAML at all."""
    if path.suffix.lower() in _YAML_SUFFIXES:
        import yaml

        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise Unreadable(f"{path}: not a readable YAML file: {err}") from None
        return
    try:
        read_table(path)
    except ManifestError as err:
        raise Unreadable(str(err)) from None


def summary(df: pd.DataFrame) -> list[str]:
    """Lines describing a validated manifest: subjects, label columns filled, splits, extra columns."""
    lines = [f"{len(df)} subjects"]
    filled = [f"{c} {int(df[c].notna().sum())}/{len(df)}" for c in (*dict(NUMERIC_COLUMNS), "sex", "split")
              if c in df.columns and df[c].notna().any()]
    lines.append("labels: " + (", ".join(filled) if filled else "none (only images)"))
    files = [f"{c} {int(df[c].notna().sum())}/{len(df)}" for c in PATH_COLUMNS[1:]
             if c in df.columns and df[c].notna().any()]
    if files:
        lines.append("maps: " + ", ".join(files))
    if "split" in df.columns and df["split"].notna().any():
        counts = df["split"].value_counts()
        lines.append("split: " + ", ".join(f"{k} {int(counts[k])}" for k in ("train", "val", "test") if k in counts))
    if "group" in df.columns and df["group"].notna().any():
        sizes = df["group"].fillna(df["sid"]).value_counts()
        lines.append(f"group: {len(sizes)} patient(s), {int((sizes > 1).sum())} with more than one scan")
    extra = [c for c in df.columns if c not in STANDARD_COLUMNS]
    if extra:
        lines.append("other columns (kept as they are): " + ", ".join(map(str, extra)))
    return lines


def _print_notes(notes) -> None:
    """What was adapted while reading (a renamed column, a detected separator): worth a look."""
    if notes:
        print("  notes (adapted while reading):")
        for note in notes:
            print(f"    {note}")


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr validate MANIFEST [--no-check-files]``; returns 0 valid, 1 problems, 2 unreadable."""
    from drasclr_lib.cli_help import command_parser

    p = command_parser(
        "drasclr validate",
        "Check a manifest (the subject table every step reads) without touching an image: the columns,\n"
        "every sid, path and label value. Prints a summary when it is valid, else every problem with\n"
        "its row, file line, sid and column. The format is in docs/ARCHITECTURE.md (Manifest) and\n"
        "data_manifest/README.md (YAML source files).",
        [("check a cohort table, image files included", "drasclr validate my_cohort.csv"),
         ("check the table only, on a machine without the scans", "drasclr validate my_cohort.csv --no-check-files"),
         ("check a data source of data_manifest/ (needs its environment variables)", "drasclr validate copdgene")],
        note="exit status: 0 valid, 1 problems found (all listed), 2 the file cannot be read.")
    p.add_argument("manifest", metavar="MANIFEST",
                   help="a CSV/TSV subject table, a YAML data-source file, or the name of a data_manifest/ source; "
                        "a relative path is taken from the working directory")
    p.add_argument("--no-check-files", action="store_true",
                   help="do not check that the image and map files exist (the columns and values are still checked)")
    args = p.parse_args(argv)
    try:
        path = locate(args.manifest)
        _check_readable(path)
    except Unreadable as err:
        print(f"drasclr validate: cannot read the manifest: {err}", file=sys.stderr)
        return EXIT_UNREADABLE
    with warnings.catch_warnings(record=True) as caught:  # the notes are printed below, once
        warnings.simplefilter("always", ManifestWarning)
        try:
            df = read_manifest(path, check_files=not args.no_check_files)
        except ManifestError as err:
            problems = err.problems
            print(f"{path}: {len(problems)} problem(s)")
            for line in problems:
                print(f"  {line}")
            _print_notes(err.notes)
            hint = "" if args.no_check_files or not any("not found" in p for p in problems) else \
                " (--no-check-files skips the file checks)"
            print(f"drasclr validate: {path} is not a valid manifest{hint}", file=sys.stderr)
            return EXIT_PROBLEMS
    print(f"{path}: valid manifest" + ("" if not args.no_check_files else " (files not checked)"))
    for line in summary(df):
        print(f"  {line}")
    _print_notes(df.attrs.get("manifest_notes") or [str(w.message) for w in caught
                                                    if issubclass(w.category, ManifestWarning)])
    return EXIT_VALID


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
