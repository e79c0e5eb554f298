"""HU window and the network's input scale (SPEC step 7), shared by training, embedding and segmentation."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["HU_MIN", "HU_MAX", "hu_to_input"]

HU_MIN = -1024
HU_MAX = 240


def hu_to_input(patches_hu):
    """Map HU to the encoder's input range: ``x = (clip(hu, -1024, 240) + 1024) / 632 - 1``.

    Args:
        patches_hu: NumPy array or torch tensor of HU values, any shape (e.g. (B, 32, 32, 32) int16).

    Returns:
        float32 array/tensor of the same shape, in [-1, 1] (a tensor stays on its device).
    """
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported; NumPy callers skip loading it
    if torch is not None and isinstance(patches_hu, torch.Tensor):
        x = patches_hu.to(torch.float32).clamp(HU_MIN, HU_MAX)
        return (x + 1024.0) / 632.0 - 1.0
    x = np.clip(np.asarray(patches_hu, dtype=np.float32), HU_MIN, HU_MAX)
    return (x + 1024.0) / 632.0 - 1.0
