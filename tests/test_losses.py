"""Contrastive losses against closed forms and a NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drasclr_lib.losses import info_nce, neighbor_info_nce, topk_accuracy


def _np_info_nce(q, k, negs_kd, tau):
    pos = (q * k).sum(1, keepdims=True)
    logits = np.concatenate([pos, q @ negs_kd.T], axis=1) / tau
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    return float(np.mean(lse - logits[:, 0])), logits


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("K", [1, 7, 64])
def test_all_equal_negatives_give_log_k_plus_1(K):
    v = _unit(1, 16)
    q = v.expand(5, 16)
    loss, logits = info_nce(q, q.clone(), v.expand(K, 16), temperature=0.2)
    assert logits.shape == (5, 1 + K)
    assert abs(loss.item() - math.log(K + 1)) < 1e-10
    r = v.expand(5, 2, 16) / 2
    loss_n, _ = neighbor_info_nce(r, q.clone(), v.T.expand(16, K), temperature=0.07)  # (D, K) layout
    assert abs(loss_n.item() - math.log(K + 1)) < 1e-10


def test_matches_numpy_reference_both_layouts():
    q, k, negs = _unit(6, 8, seed=1), _unit(6, 8, seed=2), _unit(20, 8, seed=3)
    ref_loss, ref_logits = _np_info_nce(q.numpy(), k.numpy(), negs.numpy(), 0.2)
    for n in (negs, negs.T):  # (K, D) and the queue's (D, K)
        loss, logits = info_nce(q, k, n, 0.2)
        np.testing.assert_allclose(logits.numpy(), ref_logits, atol=1e-12)
        assert abs(loss.item() - ref_loss) < 1e-12


def test_neighbor_loss_matches_numpy_reference():
    r, k, negs = _unit(4, 3, 8, seed=4), _unit(4, 8, seed=5), _unit(10, 8, seed=6)
    rn, kn, nn_ = r.numpy(), k.numpy(), negs.numpy()
    pos = np.einsum("bjd,bd->b", rn, kn)[:, None]
    neg = np.einsum("bjd,kd->bk", rn, nn_)
    logits_ref = np.concatenate([pos, neg], 1) / 0.2
    loss_ref = float(np.mean(np.log(np.exp(logits_ref).sum(1)) - logits_ref[:, 0]))
    loss, logits = neighbor_info_nce(r, k, negs.T, 0.2)
    np.testing.assert_allclose(logits.numpy(), logits_ref, atol=1e-12)
    assert abs(loss.item() - loss_ref) < 1e-12


def test_gradient_reaches_queries_only():
    q = _unit(4, 8, seed=7).requires_grad_()
    k = _unit(4, 8, seed=8).requires_grad_()
    negs = _unit(8, 12, seed=9).requires_grad_()  # (D, K)
    r = _unit(4, 2, 8, seed=10).requires_grad_()
    loss, _ = info_nce(q, k, negs, 0.2)
    loss_n, _ = neighbor_info_nce(r, k, negs, 0.2)
    (loss + loss_n).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert r.grad is not None and r.grad.abs().sum() > 0
    assert k.grad is None and negs.grad is None


def test_perfect_positive_gives_low_loss_and_full_accuracy():
    q = _unit(8, 16, seed=11)
    negs = -q[:4]  # far from every query
    loss, logits = info_nce(q, q.clone(), negs, 0.05)
    assert loss.item() < 1e-3
    assert topk_accuracy(logits, 1) == 100.0


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    assert topk_accuracy(logits, 1) == 25.0
    assert topk_accuracy(logits, 2) == 50.0
    assert topk_accuracy(logits, 3) == 100.0
    assert topk_accuracy(logits, 1, target=torch.tensor([0, 1, 1, 2])) == 75.0
    with pytest.raises(ValueError):
        topk_accuracy(logits, 4)


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=-1.0)])
def test_bad_arguments_raise(bad):
    q = _unit(2, 4)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, q, q, **bad)
    with pytest.raises(ValueError, match="negatives"):
        info_nce(q, q, _unit(3, 5), 0.2)
    with pytest.raises(ValueError, match="q and k"):
        info_nce(q, _unit(3, 4), q, 0.2)
    with pytest.raises(ValueError, match="r must be"):
        neighbor_info_nce(q, q, q, 0.2)


def test_per_sample_negatives_match_shared_ones_row_by_row():
    q, k = _unit(3, 8, seed=12), _unit(3, 8, seed=13)
    negs = [_unit(5, 8, seed=20 + i) for i in range(3)]
    loss, logits = info_nce(q, k, torch.stack(negs), 0.2)  # (B, K, D)
    for i in range(3):
        _, row = info_nce(q[i:i + 1], k[i:i + 1], negs[i], 0.2)
        torch.testing.assert_close(logits[i:i + 1], row)
    with pytest.raises(ValueError, match="rows"):
        info_nce(q, k, torch.stack(negs[:2]), 0.2)
