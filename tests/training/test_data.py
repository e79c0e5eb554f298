"""The per-location batch sampler and the anchor/neighbour dataset."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.augment import build_augment
from drasclr_lib.intensity import hu_to_input
from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset, SampleIndex, subject_groups


@pytest.fixture(scope="module")
def store(toy_store):
    return PatchStore(toy_store)


def test_sampler_one_location_per_batch_and_covers_epoch():
    s = LocationBatchSampler(12, 18, 4, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 18 * 3
    per_loc = Counter()
    for b in batches:
        assert len(b) == 4
        assert len({l for _, l in b}) == 1, "a batch must hold one location"
        per_loc[b[0][1]] += 1
        assert len({si for si, _ in b}) == 4
    assert set(per_loc) == set(range(18)) and set(per_loc.values()) == {3}
    # every (subject, location) pair exactly once
    pairs = [tuple(p) for b in batches for p in b]
    assert len(set(pairs)) == 12 * 18
    # locations are visited as blocks, in a shuffled order
    order = [b[0][1] for b in batches][::3]
    assert sorted(order) == list(range(18)) and order != list(range(18))


def test_sampler_epochs_differ_and_are_deterministic():
    a, b = LocationBatchSampler(12, 18, 4, seed=0), LocationBatchSampler(12, 18, 4, seed=0)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    e1 = list(a)
    assert e0 != e1
    assert [p.seed for p in e0[0]] != [p.seed for p in e1[0]]
    # resume inside an epoch
    a.set_epoch(1, start_batch=10)
    assert list(a) == e1[10:] and len(a) == len(e1) - 10


def test_sampler_drop_last_and_validation():
    s = LocationBatchSampler(10, 2, 4, drop_last=False, shuffle=False)
    sizes = [len(b) for b in s]
    assert sizes == [4, 4, 2, 4, 4, 2]
    assert len(LocationBatchSampler(10, 2, 4)) == 4
    with pytest.raises(ValueError):
        LocationBatchSampler(3, 2, 4)
    with pytest.raises(ValueError):
        LocationBatchSampler(12, 2, 4, rank=2, world_size=2)
    with pytest.raises(ValueError):
        LocationBatchSampler(12, 2, 0)


def test_sampler_ranks_disjoint_same_location():
    ranks = [list(LocationBatchSampler(12, 5, 3, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5 * 2
    for b0, b1 in zip(*ranks):
        assert b0[0][1] == b1[0][1], "both ranks must work on the same location at every step"
        assert not {s for s, _ in b0} & {s for s, _ in b1}
    # the union over ranks is the single-process epoch's coverage
    pairs = {tuple(p) for r in ranks for b in r for p in b}
    assert len(pairs) == 12 * 5


def test_sample_index_pickles_with_seed():
    i = SampleIndex(3, 7, 12345)
    j = pickle.loads(pickle.dumps(i))
    assert j == (3, 7) and j.seed == 12345 and isinstance(j, SampleIndex)
    s, l = j
    assert (s, l) == (3, 7)


def test_dataset_item_shapes_and_neighbours(store):
    ds = PatchPairDataset(store, num_neighbors=2, augment=None)
    item = ds[(5, 4)]
    p = store.patch_size
    assert item["x_q"].shape == (1, p, p, p) and item["x_nbr"].shape == (2, 1, p, p, p)
    assert item["loc"].shape == (3,) and item["nbr_locs"].shape == (2, 3)
    assert int(item["loc_idx"]) == 4 and int(item["subject"]) == 5
    assert int(item["group"]) == 5  # no group column: every subject is its own group
    nbrs = store.neighbors[4][:2]
    assert item["nbr_idx"].tolist() == nbrs.tolist()
    # without augmentation the views are the stored patches of the same subject
    raw = store.patches(5)
    assert torch.allclose(item["x_q"][0], torch.from_numpy(hu_to_input(raw[4])))
    for j, n in enumerate(nbrs):
        assert torch.allclose(item["x_nbr"][j, 0], torch.from_numpy(hu_to_input(raw[n])))
        assert np.allclose(item["nbr_locs"][j].numpy(), store.locs[n])
    with pytest.raises(ValueError):
        PatchPairDataset(store, num_neighbors=5)
    with pytest.raises(ValueError):
        ds[(99, 0)]


def test_dataset_augments_with_sample_seed(store):
    ds = PatchPairDataset(store, num_neighbors=2, augment="agc")
    a, b, c = ds[SampleIndex(1, 2, 7)], ds[SampleIndex(1, 2, 7)], ds[SampleIndex(1, 2, 8)]
    assert torch.equal(a["x_q"], b["x_q"]) and torch.equal(a["x_nbr"], b["x_nbr"])
    assert not torch.equal(a["x_q"], c["x_q"])
    assert not torch.equal(a["x_q"], a["x_k"]), "q and k are two different views"


def test_dataloader_workers_follow_the_sampler(store):
    before = (store.locs.copy(), store.neighbors.copy(), list(store.sids))
    sampler = LocationBatchSampler(store.num_subjects, store.num_locations, 4, seed=0)
    ds = PatchPairDataset(store, num_neighbors=2, augment="agc")
    planned = list(sampler)[:12]
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=2)
    got = []
    for i, batch in enumerate(loader):
        if i == 12:
            break
        got.append(batch)
    for plan, batch in zip(planned, got):
        assert batch["loc_idx"].tolist() == [l for _, l in plan]
        assert batch["subject"].tolist() == [s for s, _ in plan]
    # the views do not depend on the number of workers (per-sample seeds)
    single = ds[planned[5][2]]
    assert torch.equal(got[5]["x_k"][2], single["x_k"])
    # nothing was mutated
    assert np.array_equal(store.locs, before[0]) and np.array_equal(store.neighbors, before[1])
    assert store.sids == before[2]


def _store_with_identical_patches(toy_store, monkeypatch):
    """A fresh store whose every patch (all subjects, all locations) is one structured HU pattern.

    8-voxel blocks of -1000 / +200 HU: any difference in the spatial transform moves block edges
    and changes many voxels by ~1.9 on the input scale, far more than the noise.
    """
    st = PatchStore(toy_store)
    p = st.patch_size
    blocks = np.random.default_rng(0).integers(0, 2, size=(p // 8,) * 3)
    pattern = np.where(np.kron(blocks, np.ones((8, 8, 8))) > 0, 200, -1000).astype(np.int16)
    patches = np.broadcast_to(pattern, (st.num_locations, p, p, p))
    monkeypatch.setattr(st, "patches", lambda s: patches)
    return st


def test_neighbours_of_an_anchor_share_one_transform(toy_store, monkeypatch):
    # published: the K neighbours are the channels of one (K, P, P, P) tensor given to one MONAI
    # transform (neighbor_transforms); q and k are two independent draws (TwoCropsTransform)
    st = _store_with_identical_patches(toy_store, monkeypatch)
    raw = torch.from_numpy(hu_to_input(st.patches(0)[0]))
    affine_only = PatchPairDataset(st, num_neighbors=2, augment="a")
    for seed in range(3):
        item = affine_only[SampleIndex(1, 4, seed)]
        n0, n1 = item["x_nbr"][0, 0], item["x_nbr"][1, 0]
        assert torch.equal(n0, n1), "identical neighbour patches must get the same transform"
        assert (n0 - raw).abs().max() > 0.5, "the neighbours were augmented"
        assert (item["x_q"][0] - item["x_k"][0]).abs().max() > 0.5, "q and k are independent views"
        assert (item["x_q"][0] - n0).abs().max() > 0.5, "the neighbours' transform is not q's"
    # "agc": the neighbours agree up to the noise (one noise decision: exactly equal without it)
    full = PatchPairDataset(st, num_neighbors=2, augment="agc")
    exact = 0
    for seed in range(16):
        item = full[SampleIndex(2, 3, seed)]
        n0, n1 = item["x_nbr"][0, 0], item["x_nbr"][1, 0]
        if torch.equal(n0, n1):
            exact += 1
        else:  # noise on: the same geometry and gamma, independent noise per voxel
            assert np.corrcoef(n0.flatten().numpy(), n1.flatten().numpy())[0, 1] > 0.9
        assert not torch.equal(item["x_q"], item["x_k"])
    assert exact >= 4  # noise p = 0.25: about 12 of 16 samples have none


def test_augment_views_batch_shares_per_anchor_not_across_anchors(toy_store, monkeypatch):
    # the device path: the whole batch in one call, one neighbour transform per anchor
    st = _store_with_identical_patches(toy_store, monkeypatch)
    x = torch.from_numpy(hu_to_input(st.patches(0)[:1]))[None].expand(3, 1, *(3 * [st.patch_size]))
    x_nbr = x[:, None].expand(3, 2, 1, *(3 * [st.patch_size])).contiguous()
    q, k, n = PatchPairDataset.augment_views(build_augment("a"), x, x.clone(), x_nbr,
                                             generator=torch.Generator().manual_seed(0))
    assert q.shape == x.shape and k.shape == x.shape and n.shape == x_nbr.shape
    assert torch.equal(n[:, 0], n[:, 1])
    assert (n[0, 0] - n[1, 0]).abs().max() > 0.5 and (n[1, 0] - n[2, 0]).abs().max() > 0.5
    assert (q - k).flatten(1).abs().amax(1).min() > 0.5 and (q - n[:, 0]).flatten(1).abs().amax(1).min() > 0.5
    # the same seed gives the same views; no neighbours pass through
    again = PatchPairDataset.augment_views(build_augment("a"), x, x.clone(), x_nbr,
                                           generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((q, k, n), again))
    assert PatchPairDataset.augment_views(build_augment("a"), x, x, None)[2] is None


def test_device_augmentation_in_the_loop_uses_augment_views(tmp_path, monkeypatch):
    from drasclr_lib.training import PretrainConfig, pretrain
    from drasclr_lib.testing import make_toy_store

    root = make_toy_store(tmp_path / "store", n_subjects=8, grid=(2, 2, 1), patch_size=16)
    calls = []
    original = PatchPairDataset.augment_views

    def spy(augment, x_q, x_k, x_nbr, *, generator=None):
        calls.append(None if x_nbr is None else tuple(x_nbr.shape))
        return original(augment, x_q, x_k, x_nbr, generator=generator)

    monkeypatch.setattr(PatchPairDataset, "augment_views", staticmethod(spy))
    pretrain(PretrainConfig(store=str(root), out_dir=str(tmp_path / "run"), epochs=1, batch_size=4, queue_size=4,
                            workers=0, max_steps=1, augment_on="device", num_neighbors=2, progress=False,
                            tensorboard=False, save_every_steps=0, scale_lr=False))
    assert calls == [(4, 2, 1, 16, 16, 16)]


def test_dataset_returns_the_locations_of_its_index(store):
    # every anchor must carry its own atlas location, and its neighbours theirs
    K = 2
    ds = PatchPairDataset(store, num_neighbors=K, augment=None)
    seen = []
    for l in [0, 3, 7, 11, store.num_locations - 1]:
        item = ds[(2, l)]
        assert int(item["loc_idx"]) == l
        np.testing.assert_array_equal(item["loc"].numpy(), store.locs[l].astype(np.float32))
        np.testing.assert_array_equal(item["nbr_locs"].numpy(),
                                      store.locs[store.neighbors[l][:K]].astype(np.float32))
        assert not np.array_equal(item["nbr_locs"][0].numpy(), item["loc"].numpy())
        seen.append(tuple(item["loc"].tolist()))
    assert len(set(seen)) == len(seen), "different locations must carry different location vectors"
    # a DataLoader batch carries the locations of its own loc_idx
    sampler = LocationBatchSampler(store.num_subjects, store.num_locations, 4, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=0)
    locs_seen = set()
    for i, batch in enumerate(loader):
        if i == 9:
            break
        li = batch["loc_idx"].numpy()
        assert len(set(li.tolist())) == 1
        locs_seen.add(int(li[0]))
        np.testing.assert_array_equal(batch["loc"].numpy(), store.locs[li].astype(np.float32))
        np.testing.assert_array_equal(batch["nbr_locs"].numpy(),
                                      store.locs[store.neighbors[li][:, :K]].astype(np.float32))
    assert len(locs_seen) >= 3


def test_subject_groups_index_the_first_visit():
    import pandas as pd

    sids = ["s0", "s1", "s2", "s3", "s4", "s5", "s6"]
    t = pd.DataFrame({"group": ["B", "A", np.nan, "B", " A ", "", None]}, index=sids)
    # the first visit's position; missing or empty = the subject's own group; labels are stripped
    assert subject_groups(t, sids).tolist() == [0, 1, 2, 0, 1, 5, 6]
    assert subject_groups(t, sids[::-1]).tolist() == [0, 1, 2, 3, 4, 2, 3]  # positions in the order given
    # numbers read back from CSV as floats (1.0) are the same patients as ints (1)
    t2 = pd.DataFrame({"group": [1.0, np.nan, 1.0, 2.0]}, index=sids[:4])
    assert subject_groups(t2, sids[:4]).tolist() == [0, 1, 0, 3]
    assert subject_groups(pd.DataFrame(index=sids), sids).tolist() == list(range(7))  # no column


def test_dataset_carries_the_patient_group(tmp_path):
    import pandas as pd

    from drasclr_lib.data.patch_store import finalize_store
    from drasclr_lib.testing import make_toy_store

    root = make_toy_store(tmp_path / "s", n_subjects=6, grid=(2, 1, 1), patch_size=16, with_labels=False)
    finalize_store(root, pd.DataFrame({"sid": [f"toy{i:03d}" for i in range(6)],
                                       "group": ["p1", "p2", "p1", None, "p2", "p1"]}))
    ds = PatchPairDataset(PatchStore(root), num_neighbors=1, augment=None)
    assert [int(ds[(s, 0)]["group"]) for s in range(6)] == [0, 1, 0, 3, 1, 0]
    assert [int(ds[(s, 0)]["subject"]) for s in range(6)] == list(range(6))


# -- the invalid-patch policy ---------------------------------------------------------------------
def _with_fov(root, fractions: dict) -> PatchStore:
    """The store at ``root`` with ``patch_fov_fraction`` written into some subjects' records."""
    from drasclr_lib.utils import load_json, save_json

    for sid, frac in fractions.items():
        path = root / "subjects" / f"{sid}.json"
        save_json({**load_json(path), "patch_fov_fraction": [float(v) for v in frac]}, path)
    return PatchStore(root)


