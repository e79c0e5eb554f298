"""Shared fixtures: a small deterministic patch store that needs no preprocessing run."""

from __future__ import annotations

import os

import pytest

from drasclr_lib.testing import make_toy_store

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory):
    """Path of a session-wide toy patch store (12 subjects, 18 locations, 32³ patches)."""
    return make_toy_store(tmp_path_factory.mktemp("toy_store"))


@pytest.fixture
def fake_pretrain(monkeypatch):
    """``pretrain`` of :mod:`drasclr_lib.training.runs` replaced by one that writes a (fake)
    checkpoint and config.json at once; returns the list of configs it was called with."""
    from pathlib import Path

    from drasclr_lib.training import runs
    from drasclr_lib.utils import save_json

    calls = []

    def fake(cfg):
        calls.append(cfg)
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_bytes(b"x")
        save_json(cfg.to_dict(), out / "config.json")
        return out / "checkpoint.pt"

    monkeypatch.setattr(runs, "pretrain", fake)
    return calls
