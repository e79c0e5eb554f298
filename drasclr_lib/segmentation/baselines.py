"""Segmentation baselines that need no training: what a broken pipeline reaches.

:func:`baseline_dice` scores, like :func:`~drasclr_lib.segmentation.train.evaluate_segmenter`,
predicting background everywhere, every lung voxel as emphysema, the classic density rule
(lung voxels below -950 HU) or, for the subtypes, that rule with the class taken from position
(``laa950_position``: subpleural -> paraseptal, upper lung -> centrilobular, lower ->
panlobular). Notebook 05 draws them beside the label-efficiency curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from drasclr_lib.data.patch_store import PatchStore, cut_patches
from drasclr_lib.segmentation.lungs import lung_patches
from drasclr_lib.segmentation.train import candidate_pairs, dice_scores, patch_targets

__all__ = ["PLEURA_MM", "RULES", "baseline_dice", "lung_depth_patches", "rule_prediction", "superior_axis"]

#: The rules :func:`baseline_dice` knows.
RULES = ("background", "all_lung", "laa950", "laa950_position")
#: ``laa950_position``: emphysema voxels at most this far (mm) from the lung surface are paraseptal.
PLEURA_MM = 5.0


def superior_axis(store: PatchStore) -> tuple[int, float]:
    """Which column of ``store.locs`` runs from the feet to the head, and its sign.

    The locations are normalised atlas corners (i, j, k) of the atlas file's grid;
    ``store.json`` keeps that grid's ``atlas_geometry`` (direction cosines, LPS physical
    frame, +z = superior). The index axis whose direction has the largest z component is the
    superior-inferior one. Both the published atlas (stored LAS) and an atlas built from a
    subject (reoriented LPS) give ``(2, +1.0)``: ``locs[:, 2]`` grows towards the head. A store
    without ``atlas_geometry`` (not written by preprocessing) is assumed to be the same.

    Returns:
        ``(axis, sign)``: ``sign * store.locs[:, axis]`` increases towards the head.
    """
    geometry = store.meta.get("atlas_geometry") or {}
    if "direction" not in geometry:
        return 2, 1.0
    direction = np.asarray(geometry["direction"], dtype=np.float64).reshape(3, 3)  # column a = index axis a
    axis = int(np.argmax(np.abs(direction[2])))
    return axis, float(np.sign(direction[2, axis]))


def lung_depth_patches(store: PatchStore, subject: int | str,
                       lung_mask_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The subject's lung mask and each lung voxel's depth below the lung surface, cut at its patches.

    The mask is put on the subject's padded 1 mm grid exactly as
    :func:`~drasclr_lib.segmentation.lungs.lung_patches` does. The depth is the Euclidean
    distance (mm) from a lung voxel to the nearest voxel outside the lung, computed on the
    **whole** mask (its bounding box plus a margin of non-lung), so a patch border crossing the
    lung is not mistaken for pleura. The lung surface is the mask's boundary: the costal,
    diaphragmatic and mediastinal pleura, but not the fissures (a lung mask without lobes does
    not show them), and a lung cut by the scan's field of view gets a surface at the cut.

    Args:
        store: patch store written by preprocessing (records with ``grid_1mm`` and
            ``corners_subject``).
        subject: index or sid.
        lung_mask_path: the subject's lung mask file (nonzero = lung).

    Returns:
        ``lung`` (L, P, P, P) bool and ``depth_mm`` (L, P, P, P) float32 (0 outside the lung),
        (k, j, i) order like the store's patches.

    Raises:
        ValueError: when the subject's record lacks ``grid_1mm`` or ``corners_subject``.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    from drasclr_lib.preprocess.pipeline import on_subject_grid

    grid, corners = store.subject_grid(subject), store.corners(subject)
    lung = sitk.GetArrayFromImage(on_subject_grid(lung_mask_path, grid, kind="label")) > 0
    P = store.patch_size
    lung_p = cut_patches(lung, corners, P, False)[0]
    if not lung.any():
        return lung_p, np.zeros(lung_p.shape, np.float32)
    # the distance on the lung's bounding box with one voxel of background around it (not the
    # whole padded grid: a paper-size grid would need GBs), patches cut from there
    box = ndimage.find_objects(lung.astype(np.uint8))[0]
    depth = ndimage.distance_transform_edt(np.pad(lung[box], 1), sampling=grid.GetSpacing()[::-1]).astype(np.float32)
    start_ijk = np.array([sl.start - 1 for sl in box[::-1]])  # grid index of depth[0, 0, 0], (i, j, k)
    return lung_p, cut_patches(depth, np.asarray(corners) - start_ijk, P, 0.0)[0]


def baseline_dice(store: PatchStore, subjects: Sequence, *, rule: str, num_classes: int = 2,
                  lung_masks: Mapping[str, str | Path] | None = None, min_lung_fraction: float = 0.05,
                  max_patches: int | None = None) -> pd.DataFrame:
    """Dice of a rule that needs no training, scored like :func:`evaluate_segmenter`.

    The same patches (valid, at least ``min_lung_fraction`` lung, ``max_patches`` evenly spaced),
    the same targets (:func:`patch_targets`) and the same voxel-pooled Dice per foreground class
    (:func:`dice_scores`): ``dice`` is the macro mean over the foreground classes (three for
    ``num_classes=4``, each class absent from both truth and prediction counting as 1).

    Args:
        store: patch store with label patches.
        subjects: indices or sids.
        rule: ``"background"`` (predict no emphysema anywhere), ``"all_lung"`` (every lung voxel is
            emphysema, class 1 for the 4-class task; needs ``lung_masks``), ``"laa950"`` (lung
            voxels below -950 HU are emphysema, class 1; inside the lung when ``lung_masks`` are
            given, else every voxel below -950 HU) or ``"laa950_position"`` (the voxels of
            ``laa950``, classed by position for the 4-class task: paraseptal (3) within
            :data:`PLEURA_MM` of the lung surface (:func:`lung_depth_patches`), else
            centrilobular (1) in patches of the upper half of the atlas and panlobular (2) in
            the lower half, split at the middle of the store's location range on the
            superior-inferior axis (:func:`superior_axis`); a patch at the middle counts as
            upper. Needs ``lung_masks`` with 4 classes. With ``num_classes=2`` every emphysema
            voxel is class 1 and the rule is exactly ``laa950``).
        num_classes: 2 or 4, as the trained models.
        lung_masks: ``{sid: lung mask file}`` (the manifest's ``lung_mask``).
        min_lung_fraction, max_patches: the same patch selection as the trained models' evaluation.

    Returns:
        DataFrame with ``sid``, ``dice`` and ``dice_<class>`` per foreground class (a subject
        without a valid patch has no row, as for the models).

    Raises:
        ValueError: for an unknown rule, or ``all_lung`` (any task) or ``laa950_position``
            (4 classes) without the subject's lung mask.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    rows = []
    for s in (store.index(s) for s in subjects):
        sid = store.sids[s]
        locs = candidate_pairs(store, [s], min_lung_fraction)[:, 1]
        if not len(locs):  # no patch inside the scan's field of view: not scored, as for the models
            continue
        if max_patches and len(locs) > max_patches:
            locs = locs[np.unique(np.linspace(0, len(locs) - 1, int(max_patches)).round().astype(int))]
        truth = patch_targets(store.label_patches(s)[locs], num_classes)
        mask = None if lung_masks is None else lung_masks.get(sid)
        pred = rule_prediction(store, s, locs, rule=rule, num_classes=num_classes, lung_mask=mask)
        rows.append({"sid": sid, **dice_scores(pred, truth, num_classes)})
    return pd.DataFrame(rows)


def rule_prediction(store: PatchStore, subject: int | str, locs: np.ndarray, *, rule: str, num_classes: int = 2,
                    lung_mask: str | Path | None = None) -> np.ndarray:
    """What a rule of :func:`baseline_dice` predicts at some of a subject's patches.

    Args:
        store: patch store.
        subject: index or sid.
        locs: (M,) int location indices.
        rule, num_classes: as :func:`baseline_dice`.
        lung_mask: the subject's lung mask file, or ``None``.

    Returns:
        pred (M, P, P, P) int64 class labels.

    Raises:
        ValueError: for an unknown rule, or ``all_lung`` (any task) or ``laa950_position``
            (4 classes) without ``lung_mask``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    s, locs = store.index(subject), np.asarray(locs, dtype=np.int64)
    sid = store.sids[s]
    by_position = rule == "laa950_position" and num_classes == 4
    lung = depth = None
    if by_position:
        if lung_mask is None:
            raise ValueError(f"rule 'laa950_position' needs the lung mask of subject {sid} (its distance to the "
                             "pleura)")
        lung, depth = (a[locs] for a in lung_depth_patches(store, s, lung_mask))
    elif lung_mask is not None:
        lung = lung_patches(store, s, lung_mask)[locs]
    if rule == "background":
        return np.zeros((len(locs),) + (store.patch_size,) * 3, dtype=np.int64)
    if rule == "all_lung":
        if lung is None:
            raise ValueError(f"rule 'all_lung' needs the lung mask of subject {sid}")
        return lung.astype(np.int64)
    pred = (np.asarray(store.patches(s)[locs]) < -950).astype(np.int64)
    if lung is not None:
        pred &= lung
    if by_position:
        axis, sign = superior_axis(store)
        height = sign * store.locs[:, axis]
        upper = height >= (height.min() + height.max()) / 2  # (L,) bool: patch in the upper half of the atlas
        pred *= np.where(upper[locs], 1, 2)[:, None, None, None]
        pred[(pred > 0) & (depth <= PLEURA_MM)] = 3
    return pred
