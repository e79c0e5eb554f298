"""Quality reasons: what is wrong (or doubtful) with one scan, as short tokens a table can hold.

A *reason* is one token ``name`` or ``name:value`` (``partial_fov:0.82``, ``low_registration_dice:0.71``,
``thick_slices:5.0mm``, ``hu_offset:+85``, ``expiratory?``). A subject's reasons are stored as a
list in its record and joined with ``;`` in ``subjects.csv``'s ``qc_reasons`` column. Names in
:data:`FAILING_REASONS` fail QC (``qc_pass`` is False); every other name is a warning that a reader
should see but that does not remove the subject. :func:`reason` writes a token, :func:`parse_reason`
reads one back, :func:`qc_pass_from` and :func:`count_reasons` summarise lists of them.

:func:`input_reasons` holds the checks on the scan itself (slice thickness, slice gaps and gantry
tilt as the reader found them, HU calibration, inspiration, patient position); the checks of the
field of view and the registration are made where those figures are computed (the pipeline) and
use the same :func:`reason`.

Length (~390 lines): one idea, what is doubtful about one scan and how it is written down; a third
of the file is the reasoning behind each threshold, kept next to the constant it justifies, and
the token format is read with the checks that produce it.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import SimpleITK as sitk

__all__ = ["reason", "parse_reason", "FAILING_REASONS", "REASON_NAMES", "qc_pass_from", "count_reasons",
           "join_reasons", "split_reasons", "input_reasons"]

#: Reasons that fail QC: the subject's patches cannot be trusted as they are. ``partial_fov``: the
#: scan covers too little of the atlas lung; ``low_registration_dice``: the lung mask does not match
#: the atlas after registration.
FAILING_REASONS = frozenset({"partial_fov", "low_registration_dice"})

#: Every reason name this package writes, with what its value means (for docs and the QC report).
REASON_NAMES = {
    "partial_fov": "fraction of the atlas lung inside the scanned volume (fails below the coverage threshold)",
    "low_registration_dice": "Dice of the registered lung mask with the atlas mask (fails below the QC Dice)",
    "thick_slices": "slice thickness / spacing in mm (> 3 mm: fine emphysema is blurred)",
    "slice_gap": "largest gap between neighbouring slices in mm, resampled on the true positions",
    "gantry_tilt": "gantry tilt in degrees, corrected by shifting each slice in-plane",
    "hu_offset": "median HU of the air outside the body (else in the trachea) minus -1000 (the calibration error)",
    "expiratory?": "lung volume or density far from a full inspiration",
    "prone": "patient lies prone (DICOM PatientPosition, or the table seen in front of the body)",
    "decubitus": "patient lies on a side (DICOM PatientPosition)",
    "table_in_body": "the scanner table is merged into the body mask",
}

_SEP = ";"


def _format_value(name: str, value) -> str:
    if isinstance(value, str):
        return value
    v = float(value)
    if name in ("thick_slices", "slice_gap"):
        return f"{v:.1f}mm"
    if name == "gantry_tilt":
        return f"{v:.1f}deg"
    if name == "hu_offset":
        return f"{int(round(v)):+d}"
    return f"{v:.2f}"


def reason(name: str, value=None) -> str:
    """One reason token.

    Args:
        name: the reason's name (a key of :data:`REASON_NAMES`, or any name without ``:``/``;``).
        value: ``None`` (token is the name alone), a string (used as is) or a number, formatted by
            name: fractions and Dice with 2 decimals (``partial_fov:0.82``), millimetres with one
            and ``mm`` (``thick_slices:5.0mm``), degrees with ``deg``, HU as a signed integer
            (``hu_offset:+85``).

    Returns:
        ``"name"`` or ``"name:value"``.

    Raises:
        ValueError: for an empty name or one holding ``:`` or ``;``.
    """
    if not name or ":" in name or _SEP in name:
        raise ValueError(f"a reason name must be non-empty without ':' or ';', got {name!r}")
    return name if value is None else f"{name}:{_format_value(name, value)}"


def parse_reason(token: str) -> tuple[str, str | None]:
    """``"partial_fov:0.82"`` -> ``("partial_fov", "0.82")``; ``"expiratory?"`` -> ``("expiratory?", None)``."""
    token = str(token).strip()
    name, sep, value = token.partition(":")
    return name, (value if sep else None)


def reason_value(token: str) -> float:
    """The number in a token's value (``"thick_slices:5.0mm"`` -> 5.0); NaN when it has none."""
    _, value = parse_reason(token)
    if value is None:
        return float("nan")
    digits = value.rstrip("abcdefghijklmnopqrstuvwxyz%")
    try:
        return float(digits)
    except ValueError:
        return float("nan")


