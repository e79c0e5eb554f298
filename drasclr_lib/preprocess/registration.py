"""Affine registration of a subject's lung mask to the atlas lung mask (SPEC step 3).

SimpleITK only, no external binaries: Mattes mutual information, multi-resolution (shrink
4/2/1, Gaussian smoothing 2/1/0 voxels), centred initialisation from image moments, gradient
descent with regular steps (halved on each direction change) and scales from physical shift. Fixed = atlas mask, moving = subject mask, so the
returned transform maps **atlas physical points to subject physical points** (the SimpleITK
convention, see docs/ARCHITECTURE.md): ``subject_pt = tx.TransformPoint(atlas_pt)``.

Masks are binarised (nonzero = lung) as float32 and averaged to a ~2 mm working grid (lung
fraction per voxel); the pyramid's shrink factors apply to that grid. For speed both masks are cropped to the
bounding box of their lung plus a margin (15 mm atlas, 30 mm subject), and the metric samples
a fixed number of voxels per level (50 000 by default; fixed seed, so the result is
deterministic): an adult 1 mm mask pair registers in seconds instead of minutes.

Partial fields of view. Outside the scanned volume the subject mask says "no lung" only because
nothing was scanned there; a registration that believed it would squeeze the whole atlas lung
into a lung cut at its bases, and the missing part would seem scanned. Given the subject's
field-of-view mask (``subject_inside``, see :func:`~drasclr_lib.preprocess.resample.fov_mask`)
and a lung that touches its border, registration compares the scanned voxels only: the subject
becomes the fixed image with the field of view as the metric mask (a sample set that does not
change with the transform), the translation starts from the uncut ends of the lungs (e.g. the
apices) rather than their centroids, and the result is inverted back to atlas -> subject. On a
synthetic scan cut at 57 / 80 / 95 % of its lung the atlas coverage came out 0.59 / 0.83 / 0.94
(0.98 / 0.95 / 0.97 without the field of view); a lung that does not touch the border of the
scan registers exactly as before. :func:`registration_dice` and :func:`fov_lung_coverage` then
count only, resp. measure, the part of the atlas lung the scan covers.

Length (~370 lines): one registration with its two measures (Dice, coverage) and the transform's
file form; the partial-field-of-view handling belongs to the same optimisation.
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk

from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.resample import available_cores

__all__ = ["register_masks", "registration_dice", "fov_lung_coverage", "mask_dice", "transform_to_dict",
           "transform_from_dict", "binarize"]

_TRANSFORM_TYPES = {
    "AffineTransform": lambda: sitk.AffineTransform(3),
    "Euler3DTransform": sitk.Euler3DTransform,
    "Similarity3DTransform": sitk.Similarity3DTransform,
    "TranslationTransform": lambda: sitk.TranslationTransform(3),
    "ScaleTransform": lambda: sitk.ScaleTransform(3),
}


def binarize(mask: sitk.Image) -> sitk.Image:
    """``float32`` image, 1 where ``mask`` is nonzero (lung), else 0; geometry kept."""
    return sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32)


def _crop_box(mask_f: sitk.Image, margin_mm: float) -> tuple[list[int], list[int]]:
    """(size, index) of the bounding box of the mask's nonzero voxels plus ``margin_mm``."""
    arr = sitk.GetArrayViewFromImage(mask_f)
    nz = np.nonzero(arr)
    lo = np.array([nz[2].min(), nz[1].min(), nz[0].min()])
    hi = np.array([nz[2].max(), nz[1].max(), nz[0].max()])
    m = np.ceil(margin_mm / np.array(mask_f.GetSpacing())).astype(int)
    lo = np.maximum(lo - m, 0)
    hi = np.minimum(hi + m, np.array(mask_f.GetSize()) - 1)
    return [int(v) for v in hi - lo + 1], [int(v) for v in lo]


def _crop_to_mask(mask_f: sitk.Image, margin_mm: float) -> sitk.Image:
    return sitk.RegionOfInterest(mask_f, *_crop_box(mask_f, margin_mm))


