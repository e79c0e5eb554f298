"""Whole-scan inference: one CT file in, an emphysema label NIfTI aligned with it out.

:func:`segment_scan` runs the per-scan pipeline the store writer runs for every subject
(:func:`~drasclr_lib.preprocess.pipeline.process_scan`: read (reoriented to LPS) -> 1 mm
B-spline resampling with ``PAD_VOXELS`` voxels of -1024 HU padding -> lung mask (given, or
:func:`segment_lungs`) -> affine registration of the lung mask to the atlas mask -> the atlas
patches cut with their subject corners), on the atlas the segmenter's store was made with
(:func:`~drasclr_lib.preprocess.atlas_source.resolve_atlas`). Every atlas patch is then segmented
with its own location condition (``normalize_locations(atlas.corners)``, the store's ``locs``),
and the patch probabilities are blended back into the subject's 1 mm grid by
:class:`PatchBlender`: the mean of the overlapping patches' class probabilities (sum / count),
background where no patch reaches, and background outside the lung mask. Invalid patches (less than
:data:`~drasclr_lib.data.patch_store.records.MIN_PATCH_FOV`, half, inside the scanned volume:
mostly padding, which reads as emphysema-like air) are not segmented: voxels only they reach stay
0, unlabelled, like every voxel outside the scan. The label volume is
finally resampled (nearest neighbour) from the 1 mm grid onto the geometry of the **input file as
stored** (read again without reorientation: same size, spacing, origin and direction) and written
as a uint8 NIfTI, atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from drasclr_lib.preprocess.atlas_source import resolve_atlas
from drasclr_lib.preprocess.pipeline import process_scan
from drasclr_lib.data.patch_store import add_patches, grid_image
from drasclr_lib.data.patch_store.records import MIN_PATCH_FOV
from drasclr_lib.utils import atomic_path, resolve_device

__all__ = ["PatchBlender", "input_geometry", "to_input_grid", "segment_scan", "default_output_path",
           "plot_scan_overlay"]

SEG_SUFFIX = "_emphysema_seg.nii.gz"


class PatchBlender:
    """Accumulates patch class probabilities on a volume grid: mean over overlapping patches.

    Only the bounding box of the patches (clipped to the grid) is held in memory.

    Args:
        shape_kji: (K, J, I) shape of the volume (SimpleITK array order).
        corners_ijk: (L, 3) (i, j, k) corners of every patch that will be added.
        patch_size: P.
        num_classes: C.

    Example:
        >>> b = PatchBlender((64, 64, 64), corners, 32, 2)  # doctest: +SKIP
        >>> b.add(probs, corners)          # probs (B, C, P, P, P) of patches at corners (B, 3)
        >>> labels = b.labels()            # (K, J, I) uint8, 0 where no patch reached
    """

    def __init__(self, shape_kji, corners_ijk: np.ndarray, patch_size: int, num_classes: int):
        self.shape = tuple(int(v) for v in shape_kji)
        if len(self.shape) != 3:
            raise ValueError(f"shape_kji must have 3 entries, got {shape_kji}")
        self.P, self.C = int(patch_size), int(num_classes)
        corners = np.asarray(corners_ijk, dtype=np.int64).reshape(-1, 3)[:, ::-1]  # (k, j, i)
        lo = np.clip(corners.min(0), 0, self.shape) if len(corners) else np.zeros(3, int)
        hi = np.clip(corners.max(0) + self.P, 0, self.shape) if len(corners) else np.zeros(3, int)
        self.lo, self.hi = lo, np.maximum(hi, lo)
        box = tuple(int(v) for v in self.hi - self.lo)
        self.sum = np.zeros((self.C, *box), dtype=np.float32)
        self.count = np.zeros(box, dtype=np.uint16)

    def add(self, probs: np.ndarray, corners_ijk: np.ndarray) -> None:
        """Add (B, C, P, P, P) probabilities of patches at (B, 3) (i, j, k) corners (parts outside are dropped)."""
        probs = np.asarray(probs)
        corners = np.asarray(corners_ijk, dtype=np.int64).reshape(-1, 3)
        if probs.shape[0] != len(corners) or probs.shape[1:] != (self.C, self.P, self.P, self.P):
            raise ValueError(f"probs must be (B={len(corners)}, C={self.C}, {self.P}, {self.P}, {self.P}), got {probs.shape}")
        add_patches(self.sum, self.count, probs, corners - self.lo[::-1])  # corners in the box

    def _full(self, box: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full(box.shape[:-3] + self.shape, fill, dtype=dtype)
        out[..., self.lo[0]:self.hi[0], self.lo[1]:self.hi[1], self.lo[2]:self.hi[2]] = box
        return out

    def coverage(self) -> np.ndarray:
        """(K, J, I) uint16: how many patches cover each voxel."""
        return self._full(self.count, 0, np.uint16)

    def mean_probs(self) -> np.ndarray:
        """(C, K, J, I) float32 mean probability over the covering patches (class 0 = 1 where none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.sum / np.maximum(self.count, 1), 0).astype(np.float32)
        mean[0][self.count == 0] = 1.0
        full = np.zeros((self.C, *self.shape), dtype=np.float32)
        full[0] = 1.0
        full[:, self.lo[0]:self.hi[0], self.lo[1]:self.hi[1], self.lo[2]:self.hi[2]] = mean
        return full

    def labels(self) -> np.ndarray:
        """(K, J, I) uint8 argmax of the mean probabilities; 0 (background) where no patch reaches."""
        lab = np.argmax(self.sum, axis=0).astype(np.uint8)  # argmax of the sum = argmax of the mean
        lab[self.count == 0] = 0
        return self._full(lab, 0, np.uint8)


