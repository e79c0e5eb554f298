"""Pretraining runs on disk: reuse a finished run of the same settings, else train (or resume) it.

A run folder holds what :func:`~drasclr_lib.training.loop.pretrain` writes (``checkpoint.pt``,
``config.json``, ``history.csv``) and, once :func:`reuse_or_train` has seen ``pretrain`` return,
``done.json`` (:func:`mark_finished`: the digest of the run's budget, the checkpoint's size and
modification time, and the store's content digest,
:func:`~drasclr_lib.models.fingerprint.store_digest`: a store rebuilt in the same folder makes the
run ``"other"``). A folder holds **the finished run of a config** (:func:`run_status`) when

* its ``done.json`` names the config's budget (:func:`config_digest`: the fields
  :data:`~drasclr_lib.training.config.BUDGET_KEYS` and the store) and the checkpoint is still the
  one it was written for, or else (no ``done.json``: a run trained by ``pretrain`` directly or a
  copied folder)
* its checkpoint has the config's :data:`~drasclr_lib.training.config.RESUME_KEYS` and store, and
  stopped at the config's stop step (``min(total_steps, max_steps)``). A checkpoint of the same
  settings that stopped earlier is *unfinished*: it is resumed rather than trained anew.

The compared pretraining methods (notebooks 04 and 05) are one budget with two flags changed:

==================  ===========  ================  ==============
method              conditional  neighbor_weight   num_neighbors
==================  ===========  ================  ==============
``moco``            False        0                 0
``drasclr_no_nbr``  True         0                 0
``drasclr``         True         1                 2 (from base)
==================  ===========  ================  ==============

(With a zero weight the neighbour patches would only cost time, so the ablations also set
``num_neighbors = 0``.) Each method's run lives in ``<root>/ckpt_<method>_<digest>/``
(:func:`method_config`), so a rerun with the same budget finds it and a different budget trains anew.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from drasclr_lib.models.fingerprint import store_digest
from drasclr_lib.training.checkpoint import load_checkpoint
from drasclr_lib.training.config import BUDGET_KEYS, RESUME_KEYS, PretrainConfig
from drasclr_lib.training.loop import pretrain
from drasclr_lib.utils import load_json, output_dir, save_json

__all__ = ["config_digest", "matches", "run_status", "mark_finished", "find_finished", "reuse_or_train",
           "pretrain_or_reuse", "PRETRAINED_METHODS", "ABLATION_FLAGS", "method_config", "ensure_checkpoint",
           "finished_runs"]

CHECKPOINT, DONE = "checkpoint.pt", "done.json"
PRETRAINED_METHODS = ("moco", "drasclr_no_nbr", "drasclr")
ABLATION_FLAGS = {
    "moco": {"conditional": False, "neighbor_weight": 0.0, "num_neighbors": 0},
    "drasclr_no_nbr": {"conditional": True, "neighbor_weight": 0.0, "num_neighbors": 0},
    "drasclr": {"conditional": True},
}


def _store_path(store: str) -> str:
    return str(Path(store).resolve()) if store else str(output_dir("patch_store"))


def config_digest(cfg: PretrainConfig | dict) -> str:
    """8 hex digits identifying the budget of a config (fields ``BUDGET_KEYS`` and the resolved store)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    key = {k: d.get(k) for k in BUDGET_KEYS}
    key["store"] = _store_path(d.get("store", ""))
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def matches(saved: dict, cfg: PretrainConfig, keys: Iterable[str] = BUDGET_KEYS) -> bool:
    """True when a saved config (``config.json`` or a checkpoint's ``config``) has ``cfg``'s store and ``keys``."""
    want = cfg.to_dict()
    if _store_path(saved.get("store", "")) != _store_path(want.get("store", "")):
        return False
    return all(saved.get(k) == want.get(k) for k in keys)


def mark_finished(folder: str | os.PathLike, cfg: PretrainConfig) -> Path:
    """Write ``folder/done.json``: ``folder/checkpoint.pt`` is the finished run of ``cfg``'s budget.

    Raises:
        FileNotFoundError: when the folder has no checkpoint.
    """
    ckpt = Path(folder) / CHECKPOINT
    st = ckpt.stat()
    return save_json({"digest": config_digest(cfg), "checkpoint": str(ckpt), "checkpoint_bytes": st.st_size,
                      "checkpoint_mtime_ns": st.st_mtime_ns, "store_digest": store_digest(_store_path(cfg.store))},
                     Path(folder) / DONE)


def run_status(folder: str | os.PathLike, cfg: PretrainConfig) -> str:
    """What ``folder`` holds for ``cfg`` (see the module docstring).

    Returns:
        ``"missing"`` (no checkpoint), ``"finished"``, ``"unfinished"`` (same settings, stopped
        before ``cfg``'s stop step: resumable) or ``"other"`` (other settings, further than
        ``cfg``'s stop, or unreadable).
    """
    folder = Path(folder)
    ckpt = folder / CHECKPOINT
    if not ckpt.exists():
        return "missing"
    try:
        done = load_json(folder / DONE) if (folder / DONE).exists() else {}
    except ValueError:  # a damaged marker counts as none
        done = {}
    st = ckpt.stat()
    if done.get("store_digest") and store_digest(_store_path(cfg.store)) not in (None, done["store_digest"]):
        return "other"  # trained on what the store held before it was rebuilt in the same folder
    if done.get("digest") == config_digest(cfg) and done.get("checkpoint_bytes", st.st_size) == st.st_size \
            and done.get("checkpoint_mtime_ns", st.st_mtime_ns) == st.st_mtime_ns:
        return "finished"
    try:
        saved = load_checkpoint(ckpt, map_location="cpu")
        same = matches(saved["config"], cfg, RESUME_KEYS)
        step, stop = int(saved["step"]), cfg.stop_step(int(saved["run"]["total_steps"]))
    except (ValueError, KeyError, TypeError, AttributeError):  # unreadable or foreign: not this run
        return "other"
    if not same or step > stop:
        return "other"
    return "finished" if step == stop else "unfinished"


