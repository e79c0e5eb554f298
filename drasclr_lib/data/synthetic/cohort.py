"""Write a synthetic cohort: NIfTI volumes per subject and the manifest (``make_cohort``, CLI)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from drasclr_lib.data.synthetic.anatomy import Geometry
from drasclr_lib.data.synthetic.clinical import COEF, clinical_table_row, emphysema_targets, sample_latents
from drasclr_lib.data.synthetic.render import SubjectSpec, render_subject
from drasclr_lib.utils import atomic_path, load_json, save_json

__all__ = ["make_cohort", "cli_main", "resolve_size", "sample_spec", "generate_subject", "MANIFEST_COLUMNS", "SIZES"]

GENERATOR_VERSION = 2
#: named sizes -> scale of the adult template (demo: body ~215 mm wide, lungs ~175 x 160 mm)
SIZES = {"demo": 0.68, "adult": 1.0}
FOLDERS = {"image": "images", "lung_mask": "lung_masks", "label_map": "labels", "lobe_map": "lobes"}
MANIFEST_COLUMNS = ["sid", "image", "lung_mask", "label_map", "lobe_map", "FEV1pp", "FEV1_FVC", "GOLD", "emph_grade",
                    "paraseptal_grade", "age", "sex", "pack_years", "time", "event", "split", "emph_fraction",
                    "emph_centrilobular", "emph_panlobular", "emph_paraseptal", "severity", "airway_wall",
                    "mucus_plugging", "w_centrilobular", "w_panlobular", "w_paraseptal", "laa950", "lung_volume_ml", "mean_lung_hu",
                    "inspiration", "noise_hu", "hu_offset", "scale", "seconds"]
DISEASE_OPTIONS = {"severity", "airway_wall", "mucus_plugging", "healthy_fraction", "subtype_mix"}


def resolve_size(size) -> float:
    """``"demo"``, ``"adult"`` or a float scale of the adult template (0.3 .. 1.3) -> scale."""
    if isinstance(size, str) and size in SIZES:
        return SIZES[size]
    try:
        scale = float(size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be one of {sorted(SIZES)} or a float scale, got {size!r}") from None
    if not 0.3 <= scale <= 1.3:
        raise ValueError(f"size scale must be in [0.3, 1.3] (1.0 = adult), got {scale}")
    return scale


def _check_options(opts: dict) -> dict:
    unknown = set(opts) - DISEASE_OPTIONS
    if unknown:
        raise TypeError(f"unknown disease option(s) {sorted(unknown)}; allowed: {sorted(DISEASE_OPTIONS)}")
    for key in ("severity", "airway_wall", "mucus_plugging", "healthy_fraction"):
        v = opts.get(key)
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{key} must be in [0, 1] or None, got {v}")
    mix = opts.get("subtype_mix")
    if mix is not None:
        mix = np.asarray(mix, float)
        if mix.shape != (3,) or np.any(mix < 0) or mix.sum() <= 0:
            raise ValueError(f"subtype_mix must be 3 non-negative weights (cl, pl, ps), got {opts['subtype_mix']}")
        opts = {**opts, "subtype_mix": [float(x) for x in mix / mix.sum()]}
    return opts


def _rotation(yaw, pitch, roll):
    cz, sz, cx, sx, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def sample_spec(seed: int, index: int, scale: float, spacing, **options) -> tuple[SubjectSpec, dict, np.random.Generator]:
    """The rendering spec and latents of subject ``index`` of a cohort with ``seed``.

    Streams are derived from ``SeedSequence([seed, index])`` (latents, anatomy, clinical), so a
    subject does not depend on the cohort size, the number of workers, or options that fix
    other latents.

    Returns:
        (spec, latents, clinical_rng)
    """
    ss = np.random.SeedSequence([int(seed), int(index)])
    r_lat, r_anat, r_clin = (np.random.default_rng(s) for s in ss.spawn(3))
    hf = options.get("healthy_fraction")
    lat = sample_latents(r_lat, healthy_fraction=0.25 if hf is None else float(hf))
    lat["split_u"] = float(r_lat.random())
    if options.get("severity") is not None:
        lat["severity"] = float(options["severity"])
    if options.get("airway_wall") is not None:
        lat["airway_wall"] = float(options["airway_wall"])
    if options.get("mucus_plugging") is not None:
        lat["mucus_plugging"] = float(options["mucus_plugging"])
    if options.get("subtype_mix") is not None:
        lat["w_centrilobular"], lat["w_panlobular"], lat["w_paraseptal"] = options["subtype_mix"]
    male = lat["sex"] == "M"
    u = r_anat.random(16)
    ins = 2 * u[0] - 1
    dome_r = (48 + 14 * u[1]) * (1 - 0.15 * ins)
    geom = Geometry(scale=scale, bx=(0.95 + 0.1 * u[2]) * (1.025 if male else 0.975),
                    by=(0.94 + 0.12 * u[3]) * (1.025 if male else 0.975), hz=(1 + 0.04 * ins) * (0.97 + 0.06 * u[4]),
                    fat=(6 + 16 * u[5]) * (0.9 if male else 1.1),
                    rotation=_rotation(*np.deg2rad([8 * u[6] - 4, 4 * u[7] - 2, 4 * u[8] - 2])),
                    shift=np.array([(16 * u[9] - 8) * scale, (16 * u[10] - 8) * scale, 8 * u[11] - 4]),
                    dome_r=dome_r, dome_l=dome_r - 5 - 7 * u[12], fissure_dz=16 * u[13] - 8)
    f_cl, f_pl, f_ps = emphysema_targets(lat)
    u2 = r_anat.random(8)
    spec = SubjectSpec(geometry=geom, spacing=tuple(float(s) for s in spacing), f_centrilobular=f_cl,
                       f_panlobular=f_pl, f_paraseptal=f_ps, airway_wall=lat["airway_wall"],
                       parenchyma_hu=float(-852 - 22 * ins + 12 * (u2[0] - 0.5)), gradient_hu=15 + 20 * u2[1],
                       texture_hu=16 + 10 * u2[2], noise_hu=10 + 18 * u2[3], recon_sigma_mm=0.35 + 0.35 * u2[4],
                       hu_offset=40 * u2[5] - 20, pruning=float(np.clip(f_pl / 0.12, 0, 1)),
                       seed=int(r_anat.integers(2**31)), mucus_plugging=lat["mucus_plugging"])
    lat["inspiration"] = float(ins)
    return spec, lat, r_clin


def _config(seed, index, scale, spacing, options) -> dict:
    return {"version": GENERATOR_VERSION, "seed": int(seed), "index": int(index), "scale": float(scale),
            "spacing": [float(s) for s in spacing], "options": {k: options[k] for k in sorted(options)},
            "clinical": dict(COEF)}  # other coefficients, other labels: an existing subject is not reused


def _sid(index: int) -> str:
    return f"syn{index:04d}"


def _files(out_dir: Path, sid: str) -> dict:
    return {k: out_dir / folder / f"{sid}.nii.gz" for k, folder in FOLDERS.items()}


def _save_nifti(array, affine, path, dtype):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def generate_subject(out_dir, seed: int, index: int, scale: float, spacing, options: dict) -> dict:
    """Render subject ``index`` and write its four NIfTI files and its record (written last).

    Returns:
        the subject's record (manifest row without ``split``, plus ``config`` and ``split_u``).

    Raises:
        RuntimeError: naming the subject when rendering or writing fails.
    """
    out_dir = Path(out_dir)
    sid = _sid(index)
    t0 = time.perf_counter()
    try:
        spec, lat, r_clin = sample_spec(seed, index, scale, spacing, **options)
        vol = render_subject(spec)
        files = _files(out_dir, sid)
        _save_nifti(vol["image"], vol["affine"], files["image"], np.int16)
        for key in ("lung_mask", "label_map", "lobe_map"):
            _save_nifti(vol[key], vol["affine"], files[key], np.uint8)
    except Exception as exc:  # noqa: BLE001 - re-raised with the subject's name
        raise RuntimeError(f"synthetic subject {sid} (seed={seed}, index={index}) failed in {out_dir}: "
                           f"{type(exc).__name__}: {exc}") from exc
    st = vol["stats"]
    rec = {"sid": sid, **{k: f"{FOLDERS[k]}/{sid}.nii.gz" for k in FOLDERS}}
    rec.update(clinical_table_row(lat, st, r_clin))
    rec.update({k: st[k] for k in ("emph_fraction", "emph_centrilobular", "emph_panlobular", "emph_paraseptal",
                                   "laa950", "lung_volume_ml", "mean_lung_hu")})
    rec.update({k: lat[k] for k in ("severity", "airway_wall", "mucus_plugging", "w_centrilobular", "w_panlobular", "w_paraseptal",
                                    "inspiration", "split_u")})
    rec.update({"noise_hu": spec.noise_hu, "hu_offset": spec.hu_offset, "scale": scale,
                "seconds": round(time.perf_counter() - t0, 3), "config": _config(seed, index, scale, spacing, options)})
    save_json(rec, out_dir / "records" / f"{sid}.json")
    return rec


def _existing(out_dir: Path, seed, index, scale, spacing, options):
    sid = _sid(index)
    rec_path = out_dir / "records" / f"{sid}.json"
    if not rec_path.exists() or not all(p.exists() for p in _files(out_dir, sid).values()):
        return None
    rec = load_json(rec_path)
    if rec.get("config") != _config(seed, index, scale, spacing, options):
        raise ValueError(f"{out_dir} already holds subject {sid} generated with other parameters "
                         f"({rec.get('config')}); use overwrite=True or another out_dir")
    return rec


def _assign_splits(split_u: np.ndarray) -> list[str]:
    """train/val/test (~70/15/15) by rank of each subject's own uniform draw."""
    n = len(split_u)
    n_val = n_test = max(1, int(round(0.15 * n))) if n >= 3 else 0
    order = np.argsort(split_u, kind="stable")
    split = np.array(["train"] * n, dtype=object)
    split[order[:n_test]] = "test"
    split[order[n_test:n_test + n_val]] = "val"
    return list(split)


