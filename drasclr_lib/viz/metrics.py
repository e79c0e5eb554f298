"""Probes of what patch embeddings encode: anatomy (k-NN location decoding) and disease (ridge).

Both probes are cross-validated **by subject** (``GroupKFold``): a patch is always scored by a
model that never saw its subject, so a probe cannot succeed by recognising the scan.

- :func:`knn_accuracy`: k-nearest-neighbour accuracy (cosine distance) of predicting a label,
  e.g. a patch's location index or lobe, from its embedding; the chance level (the most frequent
  training label) comes with it.
- :func:`ridge_cv_score`: out-of-fold R² and Spearman correlation of a standardised ridge model
  (alpha chosen by inner cross-validation; the model of subject-level prediction,
  :func:`drasclr_lib.downstream.prediction.ridge_cv_model`) predicting a continuous target, e.g. a
  patch's emphysema fraction.
- :func:`embedding_metrics`: both, for an :class:`~drasclr_lib.embed.EmbeddingSet` and the
  per-patch facts of :func:`~drasclr_lib.data.patch_store.patch_table`.
"""

from __future__ import annotations

import numpy as np

from drasclr_lib.downstream.prediction import ridge_cv_model

__all__ = ["knn_accuracy", "ridge_cv_score", "embedding_metrics", "subsample_patches", "patch_intensity_features"]


def _check_xyg(X, y, groups):
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    groups = np.asarray(groups)
    if X.ndim != 2:
        raise ValueError(f"X must be (M, D), got shape {X.shape}")
    if y.shape != (len(X),) or groups.shape != (len(X),):
        raise ValueError(f"y {y.shape} and groups {groups.shape} must both be ({len(X)},)")
    return X, y, groups


def _folds(groups, n_splits):
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"cross-validation by subject needs at least 2 subjects, got {n_groups}")
    return GroupKFold(n_splits=min(n_splits, n_groups))


def knn_accuracy(X, labels, groups, *, k: int = 5, n_splits: int = 5) -> dict[str, float]:
    """Cross-validated (by group) k-NN accuracy with cosine distance.

    Args:
        X: (M, D) features.
        labels: (M,) integer labels (location index, lobe...).
        groups: (M,) subject of each row; folds never split a subject.
        k: neighbours (capped by the training-fold size).
        n_splits: folds (capped by the number of subjects).

    Returns:
        ``{"accuracy", "chance", "n"}``: pooled out-of-fold accuracy, the accuracy of always
        predicting each training fold's most frequent label, and the number of rows.

    Raises:
        ValueError: for inconsistent shapes or fewer than two subjects.
    """
    from sklearn.neighbors import KNeighborsClassifier

    X, labels, groups = _check_xyg(X, labels, groups)
    correct = chance = 0
    for tr, te in _folds(groups, n_splits).split(X, labels, groups):
        clf = KNeighborsClassifier(n_neighbors=min(k, len(tr)), metric="cosine", algorithm="brute")
        clf.fit(X[tr], labels[tr])
        correct += int((clf.predict(X[te]) == labels[te]).sum())
        vals, counts = np.unique(labels[tr], return_counts=True)
        chance += int((labels[te] == vals[np.argmax(counts)]).sum())
    return {"accuracy": correct / len(X), "chance": chance / len(X), "n": int(len(X))}


def ridge_cv_score(X, y, groups, *, n_splits: int = 5, alphas=None) -> dict[str, float]:
    """Cross-validated (by group) ridge regression of a continuous target.

    Features are standardised inside each fold; ``RidgeCV`` picks alpha from ``alphas``
    (default :data:`~drasclr_lib.downstream.prediction.RIDGE_ALPHAS`, ``logspace(-2, 5, 15)``) on the
    training fold only (:func:`~drasclr_lib.downstream.prediction.ridge_cv_model`).

    Args:
        X: (M, D) features.
        y: (M,) target; rows with NaN are dropped.
        groups: (M,) subject of each row.
        n_splits: folds (capped by the number of subjects).
        alphas: candidate ridge penalties.

    Returns:
        ``{"r2", "spearman", "n"}`` of the pooled out-of-fold predictions (R² can be negative:
        worse than predicting the training mean).

    Raises:
        ValueError: for inconsistent shapes, fewer than two subjects, or a constant target.
    """
    from scipy.stats import spearmanr
    from sklearn.metrics import r2_score

    X, y, groups = _check_xyg(X, y, groups)
    y = y.astype(np.float64)
    keep = np.isfinite(y)
    X, y, groups = X[keep], y[keep], groups[keep]
    if len(y) < 3 or np.ptp(y) == 0:
        raise ValueError("the target needs at least 3 finite, not all equal values")
    pred = np.empty_like(y)
    for tr, te in _folds(groups, n_splits).split(X, y, groups):
        model = ridge_cv_model(alphas)
        model.fit(X[tr], y[tr])
        pred[te] = model.predict(X[te])
    rho = spearmanr(y, pred).statistic if np.ptp(pred) > 0 else 0.0
    return {"r2": float(r2_score(y, pred)), "spearman": float(rho), "n": int(len(y))}


