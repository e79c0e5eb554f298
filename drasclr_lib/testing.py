"""Test support as library code: tiny patch stores with a known structure, written without any
preprocessing run.

For the test suite, the benchmarks and trying the API: :func:`make_toy_store` writes a store whose
subjects have a known disease level, so a pipeline that learns nothing is told apart from one that
does; with ``scans=`` it also writes each subject's CT and lung mask and the geometry preprocessing
records, for code that goes from patches back to scans. It writes stores as preprocessing would,
so it sits above :mod:`drasclr_lib.data` and :mod:`drasclr_lib.preprocess` and imports both.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["make_toy_store", "toy_corners"]


def toy_corners(grid: tuple = (3, 3, 2), step: int = 26, start: int = 10) -> np.ndarray:
    """(L, 3) int64 atlas corners on a regular ``grid`` (i, j, k), ``step`` voxels apart."""
    return np.array([[step * i + start, step * j + start, step * k + start] for i in range(grid[0])
                     for j in range(grid[1]) for k in range(grid[2])], dtype=np.int64)


def make_toy_store(root, n_subjects: int = 12, grid: tuple = (3, 3, 2), patch_size: int = 32, seed: int = 0,
                   with_labels: bool = True, *, scans: str | os.PathLike | None = None):
    """Write a tiny patch store with a known structure.

    Locations sit on a ``grid`` of atlas corners 26 voxels apart. Each subject has a disease level
    ``d`` in [0, 1] (subject ``s`` of N: ``d = s / (N - 1)``), and ``FEV1pp = 100 - 60 d``,
    ``GOLD = round(4 d)`` in ``subjects.csv``.

    Without ``scans`` (the default), its patches are lung-like noise around -850 HU with a
    location-dependent mean shift and a fraction ``d / 2`` of voxels set near -990 HU (emphysema,
    label 1); records hold no geometry.

    With ``scans`` (a folder), every subject also gets files and geometry as preprocessing writes
    them, for code that goes back from patches to scans (viewers, lung-aware baselines): a CT
    ``<sid>_ct.nii.gz`` (40 HU body; a lung ellipsoid of -850 +/- 40 HU, kept above -950; a fraction
    ``0.1 + 0.4 d`` of lung voxels at -990 HU, exactly the label-1 voxels, so every subject has
    some emphysema) and its lung mask
    ``<sid>_lung.nii.gz``. The subject's 1 mm grid (``grid_1mm``) starts 3 voxels into the scan on
    every axis and its patch corners (``corners_subject``) are the atlas corners shifted by
    ``s mod 3`` voxels, so code that ignores either cuts the wrong voxels; the patches are cut from
    the grid. ``subjects.csv`` gets ``image`` and ``lung_mask`` columns.

    Returns:
        The store's path.
    """
    import pandas as pd

    from drasclr_lib.data.patch_store import finalize_store, write_store_meta, write_subject
    from drasclr_lib.preprocess.landmarks import nearest_neighbors, normalize_locations

    rng = np.random.default_rng(seed)
    corners = toy_corners(grid)
    neighbors = nearest_neighbors(corners, min(2, len(corners) - 1))
    write_store_meta(root, corners, normalize_locations(corners), neighbors, patch_size=patch_size, atlas="toy")
    L, P = len(corners), patch_size
    rows = []
    for s in range(n_subjects):
        sid = f"toy{s:03d}"
        d = s / max(n_subjects - 1, 1)
        row = {"sid": sid}
        if scans is None:
            base = -850 + 15 * np.arange(L)[:, None, None, None]
            vol = base + rng.normal(0, 40, size=(L, P, P, P))
            emph = rng.random((L, P, P, P)) < 0.5 * d
            vol[emph] = -990 + rng.normal(0, 10, size=emph.sum())
            labels = emph.astype(np.uint8) if with_labels else None
            write_subject(root, sid, vol.astype(np.int16), label_patches=labels,
                          record={"lung_volume_l": 5.0, "laa950": float(emph.mean() * 100)})
        else:
            emph, files = _toy_scan(root, Path(scans), sid, s, d, corners, P, with_labels, rng)
            row.update(files)
        rows.append({**row, "emph_fraction": float(emph.mean()), "FEV1pp": 100 - 60 * d, "GOLD": int(round(4 * d))})
    finalize_store(root, pd.DataFrame(rows))
    return root


def _toy_scan(root, scans: Path, sid: str, s: int, d: float, corners: np.ndarray, P: int, with_labels: bool, rng):
    """One subject of :func:`make_toy_store` with ``scans``: files, geometry, patches cut from the grid."""
    import SimpleITK as sitk

    from drasclr_lib.data.patch_store import cut_patches, write_subject

    shift = 3  # the 1 mm grid starts this many voxels into the scan
    subject_corners = corners + s % 3
    size_ijk = subject_corners.max(0) + P + 4 + shift  # the scan: every patch inside, a margin beyond
    shape_kji = tuple(int(v) for v in size_ijk[::-1])
    kji = np.indices(shape_kji, dtype=np.float64)  # lung: an ellipsoid whose surface crosses patches
    centre, radii = (np.asarray(shape_kji) + shift) / 2.0, 0.42 * np.asarray(shape_kji)
    lung = (sum(((kji[a] - centre[a]) / radii[a]) ** 2 for a in range(3)) <= 1).astype(np.uint8)
    ct = np.full(shape_kji, 40, dtype=np.int16)
    inside = lung > 0
    ct[inside] = np.clip(rng.normal(-850, 40, size=int(inside.sum())), -930, -770).astype(np.int16)
    emph = inside & (rng.random(shape_kji) < 0.1 + 0.4 * d)
    ct[emph] = -990
    origin = np.array([-10.0 + s, 5.0, 2.0])
    scans.mkdir(parents=True, exist_ok=True)
    files = {"image": str(scans / f"{sid}_ct.nii.gz"), "lung_mask": str(scans / f"{sid}_lung.nii.gz")}
    for arr, key in ((ct, "image"), (lung, "lung_mask")):
        img = sitk.GetImageFromArray(arr)
        img.SetOrigin(tuple(origin))
        sitk.WriteImage(img, files[key])
    grid = {"origin": (origin + shift).tolist(), "spacing": [1.0, 1.0, 1.0], "direction": np.eye(3).ravel().tolist(),
            "size": [int(v) - shift for v in size_ijk]}
    on_grid = (slice(shift, None),) * 3
    patches = cut_patches(ct[on_grid], subject_corners, P, -1024)[0]
    labels = cut_patches(emph[on_grid].astype(np.uint8), subject_corners, P, 0)[0] if with_labels else None
    lung_fraction = cut_patches(lung[on_grid], subject_corners, P, 0)[0].reshape(len(corners), -1).mean(1)
    write_subject(root, sid, patches, label_patches=labels,
                  record={"lung_volume_l": float(inside.sum()) / 1e6, "laa950": 100.0 * float(emph.sum()) / inside.sum(),
                          "corners_subject": subject_corners, "grid_1mm": grid, "patch_lung_fraction": lung_fraction})
    return emph[inside], files
