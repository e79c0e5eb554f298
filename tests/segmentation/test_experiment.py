"""Label-efficiency experiment: nested subsets, the results table, summary, plot, baselines."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from drasclr_lib.data.patch_store import PatchStore, cut_patches
from drasclr_lib.segmentation import experiment as ex
from drasclr_lib.segmentation.baselines import baseline_dice
from drasclr_lib.segmentation.lungs import lung_patches
from drasclr_lib.segmentation.train import SegConfig
from drasclr_lib.testing import make_toy_store


def test_subset_sizes():
    assert ex.subset_sizes(12, (0.05, 0.1, 0.25, 1.0)) == [1, 1, 3, 12]
    assert ex.subset_sizes(20, (0.05, 0.1, 0.25, 1.0)) == [1, 2, 5, 20]
    assert ex.subset_sizes(10, (0.25,)) == [3]  # 2.5 rounds half up
    with pytest.raises(ValueError, match="fractions"):
        ex.subset_sizes(10, (0.0,))
    with pytest.raises(ValueError, match="fractions"):
        ex.subset_sizes(10, (1.5,))
    with pytest.raises(ValueError, match="at least one"):
        ex.subset_sizes(0, (0.5,))


def test_nested_subsets_are_nested_and_seeded():
    pool = list(range(100, 140))
    fr = (0.05, 0.1, 0.25, 1.0)
    a = ex.nested_subsets(pool, fr, seed=0)
    assert [len(a[f]) for f in fr] == [2, 4, 10, 40]
    for small, big in zip(fr, fr[1:]):
        assert a[big][: len(a[small])] == a[small]
    assert sorted(a[1.0]) == pool
    assert ex.nested_subsets(pool, fr, seed=0) == a
    assert ex.nested_subsets(pool, fr, seed=1)[0.25] != a[0.25]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return PatchStore(make_toy_store(tmp_path_factory.mktemp("seg_toy"), n_subjects=6, grid=(3, 1, 1)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from drasclr_lib.models import DrasEncoder

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("ckpt") / "enc.pt"
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in DrasEncoder().state_dict().items()}}, path)
    return path


def test_label_efficiency_table(small_store, checkpoint, tmp_path, monkeypatch):
    cfg = SegConfig(steps=1, batch_size=2, device="cpu")
    kw = dict(train_subjects=[0, 1, 2, 3], test_subjects=["toy005"], fractions=(0.1, 0.25, 1.0),
              inits={"random": None, "drasclr": checkpoint}, seeds=(0,), cfg=cfg, progress=False)
    df = ex.label_efficiency(small_store, cache_dir=tmp_path, **kw)
    assert len(df) == 2 * 3 * 1
    assert set(df.columns) >= {"init", "fraction", "seed", "n_labelled", "dice", "dice_emphysema", "seconds"}
    assert df.groupby("fraction")["n_labelled"].first().tolist() == [1, 1, 4]
    assert df["dice"].between(0, 1).all() and (df["seconds"] > 0).all()
    # 10 % and 25 % of 4 subjects are the same single subject: one run, the row repeated
    for _, part in df.groupby("init"):
        a, b = part[part.fraction == 0.1].iloc[0], part[part.fraction == 0.25].iloc[0]
        assert a["dice"] == b["dice"] and a["seconds"] == b["seconds"]
    # a second call finds every run in the cache and trains nothing
    monkeypatch.setattr(ex, "train_segmenter", lambda *a, **k: pytest.fail("should have used the cache"))
    again = ex.label_efficiency(small_store, cache_dir=tmp_path, **kw)
    pd.testing.assert_frame_equal(df, again)


def _save_encoder(path, seed: int) -> None:
    from drasclr_lib.models import DrasEncoder

    torch.manual_seed(seed)
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in DrasEncoder().state_dict().items()}}, path)


def test_label_efficiency_cache_is_keyed_on_weights_not_path(tmp_path, monkeypatch):
    """Notebook 02 rerun with other settings overwrites checkpoint.pt: notebook 05 must not reuse the
    old weights' Dice (the cache was keyed on the path), and must reuse them for the same weights."""
    store = PatchStore(make_toy_store(tmp_path / "store", n_subjects=4, grid=(2, 1, 1)))
    trained = []

    def fake_train(model, store, subset, cfg, progress=False):
        trained.append(float(model.encoder.conv1.weight.detach().sum()))
        return [{"loss": 0.5}]

    def fake_evaluate(model, store, test, **kw):  # a Dice that depends on the weights: stale reuse is visible
        dice = abs(float(model.encoder.conv1.weight.detach().sum())) % 1
        return pd.DataFrame({"dice": [dice] * len(test), "dice_emphysema": [dice] * len(test)})

    monkeypatch.setattr(ex, "train_segmenter", fake_train)
    monkeypatch.setattr(ex, "evaluate_segmenter", fake_evaluate)
    ckpt = tmp_path / "02_pretraining" / "checkpoint.pt"
    ckpt.parent.mkdir()
    _save_encoder(ckpt, seed=1)
    kw = dict(train_subjects=[0, 1, 2], test_subjects=[3], fractions=(1.0,), inits={"drasclr": ckpt}, seeds=(0,),
              cfg=SegConfig(steps=1, batch_size=2, device="cpu"), progress=False, cache_dir=tmp_path / "runs")
    first = ex.label_efficiency(store, **kw)
    assert len(trained) == 1
    pd.testing.assert_frame_equal(ex.label_efficiency(store, **kw), first)  # same weights: a hit
    assert len(trained) == 1
    _save_encoder(ckpt, seed=1)  # the same weights written again (a new mtime): still a hit
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    pd.testing.assert_frame_equal(ex.label_efficiency(store, **kw), first)
    assert len(trained) == 1
    _save_encoder(ckpt, seed=2)  # other weights at the same path: a miss, and the new weights' Dice
    second = ex.label_efficiency(store, **kw)
    assert len(trained) == 2 and trained[1] != trained[0]
    assert second["dice"].iloc[0] != first["dice"].iloc[0]
    saved = json.loads(next((tmp_path / "runs").glob("drasclr_n3_s0.json")).read_text())
    assert saved["checkpoint"] == str(ckpt) and len(saved["weights"]) == 16
    ex.label_efficiency(store, **kw)
    assert len(trained) == 2
    # a store rebuilt in the same folder (subjects.csv rewritten: other QC values) is a miss too
    table = tmp_path / "store" / "subjects.csv"
    table.write_text(table.read_text() + "toy000,,\n")
    ex.label_efficiency(store, **kw)
    assert len(trained) == 3
    # and so are other lung masks to score in
    masks = {"toy003": tmp_path / "mask.nii.gz"}
    masks["toy003"].write_bytes(b"mask 1")
    ex.label_efficiency(store, lung_masks=masks, **kw)
    ex.label_efficiency(store, lung_masks=masks, **kw)
    assert len(trained) == 4
    masks["toy003"].write_bytes(b"mask 2")
    ex.label_efficiency(store, lung_masks=masks, **kw)
    assert len(trained) == 5


