"""DrasCLR: queues, momentum encoder, split-batch BN, losses and a learning signal on tiny data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from drasclr_lib.models import DrasCLR, DrasEncoder
from drasclr_lib.models.drasclr import strip_module_prefix



P = 16  # 16³ patches also end in a 1³ map; 8x cheaper than 32³ for tests


def _model(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(num_locations=3, queue_size=8, momentum=0.9, temperature=0.2, neighbor_weight=1.0)
    args.update(kw)
    return DrasCLR(DrasEncoder(num_experts=2), **args)


def _views(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.randn(b, 1, 4, 4, 4, generator=g), size=P, mode="trilinear")
    base = base / base.abs().amax(dim=(1, 2, 3, 4), keepdim=True)
    return base + 0.2 * torch.randn(base.shape, generator=g), base + 0.2 * torch.randn(base.shape, generator=g)


def _loc(b, value=(0.2, -0.3, 0.5)):
    return torch.tensor([value]).expand(b, 3).clone()


def test_state_dict_keys_and_queue_init():
    m = _model()
    keys = set(m.state_dict())
    assert {"queue", "queue_ptr", "queue_subject"} <= keys
    assert all(k.startswith(("encoder_q.", "encoder_k.")) for k in keys - {"queue", "queue_ptr", "queue_subject"})
    assert {k[len("encoder_q."):] for k in keys if k.startswith("encoder_q.")} == set(DrasEncoder(num_experts=2).state_dict())
    assert m.queue.shape == (128, 8, 3) and m.queue_ptr.shape == (3,) and m.queue_ptr.dtype == torch.long
    torch.testing.assert_close(m.queue.norm(dim=0), torch.ones(8, 3))
    assert all(not p.requires_grad for p in m.encoder_k.parameters())


def test_published_checkpoint_state_loads(tmp_path):
    from tests.models.test_encoder import _published_checkpoint

    _published_checkpoint(tmp_path / "pub.pth.tar")  # queue (128, 64, 5)
    ckpt = torch.load(tmp_path / "pub.pth.tar", weights_only=True)
    m = DrasCLR(DrasEncoder(), num_locations=5, queue_size=64)
    m.load_state_dict(strip_module_prefix(ckpt["state_dict"]))  # strict
    torch.testing.assert_close(m.queue, ckpt["state_dict"]["module.queue"])


def test_pointer_wraps_modulo_k_and_keys_land_in_their_location():
    m = _model()
    keys = [F.normalize(torch.randn(4, 128), dim=1) for _ in range(3)]
    for i, k in enumerate(keys):
        m.dequeue_and_enqueue(k, 1)
        assert m.queue_ptr.tolist() == [0, (4 * (i + 1)) % 8, 0]
    torch.testing.assert_close(m.queue[:, 0:4, 1], keys[2].T)  # wrapped over the oldest
    torch.testing.assert_close(m.queue[:, 4:8, 1], keys[1].T)
    # per-sample locations: each location's keys at its own pointer, wrapping at K
    m.queue_ptr[2] = 6
    k3 = F.normalize(torch.randn(4, 128), dim=1)
    m.dequeue_and_enqueue(k3, torch.tensor([2, 0, 2, 2]))
    assert m.queue_ptr.tolist() == [1, 4, 1]
    torch.testing.assert_close(m.queue[:, [6, 7, 0], 2], k3[[0, 2, 3]].T)
    torch.testing.assert_close(m.queue[:, 0, 0], k3[1])


def test_queue_size_must_be_multiple_of_batch():
    m = _model()
    with pytest.raises(ValueError, match="queue_size .*multiple"):
        m.dequeue_and_enqueue(torch.randn(3, 128), 0)
    with pytest.raises(ValueError, match="exceed queue_size"):
        m.dequeue_and_enqueue(torch.randn(9, 128), torch.zeros(9, dtype=torch.long))


def test_momentum_update_formula():
    m = _model(momentum=0.9)
    k0 = [p.detach().clone() for p in m.encoder_k.parameters()]
    with torch.no_grad():
        for p in m.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    m.momentum_update()
    for pk, pk0, pq in zip(m.encoder_k.parameters(), k0, m.encoder_q.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)


def test_forward_gradients_reach_query_encoder_only_and_outputs():
    m = _model()
    xq, xk = _views(4)
    nbr = torch.stack(_views(4, seed=1), dim=1)  # B x 2 x 1 x P x P x P
    out = m(xq, xk, 1, _loc(4), nbr, torch.rand(4, 2, 3) * 2 - 1)
    assert out["logits"].shape == (4, 9) and out["logits_neighbor"].shape == (4, 9)
    torch.testing.assert_close(out["loss"], out["loss_local"] + out["loss_neighbor"])
    assert 0.0 <= out["acc1"] <= 100.0
    out["loss"].backward()
    assert all(p.grad is None for p in m.encoder_k.parameters())
    assert m.encoder_q.conv1.weight.grad.abs().sum() > 0
    assert m.encoder_q.conv1._routing_fn.fc.weight.grad.abs().sum() > 0
    assert m.queue_ptr.tolist() == [0, 4, 0]


def test_neighbor_embeddings_stay_with_their_samples():
    """Neighbour patches (B, Kn) are encoded location-major; each r[i, j] must still be sample i's neighbour j."""
    from drasclr_lib.losses import neighbor_info_nce

    m = _model().eval()  # eval: BatchNorm uses running statistics, so a per-sample encoding is the reference
    xq, xk = _views(4)
    nbr = torch.stack([*_views(4, seed=1), _views(4, seed=2)[0]], dim=1)  # B x 3 x 1 x P x P x P
    nbr = nbr * torch.linspace(0.2, 3.0, 12).view(4, 3, 1, 1, 1, 1)  # every (sample, neighbour) clearly different
    nbr_locs = (torch.rand(1, 3, 3) * 2 - 1).expand(4, 3, 3).clone()  # the same 3 neighbour locations per sample
    with torch.no_grad():  # BatchNorm statistics of real activations, else every embedding points the same way
        for bn in (mod for mod in m.encoder_q.modules() if isinstance(mod, torch.nn.BatchNorm3d)):
            bn.momentum = 1.0
        m.encoder_q.train()(nbr.flatten(0, 1), nbr_locs.flatten(0, 1))
        m.encoder_q.eval()
        out = m(xq, xk, 1, _loc(4), nbr, nbr_locs)
        r = torch.stack([torch.stack([F.normalize(m.encoder_q(nbr[i, j:j + 1], nbr_locs[i, j:j + 1])[0], dim=1)[0]
                                      for j in range(3)]) for i in range(4)])  # r: B x Kn x dim
        k = F.normalize(m.encoder_k(xk, _loc(4))[0], dim=1)
        ref, ref_logits = neighbor_info_nce(r, k, m.queue[:, :, 1].T.clone(), m.temperature)
    torch.testing.assert_close(out["loss_neighbor"], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["logits_neighbor"], ref_logits, atol=1e-5, rtol=0)


