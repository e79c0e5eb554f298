"""Atlas landmarks: the anatomical locations shared by every subject.

The grid rule (:func:`atlas_landmarks`), the atlas itself (:class:`Atlas`: a lung mask to
register subjects to, plus the patch corners in its voxel grid), the choice of a reference
subject when the atlas is built from the cohort (:func:`choose_reference`), the location
condition fed to the encoder (:func:`normalize_locations`) and the anatomical neighbour lists
(:func:`nearest_neighbors`).

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

__all__ = [
    "normalize_locations",
    "nearest_neighbors",
    "atlas_landmarks",
    "Atlas",
    "choose_reference",
]


def normalize_locations(atlas_corners: np.ndarray) -> np.ndarray:
    """Location condition of every atlas patch (SPEC step 6, checkpoint-compatible).

    ``loc_i = corner_i / corners.max(axis=0) * 2 - 1`` with the per-axis maximum over all
    locations, exactly as the published code, so released checkpoints see the inputs they
    were trained on.

    Args:
        atlas_corners: (L, 3) voxel corners of the patches in the atlas.

    Returns:
        loc (L, 3) float32, in [-1, 1].

    Raises:
        ValueError: for a wrong shape or an axis whose maximum corner is not positive.
    """
    corners = np.asarray(atlas_corners, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 3 or len(corners) == 0:
        raise ValueError(f"atlas_corners must be a non-empty (L, 3) array, got shape {corners.shape}")
    cmax = corners.max(axis=0)
    if np.any(cmax <= 0):
        raise ValueError(f"every axis needs a positive maximum corner to normalise, got max {cmax.tolist()}")
    return (corners / cmax * 2.0 - 1.0).astype(np.float32)


def nearest_neighbors(atlas_corners: np.ndarray, k: int = 2, *, seed: int = 0) -> np.ndarray:
    """The ``k`` nearest atlas locations of every location, itself excluded, without direction bias.

    Distance is Euclidean between atlas corners. On the 26-voxel grid several locations tie at
    the same distance (on the published 581 landmarks a location has 4.8 locations at the
    nearest distance on average), so the tie rule decides which directions the neighbour loss
    sees. Picks are made rank by rank, each from the locations at the smallest distance not yet
    taken (so the sorted distances are always the ``k`` smallest, as with a plain argsort);
    among the tied locations:

    1. **a new axis first**: prefer the candidate whose offset is least aligned with this
       location's earlier picks (smallest ``max_p cos²`` of the angle between the candidate's
       offset and each earlier pick's offset; for ``k = 2`` the second neighbour lies on another
       axis than the first whenever the grid allows);
    2. **then a seeded random priority** (``np.random.default_rng(seed)``, one value per pair of
       locations), so no axis or sign is favoured; the index breaks the (measure-zero) rest.

    A lowest-index rule instead always favours the negative offsets of the first two axes
    (78.6 % of the picks on the published landmarks). With this rule, on the published
    landmarks and ``seed=0``, no offset exceeds 17.6 % of the picks and each axis gets 32-35 %
    (see ``docs/preprocessing_atlas_patches_cohort.md``). The result depends only on the
    corners, ``k`` and ``seed``, never on the global random state.

    Args:
        atlas_corners: (L, 3) voxel corners.
        k: number of neighbours (the paper uses 2).
        seed: seed of the random tie priority; the same seed gives the same lists.

    Returns:
        neighbors (L, k) int64 indices into the locations, nearest first.

    Raises:
        ValueError: for a wrong shape or ``k`` outside ``[1, L - 1]``.
    """
    corners = np.asarray(atlas_corners, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 3:
        raise ValueError(f"atlas_corners must be an (L, 3) array, got shape {corners.shape}")
    n = len(corners)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} locations, got {k}")
    rows = np.arange(n)
    # squared distances; exact for integer corners, so ties are exact
    d2 = ((corners[:, None, :] - corners[None, :, :]) ** 2).sum(-1)
    d2[rows, rows] = np.inf  # never itself
    priority = np.random.default_rng(seed).random((n, n))
    align = np.zeros((n, n))  # max over earlier picks p of (offset_ij . offset_ip)^2 / |offset_ip|^2
    out = np.empty((n, k), dtype=np.int64)
    for r in range(k):
        tied = d2 == d2.min(axis=1, keepdims=True)
        pen = np.where(tied, align, np.inf)
        best = pen == pen.min(axis=1, keepdims=True)  # tied and least aligned with earlier picks
        pick = np.argmin(np.where(best, priority, np.inf), axis=1)
        out[:, r] = pick
        if r + 1 < k:
            # offset_ij . offset_ip = c_j.v_i - c_i.v_i with v_i = c_p - c_i
            v = corners[pick] - corners
            dot = v @ corners.T - (v * corners).sum(1, keepdims=True)
            # cos² times the candidates' common |offset_ij|²: for integer corners a correctly rounded
            # ratio of exact integers, so equal alignments compare equal
            align = np.maximum(align, dot**2 / d2[rows, pick][:, None])
        d2[rows, pick] = np.inf
    return out


# --------------------------------------------------------------------------------------------
# The grid rule
# --------------------------------------------------------------------------------------------
def _window_sums(mask: np.ndarray, starts: list[np.ndarray], size: int) -> np.ndarray:
    """Sum of ``mask`` over every box ``[s0:s0+size, s1:s1+size, s2:s2+size]`` of the grid.

    Separable: sum windows along axis 0 at the grid starts only, then axis 1, then axis 2,
    so the work is a few passes over the volume (no triple loop, no full summed-volume table).
    """
    out = mask
    for axis, st in enumerate(starts):
        moved = np.moveaxis(out, axis, 0)
        sums = np.stack([moved[s : s + size].sum(axis=0, dtype=np.int64) for s in st]) if len(st) else \
            np.zeros((0,) + moved.shape[1:], dtype=np.int64)
        out = np.moveaxis(sums, 0, axis)
    return out


def atlas_landmarks(lung_mask: np.ndarray, patch_size: int = 32, step: int = 26, min_fraction: float = 0.1,
                    max_patches: int = 1000) -> np.ndarray:
    """The published grid rule: corners of the 32³ atlas patches that hold enough lung.

    Tiles the volume with cubes of ``patch_size`` on a grid of ``step`` voxels, starting at 0
    and visiting ``x in range(0, nx - patch_size, step)`` (outer), then ``y``, then ``z``
    (inner) — the upper bound is exclusive, as in the published loop. A patch is kept when its
    number of lung voxels is **strictly greater** than ``min_fraction * patch_size**3``. If
    ``max_patches`` or more are kept, the threshold is raised by 0.1 (accumulated in floating
    point, as published) and the rule repeats while the threshold is below 1.

    On the published atlas mask (``atlas_lung_mask.nii.gz``) this returns 575 corners, every one
    of them in the published ``atlas_patch_loc.npy`` (581, made from a slightly different mask).

    Args:
        lung_mask: 3D array in NIfTI voxel order (i, j, k) as nibabel returns it (for a SimpleITK
            image: ``sitk.GetArrayFromImage(img).transpose(2, 1, 0)``); nonzero = lung.
        patch_size: edge of the cubic patches in voxels.
        step: grid step in voxels (26 = 6 voxels of overlap).
        min_fraction: initial lung fraction a patch must exceed.
        max_patches: raise the threshold while this many or more patches are kept.

    Returns:
        corners (L, 3) int64 in (i, j, k) order, sorted as the rule visits them (i outer, k
        inner). Empty (0, 3) when no patch passes (e.g. no lung).

    Raises:
        ValueError: for a non-3D mask or non-positive sizes.
    """
    mask = np.asarray(lung_mask)
    if mask.ndim != 3:
        raise ValueError(f"lung_mask must be a 3D array in (i, j, k) order, got shape {mask.shape}")
    if patch_size < 1 or step < 1 or max_patches < 1:
        raise ValueError(f"patch_size, step and max_patches must be positive, got {patch_size}, {step}, {max_patches}")
    binary = (mask > 0).view(np.uint8) if mask.dtype == bool else (mask > 0).astype(np.uint8)
    starts = [np.arange(0, n - patch_size, step) for n in mask.shape]
    counts = _window_sums(binary, starts, patch_size)  # (nx, ny, nz) lung voxels per patch
    grid = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1)  # (nx, ny, nz, 3), C order = visiting order
    patch_vol = patch_size**3
    threshold = float(min_fraction)
    while True:
        keep = counts > threshold * patch_vol
        if int(keep.sum()) < max_patches:
            return grid[keep].astype(np.int64).reshape(-1, 3)
        if threshold < 1:
            threshold += 0.1
        else:  # as published: give up, nothing kept
            return np.zeros((0, 3), dtype=np.int64)


# --------------------------------------------------------------------------------------------
# The atlas
# --------------------------------------------------------------------------------------------
def _geometry(img: sitk.Image) -> dict:
    return {
        "origin": [float(v) for v in img.GetOrigin()],
        "spacing": [float(v) for v in img.GetSpacing()],
        "direction": [float(v) for v in img.GetDirection()],
        "size": [int(v) for v in img.GetSize()],
    }


def _reorient(img: sitk.Image) -> sitk.Image:
    """Same orientation as :func:`drasclr_lib.preprocess.io.read_ct` gives subjects."""
    try:
        from drasclr_lib.preprocess.io import reorient
    except ImportError:  # io not available: the same rule, spelled out
        return sitk.DICOMOrient(img, "LPS")
    return reorient(img)


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
            self.corner_geometry = _geometry(self.mask)
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
        g = self.corner_geometry
        ref = sitk.Image([int(v) for v in g["size"]], sitk.sitkUInt8)
        ref.SetOrigin(g["origin"])
        ref.SetSpacing(g["spacing"])
        ref.SetDirection(g["direction"])
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
        """Write ``atlas_mask.nii.gz`` (on the corner grid) and ``atlas_landmarks.npy`` atomically.

        The mask is written on the grid the corners index, so :meth:`from_files` on the two files
        gives back the same atlas (same physical corners).

        Returns:
            (mask path, landmarks path).
        """
        from drasclr_lib.utils import atomic_path, save_npy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        g = self.corner_geometry
        on_grid = sitk.GetImageFromArray(self.mask_array_ijk().transpose(2, 1, 0).copy())
        on_grid.SetOrigin(g["origin"])
        on_grid.SetSpacing(g["spacing"])
        on_grid.SetDirection(g["direction"])
        mask_path = folder / "atlas_mask.nii.gz"
        with atomic_path(mask_path) as tmp:
            sitk.WriteImage(on_grid, str(tmp), useCompression=True)
        lm_path = save_npy(self.corners.astype(np.int64), folder / "atlas_landmarks.npy")
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
        geometry = _geometry(raw)
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
        return cls(mask=_reorient(binary), corners=corners, source=source, corner_geometry=geometry,
                   patch_size=patch_size)

    @classmethod
    def from_subject(cls, ct: str | os.PathLike | sitk.Image, lung_mask: str | os.PathLike | sitk.Image | None = None,
                     *, sid: str | None = None, patch_size: int = 32, pad: int = 60, **grid_kwargs) -> "Atlas":
        """An atlas built from one subject of the cohort (see :func:`choose_reference`).

        The CT is read and reoriented like every subject, resampled to 1 mm (B-spline) and padded
        by ``pad`` voxels; its lung mask is the given one (resampled with nearest neighbour onto
        that grid) or :func:`~drasclr_lib.preprocess.lung_mask.segment_lungs`; the grid rule then
        gives the corners, on the padded 1 mm grid.

        Args:
            ct: CT file/folder or a SimpleITK image in HU.
            lung_mask: optional lung-mask file or image (nonzero = lung) on the CT's geometry.
            sid: subject id, used in the source string and in errors.
            patch_size: patch edge in voxels.
            pad: padding in voxels (-1024 HU) around the resampled CT.
            **grid_kwargs: passed to :func:`atlas_landmarks`.

        Raises:
            PreprocessError: when the CT cannot be read or segmented.
            ValueError: when the lung holds too few patches.
        """
        from drasclr_lib.preprocess.io import read_ct, read_label
        from drasclr_lib.preprocess.patches import resample_to_grid
        from drasclr_lib.preprocess.resample import resample_isotropic

        name = sid or (str(ct) if not isinstance(ct, sitk.Image) else "image")
        img = ct if isinstance(ct, sitk.Image) else read_ct(ct, sid=sid)
        if isinstance(ct, sitk.Image):
            img = _reorient(sitk.Cast(img, sitk.sitkFloat32))
        ct_1mm = resample_isotropic(img, 1.0, interpolator="bspline", pad=pad, pad_value=-1024)
        if lung_mask is None:
            from drasclr_lib.preprocess.lung_mask import segment_lungs

            mask_1mm = segment_lungs(ct_1mm, sid=sid)
        else:
            lab = lung_mask if isinstance(lung_mask, sitk.Image) else read_label(lung_mask, img, sid=sid)
            if isinstance(lung_mask, sitk.Image):
                lab = _reorient(lab)
            mask_1mm = resample_to_grid(lab, ct_1mm)
        binary = sitk.Cast(mask_1mm > 0, sitk.sitkUInt8)
        corners = atlas_landmarks(_mask_to_ijk(binary), patch_size=patch_size, **grid_kwargs)
        if len(corners) < 3:
            raise ValueError(f"atlas from subject {name}: only {len(corners)} patch locations; too little lung")
        return cls(mask=binary, corners=corners, source=f"subject {name}", corner_geometry=_geometry(binary),
                   patch_size=patch_size)


def choose_reference(manifest_df) -> str:
    """The subject an atlas built from the cohort is made from (documented default).

    Rule: the subject whose lung volume is the cohort median (the lower median for an even
    count; ties by sorted ``sid``), so the atlas is neither a small nor a large lung. Lung
    volumes come from the manifest's ``lung_mask`` files when the column is filled (count of
    nonzero voxels times voxel volume, read from the mask files only; only subjects with a
    readable mask are candidates).
    Without masks the same rule uses the scanned volume of each image (size times spacing, read
    from the file headers only, no pixel data), a cheap stand-in that avoids segmenting the
    whole cohort before it is processed.

    Args:
        manifest_df: manifest DataFrame with ``sid`` and ``image`` (optional ``lung_mask``).

    Returns:
        The chosen ``sid``.

    Raises:
        ValueError: for an empty manifest.
    """
    df = manifest_df.copy()
    if len(df) == 0:
        raise ValueError("choose_reference: the manifest is empty")
    df["sid"] = df["sid"].astype(str)
    df = df.sort_values("sid").reset_index(drop=True)
    volumes = []
    use_masks = "lung_mask" in df.columns and df["lung_mask"].notna().any()
    for _, row in df.iterrows():
        try:
            if use_masks:
                if not isinstance(row["lung_mask"], str) or not row["lung_mask"].strip():
                    raise ValueError("no lung mask")  # candidates are the subjects with a mask
                m = sitk.ReadImage(str(row["lung_mask"]))
                vox = float(np.prod(m.GetSpacing()))
                volumes.append(float(np.count_nonzero(sitk.GetArrayViewFromImage(m))) * vox)
            else:
                path = Path(str(row["image"]))
                reader = sitk.ImageFileReader()
                if path.is_dir():
                    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
                    reader.SetFileName(files[0])
                    reader.ReadImageInformation()
                    size = list(reader.GetSize())[:2] + [len(files)]
                else:
                    reader.SetFileName(str(path))
                    reader.ReadImageInformation()
                    size = list(reader.GetSize())
                volumes.append(float(np.prod(size[:3]) * np.prod(reader.GetSpacing()[:3])))
        except Exception:  # noqa: BLE001 - an unreadable subject is never the reference
            volumes.append(np.nan)
    vol = np.asarray(volumes)
    ok = np.flatnonzero(np.isfinite(vol))
    if len(ok) == 0:
        return str(df["sid"].iloc[0])
    order = ok[np.argsort(vol[ok], kind="stable")]
    return str(df["sid"].iloc[order[(len(order) - 1) // 2]])
