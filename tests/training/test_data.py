"""The per-location batch sampler and the anchor/neighbour dataset."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.intensity import hu_to_input
from drasclr_lib.training.data import LocationBatchSampler, PatchPairDataset, SampleIndex


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
