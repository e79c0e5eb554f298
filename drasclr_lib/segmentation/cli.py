"""``drasclr segment``: whole-scan emphysema labels from a fine-tuned segmenter, one NIfTI per CT.

Each input (a CT file, a DICOM series folder, or a folder of CT files) goes through
:func:`~drasclr_lib.segmentation.inference.segment_scan`: the per-scan pipeline of the store
writer on the atlas the segmenter was fine-tuned with, every atlas patch segmented with its own
location, the patches blended back, and the labels written as a uint8 NIfTI on the input's grid
(same size, spacing, origin, direction). The segmenter file is the one
:func:`~drasclr_lib.segmentation.model.save_segmenter` writes (notebook 05:
``$DRASCLR_OUT/05_segmentation/segmenter.pt``); it records the store it was fine-tuned on, whose
atlas is used unless ``--atlas`` names another, and its atlas corners, against which any atlas
is checked: the model's location inputs mean those places only.

Exit codes: ``0`` every scan segmented; ``1`` at least one scan failed (the others are written,
the failures listed); ``2`` unusable arguments (model, atlas, device, inputs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

__all__ = ["cli_main", "scan_inputs", "output_paths", "CT_SUFFIXES"]

#: File name endings read as CT volumes when a folder of files is given.
CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class UsageError(Exception):
    """Arguments that cannot work (exit code 2); the message says why."""


def _is_dicom_series(folder: Path) -> bool:
    import SimpleITK as sitk

    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def scan_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """The scans named by ``inputs``: CT files as given; a folder is one DICOM series when it holds
    one, else every CT file in it (sorted; earlier ``*_emphysema_seg.nii.gz`` outputs skipped).

    Raises:
        UsageError: for a path that does not exist, or a folder without a scan.
    """
    from drasclr_lib.segmentation.inference import SEG_SUFFIX

    scans: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise UsageError(f"input not found: {path.resolve()}")
        if path.is_file():
            scans.append(path)
            continue
        if _is_dicom_series(path):
            scans.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(CT_SUFFIXES)
                       and not p.name.endswith(SEG_SUFFIX))
        if not found:
            raise UsageError(f"{path}: neither a DICOM series nor a folder of CT files ({', '.join(CT_SUFFIXES)})")
        scans += found
    return scans


def output_paths(scans: list[Path], out: str | os.PathLike | None) -> list[Path]:
    """Where each scan's labels go: next to it (``<stem>_emphysema_seg.nii.gz``) without ``out``; ``out``
    itself for a single scan when it ends in ``.nii``/``.nii.gz``; else ``out/<stem>_emphysema_seg.nii.gz``.

    Raises:
        UsageError: when two scans would write the same file.
    """
    from drasclr_lib.segmentation.inference import default_output_path

    if out is not None and str(out).lower().endswith((".nii", ".nii.gz")):
        if len(scans) != 1:
            raise UsageError(f"--out {out} is one file but {len(scans)} scans were given: give a folder")
        return [Path(out)]
    paths = [default_output_path(s) if out is None else Path(out) / default_output_path(s).name for s in scans]
    seen: dict[Path, Path] = {}
    for scan, path in zip(scans, paths):
        if path in seen:
            raise UsageError(f"{seen[path]} and {scan} would both be written to {path}; segment them separately")
        seen[path] = scan
    return paths


def _atlas_argument(atlas: str | None, landmarks: str | None, recorded: str | None):
    """The ``atlas`` for :func:`resolve_atlas` from ``--atlas``/``--landmarks`` or the model's record."""
    if atlas is None:
        if landmarks:
            raise UsageError("--landmarks goes with an --atlas lung-mask file")
        if not recorded:
            raise UsageError("the segmenter file records no store: give --atlas (the store folder it was fine-tuned "
                             "on, 'published', or the atlas lung mask)")
        if not Path(recorded).is_dir():
            raise UsageError(f"the store the segmenter was fine-tuned on is not here ({recorded}): give --atlas "
                             "(that store folder, or the atlas it was made with)")
        return recorded
    if landmarks:
        if atlas == "published" or Path(atlas).is_dir():
            raise UsageError("--landmarks goes with an --atlas lung-mask file, not a store or 'published'")
        return (atlas, landmarks)
    return atlas


def _check_atlas(corners: np.ndarray, recorded: np.ndarray | None, atlas_text: str) -> None:
    if recorded is None or np.array_equal(np.asarray(corners), recorded):
        return
    raise UsageError(f"the atlas {atlas_text} has other locations ({len(corners)} landmarks) than the one the "
                     f"segmenter was fine-tuned on ({len(recorded)} landmarks): its location inputs would mean other "
                     "places. Give the store it was fine-tuned on, or the atlas that store was made with")


