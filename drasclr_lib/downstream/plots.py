"""Figures of the downstream comparison: grouped bars, Kaplan-Meier by risk tertile, subtype maps.

Every function returns the matplotlib ``Figure`` and, given ``path``, saves it (PNG, atomically).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from drasclr_lib.downstream.experiment import METHOD_LABELS, DownstreamResult
from drasclr_lib.downstream.subtypes import SUBTYPE_NAMES
from drasclr_lib.data.patch_store import paste_patches
from drasclr_lib.utils import atomic_path

__all__ = ["DEFAULT_BARS", "headline_bars", "plot_results_bars", "plot_km", "pick_map_subject", "subtype_slice", "plot_subtype_map"]

DEFAULT_BARS = (("FEV1pp", "r2"), ("FEV1_FVC", "r2"), ("GOLD", "auc_macro"), ("emph_grade", "auc_macro"),
                ("paraseptal_grade", "auc_macro"), ("survival", "c_index"), ("subtype", "auc_macro"))
SUBTYPE_COLORS = ("none", "tab:orange", "tab:purple", "tab:green")  # CL, PL, PS


def _save(fig, path):
    if path is not None:
        path = Path(path)
        with atomic_path(path, suffix=path.suffix or ".png") as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format=(path.suffix.lstrip(".") or "png"))
    return fig


def _label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def headline_bars(table) -> list[tuple[str, str]]:
    """One (task, metric) per task of ``table``, in table order: ``r2`` for a regression, ``auc_macro``
    for classes and subtypes, ``c_index`` for survival (for the paper's tasks: :data:`DEFAULT_BARS`)."""
    bars = []
    for task in dict.fromkeys(table["task"]):
        have = set(table.loc[table.task == task, "metric"])
        metric = next((m for m in ("r2", "auc_macro", "c_index") if m in have), None)
        if metric is not None:
            bars.append((task, metric))
    return bars


def plot_results_bars(table, bars: Sequence[tuple[str, str]] | None = None, *, methods: Sequence[str] | None = None,
                      path=None):
    """Grouped bar chart: one group per (task, metric), one bar per method, error bar = SD over folds.

    Args:
        table: ``DownstreamResult.table`` (or a DataFrame with its columns).
        bars: the (task, metric) groups to show, those absent from the table skipped; default: the
            headline metric of every task in the table (:func:`headline_bars`).
        methods: bar order (default: table order).
        path: optional PNG path.
    """
    import matplotlib.pyplot as plt

    bars = headline_bars(table) if bars is None else bars
    methods = list(dict.fromkeys(table["method"])) if methods is None else list(methods)
    groups = [(t, m) for t, m in bars if ((table.task == t) & (table.metric == m)).any()]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(groups))
    for i, meth in enumerate(methods):
        mean, sd = [], []
        for t, m in groups:
            row = table[(table.method == meth) & (table.task == t) & (table.metric == m)]
            mean.append(float(row["mean"].iloc[0]) if len(row) else np.nan)
            sd.append(float(row["sd"].iloc[0]) if len(row) else np.nan)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, mean, width, yerr=np.nan_to_num(sd), capsize=2,
               label=_label(meth))
    ax.set_xticks(x, [f"{t}\n{m}" for t, m in groups], fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_ylabel("mean over folds (± SD)")
    ax.legend(fontsize=7, ncol=min(len(methods), 3), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_title("Downstream tasks: R² (regression), macro AUC (classes), C-index (survival)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_km(result: DownstreamResult, methods: Sequence[str] | None = None, *, path=None):
    """Kaplan-Meier curves by tertile of out-of-fold predicted risk, one panel per method, with the
    log-rank p-value and the cross-validated C-index in each title."""
    import matplotlib.pyplot as plt

    methods = [m for m in (methods or list(result.risk)) if m in result.risk]
    if not methods:
        raise ValueError("no method has survival predictions (the cohort has no time/event columns?)")
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), sharey=True, squeeze=False)
    names = {0: "low risk", 1: "middle", 2: "high risk"}
    for ax, m in zip(axes[0], methods):
        fits, p = result.logrank(m)
        for g, kmf in fits.items():
            kmf.plot_survival_function(ax=ax, ci_show=False, label=names.get(g, f"group {g}"))
        ax.set_title(f"{_label(m)}\nC={result.value(m, result.survival_task, 'c_index'):.2f}, log-rank p={p:.2g}", fontsize=8)
        ax.set_xlabel("years")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("survival probability")
    fig.tight_layout()
    return _save(fig, path)


def pick_map_subject(subtype_true: np.ndarray) -> int:
    """The subject whose map is most informative: most distinct subtypes, then most emphysema patches."""
    y = np.asarray(subtype_true)
    score = [(len(set(r[r > 0].tolist())), int((r > 0).sum())) for r in y]
    return int(max(range(len(y)), key=lambda i: score[i]))


def subtype_slice(store, subject, patch_classes: dict[str, np.ndarray], *, j: int | None = None, margin: int = 3):
    """Rebuild one coronal slice of a subject from its patches, with per-patch classes painted.

    Patches are pasted back at their subject corners (``record['corners_subject']``, (i, j, k) in
    the 1 mm grid; the atlas corners for stores without them), so no image file is needed. A
    patch is painted over its central part (``margin`` voxels trimmed per side, so the 26-voxel
    grid tiles without overlap).

    Args:
        store: the patch store.
        subject: subject index or id.
        patch_classes: ``{name: (L,) int}`` class per patch (e.g. truth and prediction).
        j: the coronal index; default the one crossing the most emphysema patches of the first map.
        margin: voxels left unpainted at each patch side.

    Returns:
        dict with ``ct (K, I)`` HU (NaN outside patches), ``voxel_labels (K, I)`` (or ``None``),
        ``maps {name: (K, I)}`` (-1 unpainted), ``j`` and ``extent`` (i0, i1, k0, k1).
    """
    corners = store.corners(subject, atlas_fallback=True)  # stores without geometry: the atlas layout
    P = store.patch_size
    patches = store.patches(subject)  # (L, k, j, i)
    labels = store.label_patches(subject)
    first = np.asarray(next(iter(patch_classes.values()))) if patch_classes else np.zeros(len(corners))
    if j is None:
        js = np.arange(corners[:, 1].min(), corners[:, 1].max() + P)
        inside = (corners[None, :, 1] <= js[:, None]) & (js[:, None] < corners[None, :, 1] + P)
        score = (inside & (first[None] > 0)).sum(1) * 1000 + inside.sum(1)
        j = int(js[np.argmax(score)])
    i0, k0 = corners[:, 0].min(), corners[:, 2].min()
    I, K = corners[:, 0].max() + P - i0, corners[:, 2].max() + P - k0
    crossing = np.flatnonzero((corners[:, 1] <= j) & (j < corners[:, 1] + P))
    local = corners[crossing] - [i0, j, k0]  # into a one-voxel-thick coronal volume (K, 1, I)
    ct = paste_patches(patches[crossing], local, (K, 1, I), fill=np.nan, dtype=np.float32)[:, 0]
    vox = None if labels is None else paste_patches(labels[crossing], local, (K, 1, I), dtype=np.int16)[:, 0]
    inner = (len(crossing), P - 2 * margin, P, P - 2 * margin)  # (k, j, i): trimmed in i and k
    maps = {name: paste_patches(np.broadcast_to(np.asarray(cls)[crossing, None, None, None].astype(np.int16), inner),
                                local + [margin, 0, margin], (K, 1, I), fill=-1)[:, 0]
            for name, cls in patch_classes.items()}
    return {"ct": ct, "voxel_labels": vox, "maps": maps, "j": j, "extent": (i0, i0 + I, k0, k0 + K)}


def plot_subtype_map(store, subject, y_true: np.ndarray, y_pred: np.ndarray, *, title: str = "", path=None,
                     j: int | None = None):
    """Coronal slice of a subject rebuilt from its patches: voxel labels, the true dominant subtype
    per patch and the predicted one, side by side.

    Args:
        store: the patch store; subject: index or id.
        y_true, y_pred: (L,) subtype per patch (0 none, 1 CL, 2 PL, 3 PS).
        title: figure title (e.g. the method).
        path: optional PNG path.
        j: coronal index (default: see :func:`subtype_slice`).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    sl = subtype_slice(store, subject, {"truth": np.asarray(y_true), "prediction": np.asarray(y_pred)}, j=j)
    cmap = ListedColormap(["white", *SUBTYPE_COLORS[1:]])
    panels = [("voxel labels", sl["voxel_labels"]), ("true dominant subtype", sl["maps"]["truth"]),
              ("predicted subtype", sl["maps"]["prediction"])]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, (name, lab) in zip(axes, panels):
        ax.imshow(sl["ct"], cmap="gray", vmin=-1024, vmax=0, origin="lower")
        if lab is not None:
            show = np.ma.masked_where(lab <= 0, lab)
            ax.imshow(show, cmap=cmap, vmin=0, vmax=3, alpha=0.45, origin="lower", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=c, label=n) for n, c in zip(SUBTYPE_NAMES[1:], SUBTYPE_COLORS[1:])]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    sid = subject if isinstance(subject, str) else store.sids[int(subject)]
    fig.suptitle(f"{title} subject {sid}, coronal slice j={sl['j']} (rebuilt from patches)", fontsize=10)
    return _save(fig, path)