def join_reasons(reasons: Iterable[str]) -> str:
    """Reasons as one ``subjects.csv`` cell: ``"partial_fov:0.82;thick_slices:5.0mm"`` ("" for none)."""
    return _SEP.join(str(r) for r in reasons)


def split_reasons(cell) -> list[str]:
    """Inverse of :func:`join_reasons`; a list is returned as is; NaN, None and "" give []."""
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return [str(r) for r in cell]
    if isinstance(cell, float) and np.isnan(cell):
        return []
    return [t.strip() for t in str(cell).split(_SEP) if t.strip()]


def qc_pass_from(reasons: Iterable[str]) -> bool:
    """True unless one of ``reasons`` is in :data:`FAILING_REASONS`."""
    return not any(parse_reason(r)[0] in FAILING_REASONS for r in split_reasons(list(reasons)))


def count_reasons(reason_lists: Iterable) -> dict[str, int]:
    """How many subjects have each reason name (values ignored), most frequent first.

    Args:
        reason_lists: one entry per subject: a list of tokens or a ``subjects.csv`` cell.

    Returns:
        ``{name: number of subjects}``, e.g. ``{"partial_fov": 2, "thick_slices": 1}``.
    """
    counts: Counter = Counter()
    for entry in reason_lists:
        counts.update({parse_reason(t)[0] for t in split_reasons(entry)})
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


#: Slices thicker than this (mm; the larger of SliceThickness and the slice step) are flagged
#: ``thick_slices``: emphysema holes of a few mm are averaged away at 5 mm, so %LAA-950 falls and
#: the patches' texture is not that of the thin-slice (<= 1.25 mm) scans the method was made on.
THICK_SLICE_MM = 3.0
#: Air measured more than this far from -1000 HU (HU) is flagged ``hu_offset``. Scanner QA keeps
#: air within about +-10 HU (water +-4); the synthetic cohort draws offsets in +-20 HU as normal
#: variation; 50 HU moves the -950 HU threshold past most of the emphysema distribution, so above it
#: the density figures are not comparable across scanners.
HU_OFFSET_LIMIT = 50.0
#: A median lung density above this (HU) is flagged ``expiratory?``. Normal lungs at full
#: inspiration measure about -860 HU (fibrosis, oedema or obesity raise it to -820), at expiration
#: about -730 HU (COPDGene expiratory scans); -775 lies between. Lung *volume* is not used: it
#: depends on body size and on the field of view (a cropped scan or the small synthetic bodies,
#: 1.5 l, would read as expiratory). The ``?``: dense lungs have other causes.
EXPIRATORY_MEDIAN_HU = -775.0
#: DICOM PatientPosition values (0018,5100) flagged ``prone`` and ``decubitus``.
PRONE_POSITIONS = ("HFP", "FFP")
DECUBITUS_POSITIONS = ("HFDR", "HFDL", "FFDR", "FFDL")
#: A table candidate: a tissue component outside the body at least this wide (fraction of the
#: body's left-right width) and at most half as deep as wide, found in at least
#: :data:`TABLE_MIN_SLICES` of the axial slices.
TABLE_MIN_WIDTH = 0.5
TABLE_MIN_SLICES = 0.3
#: The body mask holds the table when, in at least half of the slices, the body's row at
#: :data:`TABLE_EDGE_DEPTH` of its depth from the front or back edge is at least
#: :data:`TABLE_EDGE_WIDTH` of its widest row: a flat plate, where a chest (an ellipse, flattened
#: by lying on its back) is at most about 0.7 as wide there.
TABLE_EDGE_DEPTH = 0.04
TABLE_EDGE_WIDTH = 0.9

