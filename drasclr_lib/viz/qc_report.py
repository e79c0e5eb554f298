"""The QC report of a patch store: every subject, worst first, readable in a minute.

:func:`write_qc_report` writes ``index.html`` (one page, PNGs linked relatively, so the folder can
be zipped or copied) and ``subjects/<sid>.png`` per subject: the subject's CT on three planes
through its patches (read from the manifest's file and resampled onto the store's recorded 1 mm
grid, as :func:`~drasclr_lib.preprocess.pipeline.on_subject_grid` does), the patch boxes cut
there coloured by their field-of-view fraction (green inside the scan, red padding), and the part
of the grid outside the original scan shaded. The page's table gives per subject the QC verdict,
the reasons (failing ones in red), the field-of-view coverage of the atlas lung, the number of
invalid patches, the registration Dice, lung volume and %LAA-950; subjects that failed
preprocessing (``failures.csv``) are listed below with their stage and error.

Worst first: most failing reasons, most warnings, lowest field-of-view coverage, lowest
registration Dice (:func:`subject_rows`). Notebook 01 shows the worst few (:func:`worst_subjects`).

Length (~370 lines): one idea, the report; the table, the figure and the page are each read only
through :func:`write_qc_report` and change together.

Stores written before the field of view was recorded read ``patch_fov_fraction`` as 1.0 (every
patch inside) and ``fov_lung_coverage`` as unknown; their reasons are then what the record holds
(``low_registration_dice`` is derived from ``qc_pass`` when the record has no reasons).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from drasclr_lib.preprocess.checks import FAILING_REASONS, REASON_NAMES, count_reasons, parse_reason, split_reasons
from drasclr_lib.utils import atomic_path

__all__ = ["subject_rows", "worst_subjects", "qc_figure", "write_qc_report", "REPORT_FILE"]

#: The page :func:`write_qc_report` writes in its folder.
REPORT_FILE = "index.html"

_COLUMNS = ["rank", "sid", "qc_pass", "qc_reasons", "n_failing", "n_warnings", "fov_lung_coverage",
            "mean_patch_inside", "n_invalid_patches", "reg_dice", "lung_volume_l", "laa950", "image"]


def _num(value) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _record_reasons(rec) -> list[str]:
    reasons = rec.qc_reasons
    if reasons is not None:
        return split_reasons(list(reasons))
    if rec.qc_pass is False:  # an older store: the only failing check was the registration Dice
        from drasclr_lib.preprocess.checks import reason

        return [reason("low_registration_dice", rec.reg_dice)] if rec.reg_dice is not None else ["qc_fail"]
    return []


def _fov_fractions(store, sid: str) -> np.ndarray:
    """(L,) fraction of each patch inside the scanned volume; 1.0 where the store has none."""
    values = store.patch_values(sid, "patch_fov_fraction")
    return np.ones(store.num_locations, dtype=np.float32) if values is None else values


def subject_rows(store) -> pd.DataFrame:
    """One row per subject of the store, sorted worst first.

    Args:
        store: a :class:`~drasclr_lib.data.patch_store.PatchStore` (or its folder).

    Returns:
        DataFrame with columns ``rank`` (1 = worst), ``sid``, ``qc_pass`` (bool), ``qc_reasons``
        (list of tokens), ``n_failing``, ``n_warnings``, ``fov_lung_coverage`` (NaN unknown),
        ``mean_patch_inside``, ``n_invalid_patches`` (patches under the store's ``min_patch_fov``),
        ``reg_dice``, ``lung_volume_l``, ``laa950``, ``image``. Order: most failing reasons, most
        warnings, lowest coverage, lowest registration Dice, then sid.
    """
    from drasclr_lib.data.patch_store import PatchStore

    store = store if isinstance(store, PatchStore) else PatchStore(store)
    rows = []
    for sid in store.sids:
        rec = store.record(sid)
        reasons = _record_reasons(rec)
        failing = sum(parse_reason(r)[0] in FAILING_REASONS for r in reasons)
        fov = _fov_fractions(store, sid)
        qc_pass = rec.qc_pass if rec.qc_pass is not None else failing == 0
        rows.append({"sid": sid, "qc_pass": bool(qc_pass), "qc_reasons": reasons, "n_failing": int(failing),
                     "n_warnings": len(reasons) - int(failing),
                     "fov_lung_coverage": _num(rec.fov_lung_coverage),
                     "mean_patch_inside": float(np.mean(fov)) if fov.size else float("nan"),
                     "n_invalid_patches": int(np.count_nonzero(~store.valid_patches(sid))),
                     "reg_dice": _num(rec.reg_dice), "lung_volume_l": _num(rec.lung_volume_l),
                     "laa950": _num(rec.laa950), "image": _image_path(store, sid, rec)})
    df = pd.DataFrame(rows, columns=[c for c in _COLUMNS if c != "rank"])
    if df.empty:
        return pd.DataFrame(columns=_COLUMNS)
    df["_pass"], df["_cov"], df["_dice"] = df["qc_pass"].astype(int), df["fov_lung_coverage"].fillna(1.0), \
        df["reg_dice"].fillna(1.0)
    df = df.sort_values(["_pass", "n_failing", "n_warnings", "_cov", "_dice", "sid"],
                        ascending=[True, False, False, True, True, True], kind="mergesort")
    df = df.drop(columns=["_pass", "_cov", "_dice"]).reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def worst_subjects(store, n: int = 5) -> pd.DataFrame:
    """The ``n`` worst rows of :func:`subject_rows` (notebook 01's QC cell)."""
    return subject_rows(store).head(int(n)).reset_index(drop=True)


def _image_path(store, sid: str, rec) -> str | None:
    """The subject's CT file: the record's ``image``, else ``subjects.csv``'s (the manifest's)."""
    if rec.image:
        return str(rec.image)
    if "image" in store.table.columns:
        value = store.table.loc[sid, "image"]
        if isinstance(value, str) and value.strip():
            return value
    return None


def _planes(store, sid: str, rec) -> dict:
    """The CT (HU) and the 'inside the original scan' mask on three planes of the subject's grid.

    The planes pass through the median centre of the patches inside the scan (all patches when
    none is), the sagittal one through the first quartile of their left-right positions (a lung).

    Returns:
        dict ``centre`` (i, j, k) and, per plane ``axial`` / ``coronal`` / ``sagittal``, a pair
        ``(hu (rows, cols) float32, inside (rows, cols) bool)``; ``hu`` is None when the CT file
        cannot be read (the error text is under ``error``).
    """
    from drasclr_lib.preprocess.io import read_ct
    from drasclr_lib.preprocess.resample import fov_mask

    grid = store.subject_grid(sid)
    size = np.array(grid.GetSize())
    P = store.patch_size
    corners = store.corners(sid, atlas_fallback=True)
    centres = corners + P / 2.0
    seen = store.valid_patches(sid)
    if seen.any():  # planes through the scanned patches
        centres = centres[seen]
    centre = np.median(centres, axis=0)
    centre[0] = np.percentile(centres[:, 0], 25)  # sagittal through one lung, not the mediastinum
    centre = np.clip(np.round(centre).astype(int), 0, size - 1)
    out: dict = {"centre": centre, "error": None}
    native = None
    image = _image_path(store, sid, rec)
    if image:
        try:
            native = read_ct(image, sid=sid)
        except Exception as exc:  # noqa: BLE001 - the report lists the subject with the error
            out["error"] = str(exc)
    else:
        out["error"] = "neither the record nor subjects.csv names the CT file"
    for name, axis in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        slab_size = size.copy()
        slab_size[axis] = 1
        index = np.zeros(3, dtype=int)
        index[axis] = centre[axis]
        slab = sitk.Image([int(v) for v in slab_size], sitk.sitkFloat32)
        slab.SetSpacing(grid.GetSpacing())
        slab.SetDirection(grid.GetDirection())
        slab.SetOrigin(grid.TransformIndexToPhysicalPoint([int(v) for v in index]))
        if native is None:
            out[name] = (None, None)
            continue
        hu = sitk.GetArrayFromImage(sitk.Resample(native, slab, sitk.Transform(), sitk.sitkLinear, -1024.0,
                                                  sitk.sitkFloat32))
        inside = sitk.GetArrayFromImage(fov_mask(native, slab)) > 0  # the pipeline's own field of view
        # (k, j, i) array of a slab -> 2D image, superior up for coronal / sagittal
        squeeze = {0: lambda a: a[:, :, 0][::-1], 1: lambda a: a[:, 0, :][::-1], 2: lambda a: a[0]}[axis]
        out[name] = (squeeze(hu), squeeze(inside))
    return out


def qc_figure(store, subject, *, title: str | None = None):
    """The QC figure of one subject: CT on three planes with its patch boxes coloured by
    field-of-view fraction and the area outside the original scan shaded.

    Args:
        store: a :class:`~drasclr_lib.data.patch_store.PatchStore` (or its folder).
        subject: id or position.
        title: figure title (default: sid, verdict, reasons).

    Returns:
        A matplotlib Figure (1 x 3 axes: axial, coronal, sagittal).
    """
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"), force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from drasclr_lib.data.patch_store import PatchStore

    store = store if isinstance(store, PatchStore) else PatchStore(store)
    sid = store.sids[store.index(subject)]
    rec = store.record(sid)
    reasons = _record_reasons(rec)
    fov = _fov_fractions(store, sid)
    P = store.patch_size
    corners = store.corners(sid, atlas_fallback=True)
    planes = _planes(store, sid, rec)
    size = np.array(store.subject_grid(sid).GetSize())
    c = planes["centre"]
    cmap = plt.get_cmap("RdYlGn")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), layout="constrained")
    # plane -> (axis cut, (column axis, row axis), rows flipped so superior is up)
    layout = {"axial": (2, (0, 1), False), "coronal": (1, (0, 2), True), "sagittal": (0, (1, 2), True)}
    for ax, (name, (axis, (ca, ra), flip)) in zip(axes, layout.items()):
        hu, inside = planes[name]
        extent = (0, size[ca], size[ra], 0)
        if hu is None:
            ax.set_facecolor("0.15")
            ax.text(0.5, 0.5, "CT not readable", color="w", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlim=(0, size[ca]), ylim=(size[ra], 0))
        else:
            ax.imshow(hu, cmap="gray", vmin=-1000, vmax=200, extent=extent, interpolation="nearest")
            shade = np.zeros(inside.shape + (4,), dtype=np.float32)
            shade[~inside] = (0.35, 0.0, 0.55, 0.45)
            ax.imshow(shade, extent=extent, interpolation="nearest")
        hit = (corners[:, axis] <= c[axis]) & (c[axis] < corners[:, axis] + P)
        for idx in np.nonzero(hit)[0]:  # the boxes cut by this plane
            x0, y0 = corners[idx, ca], corners[idx, ra]
            y_top = size[ra] - (y0 + P) if flip else y0
            ax.add_patch(Rectangle((x0, y_top), P, P, fill=False, lw=0.9, edgecolor=cmap(float(fov[idx]))))
        ax.set_title(f"{name} ({'ijk'[axis]} = {c[axis]})", fontsize=9)
        ax.set(xticks=[], yticks=[])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes, fraction=0.02, pad=0.02, label="patch inside the scan (fraction)")
    verdict = "pass" if (rec.qc_pass if rec.qc_pass is not None else True) else "FAIL"
    if title is None:
        title = f"{sid}: QC {verdict}" + (f" ({', '.join(reasons)})" if reasons else "")
        if planes["error"]:
            title += f"\n{planes['error'][:150]}"
    fig.suptitle(title, fontsize=10)
    return fig


