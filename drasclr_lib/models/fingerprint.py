"""Content digests that key result caches: a checkpoint's encoder weights, a patch store.

A cache keyed on a checkpoint's path goes stale the moment the file is overwritten by a run with
other settings (notebook 02 rerun, then notebook 05 reusing Dice scores of the old weights). Keyed
on :func:`encoder_digest`, it is stale exactly when the encoder's tensors differ.

The digest covers the query encoder's tensors as :func:`~drasclr_lib.models.load_encoder` reads
them (``conv1.weight`` ..., whatever the file's prefix), so the same weights saved in the
published format and in the project's own format have the same digest, while a key encoder, a
queue or an optimiser state that changes alone does not change it. Hashing a file is cached per
``(path, size, modification time)`` for the life of the process, so asking twice is free.

:func:`store_digest` does the same for a patch store without reading its patch arrays (GBs).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch

from drasclr_lib.data.patch_store.layout import STORE_META, SUBJECTS_TABLE
from drasclr_lib.models.encoder import _encoder_state, _read_checkpoint

__all__ = ["state_digest", "encoder_digest", "store_digest", "DIGEST_CHARS"]

#: Hex characters of a digest (64 bits: collisions are not a concern for a cache key).
DIGEST_CHARS = 16
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (first :data:`DIGEST_CHARS` hex characters) of a state dict's tensors.

    Every tensor's name, dtype, shape and raw bytes enter, in sorted name order; entries that are
    not tensors are skipped. Equal state dicts give equal digests on any device.

    Args:
        state: ``{name: tensor}``, e.g. ``encoder.state_dict()``.

    Returns:
        A hex string of :data:`DIGEST_CHARS` characters.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not torch.is_tensor(tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def encoder_digest(path: str | os.PathLike) -> str:
    """:func:`state_digest` of the encoder weights a checkpoint holds (any format ``load_encoder`` reads).

    Args:
        path: a checkpoint file (published format, own format, or a bare encoder state dict).

    Returns:
        A hex string of :data:`DIGEST_CHARS` characters; cached per (path, size, mtime).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file would need code to unpickle or holds no encoder weights.
    """
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        encoder_state = _encoder_state(_read_checkpoint(path, "cpu"), path)[0]
        _FILE_DIGESTS[key] = state_digest(encoder_state)
    return _FILE_DIGESTS[key]


def store_digest(store) -> str | None:
    """A digest of what a patch store holds: its ``store.json`` (atlas, settings) and ``subjects.csv``.

    ``subjects.csv`` lists every subject with its labels, QC values and per-stage timings, and
    preprocessing rewrites it at the end of every run, so a store rebuilt in the same folder (other
    atlas, settings, subjects or labels) gets another digest. A store still being written (no
    ``subjects.csv``) is digested from its subject records instead.

    Args:
        store: a store folder or a ``PatchStore`` (its ``root``).

    Returns:
        A hex string of :data:`DIGEST_CHARS` characters, or ``None`` when the folder holds no store.
    """
    root = Path(store) if isinstance(store, (str, os.PathLike)) else Path(store.root)
    if not (root / STORE_META).is_file():
        return None
    table = root / SUBJECTS_TABLE
    files = [root / STORE_META] + ([table] if table.is_file() else sorted((root / "subjects").glob("[!.]*.json")))
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}|{path.stat().st_size}|".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:DIGEST_CHARS]