def input_geometry(image_path: str | os.PathLike) -> sitk.Image:
    """An empty uint8 image with the geometry of the input file **as stored** (no reorientation).

    Reads only the header of a file; a DICOM folder is read as its (single) series.
    """
    path = Path(image_path)
    if path.is_dir():
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
        if len(series) != 1:
            raise ValueError(f"{path}: expected one DICOM series, found {len(series)}")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
        img = reader.Execute()
        size, spacing, origin, direction = img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size, spacing, origin, direction = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(),
                                            reader.GetDirection())
        if len(size) == 4:  # 3D stored as 4D with one time point (read_ct drops it too)
            d = np.asarray(direction).reshape(4, 4)[:3, :3]
            size, spacing, origin, direction = size[:3], spacing[:3], origin[:3], tuple(d.ravel())
    return grid_image({"size": size, "spacing": spacing, "origin": origin, "direction": direction})


def to_input_grid(label_1mm: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resampling of a label image onto ``reference``'s grid (uint8, 0 outside)."""
    return sitk.Resample(sitk.Cast(label_1mm, sitk.sitkUInt8), reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def default_output_path(image_path: str | os.PathLike) -> Path:
    """``<input stem>_emphysema_seg.nii.gz`` next to the input (a DICOM folder: next to the folder)."""
    path = Path(image_path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return path.parent / f"{name}{SEG_SUFFIX}"


@torch.inference_mode()
def segment_scan(model, image_path: str | os.PathLike, *, atlas, out_path: str | os.PathLike | None = None,
                 lung_mask_path: str | os.PathLike | None = None, batch_size: int = 32, device: str = "auto",
                 sid: str | None = None, progress: bool = False, min_patch_fov: float = MIN_PATCH_FOV) -> Path:
    """Segment one CT scan with a trained segmenter and write the labels next to it.

    Args:
        model: a :class:`~drasclr_lib.segmentation.model.DrasSegNet` (anything with
            ``num_classes`` and ``forward(x (B, 1, P, P, P), loc (B, 3)) -> logits (B, C, P, P, P)``).
        image_path: CT file or DICOM series folder.
        atlas: the atlas of the store the model was trained on, as
            :func:`~drasclr_lib.preprocess.atlas_source.resolve_atlas` takes it: an ``Atlas``,
            the store folder / ``PatchStore`` (its saved atlas; the published one for a store made
            with it), ``"published"`` (the published DrasCLR atlas shipped with the package), or
            ``(mask, landmarks)``.
        out_path: output NIfTI (default :func:`default_output_path`).
        lung_mask_path: optional lung mask on the CT's geometry (default: segmented).
        batch_size: patches per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        sid: subject id named in errors.
        progress: show a tqdm bar over the patch batches.
        min_patch_fov: patches with less than this share of their voxels inside the scanned
            volume are left out (their voxels unlabelled, 0).

    Returns:
        Path of the written uint8 label NIfTI (0 background or unlabelled, 1.. classes of the
        model), on the input's grid: same size, spacing, origin and direction as the input file.

    Raises:
        PreprocessError: when the scan cannot be read, segmented or registered.
        FileNotFoundError, ValueError: for an unusable ``atlas``.
    """
    from drasclr_lib.intensity import hu_to_input

    atlas = resolve_atlas(atlas)
    scan = process_scan(image_path, atlas, lung_mask=lung_mask_path, sid=sid or Path(image_path).name)
    dev = resolve_device(device)
    model.to(dev).eval()
    locs = atlas.locs
    P = atlas.patch_size
    shape_kji = sitk.GetArrayViewFromImage(scan.ct_1mm).shape
    valid = np.flatnonzero(np.asarray(scan.patch_fov_fraction) >= float(min_patch_fov) - 1e-6)
    blender = PatchBlender(shape_kji, scan.corners_subject[valid], P, model.num_classes)
    # each patch carries its own location; the encoder groups a batch's patches by location
    for i in tqdm(range(0, len(valid), batch_size), desc="segment", disable=not progress, leave=False):
        b = valid[i:i + batch_size]
        x = hu_to_input(torch.from_numpy(scan.patches_hu[b])).unsqueeze(1).to(dev)
        loc = torch.as_tensor(locs[b], dtype=torch.float32, device=dev)
        probs = torch.softmax(model(x, loc).float(), dim=1).cpu().numpy()
        blender.add(probs, scan.corners_subject[b])
    labels = blender.labels()
    labels[sitk.GetArrayViewFromImage(scan.lung_1mm) == 0] = 0  # the lung mask is inside the scan
    label_1mm = sitk.GetImageFromArray(labels)
    label_1mm.CopyInformation(scan.ct_1mm)
    out = to_input_grid(label_1mm, input_geometry(image_path))
    out_path = Path(out_path) if out_path is not None else default_output_path(image_path)
    with atomic_path(out_path) as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)
    return out_path


def plot_scan_overlay(image_path: str | os.PathLike, seg_path: str | os.PathLike,
                      truth_path: str | os.PathLike | None = None, *, num_classes: int | None = None, title: str = "",
                      class_labels: tuple[str, ...] = ("emphysema",), hu_window=(-1000.0, 200.0)):
    """Axial and coronal CT slices with the predicted labels, next to the ground truth when given.

    All images are read and reoriented to LPS for display (radiological view: the patient's left
    on the right of axial slices, superior up on coronal slices); they must share one geometry
    (the output of :func:`segment_scan` does). The slices pass through the centre of the
    predicted foreground (of the ground truth when there is no prediction, else the lung field).

    Args:
        image_path: the CT (file or DICOM folder).
        seg_path: the label NIfTI from :func:`segment_scan`.
        truth_path: optional reference label map on the CT's geometry.
        num_classes: with 2, the reference labels are shown as emphysema vs not (labels > 0);
            with 4 or ``None`` as they are.
        title: figure title.
        class_labels: names of labels 1, 2, ... for the legend.
        hu_window: display window in HU.

    Returns:
        The matplotlib ``Figure`` (rows: axial, coronal; columns: CT, [truth,] prediction).

    Raises:
        ValueError: when the label images do not have the CT's grid.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from drasclr_lib.preprocess.io import read_ct, reorient

    ct = read_ct(image_path)
    layers = {"prediction": reorient(sitk.ReadImage(str(seg_path)))}
    if truth_path is not None:
        layers = {"ground truth": reorient(sitk.ReadImage(str(truth_path))), **layers}
    for name, img in layers.items():
        if img.GetSize() != ct.GetSize() or not np.allclose(img.GetOrigin(), ct.GetOrigin(), atol=1e-3):
            raise ValueError(f"{name} ({img.GetSize()}) is not on the CT's grid ({ct.GetSize()})")
    hu = sitk.GetArrayFromImage(ct)
    arrays = {k: sitk.GetArrayFromImage(v).astype(np.int64) for k, v in layers.items()}
    if num_classes == 2 and "ground truth" in arrays:
        arrays["ground truth"] = (arrays["ground truth"] > 0).astype(np.int64)
    focus = next((a for a in (arrays["prediction"], arrays.get("ground truth")) if a is not None and a.any()), None)
    if focus is None:
        focus = hu < -500
    kk, jj, _ = (int(np.median(v)) for v in np.nonzero(focus))
    sx, sy, sz = ct.GetSpacing()
    colors = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3"]
    n_lab = max(1, max(int(a.max()) for a in arrays.values()), len(class_labels))
    cmap = ListedColormap(colors[:n_lab])
    cols = ["CT", *arrays]
    fig, axes = plt.subplots(2, len(cols), figsize=(3.6 * len(cols), 7.2), squeeze=False)
    views = (("axial", lambda a: a[kk], sy / sx, "upper"), ("coronal", lambda a: a[:, jj, :], sz / sx, "lower"))
    for r, (view, cut, aspect, origin) in enumerate(views):
        for c, name in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(cut(hu), cmap="gray", vmin=hu_window[0], vmax=hu_window[1], aspect=aspect, origin=origin,
                      interpolation="nearest")
            if name != "CT":
                lab = cut(arrays[name]).astype(float)
                lab[lab == 0] = np.nan
                ax.imshow(lab - 1, cmap=cmap, vmin=0, vmax=n_lab - 1, alpha=0.55, aspect=aspect, origin=origin,
                          interpolation="nearest")
            ax.set_title(f"{name} ({view})", fontsize=9)
            ax.set_axis_off()
    handles = [Patch(color=colors[i], label=class_labels[i] if i < len(class_labels) else f"label {i + 1}")
               for i in range(min(n_lab, len(colors)))]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