def _physical_bbox(mask: np.ndarray, img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (x, y, z) min and max of the nonzero voxels of a (k, j, i) array on ``img``'s grid."""
    nz = np.nonzero(mask)
    lo = [int(nz[2].min()), int(nz[1].min()), int(nz[0].min())]
    hi = [int(nz[2].max()), int(nz[1].max()), int(nz[0].max())]
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint([float(c[a]) for a in range(3)])
                    for c in ([lo[0] if b & 1 else hi[0], lo[1] if b & 2 else hi[1], lo[2] if b & 4 else hi[2]]
                              for b in range(8))])
    return pts.min(0), pts.max(0)


def _cut_sides(moving: sitk.Image, moving_mask: sitk.Image) -> list[tuple[bool, bool]]:
    """Per index axis (i, j, k) of the moving grid: is the subject's lung cut by the field of view
    on the low side, on the high side (a lung voxel next to a voxel outside the scan)?"""
    lung = sitk.GetArrayViewFromImage(moving) >= 0.5
    outside = sitk.GetArrayViewFromImage(moving_mask) == 0
    out = []
    for axis in range(3):
        arr_axis = 2 - axis  # i, j, k = array axes 2, 1, 0
        hi_part = [slice(None)] * 3
        lo_part = [slice(None)] * 3
        hi_part[arr_axis], lo_part[arr_axis] = slice(1, None), slice(None, -1)
        cut_low = bool((lung[tuple(hi_part)] & outside[tuple(lo_part)]).any())  # the voxel at index - 1 is outside
        cut_high = bool((lung[tuple(lo_part)] & outside[tuple(hi_part)]).any())  # the voxel at index + 1 is outside
        out.append((cut_low, cut_high))
    return out


def _align_uncut_ends(tx: sitk.AffineTransform, fixed: sitk.Image, moving: sitk.Image, cuts) -> None:
    """Re-initialise the translation of ``tx`` along every axis on which the subject's lung is cut
    by the field of view on one side only (``cuts`` from :func:`_cut_sides`): the uncut ends (e.g.
    the apices of a scan stopping above the bases) are put on each other instead of the centroids,
    which would shift the whole atlas lung by half the part the scan misses."""
    direction = np.asarray(moving.GetDirection(), dtype=np.float64).reshape(3, 3)
    f_lo, f_hi = _physical_bbox(sitk.GetArrayViewFromImage(fixed) >= 0.5, fixed)
    m_lo, m_hi = _physical_bbox(sitk.GetArrayViewFromImage(moving) >= 0.5, moving)
    t = np.array(tx.GetTranslation(), dtype=np.float64)
    for axis, (cut_low, cut_high) in enumerate(cuts):
        if cut_low == cut_high:
            continue
        phys = int(np.argmax(np.abs(direction[:, axis])))  # the physical axis this index axis runs along
        low_side_cut = cut_low == (direction[phys, axis] > 0)
        t[phys] = (m_hi[phys] - f_hi[phys]) if low_side_cut else (m_lo[phys] - f_lo[phys])
    tx.SetTranslation([float(v) for v in t])


def _bin_shrink(img: sitk.Image, working_mm: float) -> sitk.Image:
    f = [max(1, int(round(working_mm / s))) for s in img.GetSpacing()]
    return sitk.BinShrink(img, f) if max(f) > 1 else img