_TISSUE_HU = -500.0
_WORK_MM = 2.0


def _work_array(native: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """The native CT at about 2 mm in-plane (slices kept): (K, J, I) float32 and its spacing (k, j, i) mm."""
    sp = np.array(native.GetSpacing(), dtype=np.float64)
    step = [max(1, int(round(_WORK_MM / s))) for s in sp[:2]]
    arr = sitk.GetArrayViewFromImage(native)[:, ::step[1], ::step[0]].astype(np.float32)
    return arr, np.array([sp[2], sp[1] * step[1], sp[0] * step[0]])


def _body(arr: np.ndarray, csp: np.ndarray) -> np.ndarray:
    from drasclr_lib.preprocess.lung_mask import _body_mask  # the body the lung segmentation uses

    return _body_mask(arr, csp)


def _work(native: sitk.Image, work: tuple | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arr, spacing, body) at ~2 mm, computed once per scan by :func:`input_reasons`."""
    if work is not None:
        return work
    arr, csp = _work_array(native)
    return arr, csp, _body(arr, csp)


def _fill_2d(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return np.stack([ndi.binary_fill_holes(m) if m.any() else m for m in mask])


def air_hu(native: sitk.Image, *, work: tuple | None = None) -> tuple[float, int]:
    """Median HU of the air outside the body (the calibration reference, -1000 HU when right).

    Air: voxels between -1400 and -500 HU, more than 6 mm from the body (partial volume, blankets)
    and not enclosed by tissue in their slice (the table's foam core). The scanner's fill value
    outside the reconstruction circle (the image minimum, when it covers over 1 % of the voxels) is
    left out.

    Returns:
        (median HU, number of voxels used at ~2 mm); (NaN, n) when fewer than 500 voxels.
    """
    from scipy import ndimage as ndi

    arr, csp, body = _work(native, work)
    near = ndi.binary_dilation(body, structure=np.ones((1, 3, 3), bool), iterations=max(1, int(round(6 / csp[1]))))
    enclosed = _fill_2d(arr > _TISSUE_HU)
    air = (arr > -1400) & (arr < _TISSUE_HU) & ~near & ~enclosed
    lo = float(arr.min())
    if np.count_nonzero(arr == lo) > 0.01 * arr.size:
        air &= arr != lo
    n = int(air.sum())
    return (float(np.median(arr[air])) if n >= 500 else float("nan")), n


def _on_work_grid(native: sitk.Image, arr: np.ndarray, csp: np.ndarray, label: sitk.Image) -> np.ndarray:
    """A label image (any grid) on the ~2 mm work grid of :func:`_work_array`: (K, J, I) bool."""
    ref = sitk.Image([int(arr.shape[2]), int(arr.shape[1]), int(arr.shape[0])], sitk.sitkUInt8)
    ref.SetSpacing((float(csp[2]), float(csp[1]), float(csp[0])))
    ref.SetOrigin(native.GetOrigin())
    ref.SetDirection(native.GetDirection())
    lab = sitk.Cast(label > 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0


def trachea_air_hu(native: sitk.Image, lung_1mm: sitk.Image, *, work: tuple | None = None) -> tuple[float, int]:
    """Median HU of the tracheal lumen: the calibration reference when no air outside the body is
    in the image (a reconstruction circle tight around the body).

    Per axial slice in the upper half of the lungs and above: air (below -700 HU, so an offset of
    up to +300 HU is still found) inside the body, at least 4 mm from the lungs, in a compact
    component of 100-600 mm^2 (the trachea is 15-25 mm wide) near the left-right middle of the
    body; its voxels more than one work voxel (~2 mm) from the wall are kept (no partial volume).

    Returns:
        (median HU, number of voxels); (NaN, n) when fewer than 30 voxels.
    """
    from scipy import ndimage as ndi

    arr, csp, body = _work(native, work)
    lung = _on_work_grid(native, arr, csp, lung_1mm)
    ks = np.nonzero(lung.any(axis=(1, 2)))[0]
    if ks.size == 0:
        return float("nan"), 0
    near_lung = ndi.binary_dilation(lung, structure=np.ones((1, 3, 3), bool), iterations=max(1, int(round(4 / csp[1]))))
    cand = (arr < -700) & body & ~near_lung
    area_px = float(csp[1] * csp[2])
    values = []
    k_from = int(np.median(ks))  # the upper half of the lungs (k grows superior) and above
    for k in range(k_from, arr.shape[0]):
        jj_b, ii_b = np.nonzero(body[k])
        if jj_b.size == 0 or not cand[k].any():
            continue
        lo, hi = ii_b.min(), ii_b.max()
        lab, n = ndi.label(cand[k])
        for idx, sl in enumerate(ndi.find_objects(lab), start=1):
            comp = lab[sl] == idx
            area = comp.sum() * area_px
            dj, di = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            centre_i = sl[1].start + di / 2
            if not (100 <= area <= 600 and max(dj, di) <= 2 * min(dj, di) and comp.mean() > 0.5):
                continue
            if not lo + 0.35 * (hi - lo) <= centre_i <= lo + 0.65 * (hi - lo):
                continue
            core = ndi.binary_erosion(comp)
            values.append(arr[k][sl][core])
    vals = np.concatenate(values) if values else np.zeros(0, np.float32)
    return (float(np.median(vals)) if vals.size >= 30 else float("nan")), int(vals.size)


def table_side(native: sitk.Image, *, work: tuple | None = None) -> tuple[str, float]:
    """Where the scanner table lies, relative to the body, in patient coordinates.

    Per axial slice, the tissue components outside the body are searched for a table (wide and
    flat: :data:`TABLE_MIN_WIDTH`); the table lies posterior to a supine patient and anterior to
    a prone one (the image is in patient coordinates, LPS).

    Returns:
        (``"posterior"``, ``"anterior"`` or ``""`` when no table is seen in
        :data:`TABLE_MIN_SLICES` of the slices, fraction of slices with a table).
    """
    from scipy import ndimage as ndi

    arr, csp, body = _work(native, work)
    outside = (arr > _TISSUE_HU) & ~body
    votes = []
    for k in range(arr.shape[0]):
        jj_b, ii_b = np.nonzero(body[k])
        if jj_b.size < 50:
            continue
        width_b = ii_b.max() - ii_b.min() + 1
        lab, n = ndi.label(outside[k])
        if n == 0:
            continue
        for sl, idx in zip(ndi.find_objects(lab), range(1, n + 1)):
            dj, di = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            if di >= TABLE_MIN_WIDTH * width_b and dj <= 0.5 * di:
                jj = np.nonzero(lab[sl] == idx)[0] + sl[0].start
                votes.append(1 if jj.mean() > jj_b.mean() else -1)
                break
    frac = len(votes) / max(arr.shape[0], 1)
    if frac < TABLE_MIN_SLICES:
        return "", frac
    return ("posterior" if np.sum(votes) >= 0 else "anterior"), frac


def table_in_body(native: sitk.Image, *, work: tuple | None = None) -> float:
    """Fraction of slices whose body mask ends in a flat plate (see :data:`TABLE_EDGE_WIDTH`)."""
    arr, csp, body = _work(native, work)
    flat, n = 0, 0
    for k in range(arr.shape[0]):
        widths = body[k].sum(axis=1)
        rows = np.nonzero(widths)[0]
        if rows.size < 10:
            continue
        n += 1
        depth = rows[-1] - rows[0] + 1
        off = max(1, int(round(TABLE_EDGE_DEPTH * depth)))
        edge = max(widths[rows[0] + off], widths[rows[-1] - off])
        flat += edge >= TABLE_EDGE_WIDTH * widths.max()
    return flat / max(n, 1)


def input_reasons(native: sitk.Image, ct_1mm: sitk.Image, lung_1mm: sitk.Image,
                  inside_1mm: sitk.Image | None = None) -> list[str]:
    """Reasons found on the scan itself (no registration needed); all are warnings.

    ``thick_slices`` (:data:`THICK_SLICE_MM`), ``slice_gap`` and ``gantry_tilt`` (what the DICOM
    reader resampled or corrected), ``hu_offset`` (:func:`air_hu`, else :func:`trachea_air_hu`; :data:`HU_OFFSET_LIMIT`),
    ``expiratory?`` (:data:`EXPIRATORY_MEDIAN_HU`, on the median lung HU less the measured air
    offset), ``prone`` / ``decubitus`` (DICOM
    PatientPosition when present, else :func:`table_side`), ``table_in_body``
    (:func:`table_in_body`).

    Args:
        native: the CT as :func:`~drasclr_lib.preprocess.io.read_ct` returned it (HU, LPS), with
            the metadata the reader attaches (:func:`~drasclr_lib.preprocess.io.scan_metadata`).
        ct_1mm: the padded 1 mm CT (HU).
        lung_1mm: the lung mask on that grid (nonzero = lung).
        inside_1mm: 1 inside the original field of view on that grid (``None``: the whole grid);
            lung voxels outside it are not counted in the density.

    Returns:
        Reason tokens, in the order above (empty for a good, whole, inspiratory, supine scan).
    """
    from drasclr_lib.preprocess.io import scan_metadata

    meta = scan_metadata(native)
    out: list[str] = []
    thick = max(meta["slice_thickness_mm"], meta["slice_spacing_mm"])
    if thick > THICK_SLICE_MM + 1e-6:
        out.append(reason("thick_slices", thick))
    if np.isfinite(meta["max_slice_gap_mm"]):
        out.append(reason("slice_gap", meta["max_slice_gap_mm"]))
    if meta["gantry_tilt_deg"] > 0:
        out.append(reason("gantry_tilt", meta["gantry_tilt_deg"]))
    work = _work(native, None)
    air, _ = air_hu(native, work=work)
    if not np.isfinite(air):  # no air around the body in the image: the trachea's
        air, _ = trachea_air_hu(native, lung_1mm, work=work)
    if np.isfinite(air) and abs(air + 1000.0) > HU_OFFSET_LIMIT:
        out.append(reason("hu_offset", air + 1000.0))
    lung = sitk.GetArrayViewFromImage(lung_1mm) > 0
    if inside_1mm is not None:
        lung = lung & (sitk.GetArrayViewFromImage(inside_1mm) > 0)
    if lung.any():  # the calibration offset measured on air is taken out first: it is not breathing
        median = float(np.median(sitk.GetArrayViewFromImage(ct_1mm)[lung])) - (air + 1000.0 if np.isfinite(air) else 0.0)
        if median > EXPIRATORY_MEDIAN_HU:
            out.append(reason("expiratory?"))
    position = meta["patient_position"]
    if position:
        if position in PRONE_POSITIONS:
            out.append(reason("prone"))
        elif position in DECUBITUS_POSITIONS:
            out.append(reason("decubitus"))
    elif table_side(native, work=work)[0] == "anterior":
        out.append(reason("prone"))
    if table_in_body(native, work=work) >= 0.5:
        out.append(reason("table_in_body"))
    return out
