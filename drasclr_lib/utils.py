"""Small shared helpers: device choice, seeding, output folders, atomic file writes.

Everything that writes a result file goes through :func:`atomic_path` so that an interrupted run
never leaves a half-written file behind (the file appears complete or not at all).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "resolve_device",
    "seed_everything",
    "output_dir",
    "atomic_path",
    "save_json",
    "load_json",
    "save_npy",
]


def resolve_device(device: str = "auto"):
    """Return a ``torch.device``.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), or any string torch accepts
            (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        ValueError: when a CUDA device is asked for and none is available.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random number generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    import torch  # imported here so that modules without torch work import drasclr_lib.utils quickly

    torch.manual_seed(seed)


def output_dir(name: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """The output folder shared by the notebooks, created when missing.

    Args:
        name: sub-folder (e.g. a notebook's stem ``"01_preprocessing"``); ``None`` gives the root.
        root: overrides the root; default is ``$DRASCLR_OUT`` or ``outputs/`` in the working directory.

    Returns:
        The absolute path of the folder.
    """
    base = Path(root if root is not None else os.environ.get("DRASCLR_OUT", "outputs")).expanduser()
    path = base / name if name else base
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix (``.nii.gz``, ``.npy``) so writers that infer the
    format from the extension work. On an exception the temporary file is removed and ``path``
    is left untouched.

    Example:
        >>> with atomic_path("out/sub01.npy") as tmp:  # doctest: +SKIP
        ...     np.save(tmp, patches_hu)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results should be as readable as a plain write
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (NumPy scalars and arrays are converted)."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=default, allow_nan=True), encoding="utf-8")
    return Path(path)


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_npy(array: np.ndarray, path: str | os.PathLike) -> Path:
    """``np.save`` atomically (no partial ``.npy`` after an interruption)."""
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
    return Path(path)