def test_neighbor_weight_zero_disables_neighbor_loss():
    m = _model(neighbor_weight=0.0)
    xq, xk = _views(4)
    out = m(xq, xk, 0, _loc(4), torch.stack(_views(4, 1), 1), torch.rand(4, 2, 3))
    assert out["loss_neighbor"].item() == 0.0 and out["logits_neighbor"] is None
    torch.testing.assert_close(out["loss"], out["loss_local"])


def test_output_changes_with_location():
    xq, xk = _views(4)
    logits = []
    for value in ((0.9, -0.9, 0.9), (-0.9, 0.9, -0.9)):
        m = _model()  # same weights and queue each time
        torch.manual_seed(1)  # same split-BN permutation
        logits.append(m(xq, xk, 0, _loc(4, value))["logits"].detach())
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_eval_mode_does_not_touch_queue_or_key_encoder():
    m = _model().eval()
    xq, xk = _views(4)
    queue, ptr = m.queue.clone(), m.queue_ptr.clone()
    k_params = [p.clone() for p in m.encoder_k.parameters()]
    with torch.no_grad():
        m.encoder_q.conv1.weight.add_(1.0)
        m(xq, xk, 0, _loc(4))
    assert torch.equal(m.queue, queue) and torch.equal(m.queue_ptr, ptr)  # eval: no enqueue
    assert all(torch.equal(p, q) for p, q in zip(m.encoder_k.parameters(), k_params))  # eval: no momentum step


def test_per_sample_locations_use_their_own_queues():
    m = _model().eval()
    xq, xk = _views(4)
    loc_idx = torch.tensor([0, 2, 2, 1])
    locs = m.queue.new_tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [-0.4, 0.0, 0.2]])
    with torch.no_grad():
        out = m(xq, xk, loc_idx, locs)
        q = F.normalize(m.encoder_q(xq, locs)[0], dim=1)
    for i, l in enumerate(loc_idx.tolist()):
        torch.testing.assert_close(out["logits"][i, 1:], q[i] @ m.queue[:, :, l] / 0.2)


def test_split_bn_changes_key_features_and_equals_per_subbatch_bn():
    m = _model(split_bn=2).train()
    xk, _ = _views(8, seed=3)
    locs = _loc(8)
    enc = copy.deepcopy(m.encoder_k)  # reference on a copy (running statistics move)
    torch.manual_seed(7)
    k_split = m.encode_keys(xk, locs)
    torch.manual_seed(7)
    perm = torch.randperm(8)
    with torch.no_grad():
        ref = torch.cat([enc(xk[perm[:4]], locs[:4])[0], enc(xk[perm[4:]], locs[4:])[0]])
    torch.testing.assert_close(k_split, F.normalize(ref, dim=1)[torch.argsort(perm)], atol=1e-5, rtol=0)
    m1 = _model(split_bn=1).train()
    k_whole = m1.encode_keys(xk, locs)
    with torch.no_grad():  # a permutation alone changes nothing with whole-batch BN
        torch.testing.assert_close(k_whole, F.normalize(copy.deepcopy(m1.encoder_k)(xk.flip(0), locs)[0], dim=1).flip(0),
                                   atol=1e-5, rtol=0)
    assert (k_split - k_whole).abs().max() > 1e-3


