"""Lung segmentation without a network: intensity thresholds and morphology (SPEC step 2).

Works in the LPS orientation of :func:`drasclr_lib.preprocess.io.read_ct` (axial slices are
``array[k]``), at a reduced resolution of about 2 mm for the morphology, and returns the label map
on the input grid. Steps, on the ~2 mm volume:

1. **Body**: voxels above -320 HU; the largest 3D component after a one-voxel in-plane opening
   (which cuts thin bridges to the scanner table, ECG leads and blankets), holes filled slice
   by slice.
2. **Air inside the body**: voxels below -320 HU inside the filled body and not connected to the
   border of their axial slice (removes the air around the body, between the table and the
   back, and the padding; slice-wise so that lungs cut by a partial coverage stay).
3. **Trachea and main bronchi**: the trachea is found as a small, round, pure-air (< -900 HU)
   region near the left-right centre in the highest axial slices; the airway lumen (< -900 HU,
   opened with a 2-voxel ball so that only airways wider than about 8 mm survive) connected to
   it is grown downwards slice by slice, stopping when a slice's airway area jumps (a leak into
   emphysema). The grown airway, dilated by one voxel, is removed from the air.
4. **Lungs**: the 3D components of the remaining air; the two largest are kept when the second
   holds at least 10 % of the largest, else the largest alone; components of pure gas (median
   below -975 HU, e.g. bowel gas) are never lungs. A single component spanning both sides of
   the body is split in two by eroding it until it falls apart and growing the two seeds back
   (watershed on the distance map).
5. **Vessels filled**: per lung, 3D closing (ball of ~4 mm) and slice-wise hole filling.
6. **Labels**: 1 = right lung (patient right, smaller physical x in LPS), 2 = left lung; the
   label map is brought back to the input grid by linear interpolation of each lung's indicator
   (smooth borders) and refined there: a voxel above -320 HU at the lung border that is not
   enclosed in the coarse mask is dropped.

Raises :class:`PreprocessError` (stage ``"lung_mask"``) when no lung is found in the field of view.

Length (~380 lines): one algorithm, the six steps above in order, each a private function over
the same ~2 mm arrays; split across files, one idea would be read in two places.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.resample import available_cores

__all__ = ["segment_lungs", "lung_volume_ml", "AIR_THRESHOLD_HU"]

#: Threshold between lung air and tissue (HU).
AIR_THRESHOLD_HU = -320.0
_AIRWAY_HU = -900.0
_GAS_MEDIAN_HU = -975.0


def lung_volume_ml(mask: sitk.Image) -> float:
    """Volume of the nonzero voxels of ``mask`` in millilitres."""
    n = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return n * float(np.prod(mask.GetSpacing())) / 1000.0


def segment_lungs(ct: sitk.Image, *, sid: str | None = None, coarse_mm: float = 2.0,
                  min_lung_ml: float = 150.0) -> sitk.Image:
    """Segment the lungs of a CT.

    Args:
        ct: 3D CT in HU, LPS orientation (as returned by ``read_ct`` / ``resample_isotropic``).
        sid: subject id, named in errors.
        coarse_mm: voxel size (mm) of the working resolution of the morphology.
        min_lung_ml: a lung region smaller than this (ml) means no lungs in the field of view.

    Returns:
        ``sitkUInt8`` label map on the grid of ``ct``: 0 outside, 1 right lung, 2 left lung
        (trachea and main bronchi excluded, vessels inside the lungs included).

    Raises:
        PreprocessError: stage ``"lung_mask"`` when no lungs are in the field of view.
    """
    if ct.GetDimension() != 3:
        raise PreprocessError(f"need a 3D CT, got {ct.GetDimension()}D", stage="lung_mask", sid=sid)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(available_cores())
    spacing = np.array(ct.GetSpacing(), dtype=np.float64)
    factors = np.maximum(1, np.round(coarse_mm / spacing)).astype(int)
    small = sitk.BinShrink(ct, [int(f) for f in factors]) if np.any(factors > 1) else ct
    hu = sitk.GetArrayFromImage(small).astype(np.float32)  # (k, j, i) = (S, P, L)
    csp = np.array(small.GetSpacing())[::-1]  # spacing in array axis order (k, j, i)
    voxel_ml = float(np.prod(csp)) / 1000.0

    body = _body_mask(hu, csp)
    air = (hu < AIR_THRESHOLD_HU) & body
    air = _drop_border_air(air)
    airway = _airway(hu, air, body, csp)
    if airway is not None:
        air &= ~airway
    lungs = _pick_lungs(hu, air, body, csp, voxel_ml, min_lung_ml, sid)
    lungs = _fill_vessels(lungs, csp)
    if airway is not None:
        lungs[airway] = 0
    lungs = _side_labels(lungs, small, body)
    return _to_input_grid(lungs, airway, small, ct, factors)


def _ball(radius_vox: np.ndarray) -> np.ndarray:
    r = np.maximum(np.asarray(radius_vox, dtype=np.float64), 1e-6)
    n = np.floor(r).astype(int)
    g = np.meshgrid(*[np.arange(-m, m + 1) for m in n], indexing="ij")
    return sum((gi / ri) ** 2 for gi, ri in zip(g, r)) <= 1.0 + 1e-9


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k]) if mask[k].any() else mask[k]
    return out


def _body_mask(hu: np.ndarray, csp: np.ndarray) -> np.ndarray:
    """Filled body: largest 3D tissue component after a one-voxel in-plane opening.

    The small opening cuts thin bridges (ECG leads, the table's contact with a blanket) without
    breaking a thin chest wall; the table interior, if it stays attached, is pure gas and is
    rejected later.
    """
    tissue = hu > AIR_THRESHOLD_HU
    se = np.zeros((1, 3, 3), dtype=bool)
    se[0, 1, :] = se[0, :, 1] = True
    opened = ndi.binary_opening(tissue, structure=se)
    lab, n = ndi.label(opened)
    if n == 0:
        return np.zeros_like(tissue)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    body = ndi.binary_dilation(body, structure=se) & tissue  # give back the skin
    return _fill_holes_2d(body)


def _drop_border_air(air: np.ndarray) -> np.ndarray:
    """Remove, slice by slice, air connected to the border of the axial slice."""
    out = air.copy()
    for k in range(air.shape[0]):
        sl = air[k]
        if not sl.any():
            continue
        lab, n = ndi.label(sl)
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        border = border[border > 0]
        if border.size:
            out[k][np.isin(lab, border)] = False
    return out


def _track_airway(lumen: np.ndarray, k0: int, seed: np.ndarray, csp: np.ndarray) -> tuple[np.ndarray, float]:
    """Follow an airway lumen downwards (decreasing k) from the 2D ``seed`` in slice ``k0``.

    Stops when the lumen ends, when the cross-section jumps (a leak into emphysema), or 40 mm
    below the carina (the first slice where the airway splits), i.e. past the main bronchi.
    Returns the 3D airway and the depth followed (mm).
    """
    airway = np.zeros_like(lumen)
    airway[k0] = seed
    prev = seed
    a0 = float(seed.sum())
    carina_k = None
    k_last = k0
    grow = np.ones((3, 3), dtype=bool)
    for k in range(k0 - 1, -1, -1):
        lab, n = ndi.label(lumen[k])
        if n == 0:
            break
        ids = np.unique(lab[ndi.binary_dilation(prev, structure=grow)])
        ids = ids[ids > 0]
        if ids.size == 0:
            break
        cur = np.isin(lab, ids)
        area = float(cur.sum())
        if area > 2.5 * max(float(prev.sum()), 1.0) + 4 or area > 5.0 * a0 + 4 or ids.size > 4:
            break  # leak into emphysema / lung, or past the lobar branching
        if carina_k is None and ids.size >= 2:
            carina_k = k
        if carina_k is not None and (carina_k - k) * csp[0] > 40.0:
            break
        airway[k] = cur
        prev = cur
        k_last = k
    return airway, (k0 - k_last) * float(csp[0])


def _airway(hu: np.ndarray, air: np.ndarray, body: np.ndarray, csp: np.ndarray) -> np.ndarray | None:
    """Trachea and main bronchi (dilated by one voxel), or ``None`` when no trachea is found.

    The trachea seed is a pure-air (< -900 HU) 2D region of 30..700 mm2, roughly round, within
    30 mm of the body's left-right centre, in the highest slices (searched down to 150 mm below
    the top of the body); a seed is accepted when the airway can be followed for >= 30 mm.
    """
    lumen = air & (hu < _AIRWAY_HU)
    ks = np.nonzero(body.any(axis=(1, 2)))[0]
    if ks.size == 0:
        return None
    k_top = int(ks.max())
    k_stop = max(0, k_top - int(round(150.0 / csp[0])))
    area_mm2 = float(csp[1] * csp[2])
    for k in range(k_top, k_stop - 1, -1):
        if not lumen[k].any():
            continue
        ci = float(np.nonzero(body[k])[1].mean())
        lab, n = ndi.label(lumen[k])
        objs = ndi.find_objects(lab)
        cands = []
        for idx, sl in enumerate(objs, start=1):
            comp = lab[sl] == idx
            a = float(comp.sum()) * area_mm2
            if not 30.0 <= a <= 700.0 or comp.sum() < 0.4 * comp.size:
                continue
            cx = (sl[1].start + sl[1].stop - 1) / 2.0
            if abs(cx - ci) * csp[2] > 30.0:
                continue
            cands.append((a, idx))
        for _, idx in sorted(cands, reverse=True):
            airway, depth = _track_airway(lumen, k, lab == idx, csp)
            if depth >= 30.0:
                return ndi.binary_dilation(airway, structure=ndi.generate_binary_structure(3, 1)) & air
    return None


def _pick_lungs(hu, air, body, csp, voxel_ml, min_lung_ml, sid) -> np.ndarray:
    """Temporary labels 1 and 2 for the one or two lung components (sides decided later)."""
    lab, n = ndi.label(air)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] > 0 and sizes[i] * voxel_ml >= 0.05 * min_lung_ml]
    order = order[:8]
    bbox = ndi.find_objects(lab)
    medians = {i: float(np.median(hu[bbox[i - 1]][lab[bbox[i - 1]] == i])) for i in order}
    order = [i for i in order if medians[i] >= _GAS_MEDIAN_HU]  # pure gas (bowel, table) is no lung
    if not order or sizes[order[0]] * voxel_ml < min_lung_ml:
        largest = sizes[order[0]] * voxel_ml if order else 0.0
        raise PreprocessError(
            f"no lungs in the field of view: the largest air region inside the body holds {largest:.0f} ml "
            f"(< {min_lung_ml:g} ml needed)", stage="lung_mask", sid=sid)
    i_body = np.nonzero(body.any(axis=(0, 1)))[0]
    mid = float((i_body.min() + i_body.max()) / 2.0) if i_body.size else hu.shape[2] / 2.0
    first = order[0]
    sl = bbox[first - 1]
    ii = np.nonzero(lab[sl] == first)[2] + sl[2].start
    right_frac = float(np.mean(ii < mid))
    out = np.zeros(hu.shape, dtype=np.uint8)
    if min(right_frac, 1 - right_frac) >= 0.2:  # one component holding both lungs
        comp = lab == first
        out[comp] = _split(comp, mid)[comp]
        return out
    out[lab == first] = 1
    side_first = ii.mean() < mid
    for j in order[1:]:
        if sizes[j] < 0.1 * sizes[first]:
            break
        sl = bbox[j - 1]
        jj = np.nonzero(lab[sl] == j)[2] + sl[2].start
        if (jj.mean() < mid) != side_first:
            out[lab == j] = 2
            break
    return out


def _split(comp: np.ndarray, mid: float) -> np.ndarray:
    """Split one component holding both lungs: erode until it falls apart, grow the seeds back."""
    sl = ndi.find_objects(comp.astype(np.uint8))[0]
    sub = comp[sl]
    off = sl[2].start
    eroded = sub
    markers = None
    cross = ndi.generate_binary_structure(3, 1)
    for _ in range(12):
        eroded = ndi.binary_erosion(eroded, structure=cross)
        if not eroded.any():
            break
        lab, n = ndi.label(eroded)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        a, b = [int(i) for i in np.argsort(sizes)[::-1][:2]]
        ia = np.nonzero(lab == a)[2].mean() + off
        ib = np.nonzero(lab == b)[2].mean() + off
        if sizes[b] >= 0.1 * sizes[a] and (ia < mid) != (ib < mid):
            markers = np.zeros(sub.shape, dtype=np.uint8)
            markers[lab == a] = 1
            markers[lab == b] = 2
            break
    res = np.zeros(comp.shape, dtype=np.uint8)
    if markers is None:  # never fell apart: cut at the body's left-right centre
        i_idx = np.arange(comp.shape[2])[None, None, :]
        res[comp & (i_idx < mid)] = 1
        res[comp & (i_idx >= mid)] = 2
        return res
    _, inds = ndi.distance_transform_edt(markers == 0, return_indices=True)
    nearest = markers[tuple(inds)]
    res[sl] = np.where(sub, nearest, 0)
    return res


def _fill_vessels(lungs: np.ndarray, csp: np.ndarray, radius_mm: float = 4.0) -> np.ndarray:
    """Per lung: 3D closing with a ~4 mm ball, then hole filling in 3D and per axial slice."""
    se = _ball(np.full(3, radius_mm) / csp)
    pad = np.array(se.shape) // 2 + 1
    out = np.zeros_like(lungs)
    for l in (1, 2):
        m = lungs == l
        if not m.any():
            continue
        sl = ndi.find_objects(m.astype(np.uint8))[0]
        sub = np.pad(m[sl], [(p, p) for p in pad])
        closed = ndi.binary_closing(sub, structure=se)
        closed = ndi.binary_fill_holes(closed)
        closed = _fill_holes_2d(closed)
        closed = closed[pad[0]:-pad[0], pad[1]:-pad[1], pad[2]:-pad[2]]
        region = out[sl]
        region[closed & (region == 0)] = l
    return out


def _side_labels(lungs: np.ndarray, small: sitk.Image, body: np.ndarray) -> np.ndarray:
    """Relabel: 1 = right lung (smaller physical x in LPS), 2 = left lung."""
    def phys_x(mask):
        k, j, i = [float(v.mean()) for v in np.nonzero(mask)]
        return small.TransformContinuousIndexToPhysicalPoint((i, j, k))[0]

    present = [l for l in (1, 2) if np.any(lungs == l)]
    out = np.zeros_like(lungs)
    if len(present) == 2:
        x1, x2 = phys_x(lungs == 1), phys_x(lungs == 2)
        right, left = (1, 2) if x1 < x2 else (2, 1)
        out[lungs == right] = 1
        out[lungs == left] = 2
    elif present:
        l = present[0]
        out[lungs == l] = 1 if phys_x(lungs == l) < phys_x(body) else 2
    return out


def _upsample(coarse: np.ndarray, factors_kji: np.ndarray, shape: tuple, sl: tuple) -> np.ndarray:
    """Nearest-neighbour upsampling of a BinShrink-ed array, restricted to the fine region ``sl``.

    Coarse voxel c covers fine indices [c f, c f + f - 1]; the fine voxels left over by BinShrink
    at the end of an axis take the last coarse voxel.
    """
    idx = []
    for ax in range(3):
        fine = np.arange(sl[ax].start, sl[ax].stop)
        idx.append(np.minimum(fine // factors_kji[ax], coarse.shape[ax] - 1))
    return coarse[np.ix_(*idx)]


def _to_input_grid(lungs: np.ndarray, airway, small: sitk.Image, ct: sitk.Image, factors: np.ndarray) -> sitk.Image:
    """Bring the coarse labels to the input grid and refine the border at full resolution.

    Inside the coarse lung eroded by one coarse voxel the coarse label is kept (vessels filled);
    in the one-coarse-voxel band around the border a fine voxel is lung when it is below
    -320 HU (the nearest lung's label), tissue otherwise. Only the lungs' bounding box is touched.
    """
    if not np.any(factors > 1):
        out = sitk.GetImageFromArray(lungs.astype(np.uint8))
        out.CopyInformation(ct)
        return out
    f_kji = factors[::-1]
    shape = ct.GetSize()[::-1]
    out_arr = np.zeros(shape, dtype=np.uint8)
    if lungs.any():
        cross = ndi.generate_binary_structure(3, 1)
        inner = lungs.copy()
        inner[~ndi.binary_erosion(lungs > 0, structure=cross)] = 0
        grown = ndi.grey_dilation(lungs, footprint=cross)
        grown[lungs > 0] = lungs[lungs > 0]
        if airway is not None:
            grown[airway] = 0
        csl = ndi.find_objects((grown > 0).astype(np.uint8))[0]
        sl = tuple(slice(c.start * f, min(c.stop * f if c.stop < n else size, size))
                   for c, f, n, size in zip(csl, f_kji, lungs.shape, shape))
        inner_f = _upsample(inner, f_kji, shape, sl)
        grown_f = _upsample(grown, f_kji, shape, sl)
        hu_f = sitk.GetArrayViewFromImage(ct)[sl]
        band_lung = (inner_f == 0) & (grown_f > 0) & (hu_f < AIR_THRESHOLD_HU)
        region = np.where(inner_f > 0, inner_f, np.where(band_lung, grown_f, 0)).astype(np.uint8)
        out_arr[sl] = region
    out = sitk.GetImageFromArray(out_arr)
    out.CopyInformation(ct)
    return out
