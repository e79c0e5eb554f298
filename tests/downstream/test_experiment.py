import numpy as np
import pandas as pd
import pytest

from drasclr_lib.data.patch_store import PatchStore, finalize_store
from drasclr_lib.downstream.experiment import run_downstream
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.testing import make_toy_store


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory):
    """Toy store with 20 subjects and every label the experiment reads, some of them missing."""
    root = make_toy_store(tmp_path_factory.mktemp("ds_store"), n_subjects=20, grid=(2, 2, 2), patch_size=16, seed=1)
    rng = np.random.default_rng(0)
    d = np.arange(20) / 19
    t_event = rng.exponential(1 / np.exp(2 * d))
    t_cens = rng.exponential(1.0, size=20)
    table = pd.DataFrame({
        "sid": [f"toy{s:03d}" for s in range(20)],
        "FEV1pp": 100 - 60 * d + rng.normal(0, 3, 20),
        "FEV1_FVC": 0.8 - 0.3 * d + rng.normal(0, 0.02, 20),
        "GOLD": np.round(4 * d),
        "emph_grade": np.round(3 * d),
        "paraseptal_grade": rng.integers(0, 2, 20).astype(float),
        "time": np.minimum(t_event, t_cens), "event": (t_event <= t_cens).astype(float),
    })
    table.loc[[2, 7], "FEV1pp"] = np.nan
    table.loc[[3], "GOLD"] = np.nan
    table.loc[[5], "time"] = np.nan
    finalize_store(root, table)
    return PatchStore(root)


def _emb(store, h):
    return EmbeddingSet(h=h, sids=store.sids, locs=store.locs, atlas_corners=store.atlas_corners)


def test_run_downstream_table_complete_and_sane(labelled_store):
    store = labelled_store
    rng = np.random.default_rng(0)
    N, L = store.num_subjects, store.num_locations
    d = np.arange(N) / (N - 1)
    good = rng.normal(size=(N, L, 8)) * 0.2
    good[..., 0] += d[:, None] * 3
    noise = rng.normal(size=(N, L, 8))
    # the embedding sets list subjects in a different order than the store: they are realigned
    perm = rng.permutation(N)
    shuffled = EmbeddingSet(h=good[perm], sids=[store.sids[i] for i in perm], locs=store.locs,
                            atlas_corners=store.atlas_corners)
    res = run_downstream(store, {"good": shuffled, "noise": _emb(store, noise)}, folds=4, seed=0, progress=False,
                         pca_components=2)
    t = res.table
    assert set(t.method) == {"qct", "good", "noise"}
    for m in ["qct", "good", "noise"]:
        for task, metric in [("FEV1pp", "r2"), ("FEV1_FVC", "r2"), ("GOLD", "accuracy"), ("GOLD", "auc_macro"),
                             ("emph_grade", "auc_macro"), ("paraseptal_grade", "accuracy"),
                             ("survival", "c_index"), ("subtype", "auc_macro"), ("subtype", "auc_none")]:
            assert ((t.method == m) & (t.task == task) & (t.metric == metric)).sum() == 1, (m, task, metric)
    # NaN labels dropped per task
    assert t[(t.method == "qct") & (t.task == "FEV1pp") & (t.metric == "r2")].n.item() == 18
    assert t[(t.method == "qct") & (t.task == "FEV1pp") & (t.metric == "r2_oof")].n.item() == 18
    assert res.value("qct", "FEV1pp", "r2_oof") > 0.7
    assert t[(t.method == "qct") & (t.task == "survival")].n.item() == 19
    assert res.value("qct", "FEV1pp", "r2") > 0.7
    assert res.value("good", "FEV1pp", "r2") > 0.7
    assert res.value("noise", "FEV1pp", "r2") < 0.3
    assert res.value("good", "subtype", "auc_macro") > 0.9
    c = t[t.metric == "c_index"]["mean"]
    assert ((c >= 0) & (c <= 1)).all()
    # the same folds for every method: per-fold test sizes agree
    pf = res.per_fold[(res.per_fold.task == "FEV1pp")]
    assert pf.groupby("method").fold.apply(tuple).nunique() == 1
    m = res.metrics()
    assert 0 <= m["good"]["survival/logrank_p_tertiles"] <= 1
    assert np.isnan(res.risk["good"][5]) and np.isfinite(res.risk["good"][6])