def _volumes_ml(seg_path: Path, names: list[str]) -> str:
    """``emphysema 123.4 ml`` per foreground class of a written label file."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(seg_path))
    counts = np.bincount(sitk.GetArrayViewFromImage(img).ravel(), minlength=len(names))
    voxel_ml = float(np.prod(img.GetSpacing())) / 1000.0
    return ", ".join(f"{names[c]} {counts[c] * voxel_ml:.1f} ml" for c in range(1, len(names)))


def cli_main(argv: list[str] | None = None) -> int:
    """``drasclr segment CT [CT ...] --model FILE [options]``; returns 0, 1 (a scan failed) or 2 (bad arguments)."""
    from drasclr_lib.cli_help import command_parser

    p = command_parser(
        "drasclr segment",
        "Label emphysema in whole CT scans with a fine-tuned segmenter: each scan is resampled to 1 mm,\n"
        "its lungs segmented (or --lung-mask), registered to the atlas the segmenter was fine-tuned on,\n"
        "every atlas patch segmented with its location, and the labels written as a uint8 NIfTI on the\n"
        "input's own grid (0 background; 1 emphysema, or 1-3 centrilobular/panlobular/paraseptal).",
        [("one scan, the labels next to it (scan_emphysema_seg.nii.gz)",
          "drasclr segment scan.nii.gz --model outputs/05_segmentation/segmenter.pt"),
         ("a folder of scans on a GPU, the labels into one folder",
          "drasclr segment scans/ --model segmenter.pt --out labels/ --device cuda --batch-size 128"),
         ("a DICOM series with its lung mask, on the published atlas",
          "drasclr segment dicom/series1 --model segmenter.pt --atlas published --lung-mask mask.nii.gz "
          "--out series1_seg.nii.gz")],
        note="exit status: 0 every scan segmented, 1 a scan failed (the others are written), 2 unusable arguments.")
    p.add_argument("inputs", nargs="+", metavar="CT",
                   help="CT files (NIfTI, NRRD, MHA) or folders: a DICOM series folder, or a folder of CT files "
                        "(each one segmented)")
    p.add_argument("--model", required=True,
                   help="fine-tuned segmenter file (save_segmenter; notebook 05 writes "
                        "$DRASCLR_OUT/05_segmentation/segmenter.pt)")
    p.add_argument("--atlas", help="the atlas of the segmenter's training store: that store folder, 'published', or "
                                   "an atlas lung-mask file (with --landmarks) (default: the store recorded in the "
                                   "segmenter file)")
    p.add_argument("--landmarks", help="atlas landmarks .npy, (L, 3) voxel corners, for an --atlas mask file "
                                       "(default: the grid rule on the mask)")
    p.add_argument("--out", help="output .nii.gz file (one scan) or folder (default: <scan>_emphysema_seg.nii.gz "
                                 "next to each scan)")
    p.add_argument("--lung-mask", help="lung mask on the scan's grid, for a single scan (default: segmented from "
                                       "the CT)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=32, help="patches per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")

    from drasclr_lib.preprocess.atlas_source import resolve_atlas
    from drasclr_lib.preprocess.errors import PreprocessError
    from drasclr_lib.segmentation.inference import segment_scan
    from drasclr_lib.segmentation.model import load_segmenter
    from drasclr_lib.segmentation.train import class_names
    from drasclr_lib.utils import resolve_device

    try:
        scans = scan_inputs(args.inputs)
        if args.lung_mask and len(scans) != 1:
            raise UsageError(f"--lung-mask is one scan's mask but {len(scans)} scans were given")
        outs = output_paths(scans, args.out)
        device = resolve_device(args.device)
        model, info = load_segmenter(args.model)
        atlas_arg = _atlas_argument(args.atlas, args.landmarks, info["atlas_store"])
        atlas = resolve_atlas(atlas_arg)
        _check_atlas(atlas.corners, info["atlas_corners"], str(atlas_arg))
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"drasclr segment: {err}", file=sys.stderr)
        return 2
    names = class_names(model.num_classes)
    print(f"drasclr segment: {len(scans)} scan(s), {model.num_classes} classes ({', '.join(names)}), atlas with "
          f"{len(atlas.corners)} locations, device {device}")
    failed = []
    for scan, out in zip(scans, outs):
        try:
            path = segment_scan(model, scan, atlas=atlas, out_path=out, lung_mask_path=args.lung_mask,
                                batch_size=args.batch_size, device=str(device), sid=scan.name,
                                progress=not args.no_progress)
        except (PreprocessError, ValueError, RuntimeError, OSError) as err:
            failed.append(scan)
            print(f"  FAILED {scan}: {str(err).splitlines()[0][:300]}", file=sys.stderr)
            continue
        print(f"  {scan} -> {path} ({_volumes_ml(path, names)})")
    if failed:
        print(f"drasclr segment: {len(failed)} of {len(scans)} scan(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
