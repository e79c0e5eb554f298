import sys
import types
from pathlib import Path

import pytest

from drasclr_lib.downstream.ablations import config_digest, ensure_checkpoint, matches, method_config
from drasclr_lib.training.config import PretrainConfig
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


def test_ensure_checkpoint_trains_once_then_caches_and_reuses_matching_run(tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(cfg):
        calls.append(cfg)
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_bytes(b"x")
        save_json(cfg.to_dict(), out / "config.json")
        return out / "checkpoint.pt"

    monkeypatch.setitem(sys.modules, "drasclr_lib.train", types.SimpleNamespace(pretrain=fake_pretrain))
    base = _base(tmp_path)
    p1, how1 = ensure_checkpoint("moco", base, tmp_path / "runs")
    p2, how2 = ensure_checkpoint("moco", base, tmp_path / "runs")
    assert (how1, how2) == ("trained", "cached") and p1 == p2 and len(calls) == 1
    assert calls[0].conditional is False and calls[0].resume is True
    ensure_checkpoint("moco", base.replace(max_steps=6), tmp_path / "runs")
    assert len(calls) == 2  # a different budget trains anew
    # notebook 02's run is reused only when its budget matches
    nb02 = tmp_path / "02"
    nb02.mkdir()
    (nb02 / "checkpoint.pt").write_bytes(b"y")
    cfg = method_config("drasclr", base, tmp_path / "runs")
    save_json(cfg.replace(out_dir=str(nb02)).to_dict(), nb02 / "config.json")
    assert matches(cfg.to_dict(), cfg)
    p, how = ensure_checkpoint("drasclr", base, tmp_path / "runs", reuse=nb02)
    assert p == nb02 / "checkpoint.pt" and how.startswith("reused")
    _, how = ensure_checkpoint("drasclr", base.replace(max_steps=7), tmp_path / "runs", reuse=nb02)
    assert how == "trained" and len(calls) == 3
