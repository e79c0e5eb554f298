"""Reuse a finished pretraining run or train it (``drasclr_lib.training.runs``): the compared
methods' runs (notebooks 04 and 05) and notebook 02's ``pretrain_or_reuse``."""

from __future__ import annotations

from pathlib import Path

import pytest

from drasclr_lib.testing import make_toy_store
from drasclr_lib.training import runs
from drasclr_lib.training.checkpoint import load_checkpoint
from drasclr_lib.training.config import PretrainConfig
from drasclr_lib.training.runs import (config_digest, ensure_checkpoint, mark_finished, matches, method_config,
                                       pretrain_or_reuse, run_status)
from drasclr_lib.utils import save_json


def _base(tmp_path, **kw):
    return PretrainConfig(store=str(tmp_path / "store"), epochs=1, max_steps=5, batch_size=4, queue_size=8, **kw)


def test_method_flags_and_same_budget(tmp_path):
    base = _base(tmp_path)
    cfgs = {m: method_config(m, base, tmp_path) for m in ("moco", "drasclr_no_nbr", "drasclr")}
    assert (cfgs["moco"].conditional, cfgs["moco"].neighbor_weight) == (False, 0.0)
    assert (cfgs["drasclr_no_nbr"].conditional, cfgs["drasclr_no_nbr"].neighbor_weight) == (True, 0.0)
    assert (cfgs["drasclr"].conditional, cfgs["drasclr"].neighbor_weight) == (True, 1.0)
    for key in ("epochs", "max_steps", "batch_size", "queue_size", "lr", "seed", "store"):
        assert len({getattr(c, key) for c in cfgs.values()}) == 1, key
    assert len({c.out_dir for c in cfgs.values()}) == 3
    assert config_digest(method_config("drasclr", base.replace(seed=1), tmp_path)) != config_digest(cfgs["drasclr"])
    with pytest.raises(ValueError):
        method_config("byol", base, tmp_path)
    with pytest.raises(ValueError):
        method_config("drasclr", base.replace(neighbor_weight=0.0), tmp_path)


def test_ensure_checkpoint_trains_once_then_caches_and_reuses_matching_run(tmp_path, fake_pretrain):
    calls = fake_pretrain
    base = _base(tmp_path)
    p1, how1 = ensure_checkpoint("moco", base, tmp_path / "runs")
    p2, how2 = ensure_checkpoint("moco", base, tmp_path / "runs")
    assert (how1, how2) == ("trained", "cached") and p1 == p2 and len(calls) == 1
    assert calls[0].conditional is False and calls[0].resume is True
    ensure_checkpoint("moco", base.replace(max_steps=6), tmp_path / "runs")
    assert len(calls) == 2  # a different budget trains anew
    # notebook 02's finished run (pretrain_or_reuse marks it so) is reused only when its budget matches
    nb02 = tmp_path / "02"
    nb02.mkdir()
    (nb02 / "checkpoint.pt").write_bytes(b"y")
    cfg = method_config("drasclr", base, tmp_path / "runs")
    save_json(cfg.replace(out_dir=str(nb02)).to_dict(), nb02 / "config.json")
    mark_finished(nb02, cfg.replace(out_dir=str(nb02)))
    assert matches(cfg.to_dict(), cfg)
    p, how = ensure_checkpoint("drasclr", base, tmp_path / "runs", reuse=nb02)
    assert p == nb02 / "checkpoint.pt" and how.startswith("reused")
    _, how = ensure_checkpoint("drasclr", base.replace(max_steps=7), tmp_path / "runs", reuse=nb02)
    assert how == "trained" and len(calls) == 3


def test_an_unfinished_run_elsewhere_is_not_reused(tmp_path, fake_pretrain):
    """A folder whose config.json has the budget but whose run never finished (no done.json, a
    checkpoint that is not the finished run) is not taken for the method's checkpoint."""
    base = _base(tmp_path)
    cfg = method_config("drasclr", base, tmp_path / "runs")
    nb02 = tmp_path / "02"
    nb02.mkdir()
    (nb02 / "checkpoint.pt").write_bytes(b"y")
    save_json(cfg.replace(out_dir=str(nb02)).to_dict(), nb02 / "config.json")
    assert run_status(nb02, cfg) == "other"
    _, how = ensure_checkpoint("drasclr", base, tmp_path / "runs", reuse=nb02)
    assert how == "trained" and len(fake_pretrain) == 1


def test_pretrain_or_reuse_skips_resumes_and_replaces(tmp_path, capsys):
    store = make_toy_store(tmp_path / "store", n_subjects=8, grid=(2, 2, 1), patch_size=16)
    cfg = PretrainConfig(store=str(store), out_dir=str(tmp_path / "run"), epochs=2, batch_size=4, queue_size=4,
                         workers=0, log_every=1, progress=False, tensorboard=False, save_every_steps=0, max_steps=2)
    path, trained = pretrain_or_reuse(cfg)
    assert trained and load_checkpoint(path)["step"] == 2 and (path.parent / "done.json").exists()
    stamp = path.stat().st_mtime_ns
    assert pretrain_or_reuse(cfg) == (path, False) and path.stat().st_mtime_ns == stamp  # reused, not touched
    (path.parent / "done.json").unlink()  # a run without the marker: judged from its checkpoint
    assert run_status(path.parent, cfg) == "finished"
    assert run_status(path.parent, cfg.replace(lr=0.5)) == "other"
    # a longer run of the same settings continues the checkpoint
    capsys.readouterr()
    path, trained = pretrain_or_reuse(cfg.replace(max_steps=4))
    assert trained and load_checkpoint(path)["step"] == 4 and "resuming" in capsys.readouterr().out
    # a shorter one than the checkpoint holds, or force, trains anew
    assert run_status(path.parent, cfg) == "other"
    path, trained = pretrain_or_reuse(cfg)
    assert trained and load_checkpoint(path)["step"] == 2 and "resuming" not in capsys.readouterr().out
    path, trained = pretrain_or_reuse(cfg, force=True)
    assert trained and load_checkpoint(path)["step"] == 2


def test_a_store_rebuilt_in_the_same_folder_is_not_reused(tmp_path, fake_pretrain):
    """done.json records the store's content digest: notebook 01 rerun into the same folder (other
    subjects or settings) makes notebook 02 train again instead of reusing the old store's run."""
    store = make_toy_store(tmp_path / "store", n_subjects=6, grid=(2, 1, 1))
    base = PretrainConfig(store=str(store), epochs=1, max_steps=5, batch_size=4, queue_size=8)
    assert ensure_checkpoint("moco", base, tmp_path / "runs")[1] == "trained"
    assert ensure_checkpoint("moco", base, tmp_path / "runs")[1] == "cached"
    make_toy_store(tmp_path / "store", n_subjects=7, grid=(2, 1, 1))  # rebuilt in place
    path, how = ensure_checkpoint("moco", base, tmp_path / "runs")
    assert how == "trained" and len(fake_pretrain) == 2
    assert ensure_checkpoint("moco", base, tmp_path / "runs")[1] == "cached"