def test_label_efficiency_validates(small_store):
    cfg = SegConfig(steps=1, batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="overlap"):
        ex.label_efficiency(small_store, train_subjects=[0, 1], test_subjects=[1], inits={"random": None}, cfg=cfg)
    with pytest.raises(ValueError, match="non-empty"):
        ex.label_efficiency(small_store, train_subjects=[], test_subjects=[1], inits={"random": None}, cfg=cfg)
    with pytest.raises(ValueError, match="inits"):
        ex.label_efficiency(small_store, train_subjects=[0], test_subjects=[1], inits={}, cfg=cfg)


def _fake_results():
    rows = []
    for init, base in (("random", 0.3), ("drasclr", 0.5)):
        for f in (0.1, 1.0):
            for seed, noise in zip((0, 1, 2), (-0.02, 0.0, 0.05)):
                rows.append({"init": init, "fraction": f, "seed": seed, "n_labelled": int(f * 10),
                             "dice": base + f / 10 + noise, "seconds": 1.0 + seed})
    return pd.DataFrame(rows)


def test_summarize_mean_and_sd():
    s = ex.summarize(_fake_results())
    assert list(s["init"]) == ["random", "random", "drasclr", "drasclr"]
    row = s[(s.init == "drasclr") & (s.fraction == 1.0)].iloc[0]
    vals = np.array([0.6 - 0.02, 0.6, 0.6 + 0.05])
    assert row["dice_mean"] == pytest.approx(vals.mean())
    assert row["dice_sd"] == pytest.approx(vals.std(ddof=1))
    assert row["n_seeds"] == 3 and row["n_labelled"] == 10 and row["seconds_mean"] == pytest.approx(2.0)
    assert row["dice"] == f"{vals.mean():.3f} ± {vals.std(ddof=1):.3f}"
    one = ex.summarize(_fake_results().query("seed == 0"))
    assert one["dice_sd"].isna().all() and "±" not in one["dice"].iloc[0]
    with pytest.raises(ValueError, match="empty"):
        ex.summarize(_fake_results().iloc[:0])


