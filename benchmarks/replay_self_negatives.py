"""Replay the pretraining sampler and queues: how often does an anchor meet its own subject's keys?

For each cohort size N and batch size B, the real ``LocationBatchSampler`` (reshuffled subjects
every epoch) drives the real ``DrasCLR`` queues with the real queue-size rule
(``effective_queue_size(4096, B, N)``). Keys are random unit vectors (what is measured is which
subject sits in which queue entry, not what the encoder learned). Per epoch it reports

- ``unmasked``: the share of anchors with at least one queue entry of their own subject at their
  location, i.e. what reached the loss before the mask (the published fixed order gives 0);
- ``masked``: the share of anchors for which a same-subject entry still carries softmax weight in
  the masked local InfoNCE (computed from the logits ``info_nce`` returns with the mask: 0 by
  construction when the mask is right).

    python benchmarks/replay_self_negatives.py                # the four settings of issue 11
    python benchmarks/replay_self_negatives.py --settings 500x64 --epochs 4 --locations 2

Writes ``benchmarks/results/self_negatives.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from drasclr_lib.losses import info_nce
from drasclr_lib.models import DrasCLR, DrasEncoder
from drasclr_lib.training.config import effective_queue_size
from drasclr_lib.training.data import LocationBatchSampler


def replay(n: int, b: int, epochs: int, locations: int, seed: int = 0) -> dict:
    k = effective_queue_size(4096, b, n)
    torch.manual_seed(seed)
    dim = 8
    model = DrasCLR(DrasEncoder(num_experts=1, rep_dim=dim, proj_dim=dim), num_locations=locations, queue_size=k)
    sampler = LocationBatchSampler(n, locations, b, seed=seed)
    rows = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        anchors = unmasked = masked = 0
        for batch in sampler:
            loc = batch[0][1]
            subjects = torch.tensor([s for s, _ in batch])
            same = model.same_subject_mask(loc, subjects).expand(len(batch), -1)
            q = F.normalize(torch.randn(len(batch), dim), dim=1)
            keys = F.normalize(torch.randn(len(batch), dim), dim=1)
            _, logits = info_nce(q, keys, model.queue[:, :, loc].T, 0.2, neg_mask=same)
            weight = torch.softmax(logits, dim=1)[:, 1:]  # softmax weight of every queue entry
            anchors += len(batch)
            unmasked += int(same.any(dim=1).sum())
            masked += int(((weight > 0) & same).any(dim=1).sum())
            model.dequeue_and_enqueue(keys, loc, subjects)
        rows.append({"epoch": epoch, "anchors": anchors, "unmasked_rate": unmasked / anchors,
                     "masked_rate": masked / anchors})
    return {"N": n, "B": b, "K": k, "locations": locations, "epochs": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=["9179x128", "1000x128", "200x32", "24x8"],
                    help="NxB pairs: subjects x batch size")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--locations", type=int, default=4, help="locations replayed (the rate does not depend on L)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "self_negatives.json"))
    args = ap.parse_args(argv)
    results, t0 = [], time.perf_counter()
    for setting in args.settings:
        n, b = (int(v) for v in setting.lower().split("x"))
        res = replay(n, b, args.epochs, args.locations)
        results.append(res)
        print(f"N={n:5d} B={b:4d} K={res['K']:5d}  unmasked per epoch: "
              + ", ".join(f"{r['unmasked_rate']:6.1%}" for r in res["epochs"])
              + "   masked: " + ", ".join(f"{r['masked_rate']:.1%}" for r in res["epochs"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/replay_self_negatives.py " + " ".join(argv or []),
                               "seconds": round(time.perf_counter() - t0, 1), "results": results}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
