"""The ``drasclr embed`` command: a patch store and an encoder (a checkpoint or random weights) ->
``embeddings.npz``.

Command line::

    drasclr embed --store outputs/patch_store --checkpoint outputs/02_pretraining/checkpoint.pt \\
        --out outputs/03_embeddings/embeddings.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["cli_main"]


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr embed --store DIR --checkpoint FILE --out FILE.npz [--batch-size B] [--device D]``.

    ``--checkpoint random`` embeds with a random-weight encoder (``--seed``) instead, the baseline
    of notebook 03: its BatchNorm running statistics are calibrated on the store first
    (:func:`drasclr_lib.models.random_encoder` with ``store=``; ``--calibration-batches`` batches of
    ``--calibration-batch-size`` subjects of one location, defaults 64 and 32 as in the notebook),
    since the initial statistics give every patch nearly the same embedding.
    ``--calibration-batches 0`` keeps the initial statistics (not a useful baseline).

    Returns:
        0 on success, 2 for a bad argument or a missing checkpoint (the reason goes to stderr).
    """
    ap = argparse.ArgumentParser(prog="drasclr embed", description="Embed every patch of a patch store.")
    ap.add_argument("--store", required=True, help="patch store folder (notebook 01 / drasclr preprocess)")
    ap.add_argument("--checkpoint", required=True,
                    help="checkpoint.pt of pretraining, a published checkpoint, or 'random'")
    ap.add_argument("--out", required=True, help="output .npz file")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0, help="weights seed of --checkpoint random")
    ap.add_argument("--calibration-batches", type=int, default=64,
                    help="--checkpoint random: batches to calibrate BatchNorm on (default 64; 0 keeps the "
                         "initial statistics, which make every embedding nearly the same)")
    ap.add_argument("--calibration-batch-size", type=int, default=32,
                    help="--checkpoint random: subjects per calibration batch (default 32)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.embed import embed_cohort
    from drasclr_lib.models import load_encoder, random_encoder

    if args.calibration_batches < 0 or args.calibration_batch_size < 1:
        print("drasclr embed: --calibration-batches must be >= 0 and --calibration-batch-size >= 1", file=sys.stderr)
        return 2
    store = PatchStore(args.store)
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
            print(f"drasclr embed: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
            return 2
        encoder, meta = load_encoder(args.checkpoint), {"checkpoint": str(Path(args.checkpoint).resolve())}
    emb = embed_cohort(encoder, store, batch_size=args.batch_size, device=args.device,
                       progress=not args.no_progress, meta=meta)
    emb.save(args.out)
    print(f"{emb!r} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
