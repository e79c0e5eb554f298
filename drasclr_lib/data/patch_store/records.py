"""Per-subject records: what preprocessing recorded about one subject (``subjects/<sid>.json``),
as a small dataclass rather than a dict every reader parses.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drasclr_lib.data.patch_store.layout import safe_sid

__all__ = ["SubjectRecord", "PATCH_ARRAYS", "image_grid", "grid_image"]


# per-patch lists of a record, each (L,)
PATCH_ARRAYS = ("patch_lung_fraction", "patch_emph_fraction", "patch_lobe", "patch_laa950")


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
        mask_source: ``"manifest"`` or ``"segmented"``. qc_pass: ``reg_dice >= qc_dice``.
        mean_patch_inside: mean fraction of a patch's voxels inside the padded 1 mm volume.
        corners_subject: (L, 3) int64 (i, j, k) patch corners in the subject's padded 1 mm grid.
        patch_lung_fraction, patch_emph_fraction, patch_laa950: (L,) float64 (NaN unknown).
        patch_lobe: (L,) int64 majority lobe (0 unknown).
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
    mean_patch_inside: float | None = None
    corners_subject: np.ndarray | None = None
    patch_lung_fraction: np.ndarray | None = None
    patch_emph_fraction: np.ndarray | None = None
    patch_lobe: np.ndarray | None = None
    patch_laa950: np.ndarray | None = None
    grid_1mm: dict | None = None
    transform: dict | None = None
    registration: dict | None = None
    times: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    _SCALARS = ("image", "lung_volume_l", "laa950", "reg_dice", "mask_dice", "mask_source", "qc_pass",
                "mean_patch_inside")

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
            setattr(self, key, np.nan_to_num(arr).astype(np.int64) if key == "patch_lobe" else arr)

    @classmethod
    def from_dict(cls, data: dict, *, path: str | os.PathLike | None = None) -> "SubjectRecord":
        """A record from its JSON form (``subjects/<sid>.json``).

        Raises:
            ValueError: naming ``path`` when a per-patch list has the wrong length.
        """
        data = dict(data)
        known = {"sid", "num_locations", *cls._SCALARS, "corners_subject", *PATCH_ARRAYS, "grid_1mm", "transform",
                 "registration"}
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
        if self.corners_subject is not None:
            out["corners_subject"] = self.corners_subject.tolist()
        for key in PATCH_ARRAYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = [int(v) for v in value] if key == "patch_lobe" else _floats(value)
        for key in ("grid_1mm", "transform", "registration"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        out.update({f"time_{stage}_s": float(s) for stage, s in self.times.items()})
        return out

    def flat(self) -> dict:
        """The scalar values (one row of ``subjects.csv``)."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (str, int, float, bool)) or v is None}

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