def register_masks(atlas_mask: sitk.Image, subject_mask: sitk.Image, *, sid: str | None = None,
                   shrink=(4, 2, 1), smoothing=(2, 1, 0), iterations: int = 200,
                   max_samples: int = 50_000, bins: int = 32, margin_mm: float = 15.0,
                   working_mm: float | None = 2.0, seed: int = 0,
                   subject_inside: sitk.Image | None = None) -> tuple[sitk.Transform, dict]:
    """Affine registration, fixed = atlas lung mask, moving = subject lung mask.

    Args:
        atlas_mask: 3D atlas lung mask (nonzero = lung), any pixel type.
        subject_mask: 3D subject lung mask (nonzero = lung), any pixel type.
        sid: subject id, named in errors.
        shrink: shrink factor per resolution level (coarse to fine).
        smoothing: Gaussian sigma per level, in voxels.
        iterations: maximum gradient-descent iterations per level.
        max_samples: number of fixed-image voxels the metric samples per level (random, seeded):
            the sampling percentage of each level is ``max_samples / voxels at that level``
            (capped at 1), so the cost per iteration does not grow with the image size.
        bins: histogram bins of Mattes mutual information.
        margin_mm: margin around the atlas lung kept when cropping the fixed image.
        working_mm: the binarised masks are first averaged (``BinShrink``, integer factors) to
            voxels of about this size; the pyramid (``shrink``) starts from there. A lung-mask
            fraction on a 2 mm grid loses nothing an affine needs and is 8x lighter than 1 mm.
            ``None`` registers on the masks' own grid.
        seed: seed of the metric sampling.
        subject_inside: the subject's field of view on the subject mask's grid (nonzero = scanned;
            :func:`~drasclr_lib.preprocess.resample.fov_mask`). When the lung touches its border
            (cut by the field of view), only scanned voxels are compared (see the module
            docstring). ``None``, or a lung wholly inside the scan: the plain registration.

    Returns:
        ``(transform, info)``: an ``sitk.AffineTransform`` mapping atlas physical points (mm) to
        subject physical points; ``info`` has ``metric`` (final Mattes MI value, lower is better),
        ``iterations`` (total over levels), ``time_s``, ``converged`` (bool: the last level
        stopped on the convergence test, not on the iteration limit), ``stop_condition`` and
        ``fov_masked`` (bool: the lung was cut by the field of view and only scanned voxels were
        compared).

    Raises:
        PreprocessError: stage ``"register"`` for an empty mask, mismatched level settings or a
            SimpleITK failure.
    """
    t0 = time.perf_counter()
    if len(shrink) != len(smoothing) or not len(shrink):
        raise PreprocessError(f"shrink {shrink} and smoothing {smoothing} need the same, non-zero length",
                              stage="register", sid=sid)
    fixed = binarize(atlas_mask)
    moving = binarize(subject_mask)
    for name, img in (("atlas", fixed), ("subject", moving)):
        if not np.any(sitk.GetArrayViewFromImage(img)):
            raise PreprocessError(f"the {name} lung mask is empty; cannot register", stage="register", sid=sid)
    fixed = _crop_to_mask(fixed, margin_mm)
    box = _crop_box(moving, 2 * margin_mm)
    moving = sitk.RegionOfInterest(moving, *box)
    moving_mask = None
    if subject_inside is not None:
        inside = sitk.Cast(sitk.NotEqual(sitk.RegionOfInterest(subject_inside, *box), 0), sitk.sitkFloat32)
        if not np.all(sitk.GetArrayViewFromImage(inside)):  # a whole scan needs no mask (and is faster)
            moving_mask = inside
    if working_mm:
        fixed, moving = _bin_shrink(fixed, working_mm), _bin_shrink(moving, working_mm)
        if moving_mask is not None:
            moving_mask = _bin_shrink(moving_mask, working_mm)
    cuts = None
    if moving_mask is not None:  # scanned where at least half of a working voxel was
        moving_mask = sitk.Cast(sitk.GreaterEqual(moving_mask, 0.5), sitk.sitkUInt8)
        cuts = _cut_sides(moving, moving_mask)
        if not any(any(c) for c in cuts):  # the whole lung is in the scan: outside it there is no lung
            moving_mask, cuts = None, None

    tx = sitk.AffineTransform(3)
    init = sitk.CenteredTransformInitializer(fixed, moving, tx, sitk.CenteredTransformInitializerFilter.MOMENTS)
    tx = sitk.AffineTransform(init)
    if cuts is not None:
        _align_uncut_ends(tx, fixed, moving, cuts)

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(available_cores())
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    if cuts is not None:
        # A lung cut by the field of view: the scanned subject voxels are the samples (fixed =
        # subject with its field of view as the metric mask, moving = atlas), so the compared set
        # does not change with the transform. With the atlas as fixed image and the field of view
        # as moving mask, the optimiser shrinks the atlas into the scan (more lung samples raise
        # the MI), and the missing lung seems scanned.
        atlas_wide = _bin_shrink(_crop_to_mask(binarize(atlas_mask), 4 * margin_mm), working_mm) if working_mm \
            else _crop_to_mask(binarize(atlas_mask), 4 * margin_mm)
        fixed, moving, tx = moving, atlas_wide, tx.GetInverse()
        tx = sitk.AffineTransform(tx) if not isinstance(tx, sitk.AffineTransform) else tx
        reg.SetMetricFixedMask(moving_mask)
    n_fixed = float(np.prod(fixed.GetSize()))
    # SimpleITK reads a seed of 0 as "seed from the wall clock" (sitkWallClock): shift by one so
    # every seed, 0 included, gives a repeatable registration
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, max_samples * float(f) ** 3 / n_fixed) for f in shrink], int(seed) + 1)
    reg.SetInterpolator(sitk.sitkLinear)
    # gradients at the sampled points only, instead of a gradient image of the whole volume per level
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    # regular-step descent: on mask images plain gradient descent's convergence window stops
    # after ~10 iterations of a flat metric; halving steps to 1e-2 (physical-shift scaled) does not
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=1e-2, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(s) for s in shrink])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smoothing])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(tx, inPlace=True)
    counter = {"n": 0}
    reg.AddCommand(sitk.sitkIterationEvent, lambda: counter.__setitem__("n", counter["n"] + 1))
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise PreprocessError(f"SimpleITK registration failed: {exc}", stage="register", sid=sid) from exc
    if cuts is not None:  # subject -> atlas points: back to atlas -> subject
        tx = sitk.AffineTransform(tx.GetInverse())
    stop = reg.GetOptimizerStopConditionDescription()
    info = {
        "metric": float(reg.GetMetricValue()),
        "iterations": int(counter["n"]),
        "time_s": float(time.perf_counter() - t0),
        "converged": "maximum number of iterations" not in stop.lower(),
        "stop_condition": stop,
        "fov_masked": moving_mask is not None,
    }
    return tx, info


