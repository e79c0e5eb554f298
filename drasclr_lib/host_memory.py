"""Keep freed host memory for reuse while a CPU run trains (glibc ``malloc`` settings).

Why: a DrasCLR step on the CPU allocates and frees tens of activation tensors of 4-70 MB (a batch
of 32 patches at 8 channels x 32³ is 33.5 MB in float32). glibc serves every block above its mmap
threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when torch frees it,
so the next step touches new pages again: the kernel zeroes and maps every 4 KiB page on first
write. On 2 Intel Xeon AVX-512 cores that was about 300,000 minor page faults per step and **a
quarter of the float32 model step** (batch 32, 2 threads: 31.3 against 39-41 anchors/s with freed
memory kept; ``docs/pretraining.md``, ``benchmarks/results/train_cpu_host_memory.json``).

:func:`keep_freed_memory` switches ``mmap`` off for ``malloc`` (``M_MMAP_MAX = 0``: large blocks
come from the heap) and stops glibc from giving the top of the heap back to the OS
(``M_TRIM_THRESHOLD``), so freed activations are reused by the next step without page faults. The
arithmetic is unchanged (same kernels, same inputs: results are bit for bit the same); the cost is
resident memory that stays at the run's peak until the block ends (peak RSS 1.34 -> 2.0 GB for the
model step, 1.55 -> 2.07 GB for the whole step, in the same measurements). On leaving the block the settings go back to glibc's static defaults and the free
memory is returned (``malloc_trim``). DataLoader workers forked inside the block inherit the
settings. Elsewhere (macOS, Windows, musl) it does nothing and says so.

Used by ``pretrain`` (``PretrainConfig.host_memory``), segmentation fine-tuning (``SegConfig.host_memory``)
and by ``embed_cohort`` / ``embed_subject``
(``host_memory=``), where the forward pass alone ran 2.1x faster on the same CPU (batch 32: 459-466
against 207-229 patches/s).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
import warnings
from collections.abc import Iterator

__all__ = ["HOST_MEMORY", "keep_freed_memory", "glibc_malloc_tunable", "resolve_host_memory"]

#: ``PretrainConfig.host_memory``: ``auto`` (keep on a CPU run with glibc), ``keep``, ``system``.
HOST_MEMORY = ("auto", "keep", "system")

# mallopt parameters (glibc <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on exit (the static ones: setting a threshold turns the dynamic
# mmap threshold off for the rest of the process, which only matters for blocks of 128 KiB-32 MB)
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
#: Free memory the heap may keep at its top (2 GiB - 1, the largest value ``mallopt`` takes).
_KEEP_TRIM_THRESHOLD = 2**31 - 1
#: Active blocks in this process (the settings are process-wide: only the outermost block changes them).
_depth = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt``, ``malloc_trim`` and ``gnu_get_libc_version``).

    Looked up once per process: ``find_library`` runs ``ldconfig``, and every embedding or
    prediction call asks.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return libc


def glibc_malloc_tunable() -> bool:
    """True when this process's ``malloc`` is glibc's, whose settings :func:`keep_freed_memory` changes."""
    return _glibc() is not None


def resolve_host_memory(setting: str, device_type: str) -> str:
    """``"keep"`` or ``"system"`` for a run on ``device_type`` (``"auto"`` resolved).

    ``auto``: ``keep`` when the model trains on the CPU and ``malloc`` is glibc's; ``system`` on a GPU
    (host memory then holds only the loader's batches) and where the setting cannot be changed.
    ``keep`` where ``malloc`` is not glibc's warns and gives ``system`` (what the run will get).

    Raises:
        ValueError: on a value outside :data:`HOST_MEMORY`.
    """
    if setting not in HOST_MEMORY:
        raise ValueError(f"host_memory must be one of {', '.join(HOST_MEMORY)}, got {setting!r}")
    if setting == "auto":
        return "keep" if device_type == "cpu" and glibc_malloc_tunable() else "system"
    if setting == "keep" and not glibc_malloc_tunable():
        warnings.warn("host_memory='keep' needs glibc's malloc (Linux); this process has another one, so the "
                      "run uses the system's settings", stacklevel=3)
        return "system"
    return setting


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside the block, glibc ``malloc`` keeps freed memory for reuse (no ``mmap``, no trimming).

    Blocks nest: an inner block inside an active one changes nothing, and glibc's defaults come back
    when the outermost block ends. The settings are process-wide (every thread's ``malloc``).

    Args:
        enabled: ``False`` makes the block a no-op (the caller's ``host_memory="system"``).

    Yields:
        True when the settings were changed (glibc, ``enabled``); False otherwise.

    Example:
        >>> with keep_freed_memory() as kept:
        ...     pass  # train here; ``kept`` says whether freed memory is being reused
    """
    global _depth
    if _depth and enabled:  # nested in an active block (embedding inside a benchmark's run): already kept
        _depth += 1
        try:
            yield True
        finally:
            _depth -= 1
        return
    libc = _glibc() if enabled else None
    kept = False
    if libc is not None:
        kept = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1
        _depth += kept
    try:
        yield kept
    finally:
        if libc is not None:
            _depth -= kept
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)