def test_plot_label_efficiency():
    import matplotlib.pyplot as plt

    fig = ex.plot_label_efficiency(ex.summarize(_fake_results()), baselines={"all lung": 0.2})
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"random", "drasclr", "all lung"} <= set(labels)
    drasclr = next(line for line in ax.get_lines() if line.get_label() == "drasclr")
    np.testing.assert_allclose(drasclr.get_xdata(), [0.1, 1.0])
    assert len(ax.collections) == 2  # one sd band per init
    plt.close(fig)


@pytest.fixture()
def geo_store(tmp_path):
    """A 2-subject store with records like preprocessing writes (grid_1mm, corners_subject) and
    lung-mask files, for the lung-aware baselines."""
    root = make_toy_store(tmp_path / "store", n_subjects=2, grid=(2, 1, 1), patch_size=8, scans=tmp_path / "scans")
    store = PatchStore(root)
    return store, {sid: store.table.loc[sid, "lung_mask"] for sid in store.sids}


def test_lung_patches_cut_like_preprocessing(geo_store):
    store, masks = geo_store
    for n, sid in enumerate(store.sids):
        mask = sitk.ReadImage(str(masks[sid]))  # the grid starts inside the scan: cut from there
        i0, j0, k0 = np.rint(np.subtract(store.subject_grid(sid).GetOrigin(), mask.GetOrigin())).astype(int)
        assert min(i0, j0, k0) > 0
        lung = sitk.GetArrayFromImage(mask)[k0:, j0:, i0:]
        expect = cut_patches(lung, store.corners(sid), 8, 0)[0] > 0
        np.testing.assert_array_equal(lung_patches(store, sid, masks[sid]), expect)