def _message_figure(text: str):
    """A small figure holding only ``text`` (a subject whose figure could not be drawn)."""
    import textwrap

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8, 1.2))
    fig.text(0.01, 0.5, textwrap.fill(text, 110), va="center", fontsize=9)
    return fig


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def _badges(reasons: list[str]) -> str:
    if not reasons:
        return '<span class="ok">none</span>'
    out = []
    for r in reasons:
        name = parse_reason(r)[0]
        cls = "fail" if name in FAILING_REASONS else "warn"
        tip = html.escape(REASON_NAMES.get(name, ""), quote=True)
        out.append(f'<span class="{cls}" title="{tip}">{html.escape(r)}</span>')
    return " ".join(out)


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#eee}.fail{background:#c62828;color:#fff;padding:1px 4px;border-radius:3px}
.warn{background:#f9a825;padding:1px 4px;border-radius:3px}.ok{color:#2e7d32}
img{max-width:900px;display:block}tr.failed td:first-child{border-left:4px solid #c62828}"""


def write_qc_report(store, out_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Write the QC page and one PNG per subject.

    Args:
        store: a :class:`~drasclr_lib.data.patch_store.PatchStore` (or its folder).
        out_dir: report folder (default ``<store>/qc_report``); ``index.html`` and
            ``subjects/<sid>.png`` are written there, each atomically (a subject's PNG whose CT
            cannot be read says so; the subject is still listed).
        progress: tqdm bar over subjects.

    Returns:
        Path of ``index.html``.
    """
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.data.patch_store.layout import safe_sid

    store = store if isinstance(store, PatchStore) else PatchStore(store)
    out = Path(out_dir) if out_dir is not None else store.root / "qc_report"
    rows = subject_rows(store)
    failures = store.failures()
    body = []
    for row in tqdm(rows.itertuples(index=False), total=len(rows), desc="QC report", disable=not progress):
        png = Path("subjects") / f"{safe_sid(row.sid)}.png"
        try:
            fig = qc_figure(store, row.sid)
        except Exception as exc:  # noqa: BLE001 - one subject's figure never stops the report
            fig = _message_figure(f"{row.sid}: no QC figure ({type(exc).__name__}: {exc})")
        with atomic_path(out / png) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        cls = ' class="failed"' if not row.qc_pass else ""
        body.append(
            f"<tr{cls}><td>{row.rank}</td><td><b>{html.escape(row.sid)}</b><br>"
            f"{'pass' if row.qc_pass else '<span class=fail>FAIL</span>'}</td>"
            f"<td>{_badges(row.qc_reasons)}</td><td>{_fmt(row.fov_lung_coverage, '.2f')}</td>"
            f"<td>{_fmt(row.mean_patch_inside, '.2f')} / {row.n_invalid_patches}</td>"
            f"<td>{_fmt(row.reg_dice, '.3f')}</td><td>{_fmt(row.lung_volume_l, '.2f')}</td>"
            f"<td>{_fmt(row.laa950, '.1f')}</td></tr>"
            f'<tr{cls}><td></td><td colspan="7"><img loading="lazy" src="{png.as_posix()}" '
            f'alt="{html.escape(row.sid)} overlay"></td></tr>')
    counts = count_reasons(rows["qc_reasons"]) if len(rows) else {}
    summary = ", ".join(f"{name}: {n}" for name, n in counts.items()) or "no reasons"
    n_fail = int((~rows["qc_pass"].astype(bool)).sum()) if len(rows) else 0
    fail_rows = "".join(f"<tr><td>{html.escape(str(r.sid))}</td><td>{html.escape(str(r.stage))}</td>"
                        f"<td>{html.escape(str(r.error))}</td></tr>" for r in failures.itertuples(index=False))
    legend = "".join(f"<li><code>{html.escape(k)}</code>{' (fails QC)' if k in FAILING_REASONS else ''}: "
                     f"{html.escape(v)}</li>" for k, v in REASON_NAMES.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>QC report: {html.escape(str(store.root))}</title>
<style>{_CSS}</style></head><body>
<h1>QC report</h1>
<p>Store <code>{html.escape(str(store.root))}</code>: {len(rows)} subjects, {n_fail} fail QC,
{len(failures)} failed preprocessing. Reasons: {html.escape(summary)}.</p>
<p>Sorted worst first (failing reasons, warnings, field-of-view coverage, registration Dice). Figures:
the CT on the subject's 1 mm grid, patch boxes coloured by the fraction inside the scan (red: padding),
purple: outside the original scan.</p>
<table><tr><th>#</th><th>subject</th><th>reasons</th><th>FOV coverage of the atlas lung</th>
<th>mean patch inside / invalid patches</th><th>reg Dice</th><th>lung volume (l)</th><th>%LAA-950</th></tr>
{''.join(body)}
</table>
<h2>Failed preprocessing ({len(failures)})</h2>
{'<table><tr><th>subject</th><th>stage</th><th>error</th></tr>' + fail_rows + '</table>' if len(failures) else
 '<p>none</p>'}
<h2>Reasons</h2><ul>{legend}</ul>
</body></html>
"""
    with atomic_path(out / REPORT_FILE) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out / REPORT_FILE
