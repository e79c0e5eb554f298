"""DDP: two CPU processes on the gloo backend run the same training loop as torchrun would."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from drasclr_lib.testing import make_toy_store

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, store: str, out: str, result_dir: str, overrides: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from drasclr_lib.training import PretrainConfig
    from drasclr_lib.training.loop import pretrain_model

    cfg = PretrainConfig(**{**dict(store=store, out_dir=out, epochs=1, batch_size=2, queue_size=12, workers=0,
                                   device="cpu", max_steps=2, log_every=1, progress=False, tensorboard=False,
                                   save_every_steps=0), **overrides})
    path, model = pretrain_model(cfg)  # initialises and destroys the gloo process group itself
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(result_dir, f"rank{rank}.pt"))


def _train_two_ranks(tmp_path, **overrides):
    """Train on a 16-subject toy store with 2 gloo processes; returns (rank 0, rank 1 state dicts, out_dir)."""
    store = make_toy_store(tmp_path / "store", n_subjects=16, grid=(2, 2, 1), patch_size=16)
    out, res = tmp_path / "out", tmp_path / "res"
    res.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(store), str(out), str(res), overrides), nprocs=2, join=True)
    s0, s1 = (torch.load(res / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    return s0, s1, out


def test_two_process_gloo_training(tmp_path):
    s0, s1, out = _train_two_ranks(tmp_path)
    # DDP averaged the gradients: both ranks hold the same query (and key) encoder
    for k in s0:
        if k.startswith(("encoder_q.", "encoder_k.")) and "running" not in k and "num_batches" not in k:
            assert torch.allclose(s0[k], s1[k], atol=1e-6), f"{k} differs between ranks"
    # keys of both ranks went into the queue: same queues everywhere, pointer advanced by the global batch
    assert torch.equal(s0["queue"], s1["queue"]) and torch.equal(s0["queue_ptr"], s1["queue_ptr"])
    # 16 subjects / global batch 4 = 4 steps per location: both steps were at one location
    ptr = s0["queue_ptr"]
    assert sorted(ptr.tolist()) == [0, 0, 0, 8], f"expected one location with 2 steps x 4 keys, got {ptr.tolist()}"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["run"]["world_size"] == 2 and ckpt["run"]["global_batch"] == 4 and ckpt["step"] == 2
    assert ckpt["run"]["lr"] == pytest.approx(0.01 * 4 / 128)



def test_two_processes_never_meet_their_own_subject(tmp_path):
    """Each rank's anchors are checked against the shared queue: the subject index of every entry
    is gathered with the keys, so all ranks hold the same index and mask their own subjects."""
    import pandas as pd

    # global batch 4, 4 locations: 16 steps per epoch; step 17 is the second epoch's first batch at a
    # location whose queue (12 entries) holds 12 of the 16 subjects from the first epoch
    s0, s1, out = _train_two_ranks(tmp_path, epochs=2, max_steps=20, num_neighbors=1)
    assert torch.equal(s0["queue_subject"], s1["queue_subject"])
    filled = s0["queue_subject"][s0["queue_subject"] >= 0]
    assert filled.numel() > 0 and int(filled.max()) < 16
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 20 and (hist["self_negatives"] == 0).all(), hist
    # summed over both ranks: the second epoch's first batches did bring older keys of their subjects
    assert hist.loc[hist["epoch"] == 1, "masked_negatives"].sum() > 0
    assert hist.loc[hist["epoch"] == 0, "masked_negatives"].sum() == 0