@pytest.fixture(scope="module")
def partial_store(tmp_path_factory):
    """12 subjects x 18 locations; 4 subjects miss some locations (less than half scanned)."""
    from drasclr_lib.testing import make_toy_store

    root = make_toy_store(tmp_path_factory.mktemp("partial"), n_subjects=12, with_labels=False)
    rng = np.random.default_rng(0)
    fractions = {}
    for sid in ("s000", "s003", "s007", "s010"):
        frac = np.ones(18)
        frac[rng.choice(18, 5, replace=False)] = rng.uniform(0.0, 0.49, 5)
        frac[rng.choice(18, 2, replace=False)] = 0.5  # exactly half: valid
        fractions[sid] = frac
    store = PatchStore(root)
    return _with_fov(root, {store.sids[int(s[1:])]: f for s, f in fractions.items()})


def test_sampler_never_draws_an_invalid_anchor_or_neighbour(partial_store):
    from drasclr_lib.training.data import trainable_pairs

    store = partial_store
    valid = store.valid_mask()
    assert (~valid).sum() > 10
    ok = trainable_pairs(store, 2)
    expect = valid & valid[:, store.neighbors[:, 0]] & valid[:, store.neighbors[:, 1]]
    np.testing.assert_array_equal(ok, expect)
    assert (valid & ~ok).any()  # some valid anchors are out because of a neighbour
    for drop_last, world in ((False, 1), (True, 1), (True, 2)):
        drawn = Counter()
        for rank in range(world):
            s = LocationBatchSampler(12, 18, 2, seed=4, drop_last=drop_last, rank=rank, world_size=world, valid=ok)
            for epoch in range(2):
                s.set_epoch(epoch)
                batches = list(s)
                assert len(batches) == len(s) == s.batches_per_epoch
                for b in batches:
                    assert len({l for _, l in b}) == 1
                    for subj, loc in b:
                        assert ok[subj, loc], (subj, loc)  # anchor and key valid, neighbours too
                        assert valid[subj, store.neighbors[loc, :2]].all()
                        drawn[(subj, loc)] += 1
        if not drop_last:  # every trainable pair is drawn once per epoch
            assert set(drawn) == set(zip(*np.nonzero(ok))) and set(drawn.values()) == {2}
    with pytest.raises(ValueError, match="valid"):
        LocationBatchSampler(12, 18, 2, valid=ok[:5])
    with pytest.raises(ValueError, match="nothing to train on"):
        LocationBatchSampler(12, 18, 2, valid=np.zeros((12, 18), bool))


def test_sampler_without_fov_is_unchanged(store):
    from drasclr_lib.training.data import trainable_pairs

    ok = trainable_pairs(store, 2)
    assert ok.all()  # the toy store has no field of view: every pair
    a = [list(map(tuple, b)) for b in LocationBatchSampler(12, 18, 4, seed=0)]
    b = [list(map(tuple, b)) for b in LocationBatchSampler(12, 18, 4, seed=0, valid=ok)]
    assert a == b
