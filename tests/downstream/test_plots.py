import numpy as np

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.downstream.experiment import run_downstream
from drasclr_lib.downstream.plots import (DEFAULT_BARS, headline_bars, pick_map_subject, plot_km, plot_results_bars,
                                         plot_subtype_map, subtype_slice)
from drasclr_lib.embed import EmbeddingSet
from tests.downstream.test_experiment import labelled_store  # noqa: F401 - fixture


def test_subtype_slice_pastes_patches_at_their_corners(toy_store):
    store = PatchStore(toy_store)
    L, P = store.num_locations, store.patch_size
    classes = np.arange(L) % 4
    sl = subtype_slice(store, 5, {"truth": classes}, j=12, margin=3)
    corners = store.atlas_corners  # toy records have no corners_subject
    i0, _, k0, _ = sl["extent"]
    loc = int(np.flatnonzero((corners[:, 1] <= 12) & (12 < corners[:, 1] + P))[0])
    ci, cj, ck = corners[loc]
    patch = store.patches(5)[loc]  # (k, j, i)
    # a voxel in the middle of the patch (not overwritten by an overlapping neighbour)
    assert sl["ct"][ck - k0 + 10, ci - i0 + 10] == patch[10, 12 - cj, 10]
    assert sl["maps"]["truth"][ck - k0 + 10, ci - i0 + 10] == classes[loc]
    # location 0 sits at the lowest (i, k) corner alone: its outer margin is unpainted, its inside painted
    assert sl["maps"]["truth"][1, 1] == -1 and sl["maps"]["truth"][3, 3] == classes[0]
    assert sl["voxel_labels"].max() <= 1


def test_figures_are_written(labelled_store, tmp_path):  # noqa: F811
    store = labelled_store
    rng = np.random.default_rng(0)
    h = rng.normal(size=(store.num_subjects, store.num_locations, 4))
    h[..., 0] += np.arange(store.num_subjects)[:, None] / 5
    emb = EmbeddingSet(h=h, sids=store.sids, locs=store.locs, atlas_corners=store.atlas_corners)
    res = run_downstream(store, {"drasclr": emb}, folds=3, progress=False, pca_components=2)
    assert headline_bars(res.table) == list(DEFAULT_BARS)  # the paper's tasks: the figure as before
    plot_results_bars(res.table, path=tmp_path / "bars.png")
    plot_km(res, path=tmp_path / "km.png")
    s = pick_map_subject(res.subtype_true)
    assert (res.subtype_true[s] > 0).sum() == (res.subtype_true > 0).sum(1).max()
    plot_subtype_map(store, s, res.subtype_true[s], res.subtype_proba["drasclr"][s].argmax(-1), title="DrasCLR",
                     path=tmp_path / "map.png")
    for name in ("bars.png", "km.png", "map.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_figures_of_own_tasks_use_their_names(labelled_store, tmp_path):  # noqa: F811
    store = labelled_store
    h = np.random.default_rng(1).normal(size=(store.num_subjects, store.num_locations, 4))
    emb = EmbeddingSet(h=h, sids=store.sids, locs=store.locs, atlas_corners=store.atlas_corners)
    res = run_downstream(store, {"drasclr": emb}, tasks="FEV1_FVC:continuous, GOLD:categorical, time+event:survival",
                         folds=3, progress=False, pca_components=2, include_qct=False)
    assert headline_bars(res.table) == [("FEV1_FVC", "r2"), ("GOLD", "auc_macro"), ("survival", "c_index")]
    plot_km(res, path=tmp_path / "km.png")
    assert (tmp_path / "km.png").stat().st_size > 5000
