"""Small shared helpers: device choice, seeding, output folders, atomic file writes, the setup report.

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
    "project_root",
    "output_root",
    "output_dir",
    "print_config",
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


def project_root(start: str | os.PathLike | None = None) -> Path | None:
    """The clone of the project that holds the package or ``start``, if there is one.

    A clone is a folder with ``pyproject.toml`` and ``drasclr_lib/`` side by side. The package's own
    location is tried first (an editable install or ``PYTHONPATH`` pointing at a clone), then
    ``start`` (default: the working directory) and its parents, so a notebook started in a clone's
    ``notebooks/`` folder finds the clone even when the package was installed from a wheel.

    Returns:
        The clone's absolute path, or ``None`` (an installed wheel run outside any clone, e.g. Colab).
    """
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (Path(__file__).resolve().parents[1], here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "drasclr_lib" / "__init__.py").is_file():
            return folder
    return None


def output_root() -> Path:
    """The one folder every notebook and command writes under, whatever the working directory.

    ``$DRASCLR_OUT`` when it is set (``~`` expanded; a relative value is taken from the working
    directory), else the ``outputs/`` folder of the project's clone (:func:`project_root`), else
    ``outputs/`` in the working directory (an installed package outside any clone). Notebooks print
    it in their first cell; their ``OUTPUT_ROOT`` parameter sets ``DRASCLR_OUT``.

    Returns:
        The absolute path (not created here).
    """
    env = os.environ.get("DRASCLR_OUT", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    clone = project_root()
    return (clone / "outputs") if clone is not None else (Path.cwd() / "outputs").resolve()


def output_dir(name: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """The output folder shared by the notebooks, created when missing.

    Args:
        name: sub-folder (e.g. a notebook's stem ``"01_preprocessing"``); ``None`` gives the root.
        root: overrides the root; default :func:`output_root` (``$DRASCLR_OUT``, else the clone's
            ``outputs/``).

    Returns:
        The absolute path of the folder.
    """
    base = Path(root).expanduser() if root is not None else output_root()
    path = base / name if name else base
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def print_config(file=None) -> dict[str, str]:
    """Print what a bug report needs: versions, torch and CUDA, the device, the output root.

    The same idea as MONAI's ``print_config()``: one cell at the top of a notebook that says which
    environment produced its results (Colab or a laptop, which torch build, which GPU).

    Args:
        file: stream to print to (default ``sys.stdout``).

    Returns:
        The printed ``{name: value}`` lines.
    """
    import platform
    import sys
    from importlib import metadata

    import torch

    import drasclr_lib

    info = {"drasclr_lib": f"{drasclr_lib.__version__} ({Path(drasclr_lib.__file__).parent})",
            "Python": f"{platform.python_version()} ({sys.executable})",
            "platform": platform.platform()}
    for pkg in ("torch", "numpy", "monai", "SimpleITK", "nibabel", "scipy", "scikit-learn", "pandas", "umap-learn",
                "ipywidgets", "papermill"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    info["CUDA (torch build)"] = str(torch.version.cuda or "none: a CPU build")
    info["CUDA available"] = str(torch.cuda.is_available())
    if torch.cuda.is_available():
        info["GPU"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    info["device (auto)"] = str(resolve_device("auto"))
    info["CPU threads (torch)"] = str(torch.get_num_threads())
    info["Colab"] = str("google.colab" in sys.modules)
    info["output root"] = str(output_root())
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}", file=file)
    return info


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
