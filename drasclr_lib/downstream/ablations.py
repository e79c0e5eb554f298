"""Patch embeddings of the compared encoders: random weights and the pretrained methods.

The pretrained methods (``moco``, ``drasclr_no_nbr``, ``drasclr``: one budget, two flags changed)
and their runs, trained when missing and reused when finished, belong to
:mod:`drasclr_lib.training.runs`; notebook 04 calls :func:`~drasclr_lib.training.runs.ensure_checkpoint`
through this module (``ablations.ensure_checkpoint``), which is why it is imported here by name.
"""

from __future__ import annotations

import os

from drasclr_lib.training.runs import PRETRAINED_METHODS, ensure_checkpoint

__all__ = ["prepare_embeddings", "ensure_checkpoint", "PRETRAINED_METHODS"]


def prepare_embeddings(store, base, out_root: str | os.PathLike, *, methods=("random", *PRETRAINED_METHODS),
                       reuse_drasclr: str | os.PathLike | None = None, seed: int = 0, device: str = "auto",
                       batch_size: int | None = None, calibration_batches: int = 64,
                       progress: bool = True) -> tuple[dict, dict]:
    """Patch embeddings of every compared encoder, training the missing pretraining runs.

    ``random`` is the same architecture with random weights (``drasclr_lib.models.random_encoder``,
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
    from drasclr_lib.embed import embed_cohort
    from drasclr_lib.models import load_encoder, random_encoder

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
