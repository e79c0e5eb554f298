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