def make_cohort(out_dir, n_subjects: int = 24, seed: int = 0, *, size="demo", spacing=(0.8, 0.8, 2.5),
                workers: int = 2, overwrite: bool = False, progress: bool = True, **disease_options) -> Path:
    """Write a synthetic lung-CT cohort and its manifest.

    Layout of ``out_dir``::

        images/<sid>.nii.gz      int16 HU, RAS affine with ``spacing`` (default 0.8 x 0.8 x 2.5 mm)
        lung_masks/<sid>.nii.gz  uint8, 1 right lung, 2 left lung (trachea, main bronchi excluded)
        labels/<sid>.nii.gz      uint8, 0 none, 1 centrilobular, 2 panlobular, 3 paraseptal
        lobes/<sid>.nii.gz       uint8, 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL
        records/<sid>.json       the subject's row and generation config (written last)
        manifest.csv             one row per subject, paths relative to this folder

    Manifest columns: ``sid, image, lung_mask, label_map, lobe_map, FEV1pp, FEV1_FVC, GOLD,
    emph_grade, paraseptal_grade, age, sex, pack_years, time, event, split, emph_fraction,
    emph_centrilobular, emph_panlobular, emph_paraseptal`` (fractions of lung voxels, measured on
    the label map), the latents ``severity`` (0..1 emphysema severity), ``airway_wall`` (0..1
    airway wall thickening), ``mucus_plugging`` (0..1 share of distal airways plugged), ``w_*`` (subtype mixture weights), ``inspiration`` (-1..1), and
    measurements ``laa950`` (% lung voxels < -950 HU in the written image), ``lung_volume_ml``,
    ``mean_lung_hu``, ``noise_hu``, ``hu_offset``, ``scale``, ``seconds`` (generation time). The
    clinical model is documented in :mod:`drasclr_lib.data.synthetic.clinical`.

    Subjects are independent: subject ``i`` depends only on ``(seed, i)`` and the options, never
    on ``n_subjects`` or ``workers`` (splits are assigned by rank, so they depend on the cohort).

    Args:
        out_dir: output folder (created).
        n_subjects: number of subjects (sids ``syn0000`` ...).
        seed: cohort seed.
        size: ``"demo"`` (body ~215 mm wide, ~6 M voxels, ~2 s per subject), ``"adult"``
            (350 x 300 x 310 mm field, ~20 M voxels) or a float scale of the adult template.
        spacing: voxel size in mm (x, y, z).
        workers: parallel processes (1 = in this process).
        overwrite: regenerate subjects that already exist.
        progress: show a tqdm bar.
        **disease_options: ``severity`` (fix every subject's severity, 0..1), ``airway_wall``
            (fix the airway wall thickening, 0..1), ``mucus_plugging`` (fix the plugging, 0..1), ``healthy_fraction`` (share of subjects
            without emphysema, default 0.25), ``subtype_mix`` (3 weights cl, pl, ps).

    Returns:
        Path of ``manifest.csv``.

    Raises:
        ValueError: bad size, spacing, counts, options, or an existing subject made with other
            parameters (without ``overwrite``).
        TypeError: an unknown disease option.
        RuntimeError: a subject failed (the message names it).
    """
    if int(n_subjects) < 1:
        raise ValueError(f"n_subjects must be >= 1, got {n_subjects}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0 or max(spacing) > 6:
        raise ValueError(f"spacing must be 3 positive values in mm (<= 6), got {spacing}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    scale = resolve_size(size)
    options = _check_options(dict(disease_options))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    records: dict[int, dict] = {}
    todo = []
    for i in range(int(n_subjects)):
        rec = None if overwrite else _existing(out_dir, seed, i, scale, spacing, options)
        if rec is None:
            todo.append(i)
        else:
            records[i] = rec
    bar = tqdm(total=len(todo), desc=f"synthetic cohort ({len(records)} exist)", disable=not progress or not todo)
    if int(workers) == 1 or len(todo) <= 1:
        for i in todo:
            records[i] = generate_subject(out_dir, seed, i, scale, spacing, options)
            bar.update()
    else:
        # fork (Linux) needs no `if __name__ == "__main__"` guard in user scripts; spawn elsewhere
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with cf.ProcessPoolExecutor(max_workers=min(int(workers), len(todo)), mp_context=ctx) as pool:
            futs = {pool.submit(generate_subject, out_dir, seed, i, scale, spacing, options): i for i in todo}
            for fut in cf.as_completed(futs):
                records[futs[fut]] = fut.result()
                bar.update()
    bar.close()

    rows = [records[i] for i in range(int(n_subjects))]
    splits = _assign_splits(np.array([r["split_u"] for r in rows]))
    table = pd.DataFrame([{**r, "split": s} for r, s in zip(rows, splits)])
    table = table[MANIFEST_COLUMNS]
    manifest = out_dir / "manifest.csv"
    with atomic_path(manifest) as tmp:
        table.to_csv(tmp, index=False)
    return manifest


def cli_main(argv=None) -> int:
    """``drasclr synth --out DIR [--n N] [--seed S] [--size demo|adult|SCALE] [--workers W]``: prints the manifest."""
    from drasclr_lib.cli_help import command_parser

    p = command_parser(
        "drasclr synth",
        "Write a synthetic lung-CT cohort (NIfTI CT, lung masks, lobe maps, voxel emphysema labels) and its\n"
        "manifest.csv with clinical labels generated from the latent disease. Subject i depends only on\n"
        "(seed, i), so a rerun with more subjects keeps the first ones; existing subjects are reused.",
        [("the notebooks' default cohort (24 subjects, ~2 s each)", "drasclr synth --out outputs/synthetic_cohort"),
         ("a larger, adult-sized cohort on 8 processes",
          "drasclr synth --out cohort --n 200 --size adult --spacing 0.7 0.7 1.25 --workers 8")])
    p.add_argument("--out", required=True, help="output folder (created): images/, lung_masks/, labels/, lobes/, "
                                               "manifest.csv")
    p.add_argument("--n", type=int, default=24, help="number of subjects (sids syn0000, syn0001, ...)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed")
    p.add_argument("--size", default="demo", help="body size: demo (~215 mm wide), adult (350 x 300 x 310 mm "
                                                 "field), or a float scale of the adult template")
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), metavar=("X", "Y", "Z"),
                   help="voxel size in mm")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (1: in this process)")
    p.add_argument("--overwrite", action="store_true", help="regenerate subjects that already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    path = make_cohort(args.out, args.n, args.seed, size=args.size, spacing=args.spacing, workers=args.workers,
                       overwrite=args.overwrite, progress=not args.no_progress)
    print(path)
    return 0
