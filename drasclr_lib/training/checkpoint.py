"""Training checkpoints in the project's own format (docs/ARCHITECTURE.md, "Checkpoint").

Everything stored is a tensor, a number, a string, or a list/dict of those, so the file loads with
``torch.load(path, weights_only=True)``: RNG states are stored as tensors and lists, the config as
a plain dict.
"""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import torch

from drasclr_lib.utils import atomic_path

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "write_history_csv",
           "HISTORY_COLUMNS"]

HISTORY_COLUMNS = ["step", "epoch", "loss", "loss_local", "loss_neighbor", "acc1", "self_negatives",
                   "masked_negatives", "lr", "seconds"]


def rng_state() -> dict:
    """The torch, CUDA, NumPy and Python RNG states as ``weights_only``-loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [int(py_state[0]), [int(v) for v in py_state[1]], py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (an interrupted save leaves the previous checkpoint intact)."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a training checkpoint without executing code from it (``weights_only=True``).

    Raises:
        FileNotFoundError: when the file is missing.
        ValueError: when it is not a DrasCLR training checkpoint or cannot be read safely.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:300]})") from exc
    missing = [k for k in ("state_dict", "optimizer", "scheduler", "config", "step") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a DrasCLR training checkpoint (missing {missing})")
    return ckpt


def write_history_csv(history: list[dict], path: str | os.PathLike) -> Path:
    """Write the training history (one row per logged window) as CSV, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
    return path
