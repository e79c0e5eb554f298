"""Segmentation baselines that need no training: what a broken pipeline reaches.

:func:`baseline_dice` scores, like :func:`~drasclr_lib.segmentation.train.evaluate_segmenter`,
predicting background everywhere, every lung voxel as emphysema, or the classic density rule
(lung voxels below -950 HU). Notebook 05 draws them beside the label-efficiency curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.segmentation.train import candidate_pairs, dice_scores, lung_patches, patch_targets

__all__ = ["baseline_dice"]


def baseline_dice(store: PatchStore, subjects: Sequence, *, rule: str, num_classes: int = 2,
                  lung_masks: Mapping[str, str | Path] | None = None, min_lung_fraction: float = 0.05,
                  max_patches: int | None = None) -> pd.DataFrame:
    """Dice of a rule that needs no training, scored like :func:`evaluate_segmenter`.

    Args:
        store: patch store with label patches.
        subjects: indices or sids.
        rule: ``"background"`` (predict no emphysema anywhere), ``"all_lung"`` (every lung voxel is
            emphysema, class 1 for the 4-class task; needs ``lung_masks``) or ``"laa950"`` (lung
            voxels below -950 HU are emphysema, class 1; inside the lung when ``lung_masks`` are
            given, else every voxel below -950 HU).
        num_classes: 2 or 4, as the trained models.
        lung_masks: ``{sid: lung mask file}`` (the manifest's ``lung_mask``).
        min_lung_fraction, max_patches: the same patch selection as the trained models' evaluation.

    Returns:
        DataFrame with ``sid``, ``dice`` and ``dice_<class>`` per foreground class.

    Raises:
        ValueError: for an unknown rule, or ``all_lung`` without lung masks.
    """
    if rule not in ("background", "all_lung", "laa950"):
        raise ValueError(f"rule must be 'background', 'all_lung' or 'laa950', got {rule!r}")
    rows = []
    for s in (store.index(s) for s in subjects):
        sid = store.sids[s]
        locs = candidate_pairs(store, [s], min_lung_fraction)[:, 1]
        if not len(locs):  # no patch inside the scan's field of view: not scored, as for the models
            continue
        if max_patches and len(locs) > max_patches:
            locs = locs[np.unique(np.linspace(0, len(locs) - 1, int(max_patches)).round().astype(int))]
        truth = patch_targets(store.label_patches(s)[locs], num_classes)
        lung = None
        if lung_masks is not None and sid in lung_masks:
            lung = lung_patches(store, s, lung_masks[sid])[locs]
        if rule == "background":
            pred = np.zeros_like(truth)
        elif rule == "all_lung":
            if lung is None:
                raise ValueError(f"rule 'all_lung' needs the lung mask of subject {sid}")
            pred = lung.astype(np.int64)
        else:
            pred = (np.asarray(store.patches(s)[locs]) < -950).astype(np.int64)
            if lung is not None:
                pred &= lung
        rows.append({"sid": sid, **dice_scores(pred, truth, num_classes)})
    return pd.DataFrame(rows)
