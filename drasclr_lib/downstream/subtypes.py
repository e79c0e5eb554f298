"""Dense emphysema subtype detection: one label per patch, a patch-level classifier, per-class AUC.

Patch target ("dominant subtype"): among the patch's lung voxels, the emphysema fraction is
``(# voxels labelled 1, 2 or 3) / (# lung voxels)``. Below ``threshold`` (default 0.05, i.e. 5 % of
the patch's lung) the patch is ``none`` (0); otherwise it is the subtype with the most voxels
(1 centrilobular, 2 panlobular, 3 paraseptal; ties go to the lower label). The number of lung
voxels comes from the record's ``patch_lung_fraction`` when preprocessing wrote it, else from the
HU patch (voxels below -500 HU, or labelled) — a documented approximation for stores without it.

Classifier: multinomial logistic regression on standardised patch features (embeddings ``h``, or
per-patch %LAA-950 and lung fraction for the clinical baseline), trained on the patches of the
training subjects (at most ``max_train`` patches, drawn at random) and scored on every patch of
the test subjects: the folds are the subject folds, so no subject is on both sides.

Invalid patches (mostly outside the scanned volume,
:meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`) have no target (-1), NaN QCT
features and NaN embeddings; the classifier neither trains on nor scores them (their
probabilities are NaN).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from drasclr_lib.downstream.folds import iter_folds

__all__ = [
    "SUBTYPE_NAMES",
    "LUNG_HU",
    "dominant_subtype",
    "patch_lung_voxels",
    "subtype_targets",
    "patch_qct_features",
    "cv_patch_classifier",
]

SUBTYPE_NAMES = ("none", "centrilobular", "panlobular", "paraseptal")
LUNG_HU = -500.0  # HU proxy for "lung voxel" when the record has no patch_lung_fraction


def dominant_subtype(label_patches: np.ndarray, lung_voxels: np.ndarray, *, threshold: float = 0.05) -> np.ndarray:
    """Dominant subtype of each patch from its voxel labels.

    Args:
        label_patches: (L, P, P, P) integer labels (0 none, 1 CL, 2 PL, 3 PS), or one (P, P, P) patch.
        lung_voxels: (L,) number of lung voxels in each patch (or a scalar for one patch).
        threshold: minimum emphysema fraction of the lung voxels for a patch to count as emphysema.

    Returns:
        (L,) int64 in {0, 1, 2, 3} (a 0-d array for one patch).

    Raises:
        ValueError: for labels outside 0..3, a negative threshold or mismatched shapes.
    """
    lab = np.asarray(label_patches)
    single = lab.ndim == 3
    if single:
        lab = lab[None]
    if lab.ndim != 4:
        raise ValueError(f"label patches must be (L, P, P, P) or (P, P, P), got {np.asarray(label_patches).shape}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    lung = np.atleast_1d(np.asarray(lung_voxels, dtype=np.float64))
    if lung.shape != (len(lab),):
        raise ValueError(f"lung_voxels must have shape ({len(lab)},), got {lung.shape}")
    flat = lab.reshape(len(lab), -1)
    if flat.size and (flat.max() > 3):
        raise ValueError(f"emphysema labels must be in 0..3, found {int(flat.max())}")
    counts = np.stack([(flat == c).sum(1) for c in (1, 2, 3)], axis=1)  # (L, 3)
    emph = counts.sum(1)
    frac = emph / np.maximum(lung, 1.0)
    out = np.where((emph > 0) & (frac >= threshold), counts.argmax(1) + 1, 0).astype(np.int64)
    return out[0] if single else out


def _known(values: np.ndarray | None) -> np.ndarray | None:
    """Per-patch values from a record, when every one is known."""
    return values if values is not None and np.all(np.isfinite(values)) else None


def patch_lung_voxels(store, subject) -> np.ndarray:
    """Lung voxels per patch (L,): ``patch_lung_fraction * P³`` from the record, else the HU proxy."""
    L, P = store.num_locations, store.patch_size
    frac = _known(store.patch_values(subject, "patch_lung_fraction"))
    if frac is not None:
        return frac * P**3
    hu = np.asarray(store.patches(subject))
    lung = hu < LUNG_HU
    lab = store.label_patches(subject)
    if lab is not None:
        lung |= np.asarray(lab) > 0
    return lung.reshape(L, -1).sum(1).astype(np.float64)


def subtype_targets(store, subjects=None, *, threshold: float = 0.05) -> np.ndarray:
    """Dominant subtype of every patch of every subject.

    Args:
        store: a :class:`~drasclr_lib.data.patch_store.PatchStore`.
        subjects: subject ids or indices (default: all, in store order).
        threshold: see :func:`dominant_subtype`.

    Returns:
        (N, L) int64, -1 for subjects without label patches and for invalid patches.
    """
    subjects = store.sids if subjects is None else list(subjects)
    out = np.full((len(subjects), store.num_locations), -1, dtype=np.int64)
    for n, s in enumerate(subjects):
        lab = store.label_patches(s)
        if lab is not None:
            out[n] = dominant_subtype(np.asarray(lab), patch_lung_voxels(store, s), threshold=threshold)
            out[n][~store.valid_patches(s)] = -1
    return out


def patch_qct_features(store, subjects=None) -> np.ndarray:
    """Clinical QCT features of every patch: [%LAA-950, lung fraction] (N, L, 2) float32.

    %LAA-950 is the record's ``patch_laa950`` when present, else 100 x the share of the patch's
    lung-proxy voxels (< -500 HU) below -950 HU; the lung fraction is ``patch_lung_fraction`` or
    the share of lung-proxy voxels. Records that know the field of view (``patch_fov_fraction``)
    count scanned lung only: their per-patch values are used as they are, a patch without
    scanned lung being 0 % in 0 lung (the HU proxy would count padding, -1024 HU, as emphysema).
    Invalid patches (mostly padding) are NaN.
    """
    subjects = store.sids if subjects is None else list(subjects)
    L, P = store.num_locations, store.patch_size
    out = np.zeros((len(subjects), L, 2), dtype=np.float32)
    for n, s in enumerate(subjects):
        rec = store.record(s)
        laa = _known(rec.patch_laa950)
        frac = _known(rec.patch_lung_fraction)
        if rec.patch_fov_fraction is not None and rec.patch_laa950 is not None and rec.patch_lung_fraction is not None:
            laa = np.nan_to_num(rec.patch_laa950, nan=0.0)
            frac = np.nan_to_num(rec.patch_lung_fraction, nan=0.0)
        if laa is None or frac is None:
            hu = np.asarray(store.patches(s)).reshape(L, -1)
            lung = hu < LUNG_HU
            nlung = np.maximum(lung.sum(1), 1)
            if laa is None:
                laa = 100.0 * (hu < -950).sum(1) / nlung
            if frac is None:
                frac = lung.mean(1)
        out[n, :, 0], out[n, :, 1] = laa, frac
        out[n, ~store.valid_patches(s)] = np.nan
    return out


def cv_patch_classifier(H: np.ndarray, y: np.ndarray, fold: np.ndarray, *, C: float = 1.0, max_train: int = 20000,
                        seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Subject-grouped cross-validated patch classifier of the dominant subtype.

    Args:
        H: (N, L, D) patch features.
        y: (N, L) dominant subtype in 0..3, -1 = no label (left out). Patches whose features are
            not finite (invalid patches: NaN) are left out as well.
        fold: (N,) subject folds (shared with the subject-level tasks).
        C: inverse L2 penalty of the multinomial logistic regression.
        max_train: cap on training patches per fold (random subset, for speed).
        seed: seed of that subset.

    Returns:
        ``(scores, proba)``: one row per fold with ``fold, accuracy, auc_macro, auc_<subtype>...,
        n_test``; AUCs are NaN for a class without positives or negatives in the test fold.
        proba (N, L, 4) out-of-fold class probabilities of every patch (unlabelled ones
        too, so a whole map can be drawn); NaN for subjects in no scored fold and for patches
        with non-finite features.

    Raises:
        ValueError: for inconsistent shapes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    H = np.asarray(H, dtype=np.float32)
    y = np.asarray(y)
    fold = np.asarray(fold)
    if H.ndim != 3 or y.shape != H.shape[:2] or fold.shape != (len(H),):
        raise ValueError(f"H (N, L, D) {H.shape}, y (N, L) {y.shape} and fold (N,) {fold.shape} disagree")
    N, L, D = H.shape
    K = len(SUBTYPE_NAMES)
    proba = np.full((N, L, K), np.nan, dtype=np.float32)
    rng = np.random.default_rng(seed)
    cols = ["fold", "accuracy", "auc_macro", *[f"auc_{n}" for n in SUBTYPE_NAMES], "n_test"]
    rows = []
    finite = np.isfinite(H).all(axis=2)  # (N, L): invalid patches are NaN rows
    for f, train, test in iter_folds(fold):
        Xtr, ytr = H[train].reshape(-1, D), y[train].reshape(-1)
        keep = (ytr >= 0) & finite[train].reshape(-1)
        Xtr, ytr = Xtr[keep], ytr[keep]
        Xte, yte = H[test].reshape(-1, D), y[test].reshape(-1)
        ok = finite[test].reshape(-1)
        lab = (yte >= 0) & ok
        if len(ytr) == 0 or not lab.any():
            continue
        if len(ytr) > max_train:
            pick = rng.choice(len(ytr), size=max_train, replace=False)
            Xtr, ytr = Xtr[pick], ytr[pick]
        p = np.full((len(Xte), K), np.nan, dtype=np.float32)
        p[ok] = 0.0
        seen = np.unique(ytr)
        if len(seen) == 1:
            p[ok, seen[0]] = 1.0
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500))
            model.fit(Xtr, ytr)
            p[np.ix_(ok, model.classes_)] = model.predict_proba(Xte[ok])
        proba[test] = p.reshape(len(test), L, K)
        p, yte = p[lab], yte[lab]
        row = {"fold": f, "accuracy": float(np.mean(p.argmax(1) == yte)), "n_test": int(lab.sum())}
        aucs = []
        for c, name in enumerate(SUBTYPE_NAMES):
            pos = yte == c
            auc = float(roc_auc_score(pos, p[:, c])) if pos.any() and (~pos).any() else float("nan")
            row[f"auc_{name}"] = auc
            if np.isfinite(auc):
                aucs.append(auc)
        row["auc_macro"] = float(np.mean(aucs)) if aucs else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=cols), proba
