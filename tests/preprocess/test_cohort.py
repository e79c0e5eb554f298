"""The cohort runner on tiny phantoms: failures, resume, kills, shards, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from drasclr_lib.data.patch_store import PatchStore, subject_done
from drasclr_lib.preprocess import cohort
from drasclr_lib.preprocess.atlas_source import resolve_atlas
from drasclr_lib.preprocess.cohort import load_manifest, parse_shard, preprocess_cohort, shard_sids

REPO = Path(__file__).resolve().parents[2]
FAST_REG = {"shrink": (4,), "smoothing": (2,), "iterations": 60}  # one level: enough for phantoms
PAD = 16  # less padding than the paper's 60: 4x fewer voxels, same patches here


def write_phantom(folder: Path, sid: str, *, scale=1.0, shift=(0.0, 0.0, 0.0), seed=0):
    """A tiny chest-like CT (2 x 2 x 2.5 mm voxels) with two ellipsoid lungs and its lung mask."""
    rng = np.random.default_rng(seed)
    size, sp = (64, 52, 40), np.array([2.0, 2.0, 2.5])  # (i, j, k)
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(size[::-1], sp[::-1])], indexing="ij")
    c = np.array(size) * sp / 2 + np.asarray(shift)
    body = ((i - c[0]) / 55) ** 2 + ((j - c[1]) / 42) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)
    mask = np.zeros(hu.shape, np.uint8)
    for lab, side in ((1, -1), (2, 1)):
        lung = (((i - c[0] - side * 24 * scale) / (18 * scale)) ** 2 + ((j - c[1]) / (28 * scale)) ** 2
                + ((k - c[2]) / (38 * scale)) ** 2) < 1
        mask[lung & body] = lab
    hu[mask > 0] = -860.0
    hu[(mask > 0) & (rng.random(hu.shape) < 0.1)] = -980.0
    hu += rng.normal(0, 15, hu.shape)
    img = sitk.GetImageFromArray(hu.astype(np.float32))
    img.SetSpacing(tuple(sp))
    m = sitk.GetImageFromArray(mask)
    m.CopyInformation(img)
    sitk.WriteImage(img, str(folder / f"{sid}.nii.gz"))
    sitk.WriteImage(m, str(folder / f"{sid}_mask.nii.gz"))
    return {"sid": sid, "image": str(folder / f"{sid}.nii.gz"), "lung_mask": str(folder / f"{sid}_mask.nii.gz")}


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    """Three phantoms and one subject whose image is missing; manifest.csv."""
    d = tmp_path_factory.mktemp("phantoms")
    rows = [write_phantom(d, f"s{n}", scale=s, shift=sh, seed=n)
            for n, (s, sh) in enumerate([(1.0, (0, 0, 0)), (0.92, (4, -3, 2)), (1.08, (-3, 2, -4))])]
    rows.append({"sid": "bad", "image": str(d / "bad.nii.gz"), "lung_mask": np.nan})
    for r, fev in zip(rows, (80.0, 60.0, 90.0, 70.0)):
        r["FEV1pp"] = fev
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    return d


@pytest.fixture(scope="module")
def store_dir(cohort_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    preprocess_cohort(cohort_dir / "manifest.csv", out, atlas="auto", registration_kwargs=FAST_REG, pad=PAD, progress=False)
    return out


def test_helpers():
    assert parse_shard(None) is None and parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    sids = ["s10", "s2", "a", "b", "c"]
    parts = [shard_sids(sids, f"{k}/3") for k in range(3)]
    assert sorted(sum(parts, [])) == sorted(sids)  # disjoint and covering
    assert parts[0] == ["a", "s10"] and parts[1] == ["b", "s2"] and parts[2] == ["c"]  # sorted as strings


def test_manifest_with_missing_file_is_kept(cohort_dir):
    df = load_manifest(cohort_dir / "manifest.csv")
    assert sorted(df["sid"]) == ["bad", "s0", "s1", "s2"]
    assert df.set_index("sid").loc["s1", "FEV1pp"] == 60.0


def test_cohort_completes_around_a_bad_subject(store_dir):
    store = PatchStore(store_dir)
    assert store.sids == ["s0", "s1", "s2"]
    fails = store.failures()
    assert fails["sid"].tolist() == ["bad"] and fails["stage"].tolist() == ["read"]
    assert "not found" in fails["error"][0] and "bad" in fails["error"][0]
    assert not (store_dir / "patches" / "bad.npy").exists() and not (store_dir / "subjects" / "bad.json").exists()
    # auto atlas saved for resumed / sharded runs, from the median-lung-volume subject (s0)
    assert (store_dir / "atlas_mask.nii.gz").exists() and (store_dir / "atlas_landmarks.npy").exists()
    meta = json.loads((store_dir / "store.json").read_text())
    assert "s0" in meta["atlas_source"]
    assert np.array_equal(np.load(store_dir / "atlas_landmarks.npy"), store.atlas_corners)
    assert store.num_locations >= 8 and store.neighbors.shape == (store.num_locations, 2)
    assert store.table.loc["s1", "FEV1pp"] == 60.0  # manifest labels joined


def test_records_and_patches(store_dir):
    store = PatchStore(store_dir)
    L = store.num_locations
    for sid in store.sids:
        rec = store.record(sid).to_dict()  # the file's keys and values
        for key in ("lung_volume_l", "laa950", "reg_dice", "mask_dice", "qc_pass", "corners_subject", "patch_lung_fraction",
                    "patch_emph_fraction", "patch_lobe", "patch_laa950", "grid_1mm", "transform", "time_read_s",
                    "time_resample_s", "time_lung_mask_s", "time_register_s", "time_patches_s"):
            assert key in rec, key
        assert rec["reg_dice"] >= 0.8 and rec["qc_pass"]
        # whole phantoms: every patch at least half scanned, no reason to fail
        assert not {r.split(":")[0] for r in rec["qc_reasons"]} & {"partial_fov", "low_registration_dice"}
        assert rec["fov_lung_coverage"] > 0.99 and min(rec["patch_fov_fraction"]) >= 0.5
        assert rec["mean_patch_inside"] == pytest.approx(np.mean(rec["patch_fov_fraction"]), abs=1e-5)
        assert np.asarray(rec["corners_subject"]).shape == (L, 3)
        assert 0.1 < rec["lung_volume_l"] < 0.3  # two ~80-100 ml ellipsoids
        assert 5 < rec["laa950"] < 20  # 10 % of lung voxels set to -980 HU
        patches = store.patches(sid)
        assert patches.shape == (L, 32, 32, 32) and patches.dtype == np.int16
        assert patches.min() >= -1024 and patches.max() <= 240
        # the atlas keeps patches with > 10 % lung; the registered subject's patches hold lung too
        assert np.nanmean(rec["patch_lung_fraction"]) > 0.2
        g = rec["grid_1mm"]
        ct = sitk.ReadImage(rec["image"])
        assert g["spacing"] == [1.0, 1.0, 1.0] and g["size"][0] == (ct.GetSize()[0] - 1) * 2 + 1 + 2 * PAD


def test_resume_skips_completed_subjects(store_dir, cohort_dir, monkeypatch):
    mtimes = {p: p.stat().st_mtime_ns for p in (store_dir / "patches").glob("*.npy")}
    calls = []
    real = cohort.preprocess_subject

    def counting(row, *a, **k):
        calls.append(str(row["sid"]))
        return real(row, *a, **k)

    monkeypatch.setattr(cohort, "preprocess_subject", counting)
    store = preprocess_cohort(cohort_dir / "manifest.csv", store_dir, atlas="auto", registration_kwargs=FAST_REG, pad=PAD,
                              progress=False)
    assert calls == ["bad"]  # only the failed subject is retried
    assert {p: p.stat().st_mtime_ns for p in (store_dir / "patches").glob("*.npy")} == mtimes
    assert store.sids == ["s0", "s1", "s2"] and store.failures()["sid"].tolist() == ["bad"]


def _atlas_of(store_dir):
    return (store_dir / "atlas_mask.nii.gz", store_dir / "atlas_landmarks.npy")


def test_shards_interrupt_and_resume(store_dir, cohort_dir, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    atlas = _atlas_of(store_dir)
    # shard 1/2 of sorted [bad, s0, s1, s2] is s0, s2 (run with two worker processes)
    store = preprocess_cohort(cohort_dir / "manifest.csv", out, atlas=atlas, shard="1/2", workers=2,
                              registration_kwargs=FAST_REG, pad=PAD, progress=False)
    assert store.sids == ["s0", "s2"] and len(store.failures()) == 0
    # the same atlas as the first store (reloaded from its saved files)
    assert np.array_equal(store.atlas_corners, PatchStore(store_dir).atlas_corners)
    assert all(store.record(s).reg_dice >= 0.8 for s in store.sids)

    # shard 0/2 (bad, s1), interrupted while s1's record is being written
    import drasclr_lib.data.patch_store.writer as ps

    real_save_json = ps.save_json

    def dying(obj, path):
        if Path(path).name == "s1.json":
            raise KeyboardInterrupt("simulated kill")
        return real_save_json(obj, path)

    monkeypatch.setattr(ps, "save_json", dying)
    with pytest.raises(KeyboardInterrupt):
        preprocess_cohort(cohort_dir / "manifest.csv", out, atlas=atlas, shard="0/2", registration_kwargs=FAST_REG, pad=PAD,
                          progress=False)
    monkeypatch.setattr(ps, "save_json", real_save_json)
    assert not subject_done(out, "s1")
    assert PatchStore(out).sids == ["s0", "s2"]
    assert not list((out / "subjects").glob(".*part*"))  # atomic writes cleaned their temporary file
    store = preprocess_cohort(cohort_dir / "manifest.csv", out, atlas=atlas, shard="0/2", registration_kwargs=FAST_REG, pad=PAD,
                              progress=False)
    assert store.sids == ["s0", "s1", "s2"] and store.failures()["sid"].tolist() == ["bad"]


def test_sigkill_leaves_no_half_written_subject(store_dir, cohort_dir, tmp_path):
    out = tmp_path / "killed"
    mask, lm = _atlas_of(store_dir)
    script = textwrap.dedent(f"""
        import os, signal
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(os.path.join("subjects", "s2.json")):
                os.kill(os.getpid(), signal.SIGKILL)  # killed after the temporary record was written
            real_replace(src, dst)
        os.replace = replace
        from drasclr_lib.preprocess.cohort import preprocess_cohort
        preprocess_cohort({str(cohort_dir / 'manifest.csv')!r}, {str(out)!r}, atlas=({str(mask)!r}, {str(lm)!r}),
                          shard="3/4", registration_kwargs={FAST_REG!r}, pad={PAD}, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not subject_done(out, "s2") and not (out / "subjects" / "s2.json").exists()
    assert list((out / "subjects").glob(".s2.*part*"))  # the unrenamed temporary file of the killed write
    assert PatchStore(out).sids == []
    store = preprocess_cohort(cohort_dir / "manifest.csv", out, atlas=(mask, lm), shard="3/4",
                              registration_kwargs=FAST_REG, pad=PAD, progress=False)
    assert store.sids == ["s2"] and not list((out / "subjects").glob(".*part*"))


def test_other_atlas_in_same_folder_is_refused(store_dir, cohort_dir, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    shutil.copy(store_dir / "store.json", out / "store.json")
    mask, lm = _atlas_of(store_dir)
    np.save(tmp_path / "fewer.npy", np.load(lm)[:-1])
    with pytest.raises(ValueError, match="another atlas"):
        preprocess_cohort(cohort_dir / "manifest.csv", out, atlas=(mask, tmp_path / "fewer.npy"), progress=False)


def test_cli(store_dir, cohort_dir, tmp_path, capsys):
    code = cohort.cli_main(["--manifest", str(cohort_dir / "manifest.csv"), "--out", str(store_dir), "--no-progress",
                            "--pad", str(PAD)])
    text = capsys.readouterr().out
    assert code == 0 and "3/4 subjects complete" in text and "FAILED bad [read]" in text
    only_bad = tmp_path / "only_bad.csv"
    pd.read_csv(cohort_dir / "manifest.csv").query("sid == 'bad'").to_csv(only_bad, index=False)
    mask, lm = _atlas_of(store_dir)
    code = cohort.cli_main(["--manifest", str(only_bad), "--out", str(tmp_path / "none"), "--atlas-mask", str(mask),
                            "--landmarks", str(lm), "--no-progress"])
    assert code == 1  # no subject succeeded
    assert os.path.exists(tmp_path / "none" / "failures.csv")


def test_auto_atlas_falls_back_when_reference_fails(cohort_dir, tmp_path, monkeypatch):
    from drasclr_lib.preprocess.atlas import Atlas
    from drasclr_lib.preprocess.errors import PreprocessError

    real = Atlas.from_subject.__func__

    def failing(cls, ct, lung_mask=None, *, sid=None, **kw):
        if sid == "s0":
            raise PreprocessError("no lungs in the field of view", stage="lung_mask", sid=sid)
        return real(cls, ct, lung_mask, sid=sid, **kw)

    monkeypatch.setattr(Atlas, "from_subject", classmethod(failing))
    df = load_manifest(cohort_dir / "manifest.csv")
    atlas = resolve_atlas("auto", store=tmp_path, manifest=df, pad=PAD)
    assert "s0" not in atlas.source and (tmp_path / "atlas_landmarks.npy").exists()


def test_patches_are_cut_through_the_registration_transform(cohort_dir, tmp_path):
    """A subject lying 45/-30/25 mm away from the atlas in physical space, smaller and shifted in
    its field of view: only patches cut through the registration transform hold the atlas's
    lung at every location (an identity cut lands on the wrong anatomy, half of it outside)."""
    from drasclr_lib.preprocess.atlas import Atlas
    from drasclr_lib.preprocess.patches import extract_patches
    from drasclr_lib.preprocess.pipeline import scan_to_1mm

    ref = pd.read_csv(cohort_dir / "manifest.csv").set_index("sid").loc["s0"]
    atlas = Atlas.from_subject(ref["image"], ref["lung_mask"], sid="s0", pad=PAD)
    P = atlas.patch_size
    atlas_lung = atlas.mask_array_ijk() > 0
    want = np.array([atlas_lung[i:i + P, j:j + P, k:k + P].mean() for i, j, k in atlas.corners])
    assert len(want) >= 8 and want.std() > 0.1  # locations differ in lung content

    row = write_phantom(tmp_path, "moved", scale=0.9, shift=(6.0, -4.0, 3.0), seed=7)
    for key in ("image", "lung_mask"):  # the same scan, taken at another table position
        img = sitk.ReadImage(row[key])
        img.SetOrigin(tuple(float(o + d) for o, d in zip(img.GetOrigin(), (45.0, -30.0, 25.0))))
        sitk.WriteImage(img, row[key])
    rec = cohort.preprocess_subject(row, atlas, tmp_path / "store", registration_kwargs=FAST_REG, pad=PAD)
    assert rec.reg_dice >= 0.85

    def agreement(frac):
        return np.abs(frac - want).mean(), np.corrcoef(frac, want)[0, 1]

    # the subject's own lung mask, cut at the stored corners (measured: MAD 0.015, r 0.999)
    mad, r = agreement(np.asarray(rec.patch_lung_fraction))
    assert mad < 0.05 and r > 0.95, (mad, r)
    # the stored HU patches themselves: lung voxels are -860 / -980 HU, air -1000, tissue 40;
    # 90 % of the lung lies in (-930, -500) (measured: MAD 0.022, r 0.996)
    hu = np.load(tmp_path / "store" / "patches" / "moved.npy").reshape(len(want), -1)
    mad, r = agreement(((hu > -930) & (hu < -500)).mean(1) / 0.9)
    assert mad < 0.06 and r > 0.95, (mad, r)
    # the test can tell: the identity cut of the same subject is far off (MAD 0.28, r -0.17)
    images = scan_to_1mm(row["image"], lung_mask=row["lung_mask"], sid="moved", pad=PAD)  # the volumes cut above
    ident = extract_patches(images.ct_1mm, atlas, None, lung_1mm=images.lung_1mm)["lung_fraction"]
    assert agreement(ident)[0] > 0.15


def test_cli_counts_each_reason(store_dir, cohort_dir, tmp_path, capsys):
    """A phantom missing the lower 40 % of its slices fails QC with partial_fov; the summary
    line counts it, and subjects.csv holds the reasons."""
    mask, lm = _atlas_of(store_dir)
    rows = pd.read_csv(cohort_dir / "manifest.csv").query("sid in ['s0', 's1']").to_dict("records")
    cut = dict(rows[1], sid="s1cut", image=str(tmp_path / "s1cut.nii.gz"), lung_mask=str(tmp_path / "s1cut_mask.nii.gz"))
    for key in ("image", "lung_mask"):
        img = sitk.ReadImage(rows[1][key])
        sitk.WriteImage(img[:, :, 16:], cut[key])
    pd.DataFrame(rows + [cut]).to_csv(tmp_path / "m.csv", index=False)
    code = cohort.cli_main(["--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "st"), "--atlas-mask",
                            str(mask), "--landmarks", str(lm), "--no-progress", "--pad", str(PAD)])
    text = capsys.readouterr().out
    assert code == 0 and "3/3 subjects complete" in text
    assert "1 fail QC" in text and "partial_fov 1" in text, text
    table = pd.read_csv(tmp_path / "st" / "subjects.csv", dtype={"sid": str}).set_index("sid")
    assert table.loc["s1cut", "qc_reasons"].startswith("partial_fov:") and not table.loc["s1cut", "qc_pass"]
    assert table.loc["s1cut", "fov_lung_coverage"] < 0.9 <= table.loc["s0", "fov_lung_coverage"]
    assert table.loc["s0", "qc_pass"] and "partial_fov" not in str(table.loc["s0", "qc_reasons"])
    store = PatchStore(tmp_path / "st")
    assert store.meta["min_patch_fov"] == 0.5 and store.meta["min_coverage"] == 0.9
    assert not store.valid_patches("s1cut").all() and store.valid_patches("s0").all()


def test_qc_summary_of_old_and_new_tables():
    assert cohort.qc_summary(pd.DataFrame({"qc_pass": [True, False]})) == "1 fail QC; reasons: none"
    t = pd.DataFrame({"qc_pass": [True, False, False],
                      "qc_reasons": [np.nan, "partial_fov:0.82;thick_slices:5.0mm", "partial_fov:0.7"]})
    assert cohort.qc_summary(t) == "2 fail QC; reasons: partial_fov 2, thick_slices 1"
