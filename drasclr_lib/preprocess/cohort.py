"""The cohort runner: every subject of a manifest from its CT file to the patch store.

Per subject, :func:`preprocess_subject` runs the per-scan pipeline
(:func:`~drasclr_lib.preprocess.pipeline.process_scan`: read -> resample -> lung_mask ->
register -> patches, each timed as ``time_<stage>_s``) and writes the subject to the store
(:func:`~drasclr_lib.data.patch_store.write_subject`, stage ``write``: patches, label patches
and the record, written last, marking the subject complete).

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
- **Atlas**: :func:`~drasclr_lib.preprocess.atlas_source.resolve_atlas`: a user-given atlas
  (mask + landmarks, e.g. the published ones), an :class:`Atlas`, or ``"auto"``: built from the
  cohort's reference subject and saved in the store, so resumed and sharded runs reuse the very
  same atlas.

The store's layout (file names, failure rows, temporary files, ``store.json``) is
:mod:`drasclr_lib.data.patch_store`'s; this module only orchestrates. It is past 350 lines because
the ``drasclr preprocess`` command, its help and examples, lives beside the runner it drives.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from drasclr_lib.data.patch_store import (PatchStore, SubjectRecord, clear_failure, ensure_store_meta, finalize_store,
                                          record_failure, remove_stale_temps, subject_done, write_failures_table,
                                          write_subject)
from drasclr_lib.data.patch_store.records import MIN_PATCH_FOV
from drasclr_lib.preprocess.atlas import Atlas
from drasclr_lib.preprocess.atlas_source import resolve_atlas
from drasclr_lib.preprocess.errors import PreprocessError
from drasclr_lib.preprocess.pipeline import DEFAULT_MIN_COVERAGE, DEFAULT_QC_DICE, manifest_files, process_scan
from drasclr_lib.preprocess.resample import PAD_VOXELS

__all__ = [
    "preprocess_subject",
    "preprocess_cohort",
    "parse_shard",
    "shard_sids",
    "load_manifest",
    "qc_summary",
    "cli_main",
]


# --------------------------------------------------------------------------------------------
# shards and the manifest
# --------------------------------------------------------------------------------------------
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


def load_manifest(manifest) -> pd.DataFrame:
    """A manifest DataFrame from a DataFrame, a path or a name (``"synthetic"`` ...).

    Subjects whose files are missing are kept (``read_manifest(..., check_files=False)``): they
    fail at the ``read`` stage and are listed in ``failures.csv`` instead of rejecting the whole
    manifest. Every other problem (a missing column, a duplicated sid, a bad label) still raises
    :class:`~drasclr_lib.data.manifest.ManifestError`.
    """
    from drasclr_lib.data.sources import read_manifest, resolve_manifest

    if isinstance(manifest, pd.DataFrame):
        df = manifest.copy()
        df["sid"] = df["sid"].astype(str)
        return df.reset_index(drop=True)
    path = Path(manifest)
    if not path.exists():
        path = resolve_manifest(str(manifest))
    return read_manifest(path, check_files=False)


# --------------------------------------------------------------------------------------------
# one subject
# --------------------------------------------------------------------------------------------
def preprocess_subject(row, atlas: Atlas, out_dir: str | os.PathLike, *, sid: str | None = None,
                       qc_dice: float = DEFAULT_QC_DICE, segment: bool = False,
                       registration_kwargs: dict | None = None, pad: int = PAD_VOXELS,
                       min_coverage: float = DEFAULT_MIN_COVERAGE) -> SubjectRecord:
    """Preprocess one subject (:func:`~drasclr_lib.preprocess.pipeline.process_scan`) and write it
    to the patch store ``out_dir``.

    Args:
        row: manifest row (mapping or ``pandas.Series``) with ``image`` and optional
            ``lung_mask``, ``label_map``, ``lobe_map``.
        atlas: the :class:`Atlas` subjects are registered to.
        out_dir: patch store folder.
        sid: subject id (default ``row["sid"]``).
        qc_dice: registration Dice under which the subject fails QC (``low_registration_dice``).
        segment: segment the lungs even when the manifest gives a mask; ``mask_dice`` then
            compares the two (how good the segmentation is, e.g. on the synthetic cohort).
        registration_kwargs: extra keyword arguments of ``register_masks``.
        pad: voxels of -1024 HU padding around the 1 mm volume (60 in the paper).
        min_coverage: share of the atlas lung the scan must cover, else it fails QC
            (``partial_fov``; :data:`~drasclr_lib.preprocess.pipeline.DEFAULT_MIN_COVERAGE`).

    Returns:
        The :class:`~drasclr_lib.data.patch_store.SubjectRecord` written to
        ``subjects/<sid>.json`` (``sid``, ``lung_volume_l``, ``laa950``, ``reg_dice``,
        ``mask_dice`` (NaN without a given mask or when the given mask was used), ``qc_reasons``,
        ``qc_pass``, ``fov_lung_coverage``, ``corners_subject``, ``patch_*`` (with
        ``patch_fov_fraction``), ``grid_1mm``, ``transform``, the stage times), its
        ``times`` completed with ``write`` (known only once written).

    Raises:
        PreprocessError: naming the stage, the subject and the file, whatever went wrong.
    """
    sid = str(sid if sid is not None else row["sid"])
    out_dir = Path(out_dir)
    files = manifest_files(row)
    stage = "read"
    try:
        remove_stale_temps(out_dir, sid)
        scan = process_scan(files["image"], atlas, lung_mask=files["lung_mask"], label_map=files["label_map"],
                            lobe_map=files["lobe_map"], sid=sid, segment=segment, pad=pad,
                            registration_kwargs=registration_kwargs)
        stage, t0 = "write", time.perf_counter()
        record = scan.record(qc_dice=qc_dice, min_coverage=min_coverage)
        write_subject(out_dir, sid, scan.patches_hu, label_patches=scan.label_patches, record=record)
    except PreprocessError as err:
        if err.sid is None:
            err.sid = sid
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a PreprocessError naming the stage
        raise PreprocessError(f"{type(exc).__name__}: {exc}", stage=stage, sid=sid, path=files["image"]) from exc
    record.times["write"] = time.perf_counter() - t0  # the record on disk has every other stage's time
    return record


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
             pad: int, atlas: Atlas | None = None, min_coverage: float = DEFAULT_MIN_COVERAGE) -> tuple:
    """Worker body: ``("ok", sid, flat record)`` or ``("fail", sid, stage, message)`` (never raises)."""
    sid = str(row["sid"])
    try:
        rec = preprocess_subject(row, atlas or _WORKER["atlas"], out_dir, sid=sid, qc_dice=qc_dice, segment=segment,
                                 registration_kwargs=registration_kwargs, pad=pad, min_coverage=min_coverage)
        return ("ok", sid, rec.flat())
    except PreprocessError as err:
        return ("fail", sid, err.stage, str(err))
    except BaseException as exc:  # noqa: BLE001 - a worker must report, not die
        if isinstance(exc, KeyboardInterrupt):
            raise
        return ("fail", sid, "write", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")


def preprocess_cohort(manifest, out_dir: str | os.PathLike, *, atlas=None, workers: int = 1, shard: str | None = None,
                      qc_dice: float = DEFAULT_QC_DICE, segment: bool = False, registration_kwargs: dict | None = None,
                      pad: int = PAD_VOXELS, progress: bool = True, min_coverage: float = DEFAULT_MIN_COVERAGE,
                      min_patch_fov: float = MIN_PATCH_FOV) -> PatchStore:
    """Preprocess every subject of a manifest into a patch store (resumable, parallel, sharded).

    Args:
        manifest: a manifest path, a name for ``resolve_manifest`` (``"synthetic"``) or a DataFrame.
        out_dir: the patch store folder.
        atlas: anything :func:`~drasclr_lib.preprocess.atlas_source.resolve_atlas` takes:
            ``None``/``"auto"`` (built from the cohort's reference subject, saved in the store),
            an :class:`Atlas`, ``(mask_path, landmarks_path)`` or a mask path (grid rule).
        workers: parallel processes (1 = in this process).
        shard: ``"K/N"``: only subjects K, K+N, ... of the sorted sids (see the module docstring).
        qc_dice: registration Dice under which a subject fails QC (``low_registration_dice``).
        segment: segment the lungs even where the manifest gives a mask (reports ``mask_dice``).
        registration_kwargs: extra keyword arguments of ``register_masks``.
        pad: voxels of -1024 HU padding around each 1 mm volume (60 in the paper; smaller is
            faster and only matters for patches reaching past the scan).
        progress: show a tqdm bar.
        min_coverage: share of the atlas lung a scan must cover, else it fails QC (``partial_fov``).
        min_patch_fov: share of a patch that must lie inside the scan for the patch to be valid
            (kept in ``store.json`` as ``min_patch_fov``, read by
            :meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`).

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
    the_atlas = resolve_atlas(atlas, store=out_dir, manifest=df, segment=segment, pad=pad)
    ensure_store_meta(out_dir, the_atlas.corners, the_atlas.locs, the_atlas.neighbors(2),
                      patch_size=the_atlas.patch_size, atlas_source=the_atlas.source,
                      atlas_geometry=the_atlas.corner_geometry, qc_dice=float(qc_dice), segment=bool(segment),
                      pad_voxels=int(pad), spacing_mm=1.0, min_coverage=float(min_coverage),
                      min_patch_fov=float(min_patch_fov))
    mine = shard_sids(df["sid"], shard)
    todo = [s for s in mine if not subject_done(out_dir, s)]
    rows = {str(r["sid"]): {k: (None if (isinstance(v, float) and np.isnan(v)) else v) for k, v in r.items()}
            for r in df.to_dict("records")}
    workers = min(int(workers), max(len(todo), 1))
    bar = tqdm(total=len(todo), desc="preprocess", unit="subject", disable=not progress)

    def handle(result):
        if result[0] == "ok":
            clear_failure(out_dir, result[1])
        else:
            _, sid, stage, msg = result
            record_failure(out_dir, sid, stage, msg)
            bar.set_postfix_str(f"failed: {sid} ({stage})")
        bar.update(1)

    try:
        if workers == 1:
            for sid in todo:
                handle(_run_one(rows[sid], str(out_dir), qc_dice, segment, registration_kwargs, pad, atlas=the_atlas,
                                min_coverage=min_coverage))
        else:
            import multiprocessing as mp

            from drasclr_lib.preprocess.resample import available_cores

            ctx = mp.get_context("spawn")
            threads = max(1, available_cores() // workers)
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(the_atlas, threads, ctx.Value("i", 0))) as pool:
                futures = {pool.submit(_run_one, rows[sid], str(out_dir), qc_dice, segment, registration_kwargs, pad,
                                       None, min_coverage): sid
                           for sid in todo}
                for fut in as_completed(futures):
                    try:
                        handle(fut.result())
                    except Exception as exc:  # noqa: BLE001 - a crashed worker process
                        handle(("fail", futures[fut], "write", f"worker crashed: {type(exc).__name__}: {exc}"))
    finally:
        bar.close()
        write_failures_table(out_dir)
        finalize_store(out_dir, df)
    return PatchStore(out_dir)


def qc_summary(table: pd.DataFrame) -> str:
    """The QC part of the ``drasclr preprocess`` summary line: subjects failing QC, and how many
    subjects carry each reason, e.g. ``"2 fail QC; reasons: partial_fov 2, thick_slices 1"``.

    Args:
        table: ``subjects.csv`` rows (``qc_pass``, ``qc_reasons``; stores written before reasons
            were recorded have ``qc_pass`` only).
    """
    from drasclr_lib.preprocess.checks import count_reasons

    failing = int((~table["qc_pass"].astype(bool)).sum()) if "qc_pass" in table and len(table) else 0
    counts = count_reasons(table["qc_reasons"].tolist()) if "qc_reasons" in table else {}
    listed = ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"
    return f"{failing} fail QC; reasons: {listed}"


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr preprocess``: exit 0 when at least one subject of the run's shard is complete."""
    from drasclr_lib.cli_help import HelpFormatter, examples_epilog

    ap = argparse.ArgumentParser(prog="drasclr preprocess", formatter_class=HelpFormatter, description=(
        "CT files -> registered atlas patches (a patch store folder). Each scan is read, resampled to 1 mm,\n"
        "its lungs segmented (or taken from the manifest's lung_mask), registered to the atlas lung mask,\n"
        "and a 32^3 patch cut at every atlas location. Resumable (a rerun skips finished subjects) and\n"
        "shardable over machines (--shard); failed subjects are listed in OUT/failures.csv."),
        epilog=examples_epilog([
            ("the synthetic cohort on the atlas built from its median-lung-volume subject",
             "drasclr preprocess --manifest synthetic --out outputs/patch_store --workers 4"),
            ("your cohort on the published atlas (581 locations), to embed with the released weights",
             "drasclr preprocess --manifest cohort.csv --out store --atlas published --workers 8"),
            ("your cohort on a given atlas mask and landmarks (.npy, (L, 3) voxel corners)",
             "drasclr preprocess --manifest cohort.csv --out store --atlas-mask atlas_lung_mask.nii.gz "
             "--landmarks atlas_patch_loc.npy"),
            ("one of four machines (run K = 0..3 on each, same --out on a shared disk)",
             "drasclr preprocess --manifest cohort.csv --out /shared/store --shard 0/4 --workers 8")]))
    ap.add_argument("--manifest", required=True, help="manifest CSV/YAML, or 'synthetic' / 'lung-pet-ct-dx'")
    ap.add_argument("--out", required=True, help="patch store folder (created; a rerun resumes)")
    ap.add_argument("--atlas", choices=("auto", "published"), default="auto",
                    help="auto: the atlas built from the cohort's median-lung-volume subject; published: the DrasCLR "
                         "release's atlas and 581 landmarks shipped with the package (use it with the released "
                         "weights); --atlas-mask gives another")
    ap.add_argument("--atlas-mask", help="atlas lung mask (e.g. the published atlas_lung_mask.nii.gz) "
                                         "(default: built from the cohort's median-lung-volume subject)")
    ap.add_argument("--landmarks", help="atlas landmarks .npy (L, 3) in the mask's voxel order "
                                        "(default: the grid rule on the --atlas-mask)")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes")
    ap.add_argument("--shard", help="K/N: process subjects K, K+N, ... of the sorted sids (0 <= K < N) "
                                    "(default: all subjects)")
    ap.add_argument("--qc-dice", type=float, default=DEFAULT_QC_DICE,
                    help="registration Dice below which a subject fails QC (low_registration_dice; its patches are "
                         "kept)")
    ap.add_argument("--min-coverage", type=float, default=DEFAULT_MIN_COVERAGE,
                    help="share of the atlas lung a scan must cover, else it fails QC (partial_fov)")
    ap.add_argument("--min-patch-fov", type=float, default=MIN_PATCH_FOV,
                    help="share of a patch inside the scan below which the patch is invalid (never trained on, NaN "
                         "embedding, out of %%LAA-950)")
    ap.add_argument("--pad", type=int, default=PAD_VOXELS,
                    help="voxels of -1024 HU padding around the 1 mm volume (default: %(default)s, as published)")
    ap.add_argument("--segment", action="store_true", help="segment the lungs even when the manifest has lung_mask")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.landmarks and not args.atlas_mask:
        ap.error("--landmarks needs --atlas-mask")
    if args.atlas_mask and args.atlas == "published":
        ap.error("--atlas published and --atlas-mask exclude each other")
    atlas = (args.atlas_mask, args.landmarks) if args.atlas_mask else args.atlas
    try:
        store = preprocess_cohort(args.manifest, args.out, atlas=atlas, workers=args.workers, shard=args.shard,
                                  qc_dice=args.qc_dice, segment=args.segment, pad=args.pad,
                                  progress=not args.no_progress, min_coverage=args.min_coverage,
                                  min_patch_fov=args.min_patch_fov)
    except (ValueError, FileNotFoundError, PreprocessError) as err:
        print(f"drasclr preprocess: {err}", file=sys.stderr)
        return 2
    failures = store.failures()
    df = load_manifest(args.manifest)
    mine = set(shard_sids(df["sid"], args.shard))
    complete = [s for s in store.sids if s in mine]
    print(f"drasclr preprocess: {len(complete)}/{len(mine)} subjects complete in {store.root}, "
          f"{len(failures)} failed, {qc_summary(store.table.loc[complete] if complete else store.table.iloc[:0])}")
    for _, f in failures.head(10).iterrows():
        print(f"  FAILED {f['sid']} [{f['stage']}]: {str(f['error']).splitlines()[0][:200]}")
    if len(failures) > 10:
        print(f"  ... see {store.root / 'failures.csv'}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(cli_main())
