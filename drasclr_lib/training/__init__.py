"""DrasCLR pretraining internals: data (sampler, dataset), checkpoints, the training loop.

The public entry points are re-exported by :mod:`drasclr_lib.train`.
"""

from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset, SampleIndex

__all__ = ["LocationBatchSampler", "PatchPairDataset", "SampleIndex"]
