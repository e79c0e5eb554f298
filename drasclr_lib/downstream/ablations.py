"""Pretraining runs of the compared methods: train what is missing, reuse what matches.

The three pretrained methods differ only in two flags of :class:`~drasclr_lib.training.config.
PretrainConfig`; everything else (store, epochs, ``max_steps``, batch, queue, lr, seed) is the
same *budget*, so the comparison is fair:

==================  ===========  ================  ==============
method              conditional  neighbor_weight   num_neighbors
==================  ===========  ================  ==============
``moco``            False        0                 0
``drasclr_no_nbr``  True         0                 0
``drasclr``         True         1                 2 (from base)
==================  ===========  ================  ==============

(With a zero weight the neighbour patches would only cost time, so the ablations also set
``num_neighbors = 0``.) Each run lives in ``<root>/ckpt_<method>_<hash>/`` where ``hash`` is a
digest of the budget-defining fields, and a ``done.json`` written after :func:`pretrain` returns
marks it complete: a rerun with the same setting reuses it, a different setting trains anew.
``drasclr`` may instead reuse notebook 02's checkpoint when its ``config.json`` matches the
requested budget on :data:`BUDGET_KEYS` and the store is the same — otherwise it trains its own
with the same budget as the ablations.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from drasclr_lib.utils import load_json, save_json

__all__ = ["PRETRAINED_METHODS", "ABLATION_FLAGS", "BUDGET_KEYS", "method_config", "config_digest", "matches",
           "ensure_checkpoint", "prepare_embeddings"]

PRETRAINED_METHODS = ("moco", "drasclr_no_nbr", "drasclr")
ABLATION_FLAGS = {
    "moco": {"conditional": False, "neighbor_weight": 0.0, "num_neighbors": 0},
    "drasclr_no_nbr": {"conditional": True, "neighbor_weight": 0.0, "num_neighbors": 0},
    "drasclr": {"conditional": True},
}
BUDGET_KEYS = ("epochs", "max_steps", "batch_size", "lr", "scale_lr", "momentum", "weight_decay", "queue_size",
               "moco_momentum", "temperature", "num_neighbors", "neighbor_weight", "conditional", "num_experts",
               "rep_dim", "proj_dim", "augment", "seed", "split_bn", "exclude_self_negatives")


def _store_path(store: str) -> str:
    from drasclr_lib.utils import output_dir

    return str(Path(store).resolve()) if store else str(output_dir("patch_store"))


def method_config(method: str, base, out_root: str | os.PathLike):
    """The ``PretrainConfig`` of ``method``: ``base`` with the method's flags, in its own folder.

    Args:
        method: one of :data:`PRETRAINED_METHODS`.
        base: a ``PretrainConfig`` holding the shared budget (store, epochs, max_steps, batch...).
        out_root: where the ``ckpt_<method>_<hash>`` folders go.

    Raises:
        ValueError: for an unknown method, or ``drasclr`` with a zero neighbour weight.
    """
    if method not in ABLATION_FLAGS:
        raise ValueError(f"unknown pretrained method {method!r}; expected one of {PRETRAINED_METHODS}")
    cfg = base.replace(**ABLATION_FLAGS[method])
    if method == "drasclr" and (cfg.neighbor_weight <= 0 or cfg.num_neighbors < 1):
        raise ValueError("the base config of 'drasclr' must keep the neighbour loss (neighbor_weight > 0, num_neighbors >= 1)")
    cfg = cfg.replace(store=_store_path(cfg.store))
    return cfg.replace(out_dir=str(Path(out_root) / f"ckpt_{method}_{config_digest(cfg)}"), resume=True)


def config_digest(cfg) -> str:
    """8 hex digits identifying the budget of a config (fields :data:`BUDGET_KEYS` and the store)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    key = {k: d.get(k) for k in BUDGET_KEYS}
    key["store"] = _store_path(d.get("store", ""))
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def matches(saved: dict, cfg) -> bool:
    """True when a saved config (``config.json`` dict) has the budget of ``cfg``."""
    want = cfg.to_dict()
    if _store_path(saved.get("store", "")) != _store_path(want.get("store", "")):
        return False
    return all(saved.get(k) == want.get(k) for k in BUDGET_KEYS)