def test_same_seed_same_result_and_errors(labelled_store, tmp_path):
    store = labelled_store
    h = np.random.default_rng(1).normal(size=(store.num_subjects, store.num_locations, 4))
    a = run_downstream(store, {"x": _emb(store, h)}, folds=3, seed=5, progress=False, include_qct=False)
    b = run_downstream(store, {"x": _emb(store, h)}, folds=3, seed=5, progress=False, include_qct=False)
    pd.testing.assert_frame_equal(a.table, b.table)
    np.testing.assert_array_equal(a.fold, b.fold)
    paths = a.save(tmp_path)
    assert pd.read_csv(paths["results.csv"]).columns.tolist()[:6] == ["method", "task", "metric", "mean", "sd", "folds"]
    with pytest.raises(KeyError, match="lack subjects"):
        bad = EmbeddingSet(h=h[1:], sids=store.sids[1:], locs=store.locs, atlas_corners=store.atlas_corners)
        run_downstream(store, {"x": bad}, folds=3, progress=False)
    with pytest.raises(ValueError):
        run_downstream(store, {}, include_qct=False, progress=False)


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory):
    """24 scans of 12 patients (two visits each, sids not in patient order) with custom outcome columns:
    ``lung_score`` (continuous, from disease), ``smoker`` (text classes), ``os_years``/``died`` (survival)."""
    root = make_toy_store(tmp_path_factory.mktemp("visits"), n_subjects=24, grid=(2, 2, 1), patch_size=16, seed=2,
                          with_labels=False)
    rng = np.random.default_rng(3)
    d = np.arange(24) / 23
    patient = np.array([f"P{p:02d}" for p in rng.permutation(np.repeat(np.arange(12), 2))])
    t_event = rng.exponential(1 / np.exp(2 * d))
    table = pd.DataFrame({
        "sid": [f"toy{s:03d}" for s in range(24)], "group": patient,
        "lung_score": 10 * d + rng.normal(0, 0.3, 24),
        "smoker": np.where(d > 0.5, "current", "former"),
        "os_years": t_event, "died": (t_event < 1.5).astype(int),
        "note": ["x"] * 24,
    })
    finalize_store(root, table)
    return PatchStore(root)


def test_own_tasks_from_manifest_columns(cohort_store):
    store = cohort_store
    N, L = store.num_subjects, store.num_locations
    d = np.arange(N) / (N - 1)
    h = np.random.default_rng(0).normal(size=(N, L, 6)) * 0.2
    h[..., 0] += d[:, None] * 3
    res = run_downstream(store, {"enc": _emb(store, h)}, tasks="lung_score:continuous, smoker:categorical, "
                         "os_years+died:survival", folds=4, progress=False, pca_components=2)
    t = res.table
    assert list(dict.fromkeys(t.task)) == ["lung_score", "smoker", "os_years+died"]
    assert set(t.method) == {"qct", "enc"}
    assert res.value("enc", "lung_score", "r2_oof") > 0.8  # the embedding carries the disease level
    assert res.value("enc", "smoker", "auc_macro") > 0.8
    assert 0 <= res.value("enc", "os_years+died", "c_index") <= 1
    assert res.survival_task == "os_years+died" and np.isfinite(res.risk["enc"]).all()
    assert "os_years+died/logrank_p_tertiles" in res.metrics()["enc"]
    assert res.settings["tasks"] == "lung_score:continuous, smoker:categorical, os_years+died:survival"
    # the same run with the paper's default finds none of the paper's columns (and no label maps): no task
    assert len(run_downstream(store, {"enc": _emb(store, h)}, folds=4, progress=False).table) == 0


def test_visits_of_one_patient_share_a_fold(cohort_store):
    store = cohort_store
    h = np.random.default_rng(1).normal(size=(store.num_subjects, store.num_locations, 4))
    res = run_downstream(store, {"x": _emb(store, h)}, tasks="lung_score:continuous", folds=4, seed=0,
                         progress=False, include_qct=False)
    patient = store.table.loc[res.sids, "group"].to_numpy()
    for p in set(patient):
        assert len(set(res.fold[patient == p])) == 1, p
    assert res.settings["num_groups"] == 12 and res.settings["group_column"] == "group"
    assert sorted(np.bincount(res.fold)) == [6, 6, 6, 6]  # 3 patients (6 scans) per fold
    # without the group column the folds split patients (this is what the grouping prevents)
    from drasclr_lib.downstream.folds import make_folds

    plain = make_folds(store.num_subjects, k=4, seed=0)
    assert any(len(set(plain[patient == p])) > 1 for p in set(patient))


def test_task_errors_name_the_column_of_the_store(cohort_store, labelled_store):
    from drasclr_lib.downstream.tasks import TaskError

    h = np.zeros((cohort_store.num_subjects, cohort_store.num_locations, 2))
    emb = {"x": _emb(cohort_store, h)}
    with pytest.raises(TaskError, match=r"subjects.csv has no column 'Lung_Score'; did you mean 'lung_score'"):
        run_downstream(cohort_store, emb, tasks="Lung_Score:continuous", progress=False)
    with pytest.raises(TaskError, match=r"'note'.*must be numeric, found 'x'"):
        run_downstream(cohort_store, emb, tasks="note:continuous", progress=False)
    with pytest.raises(TaskError, match="no label patches"):
        run_downstream(cohort_store, emb, tasks="subtype", progress=False)
    with pytest.raises(ValueError, match="13 folds from 12 patient groups"):
        run_downstream(cohort_store, emb, tasks="lung_score:continuous", folds=13, progress=False)
    # an explicit list equal to the paper's (required, spelled out) gives the default's table
    store = labelled_store
    h = np.random.default_rng(2).normal(size=(store.num_subjects, store.num_locations, 4))
    spec = "FEV1pp:continuous,FEV1_FVC:continuous,GOLD:ordinal,emph_grade:ordinal,paraseptal_grade:ordinal," \
           "time+event:survival,subtype"
    a = run_downstream(store, {"x": _emb(store, h)}, folds=3, progress=False, pca_components=2)
    b = run_downstream(store, {"x": _emb(store, h)}, tasks=spec, folds=3, progress=False, pca_components=2)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert a.settings["tasks"] == "paper" and a.settings["group_column"] is None


