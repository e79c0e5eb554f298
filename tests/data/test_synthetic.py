"""The synthetic cohort: files and geometry, determinism, disease dose-response, clinical rules."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from drasclr_lib.data.synthetic import MANIFEST_COLUMNS, cli_main, gold_stage, make_cohort, plot_subject, resolve_size
from drasclr_lib.data.synthetic.clinical import EMPH_GRADE_BINS, PARASEPTAL_GRADE_BINS
from drasclr_lib.data.synthetic.cohort import sample_spec
from drasclr_lib.data.synthetic.render import render_subject

SMALL = 0.45  # template scale for fast tests (~2 M voxels per subject)
SPACING = (0.8, 0.8, 2.5)


def _load(manifest, row, key):
    return np.asarray(nib.load(manifest.parent / row[key]).dataobj)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = make_cohort(out, 3, seed=7, size=SMALL, workers=1, progress=False)
    return manifest, pd.read_csv(manifest)


def _one(tmp_path, name, seed=11, **opts):
    m = make_cohort(tmp_path / name, 1, seed=seed, size=SMALL, workers=1, progress=False, **opts)
    row = pd.read_csv(m).iloc[0]
    return m, row


def test_files_manifest_and_geometry(cohort):
    manifest, df = cohort
    assert list(df.columns) == MANIFEST_COLUMNS
    assert df["sid"].is_unique and len(df) == 3
    assert set(df["split"]) <= {"train", "val", "test"} and set(df["sex"]) <= {"M", "F"}
    for _, row in df.iterrows():
        img = nib.load(manifest.parent / row["image"])
        assert img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms()[:3], SPACING)
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), SPACING)
        hu = np.asarray(img.dataobj)
        lung, lab, lobe = (_load(manifest, row, k) for k in ("lung_mask", "label_map", "lobe_map"))
        assert lung.shape == lab.shape == lobe.shape == hu.shape
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert abs(float(np.median(hu[:3, :3, :])) + 1000) < 40  # air outside the body
        body = hu > -500
        assert np.mean((hu[body] > 300)) > 0.005  # bone (ribs, spine)
        assert np.mean((hu[body] > -130) & (hu[body] < -70)) > 0.02  # fat
        assert set(np.unique(lung)) == {0, 1, 2} and set(np.unique(lab)) <= {0, 1, 2, 3}
        assert not np.any(lab[lung == 0]), "emphysema labels outside the lung"
        # lobes partition the lung mask: right lung = lobes 1-3, left lung = lobes 4-5, all present
        assert np.array_equal(lobe > 0, lung > 0)
        assert set(np.unique(lobe[lung == 1])) == {1, 2, 3} and set(np.unique(lobe[lung == 2])) == {4, 5}
        # right lung on the subject's right (+x in RAS)
        xs = np.nonzero(lung)[0]
        assert np.nonzero(lung == 1)[0].mean() > np.nonzero(lung == 2)[0].mean()
        assert xs.min() > 0 and xs.max() < hu.shape[0] - 1
        # the lung is air-like: parenchyma far below soft tissue, nothing of it touches the border
        assert -900 < np.median(hu[lung > 0]) < -700
        assert not lung[:, :, 0].any() and not lung[:, :, -1].any()
        assert np.isclose(row["emph_fraction"], np.mean(lab[lung > 0] > 0), atol=1e-6)


def test_deterministic_and_independent_of_workers(cohort, tmp_path):
    manifest, df = cohort
    m2 = make_cohort(tmp_path / "again", 3, seed=7, size=SMALL, workers=2, progress=False)
    df2 = pd.read_csv(m2)
    pd.testing.assert_frame_equal(df.drop(columns="seconds"), df2.drop(columns="seconds"))
    for _, row in df.iterrows():
        for key in ("image", "label_map", "lobe_map", "lung_mask"):
            assert np.array_equal(_load(manifest, row, key), _load(m2, row, key)), (row["sid"], key)
    other = pd.read_csv(make_cohort(tmp_path / "other", 1, seed=8, size=SMALL, workers=1, progress=False))
    assert other.loc[0, "FEV1pp"] != df.loc[0, "FEV1pp"]


def test_resume_skips_complete_subjects_and_rejects_other_parameters(cohort):
    manifest, df = cohort
    rec = manifest.parent / "records" / f"{df.loc[0, 'sid']}.json"
    before = rec.stat().st_mtime_ns
    again = make_cohort(manifest.parent, 3, seed=7, size=SMALL, workers=1, progress=False)
    assert rec.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(pd.read_csv(again), df)
    with pytest.raises(ValueError, match="other parameters"):
        make_cohort(manifest.parent, 3, seed=8, size=SMALL, workers=1, progress=False)


def test_severity_raises_laa950_lowers_fev1_and_labels_match_low_attenuation(tmp_path):
    rows = []
    for s in (0.0, 0.35, 0.8):
        m, row = _one(tmp_path, f"s{s}", severity=s, airway_wall=0.2, subtype_mix=(0.5, 0.35, 0.15))
        rows.append(row)
        if s > 0:
            hu, lab, lung = (_load(m, row, k) for k in ("image", "label_map", "lung_mask"))
            labelled, normal = hu[lab > 0], hu[(lab == 0) & (lung > 0)]
            assert labelled.mean() < normal.mean() - 100, "labels do not sit on low-attenuation voxels"
            assert np.mean(labelled < -950) > 0.4
            assert np.mean(normal < -950) < 0.05
            assert set(np.unique(lab)) == {0, 1, 2, 3}
    laa = [r["laa950"] for r in rows]
    emph = [r["emph_fraction"] for r in rows]
    fev1 = [r["FEV1pp"] for r in rows]
    assert laa[0] < 1.0 and emph[0] == 0
    assert laa[0] < laa[1] < laa[2] and laa[2] > 8
    assert emph[0] < emph[1] < emph[2]
    assert fev1[0] > fev1[1] > fev1[2]


def test_centrilobular_is_upper_and_panlobular_lower_predominant(tmp_path):
    m, row = _one(tmp_path, "mix", severity=0.7, subtype_mix=(0.5, 0.5, 0.0))
    lab, lobe = _load(m, row, "label_map"), _load(m, row, "lobe_map")
    upper, lower = np.isin(lobe, (1, 4)), np.isin(lobe, (3, 5))
    assert np.mean(lab[upper] == 1) > 2 * np.mean(lab[lower] == 1)
    assert np.mean(lab[lower] == 2) > 2 * np.mean(lab[upper] == 2)


def test_airway_wall_lowers_fev1_without_changing_laa950(tmp_path):
    _, thin = _one(tmp_path, "thin", severity=0.35, airway_wall=0.0)
    _, thick = _one(tmp_path, "thick", severity=0.35, airway_wall=1.0)
    assert thick["FEV1pp"] < thin["FEV1pp"] - 20
    assert thick["FEV1_FVC"] < thin["FEV1_FVC"]
    assert abs(thick["laa950"] - thin["laa950"]) < 0.1 * thin["laa950"] + 0.2
    assert abs(thick["emph_fraction"] - thin["emph_fraction"]) < 0.1 * thin["emph_fraction"]


def test_mucus_plugging_is_drawn_lowers_fev1_and_barely_changes_laa950(tmp_path):
    m0, clear = _one(tmp_path, "clear", severity=0.35, airway_wall=0.3, mucus_plugging=0.0)
    m1, plugged = _one(tmp_path, "plugged", severity=0.35, airway_wall=0.3, mucus_plugging=1.0)
    assert plugged["mucus_plugging"] == 1.0 and clear["mucus_plugging"] == 0.0
    assert plugged["FEV1pp"] < clear["FEV1pp"] - 20
    assert plugged["FEV1_FVC"] < clear["FEV1_FVC"]
    assert abs(plugged["laa950"] - clear["laa950"]) < 0.1 * clear["laa950"] + 0.3
    assert abs(plugged["emph_fraction"] - clear["emph_fraction"]) < 0.1 * clear["emph_fraction"]
    # drawn in the image: plugged lumens and tree-in-bud nodules add soft tissue inside the lung,
    # at the size of distal airways (a few mm), not as a global density shift
    hu0, lung0 = _load(m0, clear, "image"), _load(m0, clear, "lung_mask") > 0
    hu1, lung1 = _load(m1, plugged, "image"), _load(m1, plugged, "lung_mask") > 0
    soft0, soft1 = np.mean(hu0[lung0] > -300), np.mean(hu1[lung1] > -300)
    assert soft1 > soft0 + 0.002, (soft0, soft1)
    changed = (hu1 != hu0) & lung0 & lung1
    normal = lung0 & lung1 & (np.abs(hu1.astype(int) - hu0) < 50)
    assert normal.mean() > 0.5 * (lung0 & lung1).mean(), "mucus plugging changed most of the lung"
    assert changed.any()


def test_clinical_rules(cohort):
    _, df = cohort
    assert np.array_equal(df["GOLD"].to_numpy(), gold_stage(df["FEV1pp"], df["FEV1_FVC"]))
    assert gold_stage(85, 0.65) == 1 and gold_stage(79.9, 0.65) == 2 and gold_stage(49, 0.6) == 3
    assert gold_stage(29, 0.5) == 4 and gold_stage(40, 0.75) == 0 and gold_stage(100, 0.7) == 0
    pct_ps = 100 * df["emph_paraseptal"]
    assert np.array_equal(df["paraseptal_grade"], np.searchsorted(PARASEPTAL_GRADE_BINS, pct_ps, side="right"))
    assert df["emph_grade"].between(0, len(EMPH_GRADE_BINS)).all()
    assert df["event"].isin([0, 1]).all() and (df["time"] > 0).all() and (df["time"] <= 12).all()
    assert (df["age"].between(40, 85)).all() and (df["pack_years"] >= 0).all()


def test_demo_size_matches_the_patch_budget():
    spec, _, _ = sample_spec(0, 0, resolve_size("demo"), SPACING)
    vol = render_subject(spec)
    lung, hu = vol["lung_mask"] > 0, vol["image"]
    ext = [np.ptp(np.nonzero(lung.any(axis=tuple(a for a in range(3) if a != ax)))[0]) * SPACING[ax] for ax in range(3)]
    body_x = np.ptp(np.nonzero((hu > -500).any(axis=(1, 2)))[0]) * SPACING[0]
    assert 150 <= ext[0] <= 200 and 130 <= ext[2] <= 185, ext
    assert 195 <= body_x <= 245, body_x
    # 32^3 patches on a 26-voxel grid at 1 mm inside the lung bounding box: the atlas budget
    n_grid = np.prod([(e - 32) // 26 + 1 for e in ext])
    assert 40 <= n_grid <= 250, n_grid


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_cohort(tmp_path, 1, size="huge")
    with pytest.raises(ValueError, match="size scale"):
        make_cohort(tmp_path, 1, size=3.0)
    with pytest.raises(TypeError, match="unknown disease option"):
        make_cohort(tmp_path, 1, emphysema=1)
    with pytest.raises(ValueError, match="n_subjects"):
        make_cohort(tmp_path, 0)
    with pytest.raises(ValueError, match="severity"):
        make_cohort(tmp_path, 1, severity=2.0)
    with pytest.raises(ValueError, match="spacing"):
        make_cohort(tmp_path, 1, spacing=(1, 1))


def test_plot_subject_and_cli(cohort, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    manifest, df = cohort
    fig = plot_subject(df.loc[0, "sid"], manifest)
    assert len([a for a in fig.axes if a.images]) == 3
    fig2 = plot_subject(df.iloc[1], manifest, overlay="lobes")
    assert len(fig2.axes[0].images) == 2  # image + overlay
    with pytest.raises(ValueError, match="manifest"):
        plot_subject("syn0000")
    assert cli_main(["--out", str(tmp_path / "cli"), "--n", "1", "--seed", "5", "--size", "0.35", "--workers", "1"]) == 0
    assert (tmp_path / "cli" / "manifest.csv").exists()


def test_survival_model_has_events_and_follows_disease():
    """Enough deaths for a C-index on a small cohort, and more of them with more emphysema."""
    from drasclr_lib.data.synthetic.clinical import clinical_table_row, emphysema_targets, sample_latents

    rng = np.random.default_rng(123)
    rows, burden = [], []
    for _ in range(600):
        lat = sample_latents(rng)
        e_cl, e_pl, e_ps = emphysema_targets(lat)
        rows.append(clinical_table_row(lat, {"emph_centrilobular": e_cl, "emph_panlobular": e_pl,
                                             "emph_paraseptal": e_ps}, rng))
        burden.append(e_cl + 1.3 * e_pl + 0.4 * e_ps)
    event = np.array([r["event"] for r in rows])
    burden = np.array(burden)
    assert 0.2 < event.mean() < 0.7
    high = burden > np.median(burden)
    assert event[high].mean() > event[~high].mean() + 0.1


def test_healthy_fraction_zero_and_one_are_honoured():
    specs = [sample_spec(5, i, SMALL, SPACING, healthy_fraction=h)[1]["severity"] for h in (0.0, 1.0) for i in range(40)]
    assert min(specs[:40]) > 0, "healthy_fraction=0 still drew healthy subjects"
    assert max(specs[40:]) == 0