def ensure_checkpoint(method: str, base, out_root: str | os.PathLike, *,
                      reuse: str | os.PathLike | None = None) -> tuple[Path, str]:
    """Return the checkpoint of ``method``, training it when no matching one exists.

    Args:
        method: one of :data:`PRETRAINED_METHODS`.
        base: the shared ``PretrainConfig`` budget.
        out_root: folder of the per-method runs (e.g. ``output_dir("04_downstream")``).
        reuse: optional folder of an existing run (notebook 02's) to reuse when its ``config.json``
            matches the method's config.

    Returns:
        ``(checkpoint_path, how)`` with ``how`` in ``{"reused <folder>", "cached", "trained"}``.

    Raises:
        Whatever :func:`drasclr_lib.train.pretrain` raises.
    """
    cfg = method_config(method, base, out_root)
    if reuse is not None:
        reuse = Path(reuse)
        if (reuse / "checkpoint.pt").exists() and (reuse / "config.json").exists() and matches(load_json(reuse / "config.json"), cfg):
            return reuse / "checkpoint.pt", f"reused {reuse}"
    out = Path(cfg.out_dir)
    done = out / "done.json"
    if done.exists() and (out / "checkpoint.pt").exists() and load_json(done).get("digest") == config_digest(cfg):
        return out / "checkpoint.pt", "cached"
    from drasclr_lib.train import pretrain

    path = Path(pretrain(cfg))
    save_json({"digest": config_digest(cfg), "method": method, "checkpoint": str(path)}, done)
    return path, "trained"


def prepare_embeddings(store, base, out_root: str | os.PathLike, *, methods=("random", *PRETRAINED_METHODS),
                       reuse_drasclr: str | os.PathLike | None = None, seed: int = 0, device: str = "auto",
                       batch_size: int = 256, calibration_batches: int = 64,
                       progress: bool = True) -> tuple[dict, dict]:
    """Patch embeddings of every compared encoder, training the missing pretraining runs.

    ``random`` is the same architecture with random weights (``drasclr_lib.embed.random_encoder``,
    BatchNorm statistics calibrated on the store, conditional like DrasCLR); the pretrained
    methods come from :func:`ensure_checkpoint` and are loaded with ``load_encoder``.

    Args:
        store: a ``PatchStore``.
        base: the shared ``PretrainConfig`` budget (its ``store`` should be this store's folder).
        out_root: folder of the pretraining runs (e.g. ``output_dir("04_downstream")``).
        methods: which encoders to embed with.
        reuse_drasclr: notebook 02's run folder, reused for ``drasclr`` when its budget matches.
        seed: seed of the random encoder.
        calibration_batches: batches of the random encoder's BatchNorm calibration.
        device, batch_size, progress: passed to ``embed_cohort``.

    Returns:
        ``({method: EmbeddingSet}, {method: how})`` where ``how`` says where the weights came from.
    """
    from drasclr_lib.embed import embed_cohort, random_encoder
    from drasclr_lib.models import load_encoder

    embeddings, how = {}, {}
    for m in methods:
        if m == "random":
            enc = random_encoder(seed=seed, store=store, device=device, calibration_batches=calibration_batches,
                                 rep_dim=base.rep_dim, num_experts=base.num_experts, proj_dim=base.proj_dim)
            how[m] = f"random weights (seed {seed}), BatchNorm calibrated on the store"
        else:
            path, how[m] = ensure_checkpoint(m, base, out_root, reuse=reuse_drasclr if m == "drasclr" else None)
            enc = load_encoder(path)
        embeddings[m] = embed_cohort(enc, store, batch_size=batch_size, device=device, progress=progress,
                                     meta={"method": m, "source": how[m]})
    return embeddings, how