def test_subject_without_valid_patches_left_out_of_every_method(labelled_store):
    """A subject whose patches all lie outside the scan embeds as NaN: it is dropped from every method's
    subject-level tasks (same subjects for all), with a warning naming it, instead of breaking the fits."""
    store = labelled_store
    N, L = store.num_subjects, store.num_locations
    d = np.arange(N) / (N - 1)
    h = np.random.default_rng(0).normal(size=(N, L, 8)) * 0.2
    h[..., 0] += d[:, None] * 3
    h[9] = np.nan  # toy009: no valid patch
    with pytest.warns(UserWarning, match="toy009"):
        res = run_downstream(store, {"good": _emb(store, h)}, folds=4, seed=0, progress=False, pca_components=2)
    t = res.table
    for m in ["qct", "good"]:  # 20 subjects, FEV1pp missing for 2: 17 left once toy009 is out
        assert t[(t.method == m) & (t.task == "FEV1pp") & (t.metric == "r2")].n.item() == 17
        assert t[(t.method == m) & (t.task == "survival")].n.item() == 18
    assert res.value("good", "FEV1pp", "r2_oof") > 0.7
    assert np.isnan(res.risk["good"][9]) and np.isnan(res.risk["qct"][9])


def test_feature_sets_and_compositions_join_the_same_folds(labelled_store):
    """Subject-level feature sets (an oracle) and a composition qct + embedding are scored on the folds of
    every other method; the per-fold table carries each fold's labelled train / test subjects."""
    store = labelled_store
    N, L = store.num_subjects, store.num_locations
    d = np.arange(N) / (N - 1)
    rng = np.random.default_rng(4)
    noise = rng.normal(size=(N, L, 16))
    oracle = np.stack([d, rng.normal(size=N)], axis=1)
    shuffled = pd.DataFrame(oracle, index=store.sids).iloc[rng.permutation(N)]  # realigned by sid
    res = run_downstream(store, {"noise": _emb(store, noise)}, folds=4, seed=0, progress=False, pca_components=2,
                         features={"oracle": shuffled}, compose={"qct+noise": ("qct", "noise")})
    t = res.table
    assert set(t.method) == {"qct", "noise", "oracle", "qct+noise"}
    assert not ((t.method == "oracle") & (t.task == "subtype")).any()  # no patch features: no patch task
    assert ((t.method == "qct+noise") & (t.task == "subtype")).any()  # both parts have patch features
    assert res.value("oracle", "FEV1pp", "r2") > 0.8 and res.value("noise", "FEV1pp", "r2") < 0.3
    # qct's signal survives next to 16 noise columns (reduced to 2 components)
    assert res.value("qct+noise", "FEV1pp", "r2_oof") > 0.6
    pf = res.per_fold
    assert pf.groupby(["task", "metric"])[["method", "fold"]].apply(lambda g: g.groupby("method").fold.apply(tuple).nunique()).max() == 1
    fev = pf[(pf.task == "FEV1pp") & (pf.method == "oracle")].set_index("fold")
    labelled = store.table.loc[res.sids, "FEV1pp"].notna().to_numpy()
    for f, row in fev.iterrows():
        assert row.n_test == (labelled & (res.fold == f)).sum() and row.n_train == (labelled & (res.fold != f)).sum()
    assert (pf.n_train + pf.n_test <= N).all() and (pf.n_test > 0).all()
    assert res.settings["features"] == ["oracle"] and res.settings["compose"] == {"qct+noise": ["qct", "noise"]}
    with pytest.raises(ValueError, match="unknown methods"):
        run_downstream(store, {}, folds=4, progress=False, compose={"a+b": ("qct", "b")})
    with pytest.raises(ValueError, match=r"\(N=20, F\)"):
        run_downstream(store, {}, folds=4, progress=False, features={"o": oracle[:5]})


def test_compose_blocks_balances_widths():
    from drasclr_lib.downstream.experiment import compose_blocks

    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 2)) * 1000  # density-like units
    b = rng.normal(size=(30, 64))
    b[3] = np.nan
    X = compose_blocks([a, b], n_components=4)
    assert X.shape == (30, 6)
    ok = np.isfinite(X).all(axis=1)
    assert ok.sum() == 29 and not ok[3]
    np.testing.assert_allclose(X[ok].std(axis=0), 1.0, rtol=0.05)  # every column on one scale
    P = compose_blocks([rng.normal(size=(5, 7, 3)), rng.normal(size=(5, 7, 10))], n_components=4)
    assert P.shape == (5, 7, 7)
    with pytest.raises(ValueError, match="leading shape"):
        compose_blocks([a, b[:10]])