def find_finished(cfg: PretrainConfig, folders: Iterable[str | os.PathLike]) -> Path | None:
    """The first of ``folders`` that holds the finished run of ``cfg``, or None."""
    for folder in folders:
        if run_status(folder, cfg) == "finished":
            return Path(folder)
    return None


def reuse_or_train(cfg: PretrainConfig, *, reuse: Iterable[str | os.PathLike] = (),
                   force: bool = False) -> tuple[Path, str]:
    """The checkpoint of ``cfg``'s run: an existing finished one when there is one, else trained now.

    In order: the first folder of ``reuse`` holding the finished run of ``cfg`` (e.g. notebook 02's
    run for notebook 04); ``cfg.out_path()`` when it holds it; else ``pretrain`` in
    ``cfg.out_path()``, resuming an unfinished run of the same settings, replacing a run of other
    settings, or, with no checkpoint there, with ``cfg.resume`` as given. ``force`` skips the
    search and trains anew. A trained run is marked finished (:func:`mark_finished`).

    Returns:
        ``(checkpoint_path, how)`` with ``how`` in ``{"reused <folder>", "cached", "trained"}``.

    Raises:
        Whatever :func:`~drasclr_lib.training.loop.pretrain` raises.
    """
    found = None if force else find_finished(cfg, reuse)
    if found is not None:
        return found / CHECKPOINT, f"reused {found}"
    out = cfg.out_path()
    status = "other" if force else run_status(out, cfg)
    if status == "finished":
        return out / CHECKPOINT, "cached"
    (out / DONE).unlink(missing_ok=True)  # a stale marker must not outlive the run it described
    resume = {"unfinished": True, "missing": cfg.resume}.get(status, False)
    path = Path(pretrain(cfg.replace(resume=resume)))
    mark_finished(path.parent, cfg)
    return path, "trained"


def pretrain_or_reuse(cfg: PretrainConfig, *, force: bool = False) -> tuple[Path, bool]:
    """:func:`reuse_or_train` in ``cfg.out_dir`` alone (notebook 02): ``(checkpoint_path, trained)``.

    ``trained`` is False when the finished run of the same settings was reused; ``force`` retrains.
    """
    path, how = reuse_or_train(cfg, force=force)
    return path, how == "trained"


def method_config(method: str, base: PretrainConfig, out_root: str | os.PathLike) -> PretrainConfig:
    """The ``PretrainConfig`` of ``method``: ``base`` with the method's flags, in its own folder.

    Args:
        method: one of :data:`PRETRAINED_METHODS`.
        base: a ``PretrainConfig`` holding the shared budget (store, epochs, max_steps, batch...).
        out_root: where the ``ckpt_<method>_<digest>`` folders go.

    Raises:
        ValueError: for an unknown method, or ``drasclr`` with a zero neighbour weight.
    """
    if method not in ABLATION_FLAGS:
        raise ValueError(f"unknown pretrained method {method!r}; expected one of {PRETRAINED_METHODS}")
    cfg = base.replace(**ABLATION_FLAGS[method])
    if method == "drasclr" and (cfg.neighbor_weight <= 0 or cfg.num_neighbors < 1):
        raise ValueError("the base config of 'drasclr' must keep the neighbour loss "
                         "(neighbor_weight > 0, num_neighbors >= 1)")
    cfg = cfg.replace(store=_store_path(cfg.store))
    return cfg.replace(out_dir=str(Path(out_root) / f"ckpt_{method}_{config_digest(cfg)}"), resume=True)


def finished_runs(root: str | os.PathLike, method: str) -> list[Path]:
    """Folders ``root/ckpt_<method>_*`` marked finished, whatever their budget (sorted)."""
    return [done.parent for done in sorted(Path(root).glob(f"ckpt_{method}_*/{DONE}"))
            if (done.parent / CHECKPOINT).exists()]


def ensure_checkpoint(method: str, base: PretrainConfig, out_root: str | os.PathLike, *,
                      reuse: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The checkpoint of ``method`` with ``base``'s budget: :func:`reuse_or_train` of :func:`method_config`.

    Args:
        method: one of :data:`PRETRAINED_METHODS`.
        base: the shared ``PretrainConfig`` budget.
        out_root: folder of the per-method runs (e.g. ``output_dir("04_downstream")``).
        reuse: optional folder of an existing run (notebook 02's), reused when it holds the finished
            run of the method's config.

    Returns:
        ``(checkpoint_path, how)`` with ``how`` in ``{"reused <folder>", "cached", "trained"}``.

    Raises:
        ValueError: from :func:`method_config`; whatever ``pretrain`` raises.
    """
    return reuse_or_train(method_config(method, base, out_root), reuse=() if reuse is None else (reuse,))