def subsample_patches(n_subjects: int, n_locations: int, max_points: int | None, seed: int = 0):
    """A random, sorted subset of (subject, location) pairs, at most ``max_points`` of them.

    Returns:
        ``(subject_idx, location_idx)``, two int64 arrays of equal length (all pairs when
        ``max_points`` is ``None`` or not smaller than ``n_subjects * n_locations``).
    """
    total = n_subjects * n_locations
    if max_points is None or max_points >= total:
        flat = np.arange(total)
    else:
        if max_points < 1:
            raise ValueError(f"max_points must be positive, got {max_points}")
        flat = np.sort(np.random.default_rng(seed).choice(total, size=int(max_points), replace=False))
    return flat // n_locations, flat % n_locations


def embedding_metrics(emb, table: dict, *, max_patches: int | None = 20000, k: int = 5, n_splits: int = 5,
                      seed: int = 0) -> dict[str, float]:
    """Location decoding and disease signal of patch embeddings.

    Args:
        emb: :class:`~drasclr_lib.embed.EmbeddingSet` with ``h (N, L, D)``.
        table: per-patch facts from :func:`~drasclr_lib.data.patch_store.patch_table`, (N, L) arrays in the
            subject order of ``emb``.
        max_patches: random subset of patches to score (k-NN is quadratic); ``None`` for all.
        k, n_splits, seed: see :func:`knn_accuracy`, :func:`ridge_cv_score`.

    Returns:
        ``location_knn_acc``, ``location_chance``, ``lobe_knn_acc`` and ``lobe_chance`` (when
        lobes are known), ``emph_r2``, ``emph_spearman`` (when emphysema fractions vary), and
        ``n_patches`` (the scored patches: NaN embeddings, outside the field of view, are left out).
    """
    N, L, D = emb.h.shape
    si, li = subsample_patches(N, L, max_patches, seed)
    ok = np.isfinite(emb.h[si, li]).all(-1)  # patches outside the field of view embed as NaN: not scored
    si, li = si[ok], li[ok]
    X = emb.h[si, li]
    out: dict[str, float] = {"n_patches": int(len(si))}
    loc = knn_accuracy(X, li, si, k=k, n_splits=n_splits)
    out["location_knn_acc"], out["location_chance"] = loc["accuracy"], loc["chance"]
    lobe = np.asarray(table["lobe"])[si, li]
    if np.any(lobe > 0):
        keep = lobe > 0
        res = knn_accuracy(X[keep], lobe[keep], si[keep], k=k, n_splits=n_splits)
        out["lobe_knn_acc"], out["lobe_chance"] = res["accuracy"], res["chance"]
    emph = np.asarray(table["emph_fraction"], dtype=np.float64)[si, li]
    finite = np.isfinite(emph)
    if finite.sum() >= 3 and np.ptp(emph[finite]) > 0:
        res = ridge_cv_score(X, emph, si, n_splits=n_splits)
        out["emph_r2"], out["emph_spearman"] = res["r2"], res["spearman"]
    return out


def patch_intensity_features(store) -> np.ndarray:
    """Hand-made intensity features of every patch, a reference for the embedding probes.

    Args:
        store: a :class:`~drasclr_lib.data.patch_store.PatchStore`.

    Returns:
        (N, L, 4) float32: mean HU, HU standard deviation, fraction of voxels below -950 HU
        (%LAA-950 / 100) and below -900 HU, of every patch (subject, location).
    """
    feats = []
    for i in range(store.num_subjects):
        hu = np.asarray(store.patches(i), dtype=np.float32).reshape(store.num_locations, -1)
        feats.append(np.stack([hu.mean(1), hu.std(1), (hu < -950).mean(1), (hu < -900).mean(1)], -1))
    return np.stack(feats).astype(np.float32)
