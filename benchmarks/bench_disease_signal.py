"""Disease signal of patch embeddings after a longer pretraining run than CI can afford.

Notebook 03's CI run pretrains for 40 steps on 16 subjects; at that scale neither the pretrained
nor the random-weight encoder predicts a patch's emphysema fraction (the probe's R² is about 0 for
both). This script pretrains DrasCLR on a larger synthetic cohort for longer, embeds every patch
with the pretrained and with a random-weight encoder, and scores both with the probes of notebook
03 (k-NN location decoding, subject-grouped cross-validated ridge R² of the emphysema fraction).
It also scores simple intensity features of the patches (mean, sd, fractions below -950 and
-900 HU) as a reference. The result goes to ``benchmarks/results/disease_signal.json``.

    python benchmarks/bench_disease_signal.py                         # 36 subjects, 300 steps
    python benchmarks/bench_disease_signal.py --store outputs/patch_store --steps 600

Without ``--store`` it generates (or reuses) ``outputs/bench_disease/cohort`` and preprocesses it
into ``outputs/bench_disease/patch_store``. Every stage is cached, so a rerun continues.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="", help="an existing patch store (default: build one)")
    ap.add_argument("--subjects", type=int, default=36, help="cohort size when building the store")
    ap.add_argument("--cohort-seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.8, help="SGD lr at batch 128 (scaled linearly)")
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench_disease"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "disease_signal.json"))
    args = ap.parse_args(argv)

    from drasclr_lib.data.patch_store import PatchStore, patch_table
    from drasclr_lib.embed import EmbeddingSet, embed_cohort
    from drasclr_lib.models import load_encoder, random_encoder
    from drasclr_lib.training import PretrainConfig, pretrain
    from drasclr_lib.utils import save_json
    from drasclr_lib.viz.metrics import embedding_metrics, patch_intensity_features

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.store:
        store_dir = Path(args.store)
    else:
        from drasclr_lib.data.sources import read_manifest
        from drasclr_lib.data.synthetic import make_cohort
        from drasclr_lib.preprocess.cohort import preprocess_cohort

        manifest = make_cohort(out / "cohort", n_subjects=args.subjects, seed=args.cohort_seed, size="demo")
        store_dir = out / "patch_store"
        preprocess_cohort(read_manifest(manifest), store_dir, atlas="auto", workers=2)
    store = PatchStore(store_dir)
    t_store = time.perf_counter() - t0

    cfg = PretrainConfig(store=str(store_dir), out_dir=str(out / f"drasclr_{args.steps}steps_b{args.batch_size}"),
                         epochs=max(1, int(np.ceil(args.steps / (store.num_locations * (store.num_subjects // args.batch_size))))),
                         max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, queue_size=args.queue_size,
                         seed=args.seed, workers=2, device="auto", tensorboard=False, resume=True)
    t1 = time.perf_counter()
    ckpt = pretrain(cfg)
    t_train = time.perf_counter() - t1

    table = patch_table(store)
    results = {}
    for name, enc in (("pretrained", load_encoder(ckpt)), ("random", random_encoder(args.seed, store=store))):
        emb = embed_cohort(enc, store, batch_size=64)
        results[name] = embedding_metrics(emb, table, max_patches=None, seed=args.seed)
    feats = patch_intensity_features(store)
    results["intensity_features"] = embedding_metrics(
        EmbeddingSet(h=feats.astype(np.float32), sids=store.sids, locs=store.locs, atlas_corners=store.atlas_corners,
                     meta={}), table, max_patches=None, seed=args.seed)
    record = {
        "setting": {"store": str(store_dir), "subjects": store.num_subjects, "locations": store.num_locations,
                    "steps": args.steps, "batch_size": args.batch_size, "lr_at_128": args.lr,
                    "queue_size": args.queue_size, "seed": args.seed},
        "results": results,
        "pretrained_beats_random_on_emph_r2": bool(results["pretrained"]["emph_r2"] > results["random"]["emph_r2"]),
        "seconds": {"store": t_store, "pretrain": t_train, "total": time.perf_counter() - t0},
        "machine": {"platform": platform.platform(), "load_avg_end": list(__import__("os").getloadavg())},
        "command": " ".join(["python", "benchmarks/bench_disease_signal.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    save_json(record, args.json)
    rows = [("encoder", "location k-NN acc", "lobe k-NN acc", "emph R²", "emph Spearman")]
    for name, r in results.items():
        rows.append((name, f"{r['location_knn_acc']:.3f}", f"{r.get('lobe_knn_acc', float('nan')):.3f}",
                     f"{r['emph_r2']:.3f}", f"{r['emph_spearman']:.3f}"))
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows[1:]:
        print("| " + " | ".join(r) + " |")
    print(json.dumps(record["setting"]), f"pretrain {t_train:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
