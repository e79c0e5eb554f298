"""The ``drasclr qc`` command: a patch store -> its QC report (one HTML page, one PNG per subject).

Command line::

    drasclr qc outputs/patch_store                  # -> outputs/patch_store/qc_report/index.html
    drasclr qc outputs/patch_store --out qc --worst 5
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["cli_main", "main", "build_parser"]

EXAMPLES = (
    ("the report of notebook 01's store, next to it (open qc_report/index.html in a browser)",
     "drasclr qc outputs/patch_store"),
    ("into another folder, and print the five worst subjects",
     "drasclr qc outputs/patch_store --out qc_report --worst 5"),
)
NOTE = "Reasons and their thresholds: docs/input_classes.md."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``drasclr qc`` (every option with its help and default)."""
    from drasclr_lib.cli_help import command_parser

    ap = command_parser(
        "drasclr qc",
        "Write the QC report of a patch store: one HTML page listing every subject worst first\n"
        "(QC verdict, reasons, field-of-view coverage, registration Dice, lung volume, %LAA-950)\n"
        "with a PNG per subject (the CT on three planes and the patch boxes coloured by how much\n"
        "of each lies inside the scan), and the subjects that failed preprocessing.", EXAMPLES, NOTE)
    ap.add_argument("store", metavar="STORE", help="patch store folder (notebook 01 / drasclr preprocess)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="report folder for index.html and subjects/<sid>.png (default: STORE/qc_report)")
    ap.add_argument("--worst", type=int, default=0, metavar="N", help="also print the N worst subjects (0: none)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr qc STORE [--out DIR] [--worst N]``.

    Returns:
        0 when the report was written, 2 when STORE is not a patch store (the reason on stderr).
    """
    args = build_parser().parse_args(argv)

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.preprocess.checks import count_reasons
    from drasclr_lib.viz.qc_report import subject_rows, write_qc_report

    try:
        store = PatchStore(args.store)
    except (FileNotFoundError, ValueError) as err:
        print(f"drasclr qc: {err}", file=sys.stderr)
        return 2
    page = write_qc_report(store, args.out, progress=not args.no_progress)
    rows = subject_rows(store)
    counts = count_reasons(rows["qc_reasons"]) if len(rows) else {}
    n_fail = int((~rows["qc_pass"].astype(bool)).sum()) if len(rows) else 0
    reasons = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
    print(f"QC report: {page} ({len(rows)} subjects, {n_fail} fail QC, {len(store.failures())} failed "
          f"preprocessing; reasons: {reasons})")
    if args.worst > 0 and len(rows):
        cols = ["rank", "sid", "qc_pass", "fov_lung_coverage", "reg_dice", "qc_reasons"]
        print(rows.head(args.worst)[cols].to_string(index=False))
    return 0


#: The command's entry point under the name the brief of issue 13 gives it.
main = cli_main


if __name__ == "__main__":
    sys.exit(cli_main())