@pytest.mark.parametrize("b,splits", [(7, 3), (5, 2), (9, 4), (2, 3)])
def test_split_bn_with_uneven_batches_never_leaves_a_one_sample_chunk(b, splits):
    m = _model(split_bn=splits).train()
    xk, _ = _views(b, seed=4)
    k = m.encode_keys(xk, _loc(b))  # chunk() gave 3, 3, 1 for 7 / 3 and BatchNorm failed on the 1
    assert k.shape == (b, 128) and torch.isfinite(k).all()
    torch.testing.assert_close(k.norm(dim=1), torch.ones(b))


def test_loss_goes_down_on_tiny_data():
    m = _model(num_locations=2, queue_size=16, neighbor_weight=0.0)
    opt = torch.optim.SGD(m.encoder_q.parameters(), lr=0.05, momentum=0.9)
    pa, pb = _views(16, seed=100)

    def probe():  # InfoNCE of 16 held-out pairs against each other (train-mode BN on a copy)
        enc = copy.deepcopy(m.encoder_q).train()
        with torch.no_grad():
            q, k = (F.normalize(enc(v, _loc(16))[0], dim=1) for v in (pa, pb))
        return F.cross_entropy(q @ k.T / 0.2, torch.arange(16)).item()

    before = probe()
    losses = []
    for step in range(20):
        xq, xk = _views(8, seed=step + 1)
        out = m(xq, xk, 0, _loc(8))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    after = probe()
    assert after < before - 0.7, (before, after)
    assert sum(losses[-5:]) / 5 < 0.85 * math.log(17), losses


@pytest.mark.parametrize("kw", [dict(num_locations=0), dict(queue_size=0), dict(momentum=1.5), dict(temperature=0.0),
                                dict(neighbor_weight=-1.0), dict(split_bn=0), dict(num_locations=2.5)])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        _model(**kw)


def test_bad_inputs_raise():
    m = _model()
    xq, xk = _views(4)
    with pytest.raises(ValueError, match="encoder_q"):
        DrasCLR(torch.nn.Linear(2, 2), num_locations=2)
    with pytest.raises(ValueError, match="loc_idx"):
        m(xq, xk, 3, _loc(4))
    with pytest.raises(ValueError, match="loc_idx"):
        m(xq, xk, torch.tensor([0, 1, 5, 0]), _loc(4))
    with pytest.raises(ValueError, match="x_k"):
        m(xq, xk[:2], 0, _loc(4))
    with pytest.raises(ValueError, match="locs"):
        m(xq, xk, 0, _loc(3))
    with pytest.raises(ValueError, match="together"):
        m(xq, xk, 0, _loc(4), torch.stack([xq, xq], 1), None)
    with pytest.raises(ValueError, match="nbr_locs"):
        m(xq, xk, 0, _loc(4), torch.stack([xq, xq], 1), torch.zeros(4, 3, 3))


def _ddp_worker(rank, world, port, result_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _model(queue_size=16)  # same seed on every rank: same initial weights and queue
        # shuffle/unshuffle round trip, and locations travel with their patches
        x = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 1, 2, 2, 2) + 10 * rank
        locs = x[:, :, 0, 0, 0].expand(4, 3).clone()
        xs, ls, idx_unshuffle = m._batch_shuffle_ddp(x, locs)
        assert torch.equal(xs[:, 0, 0, 0, 0], ls[:, 0])
        assert torch.equal(m._batch_unshuffle_ddp(xs[:, 0, 0, 0, 0].contiguous(), idx_unshuffle), x[:, 0, 0, 0, 0])
        # a training step: keys of both ranks enter every rank's queue
        xq, xk = _views(4, seed=rank)
        out = m(xq, xk, 2, _loc(4))
        out["loss"].backward()
        torch.save({"queue": m.queue, "ptr": m.queue_ptr}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_cpu_processes_share_queues(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ptr"].tolist() == r1["ptr"].tolist() == [0, 0, 8]  # 2 ranks x 4 keys
    torch.testing.assert_close(r0["queue"], r1["queue"])
    fresh = _model(queue_size=16).queue
    assert not torch.allclose(r0["queue"][:, :8, 2], fresh[:, :8, 2]) and torch.equal(r0["queue"][:, 8:], fresh[:, 8:])
