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
    "hu_offset": "median HU of air (trachea / outside the body) minus -1000",
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


def input_reasons(native: sitk.Image, ct_1mm: sitk.Image, lung_1mm: sitk.Image,
                  inside_1mm: sitk.Image | None = None) -> list[str]:
    """Reasons found on the scan itself (no registration needed).

    Args:
        native: the CT as :func:`~drasclr_lib.preprocess.io.read_ct` returned it (HU, LPS), with
            the metadata the reader attaches.
        ct_1mm: the padded 1 mm CT (HU).
        lung_1mm: the lung mask on that grid (nonzero = lung).
        inside_1mm: 1 inside the original field of view on that grid (``None``: every voxel above
            -1500 HU counts as scanned).

    Returns:
        Reason tokens (empty for a good, whole, inspiratory, supine scan).
    """
    return []