def mask_dice(a: np.ndarray | sitk.Image, b: np.ndarray | sitk.Image) -> float:
    """Dice overlap of two masks on one grid: ``2 |A & B| / (|A| + |B|)``, nonzero = foreground.

    The one mask Dice of preprocessing (lung mask against the given mask, registered subject
    against the atlas, the notebooks' overlays). Two empty masks agree: their Dice is 1.0.

    Args:
        a, b: masks of the same shape, NumPy arrays or SimpleITK images (any pixel type).

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty.

    Raises:
        ValueError: when the shapes differ.
    """
    av, bv = (np.asarray(sitk.GetArrayViewFromImage(m) if isinstance(m, sitk.Image) else m) != 0 for m in (a, b))
    if av.shape != bv.shape:
        raise ValueError(f"mask_dice needs masks of one shape, got {av.shape} and {bv.shape}")
    denom = int(np.count_nonzero(av)) + int(np.count_nonzero(bv))
    return 1.0 if denom == 0 else 2.0 * int(np.count_nonzero(av & bv)) / denom


def _fov_in_atlas(atlas_mask: sitk.Image, subject_inside: sitk.Image, transform: sitk.Transform,
                  where: np.ndarray) -> np.ndarray:
    """(k, j, i) bool on the atlas grid: the voxels of ``where`` whose subject point (nearest
    subject voxel, through ``transform``) lies inside the scan; False elsewhere.

    Only the bounding box of ``where`` is resampled (the whole padded atlas grid took seconds).
    """
    out = np.zeros(where.shape, dtype=bool)
    if not where.any():
        return out
    nz = np.nonzero(where)
    lo = [int(v.min()) for v in nz]  # (k, j, i)
    hi = [int(v.max()) + 1 for v in nz]
    ref = sitk.RegionOfInterest(atlas_mask, [hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]], [lo[2], lo[1], lo[0]])
    warped = sitk.Resample(sitk.NotEqual(subject_inside, 0), ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[box] = (sitk.GetArrayViewFromImage(warped) != 0) & where[box]
    return out


def registration_dice(atlas_mask: sitk.Image, subject_mask: sitk.Image, transform: sitk.Transform, *,
                      subject_inside: sitk.Image | None = None) -> float:
    """Dice (:func:`mask_dice`) of the warped subject lung mask with the atlas lung mask (nonzero = lung).

    The subject mask is resampled onto the atlas grid through ``transform`` (atlas -> subject
    points) with nearest-neighbour interpolation.

    Args:
        atlas_mask, subject_mask: lung masks (nonzero = lung).
        transform: atlas physical -> subject physical points.
        subject_inside: the subject's field of view on its grid (nonzero = scanned). Given, the
            Dice is taken over the atlas voxels that land inside the scan only: how well the
            scanned lung is aligned, not how much lung was scanned (that is
            :func:`fov_lung_coverage`). For a whole scan it is the plain Dice.

    Returns:
        Dice in [0, 1] (1.0 when both masks are empty).
    """
    a = sitk.NotEqual(atlas_mask, 0)
    warped = sitk.Resample(sitk.NotEqual(subject_mask, 0), a, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if subject_inside is None:
        return mask_dice(a, warped)
    av, wv = sitk.GetArrayViewFromImage(a) != 0, sitk.GetArrayViewFromImage(warped) != 0
    seen = _fov_in_atlas(a, subject_inside, transform, av | wv)
    return mask_dice(av & seen, wv & seen)


def fov_lung_coverage(atlas_mask: sitk.Image, subject_inside: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the atlas lung that the subject's scan covers.

    The field of view is carried into the atlas (nearest neighbour through ``transform``, atlas
    -> subject points): the share of atlas lung voxels whose subject point lies inside the
    scanned volume. 1.0 for a scan showing the whole lung; a scan stopping above the lung bases
    covers less.

    Args:
        atlas_mask: atlas lung mask (nonzero = lung).
        subject_inside: the subject's field of view on its grid (nonzero = scanned).
        transform: atlas physical -> subject physical points.

    Returns:
        Coverage in [0, 1] (1.0 for an empty atlas mask).
    """
    a = sitk.GetArrayViewFromImage(atlas_mask) != 0
    n = int(np.count_nonzero(a))
    if n == 0:
        return 1.0
    return float(np.count_nonzero(_fov_in_atlas(atlas_mask, subject_inside, transform, a))) / n


def _unwrap(tx: sitk.Transform) -> sitk.Transform:
    if isinstance(tx, sitk.CompositeTransform) or tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        if comp.GetNumberOfTransforms() != 1:
            raise ValueError(f"only a single transform can be stored, got a composite of {comp.GetNumberOfTransforms()}")
        tx = comp.GetNthTransform(0)
    return tx.Downcast() if hasattr(tx, "Downcast") else tx


def transform_to_dict(tx: sitk.Transform) -> dict:
    """A JSON-friendly description of a 3D transform.

    Returns:
        ``{"type": <ITK class name>, "parameters": [...], "fixed_parameters": [...]}``; for an
        affine, parameters are the 9 matrix entries (row-major) then the 3 translations (mm) and
        fixed parameters are the centre of rotation (mm).

    Raises:
        ValueError: for a composite of several transforms or an unsupported type.
    """
    tx = _unwrap(tx)
    name = tx.GetName()
    if name not in _TRANSFORM_TYPES:
        raise ValueError(f"unsupported transform type {name!r}; supported: {sorted(_TRANSFORM_TYPES)}")
    return {"type": name, "parameters": [float(p) for p in tx.GetParameters()],
            "fixed_parameters": [float(p) for p in tx.GetFixedParameters()]}


def transform_from_dict(d: dict) -> sitk.Transform:
    """Rebuild the transform written by :func:`transform_to_dict`.

    Raises:
        ValueError: for an unknown type or a wrong number of parameters.
    """
    kind = d.get("type")
    if kind not in _TRANSFORM_TYPES:
        raise ValueError(f"unsupported transform type {kind!r}; supported: {sorted(_TRANSFORM_TYPES)}")
    tx = _TRANSFORM_TYPES[kind]()
    fixed = [float(p) for p in d.get("fixed_parameters", [])]
    params = [float(p) for p in d["parameters"]]
    if len(fixed) != len(tx.GetFixedParameters()) or len(params) != len(tx.GetParameters()):
        raise ValueError(f"{kind} needs {len(tx.GetParameters())} parameters and {len(tx.GetFixedParameters())} "
                         f"fixed parameters, got {len(params)} and {len(fixed)}")
    tx.SetFixedParameters(fixed)
    tx.SetParameters(params)
    return tx
