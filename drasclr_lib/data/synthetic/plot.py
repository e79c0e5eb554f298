"""``plot_subject``: axial, coronal and sagittal slices of a subject with a label overlay."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["plot_subject", "load_subject"]

LABEL_COLORS = {
    "labels": ["#e41a1c", "#ff7f00", "#4daf4a"],  # centrilobular, panlobular, paraseptal
    "lobes": ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"],
    "lung": ["#17becf", "#bcbd22"],
}
LABEL_NAMES = {
    "labels": ["centrilobular", "panlobular", "paraseptal"],
    "lobes": ["RUL", "RML", "RLL", "LUL", "LLL"],
    "lung": ["right lung", "left lung"],
}
_OVERLAY_COLUMN = {"labels": "label_map", "lobes": "lobe_map", "lung": "lung_mask"}


def _row(subject, manifest):
    """A manifest row as a dict with absolute paths."""
    import pandas as pd

    base = None
    if isinstance(subject, (str, os.PathLike)) and str(subject).endswith((".nii", ".nii.gz")):
        return {"sid": Path(subject).name.split(".")[0], "image": str(subject)}
    if isinstance(subject, str):
        if manifest is None:
            raise ValueError(f"subject {subject!r} is a sid: pass the manifest (path or DataFrame) as well")
        if isinstance(manifest, (str, os.PathLike)):
            base = Path(manifest).resolve().parent
            manifest = pd.read_csv(manifest)
        hit = manifest[manifest["sid"].astype(str) == subject]
        if hit.empty:
            raise KeyError(f"sid {subject!r} is not in the manifest")
        row = hit.iloc[0].to_dict()
    elif isinstance(subject, pd.Series):
        row = subject.to_dict()
        if isinstance(manifest, (str, os.PathLike)):
            base = Path(manifest).resolve().parent
    elif isinstance(subject, dict):
        row = dict(subject)
        if isinstance(manifest, (str, os.PathLike)):
            base = Path(manifest).resolve().parent
    else:
        raise TypeError(f"subject must be a sid, a manifest row or a NIfTI path, got {type(subject).__name__}")
    for key in ("image", "lung_mask", "label_map", "lobe_map"):
        v = row.get(key)
        if isinstance(v, str) and v and base is not None and not Path(v).is_absolute():
            row[key] = str(base / v)
    return row


def load_subject(subject, manifest=None, overlay: str | None = "labels"):
    """Image (HU) and overlay volumes of a subject in RAS+ voxel order, and the voxel size.

    Returns:
        (sid, image (nx, ny, nz) float32, overlay (nx, ny, nz) uint8 or None, spacing (3,))
    """
    import nibabel as nib

    row = _row(subject, manifest)
    img_path = row.get("image")
    if not img_path or not Path(img_path).exists():
        raise FileNotFoundError(f"subject {row.get('sid')}: image file {img_path} not found")
    img = nib.as_closest_canonical(nib.load(img_path))
    image = np.asarray(img.dataobj, dtype=np.float32)
    spacing = np.asarray(img.header.get_zooms()[:3], float)
    ov = None
    if overlay is not None:
        col = _OVERLAY_COLUMN.get(overlay)
        if col is None:
            raise ValueError(f"overlay must be one of {sorted(_OVERLAY_COLUMN)} or None, got {overlay!r}")
        path = row.get(col)
        if isinstance(path, str) and path and Path(path).exists():
            ov = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.uint8)
            if ov.shape != image.shape:
                raise ValueError(f"subject {row.get('sid')}: {col} {path} has shape {ov.shape}, image {image.shape}")
    return str(row.get("sid")), image, ov, spacing


def plot_subject(subject, manifest=None, *, ax=None, overlay: str | None = "labels", window=(-1000, 300),
                 alpha: float = 0.45, slices=None):
    """Show axial, coronal and sagittal slices of a subject with a label overlay.

    Slices pass through the centre of the overlay (or of the image); the sagittal slice goes
    through the right lung's centre when a lung or label map is present.

    Args:
        subject: a sid (with ``manifest``), a manifest row (pandas Series or dict; relative paths
            are resolved against ``manifest`` when it is a path), or a NIfTI image path.
        manifest: manifest path or DataFrame.
        ax: three matplotlib Axes to draw into; a new figure when None.
        overlay: ``"labels"`` (emphysema subtypes), ``"lobes"``, ``"lung"`` or None.
        window: HU display window (low, high).
        alpha: overlay opacity.
        slices: (i, j, k) voxel indices of the sagittal, coronal and axial slices (RAS order).

    Returns:
        The matplotlib Figure.

    Raises:
        FileNotFoundError: when the subject's image is missing (the message names the sid).
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    sid, image, ov, sp = load_subject(subject, manifest, overlay)
    if slices is None:
        lung = load_subject(subject, manifest, "lung")[2] if overlay != "lung" else ov
        ref = lung if lung is not None and lung.any() else (image < -400) & (image > -1500)
        idx = np.argwhere(ref)
        c = idx.mean(axis=0).astype(int) if len(idx) else np.array(image.shape) // 2
        if lung is not None and (lung == 1).any():
            c[0] = int(np.argwhere(lung == 1)[:, 0].mean())  # sagittal through the right lung
        if overlay == "labels" and ov is not None and ov.any():
            c[2] = int(np.argmax((ov > 0).sum(axis=(0, 1))))  # axial slice with the most labels
        slices = tuple(int(v) for v in c)
    i, j, k = slices
    if ax is None:
        fig, ax = plt.subplots(1, 3, figsize=(14, 5.2))
    else:
        fig = ax[0].figure
    views = [
        ("axial", image[:, :, k], None if ov is None else ov[:, :, k], sp[1] / sp[0]),
        ("coronal", image[:, j, :], None if ov is None else ov[:, j, :], sp[2] / sp[0]),
        ("sagittal", image[i, :, :], None if ov is None else ov[i, :, :], sp[2] / sp[1]),
    ]
    colors = LABEL_COLORS.get(overlay, [])
    cmap = ListedColormap(colors) if colors else None
    for a, (name, sl, ovs, aspect) in zip(ax, views):
        # rows: second axis (A or S) upwards; columns: first axis. Radiological view: patient's
        # right on the left of the axial/coronal picture.
        a.imshow(sl.T[:, ::-1] if name != "sagittal" else sl.T, cmap="gray", vmin=window[0], vmax=window[1],
                 origin="lower", aspect=aspect, interpolation="nearest")
        if ovs is not None and ovs.any():
            o = ovs.T[:, ::-1] if name != "sagittal" else ovs.T
            a.imshow(np.ma.masked_equal(o, 0), cmap=cmap, vmin=0.5, vmax=len(colors) + 0.5, alpha=alpha,
                     origin="lower", aspect=aspect, interpolation="nearest")
        a.set_title(name)
        a.set_xticks([])
        a.set_yticks([])
    if ov is not None and colors:
        handles = [Patch(color=c_, label=n) for c_, n in zip(colors, LABEL_NAMES[overlay])]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(f"{sid}  (slices i={i}, j={j}, k={k}; spacing {', '.join(f'{s:g}' for s in sp)} mm)")
    return fig
