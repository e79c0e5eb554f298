"""Fine-tuning :class:`DrasSegNet` on 32³ atlas patches, and patch-level evaluation.

Each training step draws one atlas location and a batch of the given subjects' patches at that
location (one shared conditional kernel per layer, the encoder's fast path); each patch is
segmented with its own location condition. The loss is MONAI's Dice loss (foreground classes,
over the batch) + class-weighted cross-entropy.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.host_memory import HOST_MEMORY, keep_freed_memory, resolve_host_memory
from drasclr_lib.intensity import hu_to_input
from drasclr_lib.segmentation.lungs import lung_patches
from drasclr_lib.utils import resolve_device, seed_everything

__all__ = ["SegConfig", "patch_targets", "candidate_pairs", "lung_patches", "train_segmenter", "predict_patches", "dice_scores",
           "evaluate_segmenter", "class_names", "config_dict"]


@dataclass
class SegConfig:
    """Settings of a fine-tuning run.

    Attributes:
        num_classes: 2 = emphysema vs not; 4 = none / centrilobular / panlobular / paraseptal.
        steps: optimiser steps.
        batch_size: patches per step.
        lr: AdamW learning rate of the decoder.
        encoder_lr_scale: the encoder's learning rate is ``lr * encoder_lr_scale`` (0 freezes it).
        weight_decay: AdamW weight decay.
        min_lung_fraction: patches with less lung than this are not sampled for training
            (uses the store's ``patch_lung_fraction``; all patches when the store lacks it).
        flip: random flips as augmentation (labels flipped with the image).
        fg_oversample: share of the batches drawn among the (subject, location) patches that
            hold labelled emphysema, in proportion to their emphysema voxels (all of one
            location, as every batch); the rest are drawn uniformly among all patches. Emphysema is a small share of the voxels, and without this
            a short run learns to predict no emphysema at all (nnU-Net oversamples foreground
            for the same reason). 0 disables it; ignored when no patch holds emphysema.
        amp: mixed precision on CUDA (ignored on CPU).
        host_memory: ``"auto"`` (on a CPU with glibc, freed memory is kept for reuse while the model
            trains: 1.3-1.5x a fine-tuning step at batch 16), ``"keep"`` or ``"system"``; see
            :mod:`drasclr_lib.host_memory`. Not part of a cached run's identity.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        eval_patches: patches per held-out subject scored by :func:`evaluate_segmenter` in the
            label-efficiency experiment (evenly spaced over the subject's lung locations, the
            same for every model); 0 = all of them.
        dice_background: include the background class in the Dice part of the loss. Off by
            default: emphysema is a small share of the voxels and a background Dice term lets a
            short run settle on predicting no emphysema at all.
        fg_weight: cross-entropy weight of the emphysema classes (background 1), for the same
            reason.
        seed: seed of the sampling and of the decoder's initialisation.
        bn_reset: BatchNorm running statistics are reset when fine-tuning starts and averaged
            cumulatively over the first ``1 / 0.1 = 10`` steps, then tracked with momentum 0.1.
            A short run otherwise evaluates with statistics that are still mostly the
            initial ones (mean 0, variance 1 for random weights; the pretraining
            distribution for pretrained ones), which ruins the eval-mode predictions.
    """

    num_classes: int = 2
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-2
    encoder_lr_scale: float = 1.0
    weight_decay: float = 1e-5
    min_lung_fraction: float = 0.05
    flip: bool = True
    fg_oversample: float = 0.5
    amp: bool = True
    host_memory: str = "auto"
    device: str = "auto"
    eval_patches: int = 0
    dice_background: bool = False
    fg_weight: float = 3.0
    seed: int = 0
    bn_reset: bool = True

    def __post_init__(self):
        if self.num_classes not in (2, 4):
            raise ValueError(f"num_classes must be 2 (emphysema vs not) or 4 (by subtype), got {self.num_classes}")
        if not self.fg_weight > 0:
            raise ValueError(f"fg_weight must be > 0, got {self.fg_weight}")
        if not 0 <= self.fg_oversample <= 1:
            raise ValueError(f"fg_oversample must lie in [0, 1], got {self.fg_oversample}")
        if self.eval_patches < 0:
            raise ValueError(f"eval_patches must be >= 0 (0 = all), got {self.eval_patches}")
        if self.host_memory not in HOST_MEMORY:
            raise ValueError(f"host_memory must be one of {', '.join(HOST_MEMORY)}, got {self.host_memory!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")


def class_names(num_classes: int) -> list[str]:
    """Names of the classes of a ``num_classes`` task."""
    return ["background", "emphysema"] if num_classes == 2 else ["none", "centrilobular", "panlobular", "paraseptal"]


def patch_targets(label_patches: np.ndarray, num_classes: int) -> np.ndarray:
    """Voxel targets from label patches (0 none, 1 CL, 2 PL, 3 PS): binary or by subtype (int64)."""
    lab = np.asarray(label_patches)
    return (lab > 0).astype(np.int64) if num_classes == 2 else np.clip(lab, 0, 3).astype(np.int64)


def candidate_pairs(store: PatchStore, subjects, min_lung_fraction: float) -> np.ndarray:
    """(subject, location) pairs used for training and evaluation: (M, 2) int64.

    Invalid patches (less than the store's ``min_patch_fov`` inside the scanned volume,
    :meth:`PatchStore.valid_patches`) are never used: they are mostly padding, which reads as air.
    Of the valid locations, those whose ``patch_lung_fraction`` (from its record) is below
    ``min_lung_fraction`` are left out; all valid locations are kept when the record lacks the list,
    when ``min_lung_fraction`` is 0, or when no location would remain. A subject with no valid
    patch contributes no pair.
    """
    pairs = []
    for s in subjects:
        s = store.index(s)
        locs = np.flatnonzero(store.valid_patches(s))
        frac = store.patch_values(s, "patch_lung_fraction")
        if frac is not None and min_lung_fraction > 0 and len(locs):
            keep = np.asarray(frac, dtype=float)[locs] >= min_lung_fraction
            locs = locs[keep] if keep.any() else locs
        pairs.extend((int(s), int(l)) for l in locs)
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def train_segmenter(model, store: PatchStore, subjects, cfg: SegConfig, *, progress: bool = True) -> list[dict]:
    """Fine-tune ``model`` in place on the label patches of ``subjects``.

    Args:
        model: a :class:`~drasclr_lib.segmentation.model.DrasSegNet` with ``cfg.num_classes`` outputs.
        store: a patch store with label patches.
        subjects: indices of the labelled training subjects.
        cfg: the run's settings.

    Returns:
        History, one dict per step (``step``, ``loss``, ``batch_dice`` of the step's own batch in
        train mode, ``seconds``).

    Raises:
        ValueError: when the store has no label patches or ``subjects`` is empty.
    """
    from monai.losses import DiceLoss

    subjects = [int(s) for s in subjects]
    if not subjects:
        raise ValueError("train_segmenter needs at least one labelled subject")
    for s in subjects:
        if store.label_patches(s) is None:
            raise ValueError(f"subject {store.sids[s]} has no label patches in {store.root}")
    if model.num_classes != cfg.num_classes:
        raise ValueError(f"model has {model.num_classes} outputs but cfg.num_classes={cfg.num_classes}")
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device).train()
    enc_params = list(model.encoder.parameters())
    enc_ids = {id(p) for p in enc_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in enc_ids], "lr": cfg.lr}]
    if cfg.encoder_lr_scale > 0:
        groups.append({"params": enc_params, "lr": cfg.lr * cfg.encoder_lr_scale})
    else:
        for p in enc_params:
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, foreach=True)
    # Dice over the whole batch's voxels (batch=True), without numerator smoothing: with
    # MONAI's default smooth_nr=1e-5 a batch without emphysema scores Dice 1 only when nothing at
    # all is predicted, a strong push towards never predicting emphysema (a short run collapses
    # to all-background); with smooth_nr=0 such a batch gives a constant Dice loss (no gradient)
    # and only cross-entropy (heavier emphysema classes) speaks for it.
    dice_fn = DiceLoss(to_onehot_y=True, softmax=True, include_background=cfg.dice_background, batch=True,
                       smooth_nr=0.0, smooth_dr=1e-5)
    ce_weight = torch.tensor([1.0] + [float(cfg.fg_weight)] * (cfg.num_classes - 1), device=device)

    def loss_fn(logits, target):  # logits (B, C, P, P, P), target (B, 1, P, P, P) int64
        ce = torch.nn.functional.cross_entropy(logits.float(), target[:, 0], weight=ce_weight)
        return dice_fn(logits.float(), target) + ce

    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if cfg.bn_reset:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average until step 10
    pairs = candidate_pairs(store, subjects, cfg.min_lung_fraction)
    fg_frac = {s: (np.asarray(store.label_patches(s)).reshape(store.num_locations, -1) > 0).mean(1) for s in subjects}
    pair_fg = np.array([fg_frac[int(s)][int(l)] for s, l in pairs], dtype=np.float64)
    pos_pairs, pos_p = pairs[pair_fg > 0], pair_fg[pair_fg > 0]
    pos_p = pos_p / pos_p.sum() if len(pos_p) else pos_p
    locs_all = torch.from_numpy(store.locs)
    history, t0 = [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="fine-tune", disable=not progress, leave=False)
    with keep_freed_memory(resolve_host_memory(cfg.host_memory, device.type) == "keep"):
        for step in bar:
            if cfg.bn_reset and step == 10:
                for m in bns:
                    m.momentum = 0.1
            # one location per batch: every sample shares one mixed kernel (the encoder's fast path)
            if len(pos_pairs) and rng.random() < cfg.fg_oversample:
                # an emphysema patch drawn in proportion to its emphysema voxels, then its location's
                # emphysema patches in the same proportion
                loc_idx = int(pos_pairs[rng.choice(len(pos_pairs), p=pos_p), 1])
                at = pos_pairs[:, 1] == loc_idx
                w = pos_p[at] / pos_p[at].sum()
                batch = pos_pairs[at][rng.choice(int(at.sum()), size=cfg.batch_size, p=w)]
            else:
                loc_idx = int(pairs[rng.integers(len(pairs)), 1])
                at_loc = pairs[pairs[:, 1] == loc_idx]
                batch = at_loc[rng.integers(0, len(at_loc), size=cfg.batch_size)]
            x = np.stack([store.get(s, l) for s, l in batch])
            y = np.stack([patch_targets(store.label_patches(s)[l], cfg.num_classes) for s, l in batch])
            if cfg.flip:
                for axis in (1, 2, 3):
                    flip = rng.random(len(batch)) < 0.5
                    x[flip] = np.flip(x[flip], axis=axis)
                    y[flip] = np.flip(y[flip], axis=axis)
            xt = hu_to_input(torch.from_numpy(np.ascontiguousarray(x))).unsqueeze(1).to(device)
            yt = torch.from_numpy(np.ascontiguousarray(y)).unsqueeze(1).to(device)
            loc = locs_all[batch[:, 1]].to(device)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                logits = model(xt, loc)
                loss = loss_fn(logits, yt)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():  # Dice of this batch's prediction (train mode), a cheap learning monitor
                batch_dice = dice_scores(logits.argmax(1).cpu().numpy(), y, cfg.num_classes)["dice"]
            history.append({"step": step + 1, "loss": float(loss.detach()), "batch_dice": batch_dice,
                            "seconds": time.perf_counter() - t0})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    return history


@torch.inference_mode()
def predict_patches(model, patches_hu: np.ndarray, locs: np.ndarray, *, batch_size: int = 32,
                    device: str = "auto", host_memory: str = "auto") -> np.ndarray:
    """Class probabilities of every patch.

    Args:
        model: a :class:`DrasSegNet`.
        patches_hu: (L, P, P, P) HU patches.
        locs: (L, 3) location condition of each patch, in [-1, 1].
        host_memory: ``"auto"``, ``"keep"`` or ``"system"`` (:mod:`drasclr_lib.host_memory`).

    Returns:
        probs (L, C, P, P, P) float32.
    """
    dev = resolve_device(device)
    model.to(dev).eval()
    out = []
    with keep_freed_memory(resolve_host_memory(host_memory, dev.type) == "keep"):
        for i in range(0, len(patches_hu), batch_size):
            batch = np.array(patches_hu[i:i + batch_size])  # a writable copy: store patches are read-only maps
            x = hu_to_input(torch.from_numpy(batch)).unsqueeze(1).to(dev)
            loc = torch.as_tensor(np.asarray(locs[i:i + batch_size]), dtype=torch.float32, device=dev)
            out.append(torch.softmax(model(x, loc).float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def dice_scores(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> dict:
    """Dice of every foreground class over all voxels of ``pred`` and ``truth`` (same shape, int labels).

    ``Dice_c = 2 TP / (2 TP + FP + FN)``; a class absent from both counts as 1.

    Returns:
        ``{"dice": mean over foreground classes, "dice_<class>": ...}``.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    names = class_names(num_classes)
    row, dices = {}, []
    for c in range(1, num_classes):
        p, t = pred == c, truth == c
        tp = int(np.count_nonzero(p & t))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(t)) - tp
        d = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        row[f"dice_{names[c]}"] = float(d)
        dices.append(d)
    return {"dice": float(np.mean(dices)), **row}