def test_lung_patches_are_read_once_per_file_and_again_when_it_changes(geo_store, monkeypatch):
    """Scoring several models on the same test subjects reads each mask once; a rewritten mask is read again."""
    import os

    import drasclr_lib.preprocess.pipeline as pipeline
    from drasclr_lib.segmentation import lungs

    store, masks = geo_store
    reads = []
    real = pipeline.on_subject_grid
    monkeypatch.setattr(pipeline, "on_subject_grid", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    monkeypatch.setattr(lungs, "_LUNG_CACHE", lungs.OrderedDict())
    sid = store.sids[0]
    first = lung_patches(store, sid, masks[sid])
    first[...] = False  # the caller's copy: the cache keeps its own
    again = lung_patches(store, sid, masks[sid])
    assert len(reads) == 1 and again.any() and again.dtype == bool
    lung_patches(store, store.sids[1], masks[store.sids[1]])
    assert len(reads) == 2  # another subject is another file
    mask = sitk.ReadImage(str(masks[sid]))
    sitk.WriteImage(sitk.Cast(mask * 0, mask.GetPixelID()), str(masks[sid]))
    st = os.stat(masks[sid])
    os.utime(masks[sid], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clock too coarse cannot hide it
    assert not lung_patches(store, sid, masks[sid]).any() and len(reads) == 3
    monkeypatch.setattr(lungs, "LUNG_PATCH_CACHE_BYTES", 0)  # a budget of nothing keeps nothing
    lungs._LUNG_CACHE.clear()
    lung_patches(store, sid, masks[sid])
    assert len(lungs._LUNG_CACHE) == 0 and len(reads) == 4


def test_baselines(geo_store):
    store, masks = geo_store
    bg = baseline_dice(store, store.sids, rule="background", min_lung_fraction=0)
    assert (bg["dice"] == 0).all()  # every subject has emphysema
    laa = baseline_dice(store, store.sids, rule="laa950", lung_masks=masks, min_lung_fraction=0)
    assert laa["dice"].tolist() == [1.0, 1.0]  # emphysema is exactly the lung voxels at -990 HU
    lung = baseline_dice(store, store.sids, rule="all_lung", lung_masks=masks, min_lung_fraction=0)
    for s in range(2):
        lab = store.label_patches(s) > 0
        inside = lung_patches(store, s, masks[store.sids[s]])
        assert lung["dice"][s] == pytest.approx(2 * lab.sum() / (lab.sum() + inside.sum()))
    with pytest.raises(ValueError, match="lung mask"):
        baseline_dice(store, [0], rule="all_lung")
    with pytest.raises(ValueError, match="rule"):
        baseline_dice(store, [0], rule="otsu")


def test_ensure_moco_checkpoint_reuses_same_budget_then_any_budget_then_trains(tmp_path, fake_pretrain):
    from drasclr_lib.training import PretrainConfig, runs
    from drasclr_lib.utils import save_json

    calls = fake_pretrain
    store, nb04, out = tmp_path / "store", tmp_path / "04", tmp_path / "05"
    kw = dict(drasclr_run=None, store=store, out_root=out, reuse_roots=[nb04], max_steps=5)
    path, how = ex.ensure_moco_checkpoint(**kw)  # nothing to reuse: the fallback budget, trained here
    assert how == "trained" and path.parent.parent == out and len(calls) == 1
    assert (calls[0].conditional, calls[0].num_neighbors, calls[0].max_steps, calls[0].batch_size) == (False, 0, 5, 8)
    assert ex.ensure_moco_checkpoint(**kw)[1] == "cached"
    # notebook 04's MoCo run of another budget is preferred (any_budget) ...
    other, _ = runs.ensure_checkpoint("moco", PretrainConfig(store=str(store), max_steps=9), nb04)
    path, how = ex.ensure_moco_checkpoint(**kw)
    assert path == other and how == f"reused {other.parent} (its own budget, see its config.json)"
    assert ex.ensure_moco_checkpoint(**kw, any_budget=False)[1] == "cached"
    # ... and one of the same budget (notebook 02's config.json) is reused as such
    run02 = tmp_path / "02"
    save_json({**PretrainConfig(store=str(store), epochs=1, max_steps=3, batch_size=4, queue_size=8).to_dict(),
               "effective": {}}, run02 / "config.json")
    same, _ = runs.ensure_checkpoint("moco", PretrainConfig(store=str(store), epochs=1, max_steps=3, batch_size=4,
                                                            queue_size=8), nb04)
    path, how = ex.ensure_moco_checkpoint(**{**kw, "drasclr_run": run02})
    assert path == same and how == f"reused {same.parent} (same budget)"
    assert len(calls) == 3


def test_ensure_moco_checkpoint_any_budget_only_on_the_same_data(tmp_path, fake_pretrain):
    """Notebook 04's MoCo run of another budget is reused only when it was trained on this store's
    content: a store rebuilt in the same folder since then trains a new one."""
    from drasclr_lib.training import PretrainConfig, runs

    store, nb04 = make_toy_store(tmp_path / "store", n_subjects=6, grid=(2, 1, 1)), tmp_path / "04"
    other, _ = runs.ensure_checkpoint("moco", PretrainConfig(store=str(store), max_steps=9), nb04)
    kw = dict(drasclr_run=None, store=store, out_root=tmp_path / "05", reuse_roots=[nb04], max_steps=5)
    assert ex.ensure_moco_checkpoint(**kw) == (other, f"reused {other.parent} (its own budget, see its config.json)")
    make_toy_store(tmp_path / "store", n_subjects=7, grid=(2, 1, 1))  # notebook 01 rerun into the same folder
    path, how = ex.ensure_moco_checkpoint(**kw)
    assert how == "trained" and path != other and len(fake_pretrain) == 2
