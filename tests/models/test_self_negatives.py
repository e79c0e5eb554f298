"""No anchor is its own negative: the per-entry subject index of the queues and the mask it drives.

The sampler reshuffles the subjects of a location every epoch, so from the second epoch on the
first batches at a location meet queue entries written by the same subjects one epoch earlier.
These tests replay the real sampler with the real queue-size rule against an independent record
of the queue, and check that exactly those pairs are masked and that the masked loss is the
InfoNCE over the remaining negatives.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drasclr_lib.losses import info_nce, neighbor_info_nce
from drasclr_lib.models import DrasCLR, DrasEncoder
from drasclr_lib.training.config import effective_queue_size
from drasclr_lib.training.data import LocationBatchSampler
from tests.models.test_drasclr import _loc, _model, _views


def _fill(m: DrasCLR, loc: int, subjects: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(len(subjects), m.dim, generator=g), dim=1)
    m.dequeue_and_enqueue(keys, loc, torch.tensor(subjects))


def test_queue_subject_records_every_write_and_wraps():
    m = _model(queue_size=8)
    assert m.queue_subject.shape == (8, 3) and bool((m.queue_subject == -1).all())
    _fill(m, 1, [5, 6, 7, 8])
    _fill(m, 1, [9, 10, 11, 12])
    _fill(m, 1, [1, 2, 3, 4])  # wraps: overwrites entries 0-3
    assert m.queue_subject[:, 1].tolist() == [1, 2, 3, 4, 9, 10, 11, 12]
    assert bool((m.queue_subject[:, [0, 2]] == -1).all())
    # per-sample locations write each location's subjects at its own pointer
    m.dequeue_and_enqueue(F.normalize(torch.randn(3, m.dim), dim=1), torch.tensor([0, 2, 0]), torch.tensor([20, 21, 22]))
    assert m.queue_subject[:2, 0].tolist() == [20, 22] and m.queue_subject[0, 2].item() == 21
    # keys without subjects are recorded as unknown, never matched
    m.dequeue_and_enqueue(F.normalize(torch.randn(4, m.dim), dim=1), 2)
    assert m.queue_subject[1:5, 2].tolist() == [-1] * 4
    assert not m.same_subject_mask(2, torch.tensor([-1, 21])).any(dim=1)[0]


def test_masked_loss_equals_infonce_without_the_subjects_own_entries():
    m = _model(queue_size=8, split_bn=1).train()
    _fill(m, 0, [0, 1, 2, 3])
    _fill(m, 0, [4, 5, 6, 7])
    xq, xk = _views(4, seed=1)
    subjects = torch.tensor([2, 9, 6, 3])  # 2, 6 and 3 are in the queue, 9 is not
    queue_before = m.queue[:, :, 0].T.clone()
    owners = m.queue_subject[:, 0].clone()
    ref = _model(queue_size=8, split_bn=1).train()  # same seed: same weights
    ref.load_state_dict(m.state_dict())
    out = m(xq, xk, 0, _loc(4), subjects=subjects)
    assert out["self_negatives"] == 0 and out["masked_negatives"] == 3
    same = owners[None, :] == subjects[:, None]
    assert torch.isinf(out["logits"][:, 1:][same]).all() and torch.isfinite(out["logits"][:, 1:][~same]).all()
    # the reference: per-anchor InfoNCE over the queue without its own subject's entries
    with torch.no_grad():
        ref.momentum_update()
        k = ref.encode_keys(xk, _loc(4))
    q = F.normalize(ref.encoder_q(xq, _loc(4))[0], dim=1)
    losses = [info_nce(q[i:i + 1], k[i:i + 1], queue_before[~same[i]], 0.2)[0] for i in range(4)]
    torch.testing.assert_close(out["loss_local"], torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)
    # unmasked, the same pairs are counted as having reached the loss
    m2 = _model(queue_size=8, split_bn=1, exclude_same_subject=False).train()
    _fill(m2, 0, [0, 1, 2, 3])
    _fill(m2, 0, [4, 5, 6, 7])
    out2 = m2(xq, xk, 0, _loc(4), subjects=subjects)
    assert out2["self_negatives"] == 3 and out2["masked_negatives"] == 0
    assert torch.isfinite(out2["logits"]).all()
    # the enqueued keys carry their subjects
    assert m.queue_subject[:4, 0].tolist() == subjects.tolist()


def test_neighbour_logits_are_masked_too():
    r = F.normalize(torch.randn(2, 2, 8), dim=2)
    k = F.normalize(torch.randn(2, 8), dim=1)
    negs = F.normalize(torch.randn(5, 8), dim=1)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 4] = True
    loss, logits = neighbor_info_nce(r, k, negs, 0.2, neg_mask=mask)
    assert torch.isinf(logits[:, 1:][mask]).all()
    ref = torch.stack([neighbor_info_nce(r[i:i + 1], k[i:i + 1], negs[~mask[i]], 0.2)[0] for i in range(2)]).mean()
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="neg_mask"):
        info_nce(k, k, negs, 0.2, neg_mask=torch.zeros(3, 5, dtype=torch.bool))


def test_old_state_dict_without_subject_index_loads():
    m = _model(queue_size=8)
    sd = {k: v for k, v in m.state_dict().items() if k != "queue_subject"}
    m2 = _model(queue_size=8)
    m2.queue_subject.fill_(3)
    m2.load_state_dict(sd)  # strict: the missing index is filled with "unknown"
    assert bool((m2.queue_subject == -1).all())
    with pytest.raises(ValueError, match="subjects"):
        m(*_views(4), 0, _loc(4), subjects=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("n,b,epochs", [(24, 8, 3), (200, 32, 3), (1000, 128, 3), (13, 4, 4)])
def test_replayed_sampler_meets_own_keys_only_where_the_mask_removes_them(n, b, epochs):
    """Replay the real sampler and queue rule; an independent record of the queue says which
    (anchor, entry) pairs share a subject. The mask must flag exactly those, so none reaches the loss."""
    locations = 3
    k = effective_queue_size(4096, b, n)
    torch.manual_seed(0)
    m = DrasCLR(DrasEncoder(num_experts=1, rep_dim=8, proj_dim=4), num_locations=locations, queue_size=k)
    record = {loc: deque([-1] * k, maxlen=k) for loc in range(locations)}  # oldest first
    sampler = LocationBatchSampler(n, locations, b, seed=3)
    rate = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        hit = total = 0
        for batch in sampler:
            loc = batch[0][1]
            subjects = torch.tensor([s for s, _ in batch])
            mask = m.same_subject_mask(loc, subjects).expand(len(batch), -1)
            # the record as the queue holds it: entry i of the queue is at (i - ptr) mod k in the deque
            ptr = int(m.queue_ptr[loc])
            held = np.roll(np.array(record[loc]), ptr)
            ref = torch.from_numpy(held[None, :] == subjects.numpy()[:, None])
            assert torch.equal(mask, ref)
            hit += int(ref.any(dim=1).sum())
            total += len(batch)
            m.dequeue_and_enqueue(F.normalize(torch.randn(len(batch), 4), dim=1), loc, subjects)
            record[loc].extend(subjects.tolist())
        rate.append(hit / total)
    # epoch 0 never meets itself (the queue rule keeps one epoch's keys of a location distinct);
    # reshuffled later epochs do, which is what the mask is for
    assert rate[0] == 0.0
    assert min(rate[1:]) > 0.05, rate
