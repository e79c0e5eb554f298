"""The ``drasclr embed`` command: a patch store and an encoder (a checkpoint or random weights) ->
``embeddings.npz``, or tables for R / pandas / spreadsheets (:mod:`drasclr_lib.exports`).

Command line::

    drasclr embed --store outputs/patch_store --checkpoint outputs/02_pretraining/checkpoint.pt \\
        --out outputs/03_embeddings/embeddings.npz
    drasclr embed --store outputs/patch_store --embeddings outputs/03_embeddings/embeddings.npz \\
        --out subjects.parquet                 # export saved embeddings, no re-embedding
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["cli_main", "build_parser"]

EXAMPLES = (
    ("embed with notebook 02's checkpoint (or a released one) -> the EmbeddingSet file",
     "drasclr embed --store outputs/patch_store --checkpoint outputs/02_pretraining/checkpoint.pt "
     "--out outputs/03_embeddings/embeddings.npz"),
    ("the random-weight baseline of notebook 03",
     "drasclr embed --store outputs/patch_store --checkpoint random --seed 0 --out embeddings_random.npz"),
    ("one row per subject (mean-pooled) with the manifest's labels, for R or a spreadsheet",
     "drasclr embed --store outputs/patch_store --checkpoint outputs/02_pretraining/checkpoint.pt --out subjects.csv"),
    ("saved embeddings -> one row per patch (sid, location, atlas corner, lobe, h_0..h_127), no re-embedding",
     "drasclr embed --store outputs/patch_store --embeddings outputs/03_embeddings/embeddings.npz "
     "--format parquet --level patch --out patches.parquet"),
)
NOTE = ('Read back: pandas.read_parquet("subjects.parquet"); in R, arrow::read_parquet("subjects.parquet"). '
        "Columns: docs/embeddings.md.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``drasclr embed`` (every option with its help and default)."""
    from drasclr_lib.cli_help import auto_or_positive_int, command_parser

    ap = command_parser(
        "drasclr embed",
        "Embed every patch of a patch store with an encoder, and write the embeddings as the\n"
        "EmbeddingSet file (.npz, read by notebooks 04-05) or as a table (CSV / Parquet) that R,\n"
        "pandas or a spreadsheet reads.", EXAMPLES, NOTE)
    ap.add_argument("--store", required=True, metavar="DIR",
                    help="patch store folder (notebook 01 / drasclr preprocess); its subjects.csv gives the labels "
                         "of a subject-level table")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE",
                        help="encoder: checkpoint.pt of pretraining, a published DrasCLR checkpoint, or 'random' "
                             "(random weights, BatchNorm calibrated on the store); this or --embeddings is required")
    source.add_argument("--embeddings", metavar="FILE.npz",
                        help="instead of --checkpoint: embeddings already computed (embeddings.npz of notebook 03 or "
                             "of this command), exported without running an encoder; this or --checkpoint is "
                             "required")
    ap.add_argument("--out", required=True, metavar="FILE",
                    help="output file (.npz, .csv, .csv.gz, .parquet)")
    ap.add_argument("--format", default="auto", choices=["auto", "npz", "csv", "parquet"],
                    help="file format; auto: from the suffix of --out (another suffix writes npz)")
    ap.add_argument("--level", choices=["subject", "patch"], default=None,
                    help="rows of a csv/parquet table: one per subject (pooled by --pool, with the manifest's "
                         "label columns) or one per (subject, location) (default: subject for csv/parquet; an "
                         "npz file always holds every patch)")
    ap.add_argument("--pool", default="mean", choices=["mean", "meanmax"],
                    help="subject level: mean of the patch embeddings over locations (D columns), or mean and "
                         "maximum (2D columns)")
    ap.add_argument("--qc", action="store_true",
                    help="subject level: add the preprocessing QC columns (lung volume, LAA-950, registration "
                         "Dice, qc_pass) to the manifest's labels")
    ap.add_argument("--batch-size", type=auto_or_positive_int, default="auto", metavar="N",
                    help="patches per forward pass, one location at a time; auto is 32 on a CPU, 256 on a GPU")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--seed", type=int, default=0, metavar="N", help="weights seed of --checkpoint random")
    ap.add_argument("--calibration-batches", type=int, default=64, metavar="N",
                    help="--checkpoint random: batches to calibrate BatchNorm on (0 keeps the initial statistics, "
                         "which make every embedding nearly the same)")
    ap.add_argument("--calibration-batch-size", type=int, default=32, metavar="N",
                    help="--checkpoint random: subjects per calibration batch")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr embed --store DIR (--checkpoint FILE | --embeddings FILE.npz) --out FILE [options]``.

    ``--checkpoint random`` embeds with a random-weight encoder (``--seed``) instead, the baseline
    of notebook 03: its BatchNorm running statistics are calibrated on the store first
    (:func:`drasclr_lib.models.random_encoder` with ``store=``; ``--calibration-batches`` batches of
    ``--calibration-batch-size`` subjects of one location, defaults 64 and 32 as in the notebook),
    since the initial statistics give every patch nearly the same embedding.
    ``--calibration-batches 0`` keeps the initial statistics (not a useful baseline).

    The output's format is ``--format`` or the suffix of ``--out`` (npz when the suffix names
    none, as before exports existed); CSV / Parquet tables are written by
    :func:`drasclr_lib.exports.export_embeddings` (``--level``, ``--pool``, ``--qc``). The format
    and level are checked before anything is embedded.

    Returns:
        0 on success, 2 for a bad argument, a missing store / checkpoint / embeddings file, or
        embeddings that do not belong to the store (the reason goes to stderr).
    """
    args = build_parser().parse_args(argv)

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.embed import EmbeddingSet, embed_cohort
    from drasclr_lib.exports import export_embeddings, export_format
    from drasclr_lib.models import load_encoder, random_encoder

    def fail(message: str) -> int:
        print(f"drasclr embed: {message}", file=sys.stderr)
        return 2

    try:
        fmt = export_format(args.out, None if args.format == "auto" else args.format, default="npz")
    except ValueError as err:
        return fail(str(err))
    level = args.level or ("patch" if fmt == "npz" else "subject")
    if fmt == "npz" and level != "patch":
        return fail("an npz file holds every patch (the EmbeddingSet); for one row per subject use --format csv "
                    "or parquet")
    if args.calibration_batches < 0 or args.calibration_batch_size < 1:
        return fail("--calibration-batches must be >= 0 and --calibration-batch-size >= 1")
    try:
        store = PatchStore(args.store)
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    if args.embeddings is not None:
        try:
            emb = EmbeddingSet.load(args.embeddings)
        except (FileNotFoundError, ValueError) as err:
            return fail(str(err))
    else:
        if args.checkpoint == "random":
            calibrate = args.calibration_batches > 0
            encoder = random_encoder(args.seed, store=store if calibrate else None,
                                     calibration_batches=max(args.calibration_batches, 1),
                                     batch_size=args.calibration_batch_size, device=args.device)
            meta = {"checkpoint": "random", "seed": args.seed, "batchnorm_calibrated": calibrate,
                    "calibration_batches": args.calibration_batches if calibrate else 0,
                    "calibration_batch_size": min(args.calibration_batch_size, store.num_subjects) if calibrate else 0}
        else:
            if not Path(args.checkpoint).exists():
                return fail(f"checkpoint {args.checkpoint} does not exist")
            encoder, meta = load_encoder(args.checkpoint), {"checkpoint": str(Path(args.checkpoint).resolve())}
        emb = embed_cohort(encoder, store, batch_size=args.batch_size, device=args.device,
                           progress=not args.no_progress, meta=meta)
    try:
        export_embeddings(emb, store, args.out, level=level, format=fmt, pool=args.pool, qc=args.qc)
    except (ValueError, KeyError) as err:
        return fail(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    what = "every patch" if fmt == "npz" else f"one row per {'subject' if level == 'subject' else 'patch'}"
    print(f"{emb!r} -> {args.out} ({fmt}, {what})")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
