"""Pretraining: config validation, checkpoint format, exact resume, CLI, learning signal.

Runs on a tiny store (16³ patches, 8 subjects, 4 locations) so that a step takes a fraction of a
second on 2 CPU cores; the encoder is the full published architecture (16³ input gives 1³ too).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from drasclr_lib.training import PretrainConfig, cli_main, cosine_factor, effective_lr, effective_queue_size, pretrain
from drasclr_lib.training.checkpoint import HISTORY_COLUMNS, load_checkpoint
from drasclr_lib.training.loop import pretrain_model
from drasclr_lib.testing import make_toy_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("small_store"), n_subjects=8, grid=(2, 2, 1), patch_size=16)


def _cfg(store, out, **kw):
    base = dict(store=str(store), out_dir=str(out), epochs=2, batch_size=4, queue_size=4, workers=0,
                log_every=2, progress=False, tensorboard=False, save_every_steps=0, lr=0.05, scale_lr=False)
    base.update(kw)
    return PretrainConfig(**base)


def test_config_validation_and_effective_values():
    with pytest.raises(ValueError):
        PretrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        PretrainConfig(augment="agq")
    with pytest.raises(ValueError):
        PretrainConfig(moco_momentum=1.0)
    with pytest.raises(ValueError):
        PretrainConfig(augment_on="tpu")
    cfg = PretrainConfig(batch_size=32)
    assert effective_lr(cfg) == pytest.approx(0.01 * 32 / 128)
    assert effective_lr(cfg, world_size=4) == pytest.approx(0.01)
    assert effective_lr(cfg.replace(scale_lr=False)) == 0.01
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
    # queue: multiple of the global batch, capped by the cohort
    assert effective_queue_size(4096, 128, 9000) == 4096
    assert effective_queue_size(4000, 128, 9000) == 3968
    assert effective_queue_size(4096, 4, 12) == 8
    assert effective_queue_size(4096, 8, 14) == 8
    with pytest.raises(ValueError):
        effective_queue_size(4, 8, 100)


def test_cosine_factor():
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(50, 100) == pytest.approx(0.5)
    assert cosine_factor(100, 100) == pytest.approx(0.0)
    assert cosine_factor(200, 100) == pytest.approx(0.0)


def test_checkpoint_format_and_files(small_store, tmp_path):
    from drasclr_lib.models import load_encoder

    path = pretrain(_cfg(small_store, tmp_path, max_steps=3, tensorboard=True, log_every=1))
    assert path == tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no code runs on load
    assert ckpt["arch"] == "drasclr" and ckpt["step"] == 3 and ckpt["epoch"] == 0
    keys = set(ckpt["state_dict"])
    assert {"queue", "queue_ptr"} <= keys
    assert any(k.startswith("encoder_q.") for k in keys) and any(k.startswith("encoder_k.") for k in keys)
    assert all(k.split(".")[0] in {"encoder_q", "encoder_k", "queue", "queue_ptr", "queue_subject"} for k in keys)
    assert ckpt["state_dict"]["queue"].shape == (128, 4, 4)
    assert ckpt["config"]["batch_size"] == 4 and isinstance(ckpt["config"], dict)
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert json.loads((tmp_path / "config.json").read_text())["effective"]["queue_size"] == 4
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist.columns) == HISTORY_COLUMNS and hist["step"].tolist() == [1, 2, 3]
    assert hist["lr"].iloc[0] == pytest.approx(0.05) and hist["lr"].is_monotonic_decreasing
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())
    # the query encoder of the checkpoint loads with load_encoder and equals the trained weights
    enc = load_encoder(path)
    for name, value in enc.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][f"encoder_q.{name}"]), name
    assert load_checkpoint(path)["step"] == 3


def test_three_epochs_no_anchor_meets_its_own_subject(small_store, tmp_path):
    """history.csv counts the same-subject (anchor, queue entry) pairs that reached the loss: 0 in
    every row with the mask; the identical unmasked run shows they exist from the second epoch on."""
    kw = dict(epochs=3, log_every=2, num_neighbors=1)  # 8 subjects, batch 4, queue 4: 8 steps per epoch
    masked = pd.read_csv(pretrain(_cfg(small_store, tmp_path / "masked", **kw)).parent / "history.csv")
    assert len(masked) == 12 and masked["epoch"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (masked["self_negatives"] == 0).all(), masked
    assert masked["masked_negatives"].sum() > 0  # the shuffled sampler does bring them: the mask acted
    assert masked.loc[masked["epoch"] == 0, "masked_negatives"].sum() == 0
    unmasked = pd.read_csv(pretrain(_cfg(small_store, tmp_path / "unmasked", exclude_self_negatives=False,
                                         **kw)).parent / "history.csv")
    assert (unmasked["masked_negatives"] == 0).all()
    assert unmasked.loc[unmasked["epoch"] == 0, "self_negatives"].sum() == 0
    # same seed, same sampler: exactly the pairs the masked run removed reached the unmasked loss
    # (the queues hold the same subjects in both runs, only the keys' values differ)
    assert unmasked["self_negatives"].tolist() == masked["masked_negatives"].tolist()
    assert unmasked.loc[unmasked["epoch"] > 0, "self_negatives"].sum() > 0


def test_resume_is_exact(small_store, tmp_path):
    straight_path, straight = pretrain_model(_cfg(small_store, tmp_path / "a", max_steps=6))
    pretrain(_cfg(small_store, tmp_path / "b", max_steps=3))  # stops mid-epoch and mid-window
    resumed_path, resumed = pretrain_model(_cfg(small_store, tmp_path / "b", max_steps=6, resume=True))
    a, b = load_checkpoint(straight_path), load_checkpoint(resumed_path)
    assert a["step"] == b["step"] == 6
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs after resume"
    ha, hb = pd.DataFrame(a["history"]), pd.DataFrame(b["history"])
    cols = ["step", "epoch", "loss", "loss_local", "loss_neighbor", "acc1", "lr"]
    pd.testing.assert_frame_equal(ha[cols], hb[cols])
    mom_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    mom_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
    # changed settings refuse to resume
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(_cfg(small_store, tmp_path / "b", batch_size=2, queue_size=4, max_steps=8, resume=True))


def test_cli_workers_and_device_augmentation(small_store, tmp_path):
    out = tmp_path / "cli"
    rc = cli_main(["--store", str(small_store), "--out", str(out), "--epochs", "1", "--batch-size", "4",
                   "--queue-size", "4", "--workers", "2", "--max-steps", "2", "--no-tensorboard", "--log-every", "1"])
    assert rc == 0 and (out / "checkpoint.pt").exists()
    assert load_checkpoint(out / "checkpoint.pt")["config"]["workers"] == 2
    # augmentation on the training device (batched), no neighbours, plain encoder
    path = pretrain(_cfg(small_store, tmp_path / "dev", max_steps=2, augment_on="device", num_neighbors=0,
                         conditional=False))
    ckpt = load_checkpoint(path)
    assert ckpt["run"]["augment_on"] == "device"
    assert all(h["loss_neighbor"] == 0 for h in ckpt["history"])
    assert cli_main(["--store", str(tmp_path / "missing"), "--out", str(out)]) == 2
    with pytest.raises(ValueError, match="exceeds"):
        pretrain(_cfg(small_store, tmp_path / "big", batch_size=16, queue_size=16))


def test_learning_signal_against_a_frozen_control(tmp_path):
    """Loss after some steps is below the loss of the identical run whose learning rate is ~0.

    Both runs see the same batches, views and queue dynamics (same seeds), so the difference is
    what the gradient steps learned; comparing single runs' early and late windows would mix in
    the queues filling up (random initial negatives are easy).
    """
    store = make_toy_store(tmp_path / "store16", n_subjects=16, grid=(2, 2, 1), patch_size=16)
    kw = dict(epochs=3, batch_size=8, queue_size=8, moco_momentum=0.9, num_neighbors=0, log_every=1, max_steps=16)
    control = load_checkpoint(pretrain(_cfg(store, tmp_path / "control", lr=1e-9, **kw)))
    trained = load_checkpoint(pretrain(_cfg(store, tmp_path / "trained", lr=0.1, **kw)))
    late = slice(8, 16)  # the second epoch: every queue holds real keys
    c = pd.DataFrame(control["history"])["loss_local"].iloc[late].mean()
    t = pd.DataFrame(trained["history"])["loss_local"].iloc[late].mean()
    assert t < c - 0.1, f"trained loss {t:.3f} is not below the frozen control's {c:.3f}"


def test_two_visits_of_one_patient_are_never_negatives(tmp_path):
    """A store whose manifest has a ``group`` column (three patients with two scans each): the queues
    record patient groups, and the pairs masked out of the loss are exactly the (anchor, queue entry)
    pairs of one patient that a replay of the sampler predicts, from the first epoch on (where
    subject ids alone would mask nothing)."""
    from collections import deque

    import numpy as np

    from drasclr_lib.data.patch_store import finalize_store
    from drasclr_lib.training.data import LocationBatchSampler

    root = make_toy_store(tmp_path / "visits", n_subjects=8, grid=(2, 2, 1), patch_size=16, with_labels=False)
    patient = ["P0", None, "P1", "P2", "x", "P0", "P2", "P1"]
    finalize_store(root, pd.DataFrame({"sid": [f"toy{i:03d}" for i in range(8)], "group": patient}))
    group = np.array([0, 1, 2, 3, 4, 0, 3, 2])  # the first visit's position
    cfg = _cfg(root, tmp_path / "run", epochs=1, log_every=1, num_neighbors=1)
    path, model = pretrain_model(cfg)
    hist = pd.read_csv(path.parent / "history.csv")
    assert (hist["self_negatives"] == 0).all()
    # replay: the sampler's batches and a record of the per-location queues (4 entries) by group
    queue = effective_queue_size(cfg.queue_size, cfg.batch_size, 8)
    record = {loc: deque([-1] * queue, maxlen=queue) for loc in range(4)}
    sampler = LocationBatchSampler(8, 4, cfg.batch_size, seed=cfg.seed)
    expected = []
    for batch in sampler:
        loc, g = batch[0][1], group[[s for s, _ in batch]]
        held = np.array(record[loc])
        expected.append(int((held[None, :] == g[:, None]).sum()))
        record[loc].extend(g.tolist())
    assert len(expected) == 8 and hist["masked_negatives"].tolist() == expected
    # a patient's other visit is already in the queue in the first epoch (subject ids alone mask nothing there)
    assert sum(expected) > 0
    # the queues hold group indices: a second visit's own subject index (5, 6, 7) never appears
    held = set(model.queue_subject.flatten().tolist())
    assert held <= set(group.tolist()) and not held & {5, 6, 7}
