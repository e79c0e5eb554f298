"""Atomic writes: complete file or none, with ordinary permissions."""

import os

import numpy as np
import pytest

from drasclr_lib.utils import atomic_path, save_json, save_npy


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_files_get_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_npy(np.zeros(3), tmp_path / "a.npy")
        save_json({"x": 1}, tmp_path / "a.json")
    finally:
        os.umask(umask)
    for name in ("a.npy", "a.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
