"""The atlas: a lung mask subjects are registered to, and the patch corners in it.

:class:`Atlas` keeps the mask (reoriented like the subjects, the fixed image of the
registration), the corners (placed by the grid rule of :mod:`~drasclr_lib.preprocess.landmarks`
or given as the published ``atlas_patch_loc.npy``), their grid's geometry, and derives the
location condition and the neighbour lists from the corners. Which atlas a run uses (the published
one shipped with the package, given files, the one saved in a store, or one built from the
cohort's reference subject) is decided by :mod:`~drasclr_lib.preprocess.atlas_source`.

Geometry. Corners are voxel indices (i, j, k) of the grid they were defined on: the atlas
*file* as stored (nibabel's voxel order, which is SimpleITK's index order of the same file),
exactly the published ``atlas_patch_loc.npy`` format. Reorienting the mask for registration
permutes or flips axes, so :class:`Atlas` keeps the corners in the file's index space together
with that file's geometry (origin, spacing, direction) and converts them to physical points
with it (:meth:`Atlas.index_to_physical`); physical points do not depend on the orientation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from drasclr_lib.preprocess.io import reorient
from drasclr_lib.preprocess.landmarks import atlas_landmarks, nearest_neighbors, normalize_locations
from drasclr_lib.data.patch_store import grid_image, image_grid
from drasclr_lib.preprocess.resample import PAD_VOXELS

__all__ = ["Atlas"]


def _mask_to_ijk(mask: sitk.Image) -> np.ndarray:
    return sitk.GetArrayViewFromImage(mask).transpose(2, 1, 0)


@dataclass
class Atlas:
    """The atlas: a lung mask subjects are registered to, and the patch corners in it.

    Args:
        mask: atlas lung mask, uint8, nonzero = lung, reoriented like the subjects (the fixed
            image of the registration).
        corners: (L, 3) int patch corners, voxel (i, j, k) of the grid described by
            ``corner_geometry`` (the atlas file as stored; published ``atlas_patch_loc.npy``
            format).
        source: where the atlas came from (file paths or the reference subject).
        corner_geometry: ``{"origin", "spacing", "direction", "size"}`` of the grid the corners
            index. ``None`` means the grid of ``mask`` itself.
        patch_size: edge of the patches in voxels.

    Raises:
        ValueError: for corners that are not (L, 3) with L >= 1, or that lie outside the grid.
    """

    mask: sitk.Image
    corners: np.ndarray
    source: str = ""
    corner_geometry: dict | None = None
    patch_size: int = 32
    _neighbors: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        corners = np.asarray(self.corners)
        if corners.ndim != 2 or corners.shape[1] != 3 or len(corners) < 1:
            raise ValueError(f"atlas ({self.source}): corners must be (L, 3) with L >= 1, got shape {corners.shape}")
        if not np.issubdtype(corners.dtype, np.integer):
            if not np.allclose(corners, np.round(corners)):
                raise ValueError(f"atlas ({self.source}): corners must be integer voxel indices")
        self.corners = np.round(corners).astype(np.int64)
        if self.mask.GetDimension() != 3:
            raise ValueError(f"atlas ({self.source}): the mask must be 3D, got {self.mask.GetDimension()}D")
        if self.corner_geometry is None:
            self.corner_geometry = image_grid(self.mask)
        size = np.asarray(self.corner_geometry["size"])
        if np.any(self.corners < 0) or np.any(self.corners + self.patch_size > size):
            bad = int(np.sum(np.any((self.corners < 0) | (self.corners + self.patch_size > size), axis=1)))
            raise ValueError(f"atlas ({self.source}): {bad} patch corners fall (partly) outside the atlas grid of size "
                             f"{size.tolist()}; were the landmarks made for this mask?")

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_locations(self) -> int:
        return len(self.corners)

    @property
    def locs(self) -> np.ndarray:
        """(L, 3) float32 normalised locations in [-1, 1] (SPEC step 6)."""
        return normalize_locations(self.corners)

    def neighbors(self, k: int = 2, *, seed: int = 0) -> np.ndarray:
        """(L, k) int64 nearest atlas neighbours of every location (itself excluded).

        Ties are broken by :func:`nearest_neighbors`'s rule (a new axis first, then a seeded
        random priority); the lists are cached per ``(k, seed)``.
        """
        if (k, seed) not in self._neighbors:
            self._neighbors[(k, seed)] = nearest_neighbors(self.corners, k, seed=seed)
        return self._neighbors[(k, seed)]

    def index_to_physical(self, index: np.ndarray) -> np.ndarray:
        """Physical points (mm, LPS) of continuous voxel indices of the corner grid.

        Args:
            index: (N, 3) continuous (i, j, k) indices in the corner grid.

        Returns:
            (N, 3) float64 physical points, ``origin + direction @ (spacing * index)``.
        """
        g = self.corner_geometry
        direction = np.asarray(g["direction"], dtype=np.float64).reshape(3, 3)
        idx = np.asarray(index, dtype=np.float64).reshape(-1, 3) * np.asarray(g["spacing"], dtype=np.float64)
        return np.asarray(g["origin"], dtype=np.float64) + idx @ direction.T

    def patch_centers_physical(self) -> np.ndarray:
        """(L, 3) physical centres of the atlas patches (mm): corner + (P - 1) / 2 on each axis."""
        return self.index_to_physical(self.corners + (self.patch_size - 1) / 2.0)

    def mask_array_ijk(self) -> np.ndarray:
        """The atlas mask on the corner grid, as an (i, j, k) array (for pictures and checks)."""
        ref = grid_image(self.corner_geometry)
        res = sitk.Resample(self.mask, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(res).transpose(2, 1, 0)

    def warp(self, subject_image: sitk.Image, transform=None, *, interpolator: str = "nearest",
             default: float = 0.0) -> sitk.Image:
        """A subject image brought onto the atlas mask's grid (for overlays and QC).

        Args:
            subject_image: image in the subject's physical space (a lung mask, or a CT).
            transform: atlas physical -> subject physical (as from registration); ``None`` = the
                identity, i.e. the subject as it lies in physical space before registration.
            interpolator: ``"nearest"`` (labels) or ``"linear"`` (CT).
            default: value outside the subject image (use -1024 for a CT).

        Returns:
            Image with the geometry of :attr:`mask` (pixel type of ``subject_image``).
        """
        interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}[interpolator]
        return sitk.Resample(subject_image, self.mask, transform if transform is not None else sitk.Transform(),
                             interp, float(default), subject_image.GetPixelID())

    # -- persistence -----------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write the mask (on the corner grid) and the landmarks atomically, under the store's
        file names (``atlas_mask.nii.gz``, ``atlas_landmarks.npy``; see
        :mod:`~drasclr_lib.data.patch_store`).

        The mask is written on the grid the corners index, so :meth:`from_files` on the two files
        gives back the same atlas (same physical corners).

        Returns:
            (mask path, landmarks path).
        """
        from drasclr_lib.data.patch_store import ATLAS_LANDMARKS_FILE, ATLAS_MASK_FILE
        from drasclr_lib.utils import atomic_path, save_npy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        on_grid = sitk.GetImageFromArray(self.mask_array_ijk().transpose(2, 1, 0).copy())
        on_grid.CopyInformation(grid_image(self.corner_geometry))
        mask_path = folder / ATLAS_MASK_FILE
        with atomic_path(mask_path) as tmp:
            sitk.WriteImage(on_grid, str(tmp), useCompression=True)
        lm_path = save_npy(self.corners.astype(np.int64), folder / ATLAS_LANDMARKS_FILE)
        return mask_path, lm_path

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, mask_path: str | os.PathLike, landmarks_path: str | os.PathLike | None = None, *,
                   patch_size: int = 32, **grid_kwargs) -> "Atlas":
        """An atlas from a lung-mask file and, optionally, a landmark file.

        Args:
            mask_path: atlas lung mask (NIfTI, NRRD, MHA; nonzero = lung; e.g. the published
                ``atlas_lung_mask.nii.gz`` with labels 50/100).
            landmarks_path: ``.npy`` (L, 3) int corners in the mask file's voxel (i, j, k) order
                (the published ``atlas_patch_loc.npy``). ``None``: run :func:`atlas_landmarks`
                on the mask.
            patch_size: patch edge in voxels.
            **grid_kwargs: passed to :func:`atlas_landmarks` (step, min_fraction, max_patches).

        Raises:
            FileNotFoundError: when a file is missing.
            ValueError: for a mask without lung, a non-3D mask or landmarks of the wrong shape.
        """
        mask_path = Path(mask_path)
        if not mask_path.exists():
            raise FileNotFoundError(f"atlas mask {mask_path} does not exist")
        try:
            raw = sitk.ReadImage(str(mask_path))
        except RuntimeError as exc:
            raise ValueError(f"atlas mask {mask_path} cannot be read: {exc}") from None
        if raw.GetDimension() != 3 or raw.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"atlas mask {mask_path} must be a 3D scalar image, got {raw.GetDimension()}D")
        binary = sitk.Cast(raw > 0, sitk.sitkUInt8)
        if not sitk.GetArrayViewFromImage(binary).any():
            raise ValueError(f"atlas mask {mask_path} holds no lung (no nonzero voxel)")
        geometry = image_grid(raw)
        if landmarks_path is None:
            corners = atlas_landmarks(_mask_to_ijk(binary), patch_size=patch_size, **grid_kwargs)
            source = f"mask {mask_path} (grid rule)"
        else:
            landmarks_path = Path(landmarks_path)
            if not landmarks_path.exists():
                raise FileNotFoundError(f"atlas landmarks {landmarks_path} do not exist")
            corners = np.load(landmarks_path, allow_pickle=False)
            if corners.ndim != 2 or corners.shape[1] != 3:
                raise ValueError(f"atlas landmarks {landmarks_path}: expected (L, 3) corners, got {corners.shape}")
            source = f"mask {mask_path}, landmarks {landmarks_path}"
        if len(corners) < 3:
            raise ValueError(f"atlas mask {mask_path}: only {len(corners)} patch locations; too little lung for an atlas")
        return cls(mask=reorient(binary), corners=corners, source=source, corner_geometry=geometry,
                   patch_size=patch_size)

    @classmethod
    def from_subject(cls, ct: str | os.PathLike | sitk.Image, lung_mask: str | os.PathLike | sitk.Image | None = None,
                     *, sid: str | None = None, patch_size: int = 32, pad: int = PAD_VOXELS,
                     **grid_kwargs) -> "Atlas":
        """An atlas built from one subject of the cohort (see
        :func:`~drasclr_lib.preprocess.atlas_source.choose_reference`).

        The subject goes through the first stages of the per-scan pipeline
        (:func:`~drasclr_lib.preprocess.pipeline.scan_to_1mm`: read and reorient like every
        subject, 1 mm B-spline with ``pad`` voxels of -1024 HU, the given lung mask or
        :func:`~drasclr_lib.preprocess.lung_mask.segment_lungs`); the grid rule then gives the
        corners, on the padded 1 mm grid.

        Args:
            ct: CT file/folder or a SimpleITK image in HU.
            lung_mask: optional lung-mask file or image (nonzero = lung) on the CT's geometry.
            sid: subject id, used in the source string and in errors.
            patch_size: patch edge in voxels.
            pad: padding in voxels (-1024 HU) around the resampled CT.
            **grid_kwargs: passed to :func:`~drasclr_lib.preprocess.landmarks.atlas_landmarks`.

        Raises:
            PreprocessError: when the CT cannot be read, or its lung mask is empty or cannot be
                segmented.
            ValueError: when the lung holds too few patches.
        """
        from drasclr_lib.preprocess.pipeline import scan_to_1mm

        name = sid or (str(ct) if not isinstance(ct, sitk.Image) else "image")
        binary = sitk.Cast(scan_to_1mm(ct, lung_mask=lung_mask, sid=sid, pad=pad).lung_1mm > 0, sitk.sitkUInt8)
        corners = atlas_landmarks(_mask_to_ijk(binary), patch_size=patch_size, **grid_kwargs)
        if len(corners) < 3:
            raise ValueError(f"atlas from subject {name}: only {len(corners)} patch locations; too little lung")
        return cls(mask=binary, corners=corners, source=f"subject {name}", corner_geometry=image_grid(binary),
                   patch_size=patch_size)
