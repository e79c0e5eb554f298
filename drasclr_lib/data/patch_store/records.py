"""Per-subject records: what preprocessing recorded about one subject (``subjects/<sid>.json``),
as a small dataclass rather than a dict every reader parses.

The invalid-patch policy lives here, once: a patch is *valid* when at least
:data:`MIN_PATCH_FOV` (half) of its voxels lie inside the originally scanned volume
(``patch_fov_fraction``); :meth:`SubjectRecord.valid_patches` applies it, and the store
(:meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`), pretraining, embedding,
density figures and segmentation all ask it. Records written before the field of view was
recorded have no ``patch_fov_fraction``: their patches count as fully inside, hence valid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drasclr_lib.data.patch_store.layout import safe_sid

__all__ = ["SubjectRecord", "PATCH_ARRAYS", "MIN_PATCH_FOV", "REASON_SEP", "image_grid", "grid_image"]


# per-patch lists of a record, each (L,)
PATCH_ARRAYS = ("patch_lung_fraction", "patch_emph_fraction", "patch_lobe", "patch_laa950", "patch_fov_fraction")

#: A patch with less than this fraction of its voxels inside the scanned volume is invalid: never
#: sampled in pretraining, NaN in embeddings, left out of density figures and unlabelled by
#: segmentation. Half: below it most of the patch is padding, which reads as -1024 HU air, i.e.
#: as severe emphysema.
MIN_PATCH_FOV = 0.5

#: Separator of the reasons in ``subjects.csv``'s ``qc_reasons`` cell (the format of
#: :func:`drasclr_lib.preprocess.checks.join_reasons`).
REASON_SEP = ";"


@dataclass
class SubjectRecord:
    """What preprocessing recorded about one subject (``subjects/<sid>.json``).

    Every field but ``sid`` and ``num_locations`` may be absent (``None``): stores written by hand
    or by tests hold only some. Fields absent from the file are absent from :meth:`to_dict`, so a
    record read and written again is the same file.

    Attributes:
        sid: subject id. num_locations: L.
        image: path of the CT the patches were cut from.
        lung_volume_l: lung volume in litres. laa950: % of lung voxels below -950 HU.
        reg_dice: Dice of the registered lung mask with the atlas mask.
        mask_dice: Dice of the segmented with the given lung mask (NaN when not compared).
        mask_source: ``"manifest"`` or ``"segmented"``.
        qc_pass: False when one of ``qc_reasons`` fails QC
            (:func:`drasclr_lib.preprocess.checks.qc_pass_from`).
        qc_reasons: list of reason tokens (``partial_fov:0.82``, ``low_registration_dice:0.71``,
            ``thick_slices:5.0mm`` ...), ``[]`` for a clean scan; ``;``-joined in ``subjects.csv``.
        fov_lung_coverage: fraction of the atlas lung the scan covers (the field of view carried
            into the atlas through the registration).
        mean_patch_inside: mean of ``patch_fov_fraction``: how much of the patches the scanner saw
            (older stores: the fraction inside the padded 1 mm grid).
        corners_subject: (L, 3) int64 (i, j, k) patch corners in the subject's padded 1 mm grid.
        patch_lung_fraction, patch_emph_fraction, patch_laa950: (L,) float64 (NaN unknown);
            lung and %LAA-950 count scanned lung voxels only.
        patch_lobe: (L,) int64 majority lobe (0 unknown).
        patch_fov_fraction: (L,) float32 fraction of each patch's voxels inside the originally
            scanned volume (``None`` in stores written before it was recorded: fully inside).
        grid_1mm: ``{origin, spacing, direction, size}`` of the padded 1 mm grid (see
            :meth:`grid_image`).
        transform: SimpleITK affine (``transform_to_dict``), atlas physical -> subject physical.
        registration: registration details (metric, iterations, ...).
        times: seconds per stage (``time_<stage>_s`` in the file).
        extra: any other key of the file, kept as read.
    """

    sid: str
    num_locations: int
    image: str | None = None
    lung_volume_l: float | None = None
    laa950: float | None = None
    reg_dice: float | None = None
    mask_dice: float | None = None
    mask_source: str | None = None
    qc_pass: bool | None = None
    qc_reasons: list[str] | None = None
    fov_lung_coverage: float | None = None
    mean_patch_inside: float | None = None
    corners_subject: np.ndarray | None = None
    patch_lung_fraction: np.ndarray | None = None
    patch_emph_fraction: np.ndarray | None = None
    patch_lobe: np.ndarray | None = None
    patch_laa950: np.ndarray | None = None
    patch_fov_fraction: np.ndarray | None = None
    grid_1mm: dict | None = None
    transform: dict | None = None
    registration: dict | None = None
    times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    _SCALARS = ("image", "lung_volume_l", "laa950", "reg_dice", "mask_dice", "mask_source", "qc_pass",
                "fov_lung_coverage", "mean_patch_inside")

    def __post_init__(self):
        self.sid = safe_sid(self.sid)
        L = int(self.num_locations)
        self.num_locations = L
        if self.corners_subject is not None:
            corners = np.asarray(self.corners_subject, dtype=np.int64)
            if corners.shape != (L, 3):
                raise ValueError(f"subject {self.sid}: corners_subject has shape {corners.shape}, expected ({L}, 3)")
            self.corners_subject = corners
        for key in PATCH_ARRAYS:
            value = getattr(self, key)
            if value is None:
                continue
            try:
                arr = (np.array([np.nan if v is None else v for v in value], dtype=np.float64)
                       if isinstance(value, (list, tuple)) else np.asarray(value, dtype=np.float64))
            except (TypeError, ValueError):
                arr = np.asarray(value, dtype=object)
            if arr.shape != (L,):
                raise ValueError(f"subject {self.sid}: record {key} has shape {arr.shape}, expected ({L},)")
            if key == "patch_lobe":
                arr = np.nan_to_num(arr).astype(np.int64)
            elif key == "patch_fov_fraction":
                arr = np.nan_to_num(arr, nan=1.0).astype(np.float32)
            setattr(self, key, arr)
        if self.qc_reasons is not None:
            reasons = self.qc_reasons
            if isinstance(reasons, str):
                reasons = reasons.split(REASON_SEP)
            self.qc_reasons = [str(r).strip() for r in reasons if str(r).strip()]

    def valid_patches(self, min_fov: float = MIN_PATCH_FOV) -> np.ndarray:
        """(L,) bool: the patches at least ``min_fov`` inside the scanned volume (the policy of
        :data:`MIN_PATCH_FOV`); every patch of a record without ``patch_fov_fraction`` (a store
        written before it was recorded) is valid."""
        if self.patch_fov_fraction is None:
            return np.ones(self.num_locations, dtype=bool)
        return np.asarray(self.patch_fov_fraction, dtype=np.float64) >= float(min_fov) - 1e-6

    @classmethod
    def from_dict(cls, data: dict, *, path: str | os.PathLike | None = None) -> "SubjectRecord":
        """A record from its JSON form (``subjects/<sid>.json``).

        Raises:
            ValueError: naming ``path`` when a per-patch list has the wrong length.
        """
        data = dict(data)
        known = {"sid", "num_locations", *cls._SCALARS, "qc_reasons", "corners_subject", *PATCH_ARRAYS, "grid_1mm",
                 "transform", "registration"}
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        times = {k[len("time_"):-len("_s")]: data.pop(k) for k in list(data)
                 if k.startswith("time_") and k.endswith("_s")}
        num = kwargs.pop("num_locations", None)
        if num is None:
            corners = kwargs.get("corners_subject")
            num = len(corners) if corners is not None else 0
        try:
            return cls(num_locations=num, times=times, extra=data, **kwargs)
        except ValueError as err:
            raise ValueError(f"{err} (in {path})" if path else str(err)) from None

    def to_dict(self) -> dict:
        """The JSON form: the fields that are set, per-patch arrays as lists (NaN -> ``None``)."""
        out: dict[str, Any] = {"sid": self.sid, "num_locations": self.num_locations}
        for key in self._SCALARS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.qc_reasons is not None:
            out["qc_reasons"] = list(self.qc_reasons)
        if self.corners_subject is not None:
            out["corners_subject"] = self.corners_subject.tolist()
        for key in PATCH_ARRAYS:
            value = getattr(self, key)
            if value is not None:
                if key == "patch_lobe":
                    out[key] = [int(v) for v in value]
                elif key == "patch_fov_fraction":  # float32 in memory: 5 decimals keep it exact enough
                    out[key] = [round(float(v), 5) for v in value]
                else:
                    out[key] = _floats(value)
        for key in ("grid_1mm", "transform", "registration"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        out.update({f"time_{stage}_s": float(s) for stage, s in self.times.items()})
        return out

    def flat(self) -> dict:
        """The scalar values (one row of ``subjects.csv``); ``qc_reasons`` as one ``;``-joined cell
        (``""`` for a clean scan)."""
        out = {k: v for k, v in self.to_dict().items() if isinstance(v, (str, int, float, bool)) or v is None}
        if self.qc_reasons is not None:
            out["qc_reasons"] = REASON_SEP.join(self.qc_reasons)
        return out

    def grid_image(self, pixel_type: int | None = None):
        """An empty SimpleITK image on the subject's padded 1 mm grid (``grid_1mm``).

        Args:
            pixel_type: SimpleITK pixel type (default ``sitkUInt8``).

        Raises:
            ValueError: when the record has no ``grid_1mm``.
        """
        if self.grid_1mm is None:
            raise ValueError(f"subject {self.sid}: its record has no grid_1mm (not written by preprocessing)")
        return grid_image(self.grid_1mm, pixel_type)


def _floats(a) -> list:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]


def image_grid(img) -> dict:
    """The grid of a SimpleITK image as records store it (``grid_1mm``) and
    :func:`~drasclr_lib.preprocess.resample.isotropic_grid` returns it: ``origin`` (3 floats, mm),
    ``spacing`` (3 floats, mm), ``direction`` (9 floats), ``size`` (3 ints)."""
    return {"origin": [float(v) for v in img.GetOrigin()], "spacing": [float(v) for v in img.GetSpacing()],
            "direction": [float(v) for v in img.GetDirection()], "size": [int(v) for v in img.GetSize()]}


def grid_image(grid: dict, pixel_type: int | None = None):
    """An empty SimpleITK image on a grid given as :func:`image_grid` returns it (the inverse).

    Args:
        grid: ``origin``, ``spacing``, ``direction`` (9 values), ``size``.
        pixel_type: SimpleITK pixel type (default ``sitkUInt8``).
    """
    import SimpleITK as sitk

    img = sitk.Image([int(v) for v in grid["size"]], sitk.sitkUInt8 if pixel_type is None else pixel_type)
    img.SetOrigin([float(v) for v in grid["origin"]])
    img.SetSpacing([float(v) for v in grid["spacing"]])
    img.SetDirection([float(v) for v in np.asarray(grid["direction"], dtype=np.float64).ravel()])
    return img