def evaluate_segmenter(model, store: PatchStore, subjects, *, num_classes: int = 2, batch_size: int = 32,
                       device: str = "auto", min_lung_fraction: float = 0.05,
                       max_patches: int | None = None, lung_masks=None) -> pd.DataFrame:
    """Held-out Dice per subject, pooled over the subject's lung patches.

    Voxel counts (true positives, false positives, false negatives) are summed over the subject's
    patches with at least ``min_lung_fraction`` lung, then ``Dice = 2TP / (2TP + FP + FN)`` per
    foreground class; ``dice`` is their mean. A class absent from both truth and prediction
    counts as Dice 1. Patches overlap (atlas step 26 for 32³ patches), so a voxel in an overlap
    counts once per patch.

    Args:
        max_patches: score only this many of each subject's lung locations, evenly spaced over
            them (deterministic, the same for every model); ``None`` or 0 = all.
        lung_masks: optional ``{sid: lung mask file}``; a subject listed there is scored with
            its predictions outside the lung set to background (what whole-scan inference does).

    Returns:
        DataFrame with ``sid``, ``dice`` and ``dice_<class>`` per foreground class (a subject
        without a valid patch, :func:`candidate_pairs`, has no row).
    """
    rows = []
    for s in subjects:
        s = int(s)
        pairs = candidate_pairs(store, [s], min_lung_fraction)
        locs_idx = pairs[:, 1]
        if not len(locs_idx):  # no patch inside the scan's field of view: nothing to score
            continue
        if max_patches and len(locs_idx) > max_patches:
            locs_idx = locs_idx[np.unique(np.linspace(0, len(locs_idx) - 1, int(max_patches)).round().astype(int))]
        probs = predict_patches(model, store.patches(s)[locs_idx], store.locs[locs_idx], batch_size=batch_size,
                                device=device)
        pred = probs.argmax(1)
        if lung_masks is not None and store.sids[s] in lung_masks:
            pred[~lung_patches(store, s, lung_masks[store.sids[s]])[locs_idx]] = 0
        truth = patch_targets(store.label_patches(s)[locs_idx], num_classes)
        rows.append({"sid": store.sids[s], **dice_scores(pred, truth, num_classes)})
    return pd.DataFrame(rows)


def config_dict(cfg: SegConfig) -> dict:
    """The config as a plain dict (for metrics and checkpoints)."""
    return asdict(cfg)
