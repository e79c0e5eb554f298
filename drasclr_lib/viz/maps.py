"""UMAP maps of patch and subject embeddings, one row per encoder, side by side.

:func:`patch_maps` places a random subset of patches (the same subset for every encoder) with
UMAP and colours them by lobe, by height in the lung (the atlas z corner of the location) and by
the patch's emphysema fraction. :func:`subject_maps` does the same for pooled subject embeddings,
coloured by emphysema severity and GOLD stage. Rows are encoders (e.g. pretrained and random
weights), so the reader sees what pretraining changed.

UMAP (umap-learn) compiles its numba kernels on the first call of a Python process, which takes
20-40 s on a laptop CPU; later calls are fast. Maps are seeded (``random_state``), which makes
UMAP single-threaded but reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from drasclr_lib.viz.metrics import subsample_patches

__all__ = ["LOBE_NAMES", "umap_2d", "patch_maps", "subject_maps", "save_figure"]

LOBE_NAMES = {0: "unknown", 1: "RUL", 2: "RML", 3: "RLL", 4: "LUL", 5: "LLL"}


def umap_2d(X: np.ndarray, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0,
            metric: str = "cosine") -> tuple[np.ndarray, str]:
    """Two-dimensional UMAP coordinates of the rows of ``X``.

    With fewer than 6 rows UMAP's neighbour graph is meaningless, and the first two principal
    components are returned instead (the method name says which).

    Args:
        X: (M, D) features.
        n_neighbors: UMAP neighbours (capped at M - 1).
        min_dist: UMAP minimum distance.
        seed: random state (reproducible maps).
        metric: UMAP metric (cosine, as the explorer's similarity).

    Returns:
        ``(coords (M, 2) float32, method)`` with method ``"UMAP"`` or ``"PCA"``.

    Raises:
        ValueError: for a non-2D ``X`` or fewer than 2 rows.
    """
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"X must be (M >= 2, D), got shape {X.shape}")
    if len(X) < 6:
        Xc = X - X.mean(0)
        _, _, vt = np.linalg.svd(Xc, full_matrices=False)
        coords = Xc @ vt[:2].T
        if coords.shape[1] < 2:
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        return coords.astype(np.float32), "PCA"
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")  # seeded UMAP is single-threaded
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        reducer = umap.UMAP(n_neighbors=int(min(n_neighbors, len(X) - 1)), min_dist=min_dist, metric=metric,
                            random_state=int(seed), n_components=2)
        coords = reducer.fit_transform(X)
    return np.asarray(coords, dtype=np.float32), "UMAP"


def _scatter(ax, xy, values, *, kind: str, title: str, cmap="viridis", label=None):
    """Scatter coloured by continuous values (with a colour bar) or categories (with a legend)."""
    import matplotlib.pyplot as plt

    size = max(2.0, min(30.0, 3000.0 / max(len(xy), 1)))
    values = np.asarray(values)
    if kind == "category":
        cats = [c for c in np.unique(values[~_isnan(values)])]
        colours = plt.get_cmap("tab10")
        for i, c in enumerate(cats):
            sel = values == c
            name = label(c) if label else str(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colours(i % 10), label=name, linewidths=0, alpha=0.8)
        if cats:
            ax.legend(markerscale=max(1.0, 6.0 / size ** 0.5), fontsize=7, loc="best", frameon=False)
    else:
        vals = values.astype(np.float64)
        nan = ~np.isfinite(vals)
        if nan.any():
            ax.scatter(xy[nan, 0], xy[nan, 1], s=size, color="lightgrey", linewidths=0, label="unknown")
        sc = ax.scatter(xy[~nan, 0], xy[~nan, 1], c=vals[~nan], s=size, cmap=cmap, linewidths=0, alpha=0.85)
        ax.figure.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _isnan(values):
    try:
        return ~np.isfinite(values.astype(np.float64))
    except (TypeError, ValueError):
        return np.zeros(len(values), dtype=bool)


def patch_maps(sets: Mapping[str, "EmbeddingSet"], table: Mapping[str, np.ndarray], *,  # noqa: F821
               max_points: int = 5000, seed: int = 0, n_neighbors: int = 15):
    """UMAP of patch embeddings, one row per encoder, coloured by lobe, height and emphysema.

    Args:
        sets: ``{"pretrained": EmbeddingSet, "random weights": EmbeddingSet, ...}`` with the same
            subjects and locations.
        table: per-patch facts (:func:`drasclr_lib.data.patch_store.patch_table`), (N, L) arrays.
        max_points: random subset of patches (the same for every encoder).
        seed: seed of the subset and of UMAP.
        n_neighbors: UMAP neighbours.

    Returns:
        ``(figure, coords)`` with ``coords[name] (M, 2)`` and ``coords["subject"]``,
        ``coords["location"]`` the indices of the plotted patches (patches embedded as NaN, outside
        the field of view, are left out).

    Raises:
        ValueError: when the sets differ in shape or ``sets`` is empty.
    """
    import matplotlib.pyplot as plt

    names = list(sets)
    if not names:
        raise ValueError("patch_maps needs at least one EmbeddingSet")
    N, L, _ = sets[names[0]].h.shape
    for n in names:
        if sets[n].h.shape[:2] != (N, L):
            raise ValueError(f"embedding set {n!r} has shape {sets[n].h.shape[:2]}, expected {(N, L)}")
    si, li = subsample_patches(N, L, max_points, seed)
    # patches outside the scan's field of view embed as NaN: they are not drawn
    ok = np.logical_and.reduce([np.isfinite(sets[n].h[si, li]).all(-1) for n in names])
    si, li = si[ok], li[ok]
    lobe = np.asarray(table["lobe"])[si, li]
    height = np.asarray(table["height"], dtype=np.float64)[si, li]
    emph = np.asarray(table["emph_fraction"], dtype=np.float64)[si, li]
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.8 * len(names)), squeeze=False)
    coords = {"subject": si, "location": li}
    for row, name in enumerate(names):
        xy, method = umap_2d(sets[name].h[si, li], n_neighbors=n_neighbors, seed=seed)
        coords[name] = xy
        _scatter(axes[row, 0], xy, lobe, kind="category", title=f"{name}: {method}, by lobe",
                 label=lambda c: LOBE_NAMES.get(int(c), str(c)))
        _scatter(axes[row, 1], xy, height, kind="continuous", title=f"{name}: by height (atlas z corner)",
                 cmap="coolwarm")
        _scatter(axes[row, 2], xy, emph, kind="continuous", title=f"{name}: by patch emphysema fraction",
                 cmap="magma")
    fig.suptitle(f"Patch embeddings ({len(si)} of {N * L} patches)", fontsize=11)
    fig.tight_layout()
    return fig, coords


def subject_maps(sets: Mapping[str, "EmbeddingSet"], subjects, *, method: str = "mean",  # noqa: F821
                 seed: int = 0, n_neighbors: int = 15):
    """UMAP of pooled subject embeddings, one row per encoder, coloured by emphysema and GOLD.

    Args:
        sets: ``{name: EmbeddingSet}`` with the same subjects.
        subjects: ``pandas.DataFrame`` indexed by ``sid`` with columns ``emph_fraction`` and
            ``GOLD`` (missing columns or values are shown as unknown).
        method: pooling, ``"mean"`` or ``"meanmax"`` (:func:`drasclr_lib.embed.pool_subjects`).
        seed, n_neighbors: UMAP settings.

    Returns:
        ``(figure, coords)`` with ``coords[name] (N, 2)``, NaN for a subject without valid patches.
    """
    import matplotlib.pyplot as plt

    from drasclr_lib.embed import pool_subjects

    names = list(sets)
    if not names:
        raise ValueError("subject_maps needs at least one EmbeddingSet")
    sids = sets[names[0]].sids
    emph = _column(subjects, "emph_fraction", sids)
    gold = _column(subjects, "GOLD", sids)
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 3.8 * len(names)), squeeze=False)
    coords = {}
    for row, name in enumerate(names):
        if sets[name].sids != sids:
            raise ValueError(f"embedding set {name!r} holds other subjects than {names[0]!r}")
        X = pool_subjects(sets[name].h, method)
        ok = np.isfinite(X).all(-1)  # a subject with no valid patch pools to NaN: not drawn (NaN coordinates)
        xy = np.full((len(X), 2), np.nan)
        xy[ok], how = umap_2d(X[ok], n_neighbors=n_neighbors, seed=seed)
        coords[name] = xy
        _scatter(axes[row, 0], xy, emph, kind="continuous", title=f"{name}: {how}, by emphysema fraction",
                 cmap="magma")
        gold_cat = np.where(np.isfinite(gold), gold, -1).astype(int)
        _scatter(axes[row, 1], xy, gold_cat, kind="category", title=f"{name}: by GOLD stage",
                 label=lambda c: "unknown" if c < 0 else f"GOLD {c}")
    fig.suptitle(f"Subject embeddings ({method} pooling, {len(sids)} subjects)", fontsize=11)
    fig.tight_layout()
    return fig, coords


def _column(df, name, sids) -> np.ndarray:
    if df is None or name not in getattr(df, "columns", []):
        return np.full(len(sids), np.nan)
    col = df.set_index(df["sid"].astype(str)) if "sid" in df.columns else df
    return np.asarray(col[name].reindex([str(s) for s in sids]), dtype=np.float64)


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (the format follows the suffix)."""
    from drasclr_lib.utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path
