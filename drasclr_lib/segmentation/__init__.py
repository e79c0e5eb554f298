"""Label-efficient emphysema segmentation with the DrasCLR encoder (notebook 05).

- :mod:`~drasclr_lib.segmentation.model`: :class:`DrasSegNet` (U-Net decoder on the conditional
  encoder's stages) and :func:`build_segmenter` (random, MoCo or DrasCLR initialisation).
- :mod:`~drasclr_lib.segmentation.train`: fine-tuning on atlas patches (Dice + CE) and
  patch-pooled held-out Dice.
- :mod:`~drasclr_lib.segmentation.lungs`: lung masks cut at the store's patches (read once per process).
- :mod:`~drasclr_lib.segmentation.experiment`: the label-efficiency experiment.
- :mod:`~drasclr_lib.segmentation.baselines`: Dice of rules that need no training.
- :mod:`~drasclr_lib.segmentation.inference`: whole-scan inference to a NIfTI aligned with the input.
"""

from drasclr_lib.segmentation.model import INITS, DrasSegNet, build_segmenter
from drasclr_lib.segmentation.train import (SegConfig, candidate_pairs, class_names, dice_scores, evaluate_segmenter,
                                            patch_targets, predict_patches, train_segmenter)

__all__ = ["INITS", "DrasSegNet", "build_segmenter", "SegConfig", "candidate_pairs", "class_names", "dice_scores",
           "evaluate_segmenter", "patch_targets", "predict_patches", "train_segmenter"]
