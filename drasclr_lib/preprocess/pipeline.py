"""The per-scan pipeline: one CT from its file to the atlas patches, writing nothing.

Stages, each timed (``seconds[<stage>]``) and each failure a :class:`PreprocessError` naming the
stage, the subject and the file:

``read``       CT in HU, reoriented to LPS; the given label maps (lung mask, emphysema labels,
               lobes) on the CT's grid
``resample``   1 mm isotropic (B-spline), :data:`PAD_VOXELS` voxels of -1024 HU padding; label
               maps nearest neighbour; the field of view (:func:`fov_mask`): 1 where the scanner
               saw, 0 in the padding (and outside the reconstruction circle)
``lung_mask``  the given lung mask, else :func:`segment_lungs` (``segment=True`` segments anyway
               and reports ``mask_dice`` against the given one), kept inside the field of view;
               lung volume and %LAA-950 of the scanned lung; the input checks
               (:func:`~drasclr_lib.preprocess.checks.input_reasons`)
``register``   affine registration of the lung mask to the atlas mask (atlas points landing
               outside the scan are not compared), its Dice within the field of view, and the
               share of the atlas lung the scan covers (``fov_lung_coverage``)
``patches``    the atlas locations cut from the subject (:func:`extract_patches`), with the share of
               each patch inside the scan (``patch_fov_fraction``)

Quality. A scan's record carries ``qc_reasons``: the input checks' tokens plus
``partial_fov:<coverage>`` when the scan covers less than :data:`DEFAULT_MIN_COVERAGE` of the atlas
lung and ``low_registration_dice:<dice>`` below :data:`DEFAULT_QC_DICE`; ``qc_pass`` follows from
them (:func:`~drasclr_lib.preprocess.checks.qc_pass_from`). Patches less than
:data:`~drasclr_lib.data.patch_store.records.MIN_PATCH_FOV` inside the scan are invalid wherever
the store is read (:meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`).

Length (~360 lines): the two result types with their record and reasons, and the stages in order;
one scan's path is read in one file.

:func:`scan_to_1mm` runs the first three (the atlas builder ``Atlas.from_subject`` and the
notebooks use it), :func:`process_scan` all five. Their callers: the store writer
(:func:`~drasclr_lib.preprocess.cohort.preprocess_subject`: ``process_scan`` then
``write_subject``), whole-scan inference
(:func:`~drasclr_lib.segmentation.inference.segment_scan`), ``Atlas.from_subject`` and notebook
``01_preprocessing``. :func:`on_subject_grid` puts a file back on a subject's recorded 1 mm grid
(the explorer draws the CT there, segmentation cuts a lung mask there like the patches).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Union

import numpy as np
import SimpleITK as sitk

from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.resample import PAD_VOXELS

__all__ = ["Scan1mm", "ScanPatches", "scan_to_1mm", "process_scan", "on_subject_grid", "manifest_files",
           "DEFAULT_QC_DICE", "DEFAULT_MIN_COVERAGE", "LABEL_COLUMNS"]

#: Registration Dice under which a subject's record says ``qc_pass: False``.
DEFAULT_QC_DICE = 0.8
#: Fraction of the atlas lung a scan must cover (``fov_lung_coverage``), else it fails QC with
#: ``partial_fov:<coverage>``. 0.9: the lung bases are thin wedges, so a scan missing the lowest
#: fifth of the lung's height (~5 cm of an adult lung) still covers ~0.95 of its volume and 0.9 is
#: reached near a quarter of the height (synthetic scans: 20 % cut -> 0.95, 35 % -> 0.81); below
#: it whole rows of basal locations are lost and per-subject figures (%LAA-950, pooled
#: embeddings) describe another lung than the atlas's.
DEFAULT_MIN_COVERAGE = 0.9
#: The label maps a manifest row may give with its ``image``.
LABEL_COLUMNS = ("lung_mask", "label_map", "lobe_map")

#: A CT or label map: a file or folder path, or a SimpleITK image.
ImageLike = Union[str, os.PathLike, sitk.Image]


def manifest_files(row) -> dict[str, str | None]:
    """The files of one manifest row: ``image``, ``lung_mask``, ``label_map``, ``lobe_map``
    (``None`` where the row has none: missing, NaN or blank), as the keyword arguments of
    :func:`scan_to_1mm` / :func:`process_scan`."""
    out = {}
    for col in ("image", *LABEL_COLUMNS):
        value = row.get(col) if hasattr(row, "get") else None
        blank = value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() in ("", "nan")
        out[col] = None if blank else str(value)
    return out


@dataclass
class Scan1mm:
    """One scan on its padded 1 mm grid with its lung mask (the first three stages).

    Attributes:
        sid: subject id (``None`` when not given). image: the CT file (``None`` for an image).
        ct_1mm: padded 1 mm CT in HU (LPS), float32.
        lung_1mm: the lung mask used, uint8 on that grid (nonzero = lung; 1 right, 2 left when
            segmented), zero outside the field of view.
        inside_1mm: the field of view, uint8 on that grid: 1 inside the originally scanned
            volume, 0 in the padding (:func:`~drasclr_lib.preprocess.resample.fov_mask`).
        given_1mm: the given label maps on that grid, by name (``lung_mask``, ``label_map``,
            ``lobe_map``; only those given).
        mask_source: ``"manifest"`` (the given lung mask) or ``"segmented"``.
        mask_dice: Dice of the segmented with the given lung mask; NaN when not compared.
        lung_volume_l: volume of the scanned lung in litres. laa950: % of the scanned lung
            voxels below -950 HU.
        input_reasons: reason tokens of the input checks
            (:func:`~drasclr_lib.preprocess.checks.input_reasons`; ``[]`` for a clean scan).
        seconds: seconds per stage so far.
    """

    sid: str | None
    image: str | None
    ct_1mm: sitk.Image
    lung_1mm: sitk.Image
    given_1mm: dict
    mask_source: str
    mask_dice: float
    lung_volume_l: float
    laa950: float
    seconds: dict
    inside_1mm: sitk.Image | None = None
    input_reasons: list = field(default_factory=list)


@dataclass(kw_only=True)
class ScanPatches(Scan1mm):
    """One scan cut into the atlas patches: everything preprocessing knows about it, no store.

    Attributes (beyond :class:`Scan1mm`'s):
        transform: atlas physical -> subject physical points (SimpleITK affine).
        registration: ``register_masks``'s details (metric, iterations, time_s, converged, ...).
        reg_dice: Dice of the registered lung mask with the atlas mask, over the atlas voxels
            inside the scanned field of view.
        fov_lung_coverage: fraction of the atlas lung inside the scanned field of view.
        patches_hu: (L, P, P, P) int16, (k, j, i) order, clipped to [-1024, 240].
        corners_subject: (L, 3) int64 (i, j, k) patch corners in the padded 1 mm grid.
        label_patches: (L, P, P, P) uint8 of the given ``label_map``, or ``None``.
        patch_lung_fraction, patch_emph_fraction, patch_laa950: (L,) float64 (NaN unknown).
        patch_lobe: (L,) int64 majority lobe (0 unknown).
        inside_fraction: (L,) float32 fraction of each patch inside the padded grid.
        patch_fov_fraction: (L,) float32 fraction of each patch inside the scanned volume.
    """

    transform: sitk.Transform
    registration: dict
    reg_dice: float
    patches_hu: np.ndarray
    corners_subject: np.ndarray
    label_patches: np.ndarray | None
    patch_lung_fraction: np.ndarray
    patch_emph_fraction: np.ndarray
    patch_lobe: np.ndarray
    patch_laa950: np.ndarray
    inside_fraction: np.ndarray
    patch_fov_fraction: np.ndarray
    fov_lung_coverage: float

    def qc_reasons(self, *, qc_dice: float = DEFAULT_QC_DICE, min_coverage: float = DEFAULT_MIN_COVERAGE) -> list[str]:
        """Every reason token of this scan: the input checks', then ``partial_fov:<coverage>``
        (coverage below ``min_coverage``) and ``low_registration_dice:<dice>`` (below ``qc_dice``)."""
        from drasclr_lib.preprocess.checks import reason

        reasons = list(self.input_reasons)
        if self.fov_lung_coverage < min_coverage:
            reasons.append(reason("partial_fov", self.fov_lung_coverage))
        if not self.reg_dice >= qc_dice:  # NaN fails too
            reasons.append(reason("low_registration_dice", self.reg_dice))
        return reasons

    def record(self, *, qc_dice: float = DEFAULT_QC_DICE, min_coverage: float = DEFAULT_MIN_COVERAGE):
        """The :class:`~drasclr_lib.data.patch_store.SubjectRecord` the store keeps of this scan
        (``qc_reasons`` from :meth:`qc_reasons`, ``qc_pass`` from them; times of the stages run
        so far).

        Raises:
            ValueError: when the scan has no subject id.
        """
        from drasclr_lib.data.patch_store import SubjectRecord, image_grid
        from drasclr_lib.preprocess.checks import qc_pass_from
        from drasclr_lib.preprocess.registration import transform_to_dict

        if self.sid is None:
            raise ValueError("a record needs the subject id: give process_scan(..., sid=...)")
        reasons = self.qc_reasons(qc_dice=qc_dice, min_coverage=min_coverage)
        return SubjectRecord(
            sid=self.sid, num_locations=len(self.corners_subject), image=self.image,
            lung_volume_l=float(self.lung_volume_l), laa950=float(self.laa950), reg_dice=float(self.reg_dice),
            mask_dice=float(self.mask_dice), mask_source=self.mask_source, qc_pass=bool(qc_pass_from(reasons)),
            qc_reasons=reasons, fov_lung_coverage=round(float(self.fov_lung_coverage), 5),
            mean_patch_inside=float(np.mean(self.patch_fov_fraction)), corners_subject=self.corners_subject,
            patch_lung_fraction=self.patch_lung_fraction, patch_emph_fraction=self.patch_emph_fraction,
            patch_lobe=self.patch_lobe, patch_laa950=self.patch_laa950, patch_fov_fraction=self.patch_fov_fraction,
            grid_1mm=image_grid(self.ct_1mm),
            transform=transform_to_dict(self.transform),
            registration={k: v for k, v in (self.registration or {}).items()
                          if isinstance(v, (str, int, float, bool, list)) or v is None},
            times={k: float(v) for k, v in self.seconds.items()})


class _Stages:
    """Times the stages of one scan and turns any failure into a :class:`PreprocessError`."""

    def __init__(self, sid: str | None, path: str | None):
        self.sid, self.path = sid, path
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        except PreprocessError as err:
            if err.sid is None and self.sid is not None:
                err.sid = self.sid
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a PreprocessError naming the stage
            raise PreprocessError(f"{type(exc).__name__}: {exc}", stage=stage, sid=self.sid, path=self.path) from exc
        self.seconds[stage] = time.perf_counter() - t0


def _path(value) -> str | None:
    return None if value is None or isinstance(value, sitk.Image) else os.fspath(value)


def _to_1mm(stage: _Stages, image, labels: dict, *, segment: bool, pad: int) -> Scan1mm:
    from drasclr_lib.preprocess.io import read_ct, read_label, reorient
    from drasclr_lib.preprocess.patches import resample_to_grid
    from drasclr_lib.preprocess.registration import mask_dice
    from drasclr_lib.preprocess.resample import fov_mask, resample_isotropic

    sid = stage.sid
    with stage("read"):
        ct = reorient(sitk.Cast(image, sitk.sitkFloat32)) if isinstance(image, sitk.Image) else read_ct(image, sid=sid)
        given = {col: reorient(v) if isinstance(v, sitk.Image) else read_label(v, ct, sid=sid)
                 for col, v in labels.items() if v is not None}
    with stage("resample"):
        ct_1mm = resample_isotropic(ct, 1.0, interpolator="bspline", pad=int(pad), pad_value=-1024)
        inside_1mm = fov_mask(ct, ct_1mm)
        given_1mm = {col: resample_to_grid(img, ct_1mm) for col, img in given.items()}
    with stage("lung_mask"):
        dice = float("nan")
        if "lung_mask" in given_1mm and not segment:
            lung_1mm, source = given_1mm["lung_mask"], "manifest"
        else:
            from drasclr_lib.preprocess.lung_mask import segment_lungs

            lung_1mm, source = segment_lungs(ct_1mm, sid=sid), "segmented"
            if "lung_mask" in given_1mm:
                dice = mask_dice(lung_1mm, given_1mm["lung_mask"])
        inside = sitk.GetArrayViewFromImage(inside_1mm) > 0
        lung = sitk.GetArrayViewFromImage(lung_1mm) > 0
        if not np.all(inside[lung]):  # lung is only where the scanner saw (padding reads as air)
            lung_1mm = sitk.Mask(lung_1mm, inside_1mm)
            lung = sitk.GetArrayViewFromImage(lung_1mm) > 0
        n_lung = int(lung.sum())
        if n_lung == 0:
            raise PreprocessError("the lung mask is empty (no lungs in the field of view?)", stage="lung_mask", sid=sid,
                                  path=_path(labels.get("lung_mask")) if source == "manifest" else stage.path)
        voxel_ml = float(np.prod(ct_1mm.GetSpacing())) / 1000.0
        laa950 = 100.0 * float(np.count_nonzero(sitk.GetArrayViewFromImage(ct_1mm)[lung] < -950)) / n_lung
    with stage("checks"):
        from drasclr_lib.preprocess.checks import input_reasons

        reasons = list(input_reasons(ct, ct_1mm, lung_1mm, inside_1mm))
        del ct
    return Scan1mm(sid=sid, image=stage.path, ct_1mm=ct_1mm, lung_1mm=lung_1mm, given_1mm=given_1mm,
                   mask_source=source, mask_dice=dice, lung_volume_l=n_lung * voxel_ml / 1000.0, laa950=laa950,
                   seconds=stage.seconds, inside_1mm=inside_1mm, input_reasons=reasons)


def scan_to_1mm(image: ImageLike, *, lung_mask: ImageLike | None = None, label_map: ImageLike | None = None,
                lobe_map: ImageLike | None = None, sid: str | None = None, segment: bool = False,
                pad: int = PAD_VOXELS) -> Scan1mm:
    """Read one scan, resample it to 1 mm with padding and find its lungs (stages read,
    resample, lung_mask).

    Args:
        image: CT file (NIfTI, NRRD, MHA), DICOM series folder, or a SimpleITK image in HU
            (reoriented to LPS here).
        lung_mask, label_map, lobe_map: optional label maps on the CT's geometry: files, or
            SimpleITK images (reoriented here); ``None`` when not given.
        sid: subject id, named in errors.
        segment: segment the lungs even when ``lung_mask`` is given (``mask_dice`` compares them).
        pad: voxels of -1024 HU padding around the 1 mm volume (:data:`PAD_VOXELS`, 60 as
            published).

    Returns:
        :class:`Scan1mm`.

    Raises:
        PreprocessError: naming the stage, the subject and the file, whatever went wrong (an
            empty lung mask included).
    """
    stage = _Stages(None if sid is None else str(sid), _path(image))
    labels = {"lung_mask": lung_mask, "label_map": label_map, "lobe_map": lobe_map}
    return _to_1mm(stage, image, labels, segment=segment, pad=pad)


def process_scan(image: ImageLike, atlas, *, lung_mask: ImageLike | None = None, label_map: ImageLike | None = None,
                 lobe_map: ImageLike | None = None, sid: str | None = None, segment: bool = False,
                 pad: int = PAD_VOXELS, registration_kwargs: dict | None = None) -> ScanPatches:
    """One scan from its file to the atlas patches (every stage; writes nothing).

    Args:
        image, lung_mask, label_map, lobe_map, sid, segment, pad: as :func:`scan_to_1mm`.
        atlas: the :class:`~drasclr_lib.preprocess.atlas.Atlas` the scan is registered to and
            whose locations are cut.
        registration_kwargs: extra keyword arguments of
            :func:`~drasclr_lib.preprocess.registration.register_masks`.

    Returns:
        :class:`ScanPatches` (``.record()`` gives what the patch store keeps of it).

    Raises:
        PreprocessError: naming the stage, the subject and the file, whatever went wrong.
    """
    from drasclr_lib.preprocess.patches import extract_patches
    from drasclr_lib.preprocess.registration import fov_lung_coverage, register_masks, registration_dice

    stage = _Stages(None if sid is None else str(sid), _path(image))
    labels = {"lung_mask": lung_mask, "label_map": label_map, "lobe_map": lobe_map}
    scan = _to_1mm(stage, image, labels, segment=segment, pad=pad)
    with stage("register"):
        kwargs = {"subject_inside": scan.inside_1mm, **(registration_kwargs or {})}
        transform, info = register_masks(atlas.mask, scan.lung_1mm, sid=stage.sid, **kwargs)
        coverage = float(fov_lung_coverage(atlas.mask, scan.inside_1mm, transform))
        # the whole atlas lung lands in the scan (and the subject's lung is in it): the Dice within
        # the field of view is the plain Dice, without mapping the field of view again
        reg_dice = float(registration_dice(atlas.mask, scan.lung_1mm, transform,
                                           subject_inside=None if coverage >= 1.0 else scan.inside_1mm))
    with stage("patches"):
        cut = extract_patches(scan.ct_1mm, atlas, transform, label_1mm=scan.given_1mm.get("label_map"),
                              lobe_1mm=scan.given_1mm.get("lobe_map"), lung_1mm=scan.lung_1mm,
                              inside_1mm=scan.inside_1mm)
    base: dict[str, Any] = {f.name: getattr(scan, f.name) for f in fields(Scan1mm)}
    return ScanPatches(**base, transform=transform, registration=info or {}, reg_dice=reg_dice,
                       patches_hu=cut["patches_hu"], corners_subject=np.asarray(cut["corners_subject"], dtype=np.int64),
                       label_patches=cut["label_patches"], patch_lung_fraction=cut["lung_fraction"],
                       patch_emph_fraction=cut["emph_fraction"], patch_lobe=cut["lobe"], patch_laa950=cut["laa950"],
                       inside_fraction=cut["inside_fraction"], patch_fov_fraction=cut["fov_fraction"],
                       fov_lung_coverage=coverage)


def on_subject_grid(path: str | os.PathLike, grid: sitk.Image, *, kind: str = "ct", sid: str | None = None) -> sitk.Image:
    """A CT or label file on a subject's padded 1 mm grid, where its patches were cut.

    Args:
        path: the file (or DICOM folder), read as preprocessing reads it (reoriented to LPS).
        grid: the subject's grid (:meth:`~drasclr_lib.data.patch_store.PatchStore.subject_grid`).
        kind: ``"ct"`` (HU, checked like every CT, linear interpolation, -1024 HU outside; float32)
            or ``"label"`` (nearest neighbour, 0 outside; uint8).
        sid: subject id named in errors.

    Raises:
        PreprocessError: when a CT cannot be read (naming the subject and file).
        ValueError: for an unknown ``kind``.
    """
    from drasclr_lib.preprocess.io import read_ct, reorient
    from drasclr_lib.preprocess.patches import resample_to_grid

    if kind == "ct":
        img = read_ct(path, sid=sid)
        return sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, -1024.0,
                             sitk.sitkFloat32)
    if kind == "label":
        return resample_to_grid(reorient(sitk.ReadImage(os.fspath(path))), grid)
    raise ValueError(f"kind must be 'ct' or 'label', got {kind!r}")
