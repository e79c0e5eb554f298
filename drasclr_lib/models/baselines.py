"""The random-weight baseline encoder: what an encoder gives before any pretraining.

:func:`random_encoder` builds a seeded ``DrasEncoder`` with its initial weights;
:func:`calibrate_batchnorm` sets its BatchNorm running statistics from patches of a store, without
which every patch embeds to nearly the same vector. Notebooks 02-05, ``drasclr embed --checkpoint
random`` and the ablations compare pretrained encoders with this baseline.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from drasclr_lib.intensity import hu_to_input
from drasclr_lib.models.encoder import DrasEncoder
from drasclr_lib.utils import resolve_device

__all__ = ["random_encoder", "calibrate_batchnorm"]


def random_encoder(seed: int = 0, *, store=None, calibration_batches: int = 64, batch_size: int = 32,
                   device: str = "auto", **kwargs) -> DrasEncoder:
    """A ``DrasEncoder`` with random (initial) weights: the baseline that shows what pretraining adds.

    A freshly built encoder in eval mode normalises with BatchNorm's initial running statistics
    (mean 0, variance 1), which do not match its activations: with the published initialisation
    the signal shrinks layer after layer and ``h`` is nearly constant (about 1e-10 variation
    between subjects), a baseline no probe can read. Given ``store``, the running statistics are
    therefore calibrated on data first (:func:`calibrate_batchnorm`): the weights stay random, the
    normalisation is the one the network would have on these patches, as a pretrained encoder's is.

    The global torch and NumPy RNGs are left untouched; the same seed always gives the same encoder.

    Args:
        seed: seed of the weight initialisation and of the calibration sample.
        store: a ``PatchStore`` to calibrate BatchNorm on (recommended); ``None`` keeps the
            initial statistics.
        calibration_batches, batch_size: size of the calibration sample (batches of one location).
        device: where calibration runs.
        **kwargs: passed to ``DrasEncoder`` (``rep_dim``, ``num_experts``, ``conditional``...).

    Returns:
        The encoder in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        enc = DrasEncoder(**kwargs)
    if store is not None:
        calibrate_batchnorm(enc, store, num_batches=calibration_batches, batch_size=batch_size, seed=seed,
                            device=device)
    return enc.eval()


def calibrate_batchnorm(encoder: nn.Module, store, *, num_batches: int = 64, batch_size: int = 32, seed: int = 0,
                        device: str = "auto") -> nn.Module:
    """Set the BatchNorm running statistics of ``encoder`` to averages over patches of ``store``.

    Each batch holds one random location across random subjects (as in pretraining): HU patches
    (B, P, P, P) scaled to [-1, 1] and their location (B, 3) in [-1, 1]. The running mean and
    variance become the plain average of the batch statistics (``momentum=None``). Only BatchNorm
    buffers change; the weights do not.

    Args:
        encoder: a ``DrasEncoder``; moved to ``device``.
        store: a ``PatchStore``.
        num_batches: number of calibration batches.
        batch_size: subjects per batch (capped by the store's subject count).
        seed: seed of the sample of (location, subjects).
        device: where the forward passes run.

    Returns:
        The encoder, in eval mode.

    Raises:
        ValueError: for non-positive sizes or an empty store.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches and batch_size must be positive, got {num_batches}, {batch_size}")
    if store.num_subjects == 0:
        raise ValueError(f"no subjects in {store.root} to calibrate BatchNorm on")
    dev = resolve_device(device)
    encoder.to(dev)
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    rng = np.random.default_rng(seed)
    b = min(batch_size, store.num_subjects)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average of the batch statistics
    encoder.train()
    try:
        with torch.no_grad():
            for _ in range(num_batches):
                loc = int(rng.integers(store.num_locations))
                subjects = np.sort(rng.choice(store.num_subjects, size=b, replace=False))
                x = torch.from_numpy(hu_to_input(store.location_batch(subjects, loc)))[:, None].to(dev)
                encoder(x, torch.as_tensor(store.locs[loc], device=dev).expand(b, 3))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        encoder.eval()
    return encoder
