"""Shared fixtures: a small deterministic patch store that needs no preprocessing run."""

from __future__ import annotations

import os

import pytest

from drasclr_lib.data.toy import make_toy_store

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory):
    """Path of a session-wide toy patch store (12 subjects, 18 locations, 32³ patches)."""
    return make_toy_store(tmp_path_factory.mktemp("toy_store"))
