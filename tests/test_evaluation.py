"""View metrics: the maths on tiny arrays, paired views, eval mode, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.models import random_encoder
from drasclr_lib.evaluation import pair_similarities, retrieval_top1, even_indices, view_metrics
from drasclr_lib.testing import make_toy_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return PatchStore(make_toy_store(tmp_path_factory.mktemp("eval_store"), n_subjects=5, grid=(2, 2, 2)))


@pytest.fixture(scope="module")
def encoder(store):
    return random_encoder(0, store=store, calibration_batches=4, batch_size=5, device="cpu")


class _Density(torch.nn.Module):
    """z = h = (mean intensity, 1): the cosine orders patches by density, which augmentation keeps."""

    def forward(self, x, loc):
        m = x.flatten(1).mean(1)
        h = torch.stack([m, torch.ones_like(m)], 1)
        return h, h


class _Constant(torch.nn.Module):
    """A collapsed encoder: every patch gives the same vector."""

    def forward(self, x, loc):
        h = torch.ones(len(x), 4)
        return h, h


def test_retrieval_top1_perfect_wrong_and_ties():
    a = np.eye(4)
    assert retrieval_top1(a, a) == 1.0
    assert retrieval_top1(a, a[[1, 2, 3, 0]]) == 0.0  # every nearest neighbour is another item
    assert retrieval_top1(np.ones((4, 3)), np.ones((4, 3))) == 0.0  # ties are misses
    # a_0 and a_1 both point to b_0 (1 of 2 right); b_0 -> a_0 and b_1 -> a_1 (2 of 2): 3 of 4
    a2, b2 = np.array([[1.0, 0.0], [0.9, 0.1]]), np.array([[1.0, 0.05], [0.0, 1.0]])
    assert retrieval_top1(a2, b2) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        retrieval_top1(np.ones((3, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError):
        retrieval_top1(np.ones((1, 2)), np.ones((1, 2)))


def test_pair_similarities_against_a_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    pos, neg = pair_similarities(a, b)
    assert pos == pytest.approx(np.mean([cos(a[i], b[i]) for i in range(5)]))
    assert neg == pytest.approx(np.mean([cos(a[i], b[j]) for i in range(5) for j in range(5) if i != j]))
    assert pair_similarities(np.eye(3), np.eye(3)) == pytest.approx((1.0, 0.0))


def test_even_indices_even_and_bounded():
    np.testing.assert_array_equal(even_indices(10, 0), np.arange(10))
    np.testing.assert_array_equal(even_indices(10, 20), np.arange(10))
    s = even_indices(100, 5)
    assert s[0] == 0 and s[-1] == 99 and len(s) == 5 and (np.diff(s) > 0).all()
    with pytest.raises(ValueError):
        even_indices(0, 3)


def test_view_metrics_paired_views(store, encoder):
    kw = dict(num_locations=4, seed=3, device="cpu")
    res = view_metrics({"density": _Density(), "constant": _Constant(), "random": encoder}, store, **kw)
    const = res["constant"]
    assert const["alignment"] == pytest.approx(1.0) and const["separation"] == pytest.approx(0.0)
    assert const["retrieval_top1"] == 0.0 and const["chance"] == pytest.approx(1 / 5)
    assert res["density"]["retrieval_top1"] > 0.6  # the toy subjects differ in emphysema density
    assert res["density"]["separation"] > 0
    assert res["random"]["n_locations"] == 4 and res["random"]["n_subjects"] == 5
    # the views are a function of the seed: the same numbers alone or in company
    alone = view_metrics(encoder, store, **kw)
    assert alone == res["random"]
    assert view_metrics(encoder, store, **{**kw, "seed": 4}) != alone
    assert view_metrics(encoder, store, **{**kw, "max_subjects": 3})["n_subjects"] == 3
    assert encoder.training is False


def test_view_metrics_run_in_eval_mode_and_restore_it(store):
    enc = random_encoder(1, store=store, calibration_batches=2, batch_size=5, device="cpu").train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    view_metrics(enc, store, locations=[0, 5], device="cpu")
    assert enc.training  # restored
    for k, v in enc.state_dict().items():  # no BatchNorm statistic was updated
        assert torch.equal(v, before[k]), k


def test_view_metrics_reject_bad_arguments(store, encoder):
    with pytest.raises(ValueError, match="2 distinct subjects"):
        view_metrics(encoder, store, subjects=[1])
    with pytest.raises(ValueError, match="location indices"):
        view_metrics(encoder, store, locations=[store.num_locations])
    with pytest.raises(ValueError, match="no encoders"):
        view_metrics({}, store)
