"""The cohort runner: every subject of a manifest from its CT file to the patch store.

Per subject (:func:`preprocess_subject`), stages in order, each timed (``time_<stage>_s``):

``read``       CT in HU, reoriented to LPS; the manifest's label maps on the CT's grid
``resample``   1 mm isotropic (B-spline), 60 voxels of -1024 HU padding; label maps nearest
``lung_mask``  the manifest's ``lung_mask`` when given, else :func:`segment_lungs`
               (``segment=True`` segments anyway and reports ``mask_dice`` against the given one)
``register``   affine registration of the subject's lung mask to the atlas mask
``patches``    the atlas locations cut from the subject (:func:`extract_patches`)
``write``      patches, label patches and the record (written last: marks the subject complete)

The cohort (:func:`preprocess_cohort`, CLI ``drasclr preprocess``):

- **Parallel**: ``workers`` processes (``concurrent.futures.ProcessPoolExecutor``, spawn), each
  with ``cores // workers`` SimpleITK threads; a ``tqdm`` bar over subjects.
- **Resumable**: a subject whose record and patches exist is skipped; every file is written
  atomically, so a killed run leaves complete subjects and nothing half-written (a stale
  temporary file of a subject is removed before that subject is redone).
- **Sharded**: ``shard="K/N"`` (0 <= K < N) processes the subjects at positions K, K+N, K+2N, ...
  of the list of sids sorted as strings: deterministic, disjoint, covering, so N cluster array
  jobs (``--shard $SLURM_ARRAY_TASK_ID/N`` with ``--array=0-(N-1)``) split a cohort. Each shard
  finalises the store with whatever is complete; a last run without ``--shard`` (it skips every
  completed subject) gives the final tables.
- **Robust**: a failing subject never stops the cohort. Its error is recorded as
  ``failures/<sid>.json`` and gathered into ``failures.csv`` (``sid, stage, error``, atomic
  rewrite); it gets no patch file. A later successful run of that subject removes its failure.
- **Atlas**: a user-given atlas (mask + landmarks, e.g. the published ones), an :class:`Atlas`,
  or ``"auto"``: built from the reference subject of :func:`choose_reference` and saved as
  ``atlas_mask.nii.gz`` + ``atlas_landmarks.npy`` in the store, so resumed and sharded runs
  reuse the very same atlas.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from drasclr_lib.data.patch_store import PatchStore, finalize_store, subject_done, write_store_meta, write_subject
from drasclr_lib.preprocess.atlas import Atlas, choose_reference
from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.utils import atomic_path, load_json, save_json

__all__ = [
    "preprocess_subject",
    "preprocess_cohort",
    "parse_shard",
    "shard_sids",
    "load_manifest",
    "resolve_atlas",
    "dice",
    "cli_main",
]

DEFAULT_QC_DICE = 0.8
PAD_VOXELS = 60


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (nonzero = foreground); 1.0 when both are empty."""
    a = np.asarray(a) > 0
    b = np.asarray(b) > 0
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(a, b).sum()) / denom


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> (K, N) with 0 <= K < N; ``None`` -> ``None``.

    Raises:
        ValueError: for anything else.
    """
    if shard is None or str(shard).strip() == "":
        return None
    try:
        k, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like 'K/N' (e.g. '0/4'), got {shard!r}") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {shard!r}: need 0 <= K < N (K is 0-based)")
    return k, n


def shard_sids(sids, shard: str | None) -> list[str]:
    """The subjects of one shard: positions K, K+N, ... of the sids sorted as strings."""
    ordered = sorted(str(s) for s in sids)
    parsed = parse_shard(shard)
    if parsed is None:
        return ordered
    k, n = parsed
    return ordered[k::n]


def _grid(img: sitk.Image) -> dict:
    return {"origin": list(img.GetOrigin()), "spacing": list(img.GetSpacing()),
            "direction": list(img.GetDirection()), "size": [int(s) for s in img.GetSize()]}


def _given(row, col: str) -> str | None:
    value = row.get(col) if hasattr(row, "get") else None
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() in ("", "nan"):
        return None
    return str(value)


def _floats(a) -> list:
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(a, dtype=np.float64)]


def _remove_stale_temps(out_dir: Path, sid: str) -> None:
    """Temporary files a killed run left for this subject (atomic writes never renamed them)."""
    for sub in ("patches", "labels", "subjects"):
        folder = out_dir / sub
        if folder.is_dir():
            for tmp in folder.glob(f".{sid}.*.part*"):
                tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# one subject
# --------------------------------------------------------------------------------------------
def preprocess_subject(row, atlas: Atlas, out_dir: str | os.PathLike, *, sid: str | None = None,
                       qc_dice: float = DEFAULT_QC_DICE, segment: bool = False,
                       registration_kwargs: dict | None = None, pad: int = PAD_VOXELS,
                       return_images: bool = False) -> dict:
    """Preprocess one subject and write it to the patch store ``out_dir``.

    Args:
        row: manifest row (mapping or ``pandas.Series``) with ``image`` and optional
            ``lung_mask``, ``label_map``, ``lobe_map``.
        atlas: the :class:`Atlas` subjects are registered to.
        out_dir: patch store folder.
        sid: subject id (default ``row["sid"]``).
        qc_dice: registration Dice under which ``qc_pass`` is False.
        segment: segment the lungs even when the manifest gives a mask; ``mask_dice`` then
            compares the two (how good the segmentation is, e.g. on the synthetic cohort).
        registration_kwargs: extra keyword arguments of ``register_masks``.
        pad: voxels of -1024 HU padding around the 1 mm volume (60 in the paper).
        return_images: also return the 1 mm CT, masks and transform under ``"images"``
            (for pictures; not written).

    Returns:
        The record written to ``subjects/<sid>.json`` (see ``docs/ARCHITECTURE.md``): ``sid``,
        ``lung_volume_l``, ``laa950``, ``reg_dice``, ``mask_dice`` (NaN without a given mask or
        when the given mask was used), ``qc_pass``, ``time_<stage>_s``, ``corners_subject``,
        ``patch_*`` lists, ``grid_1mm``, ``transform``.

    Raises:
        PreprocessError: naming the stage, the subject and the file, whatever went wrong.
    """
    from drasclr_lib.preprocess.io import read_ct, read_label
    from drasclr_lib.preprocess.patches import extract_patches, resample_to_grid
    from drasclr_lib.preprocess.registration import register_masks, registration_dice, transform_to_dict
    from drasclr_lib.preprocess.resample import resample_isotropic

    sid = str(sid if sid is not None else row["sid"])
    out_dir = Path(out_dir)
    image_path = _given(row, "image")
    times: dict[str, float] = {}
    state: dict[str, Any] = {}
    stage = "read"

    def timed(name):
        nonlocal stage
        stage = name
        times[name] = time.perf_counter()

    def done(name):
        times[name] = time.perf_counter() - times[name]

    try:
        _remove_stale_temps(out_dir, sid)
        timed("read")
        ct = read_ct(image_path, sid=sid)
        given = {col: read_label(p, ct, sid=sid) for col in ("lung_mask", "label_map", "lobe_map")
                 if (p := _given(row, col)) is not None}
        done("read")

        timed("resample")
        ct_1mm = resample_isotropic(ct, 1.0, interpolator="bspline", pad=int(pad), pad_value=-1024)
        del ct
        given_1mm = {col: resample_to_grid(img, ct_1mm) for col, img in given.items()}
        done("resample")

        timed("lung_mask")
        mask_dice = float("nan")
        if "lung_mask" in given_1mm and not segment:
            lung_1mm = given_1mm["lung_mask"]
            mask_source = "manifest"
        else:
            from drasclr_lib.preprocess.lung_mask import segment_lungs

            lung_1mm = segment_lungs(ct_1mm, sid=sid)
            mask_source = "segmented"
            if "lung_mask" in given_1mm:
                mask_dice = dice(sitk.GetArrayViewFromImage(lung_1mm), sitk.GetArrayViewFromImage(given_1mm["lung_mask"]))
        lung_arr = sitk.GetArrayViewFromImage(lung_1mm) > 0
        n_lung = int(lung_arr.sum())
        if n_lung == 0:
            raise PreprocessError("the lung mask is empty (no lungs in the field of view?)", stage="lung_mask",
                                  sid=sid, path=_given(row, "lung_mask") if mask_source == "manifest" else image_path)
        voxel_ml = float(np.prod(ct_1mm.GetSpacing())) / 1000.0
        lung_volume_l = n_lung * voxel_ml / 1000.0
        laa950 = 100.0 * float(np.count_nonzero(sitk.GetArrayViewFromImage(ct_1mm)[lung_arr] < -950)) / n_lung
        done("lung_mask")

        timed("register")
        transform, reg_info = register_masks(atlas.mask, lung_1mm, sid=sid, **(registration_kwargs or {}))
        reg_dice = float(registration_dice(atlas.mask, lung_1mm, transform))
        done("register")

        timed("patches")
        cut = extract_patches(ct_1mm, atlas, transform, label_1mm=given_1mm.get("label_map"),
                              lobe_1mm=given_1mm.get("lobe_map"), lung_1mm=lung_1mm)
        done("patches")

        timed("write")
        record = {
            "sid": sid,
            "image": image_path,
            "lung_volume_l": float(lung_volume_l),
            "laa950": float(laa950),
            "reg_dice": reg_dice,
            "mask_dice": mask_dice,
            "mask_source": mask_source,
            "qc_pass": bool(reg_dice >= qc_dice),
            "mean_patch_inside": float(np.mean(cut["inside_fraction"])),
            "corners_subject": cut["corners_subject"].tolist(),
            "patch_lung_fraction": _floats(cut["lung_fraction"]),
            "patch_emph_fraction": _floats(cut["emph_fraction"]),
            "patch_lobe": [int(v) for v in cut["lobe"]],
            "patch_laa950": _floats(cut["laa950"]),
            "grid_1mm": _grid(ct_1mm),
            "transform": transform_to_dict(transform),
            "registration": {k: v for k, v in (reg_info or {}).items()
                             if isinstance(v, (str, int, float, bool, list)) or v is None},
        }
        for name in ("read", "resample", "lung_mask", "register", "patches"):
            record[f"time_{name}_s"] = float(times[name])
        write_subject(out_dir, sid, cut["patches_hu"], label_patches=cut["label_patches"], record=record)
        done("write")
    except PreprocessError as err:
        if err.sid is None:
            err.sid = sid
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a PreprocessError naming the stage
        raise PreprocessError(f"{type(exc).__name__}: {exc}", stage=stage, sid=sid, path=image_path) from exc
    # the write time is known only now; the record on disk has every other stage's time
    record["time_write_s"] = float(times["write"])
    if return_images:
        record = dict(record)
        record["images"] = {"ct_1mm": ct_1mm, "lung_1mm": lung_1mm, "transform": transform, **given_1mm}
    return record


# --------------------------------------------------------------------------------------------
# manifest and atlas
# --------------------------------------------------------------------------------------------
def load_manifest(manifest) -> pd.DataFrame:
    """A manifest DataFrame from a DataFrame, a path or a name (``"synthetic"`` ...).

    Subjects whose files are missing are kept (``read_manifest(..., check_files=False)``): they
    fail at the ``read`` stage and are listed in ``failures.csv`` instead of rejecting the whole
    manifest. Every other problem (a missing column, a duplicated sid, a bad label) still raises
    :class:`~drasclr_lib.data.manifest.ManifestError`.
    """
    from drasclr_lib.data.manifest import read_manifest, resolve_manifest

    if isinstance(manifest, pd.DataFrame):
        df = manifest.copy()
        df["sid"] = df["sid"].astype(str)
        return df.reset_index(drop=True)
    path = Path(manifest)
    if not path.exists():
        path = resolve_manifest(str(manifest))
    return read_manifest(path, check_files=False)


def resolve_atlas(atlas, manifest_df: pd.DataFrame, out_dir: str | os.PathLike, *, segment: bool = False,
                  pad: int = PAD_VOXELS) -> Atlas:
    """Turn the ``atlas`` argument of :func:`preprocess_cohort` into an :class:`Atlas`.

    Args:
        atlas: an :class:`Atlas`; a ``(mask_path, landmarks_path or None)`` pair; a mask path;
            ``"auto"`` or ``None``: the atlas saved in ``out_dir`` by an earlier run, else one
            built from :func:`choose_reference`'s subject and saved there (when that subject
            cannot be read or segmented, the reference among the others; three tries).
        manifest_df: the cohort.
        out_dir: the store folder.
        segment: for ``"auto"``: segment the reference subject even when it has a mask.
        pad: for ``"auto"``: padding of the reference subject's 1 mm volume.
    """
    out_dir = Path(out_dir)
    if isinstance(atlas, Atlas):
        return atlas
    if isinstance(atlas, (tuple, list)):
        mask, landmarks = (list(atlas) + [None])[:2]
        return Atlas.from_files(mask, landmarks)
    if isinstance(atlas, (str, os.PathLike)) and str(atlas) != "auto":
        return Atlas.from_files(atlas)
    if atlas not in (None, "auto"):
        raise ValueError(f"atlas must be None, 'auto', an Atlas or (mask_path, landmarks_path), got {atlas!r}")
    mask_path, lm_path = out_dir / "atlas_mask.nii.gz", out_dir / "atlas_landmarks.npy"
    if mask_path.exists() and lm_path.exists():
        saved = Atlas.from_files(mask_path, lm_path)
        info = out_dir / "atlas.json"
        if info.exists():
            saved.source = load_json(info).get("source", saved.source)
        return saved
    tried: list[str] = []
    while True:  # the reference subject, or the next one when it cannot be used (up to 3 tries)
        candidates = manifest_df.loc[~manifest_df["sid"].astype(str).isin(tried)]
        ref = choose_reference(candidates)
        row = candidates.loc[candidates["sid"].astype(str) == ref].iloc[0]
        mask = None if segment else _given(row, "lung_mask")
        try:
            built = Atlas.from_subject(_given(row, "image"), mask, sid=ref, pad=int(pad))
            break
        except (PreprocessError, ValueError) as err:
            tried.append(ref)
            if len(tried) >= 3 or len(tried) >= len(manifest_df):
                raise PreprocessError(f"no atlas could be built from the reference subjects {tried}; last error: {err}",
                                      stage=getattr(err, "stage", "lung_mask"), sid=ref) from err
    built.source = f"reference subject {ref} (median lung volume, choose_reference)"
    built.save(out_dir)
    save_json({"source": built.source, "reference_sid": ref}, out_dir / "atlas.json")
    return built


# --------------------------------------------------------------------------------------------
# the cohort
# --------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(atlas: Atlas, threads: int, counter) -> None:
    """Per worker: the atlas, and ``threads`` cores of its own.

    SimpleITK's global thread count is set, and the process is pinned to its own block of
    cores (CPU affinity), because the filters of :mod:`resample` and :mod:`registration` ask for
    ``available_cores()`` threads, which follows the affinity.
    """
    threads = max(1, int(threads))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    try:
        cores = sorted(os.sched_getaffinity(0))
        start = (index * threads) % max(len(cores), 1)
        block = (cores + cores)[start:start + threads]
        if block:
            os.sched_setaffinity(0, set(block))
    except (AttributeError, OSError):  # not Linux: SimpleITK's thread count is all we can set
        pass
    _WORKER["atlas"] = atlas


def _run_one(row: dict, out_dir: str, qc_dice: float, segment: bool, registration_kwargs: dict | None,
             pad: int, atlas: Atlas | None = None) -> tuple:
    """Worker body: ``("ok", sid, record)`` or ``("fail", sid, stage, message)`` (never raises)."""
    sid = str(row["sid"])
    try:
        rec = preprocess_subject(row, atlas or _WORKER["atlas"], out_dir, sid=sid, qc_dice=qc_dice, segment=segment,
                                 registration_kwargs=registration_kwargs, pad=pad)
        slim = {k: v for k, v in rec.items() if not isinstance(v, (list, dict))}
        return ("ok", sid, slim)
    except PreprocessError as err:
        return ("fail", sid, err.stage, str(err))
    except BaseException as exc:  # noqa: BLE001 - a worker must report, not die
        if isinstance(exc, KeyboardInterrupt):
            raise
        return ("fail", sid, "write", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")


def _write_failures(out_dir: Path) -> pd.DataFrame:
    """Gather ``failures/<sid>.json`` into ``failures.csv`` (atomic), dropping subjects now complete."""
    rows = []
    folder = out_dir / "failures"
    if folder.is_dir():
        for p in sorted(folder.glob("[!.]*.json")):
            try:
                rec = load_json(p)
            except ValueError:
                continue
            if subject_done(out_dir, rec["sid"]):
                p.unlink(missing_ok=True)
                continue
            rows.append({"sid": rec["sid"], "stage": rec["stage"], "error": rec["error"]})
    table = pd.DataFrame(rows, columns=["sid", "stage", "error"])
    with atomic_path(out_dir / "failures.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _record_failure(out_dir: Path, sid: str, stage: str, message: str) -> None:
    save_json({"sid": sid, "stage": stage, "error": message}, out_dir / "failures" / f"{sid}.json")


def _write_meta(out_dir: Path, atlas: Atlas, settings: dict) -> None:
    meta_path = out_dir / "store.json"
    if meta_path.exists():
        old = load_json(meta_path)
        if np.asarray(old.get("atlas_corners")).tolist() != atlas.corners.tolist():
            raise ValueError(f"{out_dir} already holds a patch store made with another atlas "
                             f"({old.get('atlas_source')!r}); use a new output folder or the same atlas")
        return
    write_store_meta(out_dir, atlas.corners, atlas.locs, atlas.neighbors(2), patch_size=atlas.patch_size,
                     atlas_source=atlas.source, atlas_geometry=atlas.corner_geometry, **settings)


def preprocess_cohort(manifest, out_dir: str | os.PathLike, *, atlas=None, workers: int = 1, shard: str | None = None,
                      qc_dice: float = DEFAULT_QC_DICE, segment: bool = False, registration_kwargs: dict | None = None,
                      pad: int = PAD_VOXELS, progress: bool = True) -> PatchStore:
    """Preprocess every subject of a manifest into a patch store (resumable, parallel, sharded).

    Args:
        manifest: a manifest path, a name for ``resolve_manifest`` (``"synthetic"``) or a DataFrame.
        out_dir: the patch store folder.
        atlas: ``None``/``"auto"`` (built from the cohort's reference subject, saved in the
            store), an :class:`Atlas`, ``(mask_path, landmarks_path)`` or a mask path (grid rule).
        workers: parallel processes (1 = in this process).
        shard: ``"K/N"``: only subjects K, K+N, ... of the sorted sids (see the module docstring).
        qc_dice: registration Dice under which a subject is flagged (``qc_pass`` False).
        segment: segment the lungs even where the manifest gives a mask (reports ``mask_dice``).
        registration_kwargs: extra keyword arguments of ``register_masks``.
        pad: voxels of -1024 HU padding around each 1 mm volume (60 in the paper; smaller is
            faster and only matters for patches reaching past the scan).
        progress: show a tqdm bar.

    Returns:
        :class:`~drasclr_lib.data.patch_store.PatchStore` of ``out_dir``.

    Raises:
        ValueError: bad ``workers``/``shard``, or ``out_dir`` made with another atlas.
    """
    from tqdm.auto import tqdm

    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    parse_shard(shard)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = load_manifest(manifest)
    df["sid"] = df["sid"].astype(str)
    the_atlas = resolve_atlas(atlas, df, out_dir, segment=segment, pad=pad)
    _write_meta(out_dir, the_atlas, {"qc_dice": float(qc_dice), "segment": bool(segment), "pad_voxels": int(pad),
                                     "spacing_mm": 1.0})
    mine = shard_sids(df["sid"], shard)
    todo = [s for s in mine if not subject_done(out_dir, s)]
    rows = {str(r["sid"]): {k: (None if (isinstance(v, float) and np.isnan(v)) else v) for k, v in r.items()}
            for r in df.to_dict("records")}
    workers = min(int(workers), max(len(todo), 1))
    bar = tqdm(total=len(todo), desc="preprocess", unit="subject", disable=not progress)

    def handle(result):
        if result[0] == "ok":
            (out_dir / "failures" / f"{result[1]}.json").unlink(missing_ok=True)
        else:
            _, sid, stage, msg = result
            _record_failure(out_dir, sid, stage, msg)
            bar.set_postfix_str(f"failed: {sid} ({stage})")
        bar.update(1)

    try:
        if workers == 1:
            for sid in todo:
                handle(_run_one(rows[sid], str(out_dir), qc_dice, segment, registration_kwargs, pad, atlas=the_atlas))
        else:
            import multiprocessing as mp

            from drasclr_lib.preprocess.resample import available_cores

            ctx = mp.get_context("spawn")
            threads = max(1, available_cores() // workers)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(the_atlas, threads, ctx.Value("i", 0))) as pool:
                futures = {pool.submit(_run_one, rows[sid], str(out_dir), qc_dice, segment, registration_kwargs, pad): sid
                           for sid in todo}
                for fut in as_completed(futures):
                    try:
                        handle(fut.result())
                    except Exception as exc:  # noqa: BLE001 - a crashed worker process
                        handle(("fail", futures[fut], "write", f"worker crashed: {type(exc).__name__}: {exc}"))
    finally:
        bar.close()
        _write_failures(out_dir)
        finalize_store(out_dir, df)
    return PatchStore(out_dir)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr preprocess``: exit 0 when at least one subject of the run's shard is complete."""
    ap = argparse.ArgumentParser(prog="drasclr preprocess",
                                 description="CT files -> registered atlas patches (a patch store folder).")
    ap.add_argument("--manifest", required=True, help="manifest CSV/YAML, or 'synthetic' / 'lung-pet-ct-dx'")
    ap.add_argument("--out", required=True, help="patch store folder (created; a rerun resumes)")
    ap.add_argument("--atlas-mask", help="atlas lung mask (e.g. the published atlas_lung_mask.nii.gz); "
                                         "default: built from the cohort's median-lung-volume subject")
    ap.add_argument("--landmarks", help="atlas landmarks .npy (L, 3) in the mask's voxel order "
                                        "(default with --atlas-mask: the grid rule on the mask)")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    ap.add_argument("--shard", help="K/N: process subjects K, K+N, ... of the sorted sids (0 <= K < N)")
    ap.add_argument("--qc-dice", type=float, default=DEFAULT_QC_DICE, help="registration Dice QC threshold (0.8)")
    ap.add_argument("--pad", type=int, default=PAD_VOXELS, help="voxels of -1024 HU padding at 1 mm (60 as published)")
    ap.add_argument("--segment", action="store_true", help="segment the lungs even when the manifest has lung_mask")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.landmarks and not args.atlas_mask:
        ap.error("--landmarks needs --atlas-mask")
    atlas = (args.atlas_mask, args.landmarks) if args.atlas_mask else "auto"
    try:
        store = preprocess_cohort(args.manifest, args.out, atlas=atlas, workers=args.workers, shard=args.shard,
                                  qc_dice=args.qc_dice, segment=args.segment, pad=args.pad,
                                  progress=not args.no_progress)
    except (ValueError, FileNotFoundError, PreprocessError) as err:
        print(f"drasclr preprocess: {err}", file=sys.stderr)
        return 2
    failures = store.failures()
    df = load_manifest(args.manifest)
    mine = set(shard_sids(df["sid"], args.shard))
    complete = [s for s in store.sids if s in mine]
    flagged = int((~store.table.loc[complete, "qc_pass"].astype(bool)).sum()) if complete and "qc_pass" in store.table else 0
    print(f"drasclr preprocess: {len(complete)}/{len(mine)} subjects complete in {store.root}, "
          f"{len(failures)} failed, {flagged} below registration Dice {args.qc_dice}")
    for _, f in failures.head(10).iterrows():
        print(f"  FAILED {f['sid']} [{f['stage']}]: {str(f['error']).splitlines()[0][:200]}")
    if len(failures) > 10:
        print(f"  ... see {store.root / 'failures.csv'}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(cli_main())
