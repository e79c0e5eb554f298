"""Step-by-step parity of our DrasCLR training step with the published code (batmanlab/DrasCLR v1.0).

The published ``models/builder.py`` (MoCo wrapper), ``models/cnn3d.py`` (encoder) and
``models/condconv3d.py`` (per-sample CondConv3D) are imported from ``../shared/reference`` and run on
the CPU: a one-process gloo group stands in for DDP and ``Tensor.cuda`` is patched to the identity.
Both models start from the same weights and the same queue, in float64, and take the same SGD steps
on the same batches (``train.py``: ``CE(logits_pch) + beta * CE(logits_ngb)``, SGD over
``model.parameters()``; ours: ``out["loss"]``, SGD over ``encoder_q.parameters()`` as
``drasclr_lib.training.loop``). After every step the test compares the local and neighbour logits,
the losses, the gradient of every query-encoder parameter, every parameter and BatchNorm buffer of
both encoders (after the momentum update and after the SGD step), the SGD momentum buffers, the
queues and the pointers.

Our two deliberate differences are switched to the published behaviour: ``split_bn=1`` (whole-batch
BatchNorm for the key encoder; the published one-process shuffle is a permutation, which BatchNorm
ignores) and ``exclude_same_subject=False`` (older keys of the anchor's own subject stay in the
negatives; the test makes such pairs occur and checks that nothing is masked).

Tolerances: float64 throughout; the two sides differ only in the order of floating-point sums
(batched/grouped vs per-sample convolutions, BatchNorm over a permuted batch; BatchNorm of 4 samples
on the 1³ maps amplifies them): measured up to ~1e-11 relative to a tensor's largest entry (1e-11 absolute
on gradients, 1e-17 on the conv biases before BatchNorm, whose gradient is 0 analytically). The
checks use rtol=1e-7 and atol=1e-9: 100x above that noise, far below any modelling difference
(one step of weight decay alone changes a weight by lr * wd = 3e-6 of itself).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from drasclr_lib.models import DrasCLR, DrasEncoder

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
PUBLISHED = REFERENCE / "published_code"

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(),
                                reason=f"published DrasCLR reference code not available ({REFERENCE} is absent)")

RTOL, ATOL = 1e-7, 1e-9
P = 32  # the published neighbour path hard-codes 32³ patches
B, K, KN = 4, 8, 2  # batch, queue size (a multiple of B, so the pointer wraps), neighbours per anchor
LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.03, 0.9, 1e-4


# --------------------------------------------------------------------------------------------------
# the published code
# --------------------------------------------------------------------------------------------------
def _import_published():
    """Load the published ``models.condconv3d``, ``models.cnn3d`` and ``models.builder`` from their files.

    ``cnn3d`` runs ``from models.condconv3d import ...``, so the three modules are registered under
    their own names in ``sys.modules`` while they execute; whatever those names held before (or their
    absence) is restored afterwards. ``sys.path`` is not touched.
    """
    names = ("models", "models.condconv3d", "models.cnn3d", "models.builder")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    try:
        pkg = types.ModuleType("models")
        pkg.__path__ = [str(PUBLISHED / "models")]
        sys.modules["models"] = pkg
        loaded = {}
        for short in ("condconv3d", "cnn3d", "builder"):
            name = f"models.{short}"
            spec = importlib.util.spec_from_file_location(name, PUBLISHED / "models" / f"{short}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            loaded[short] = mod
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    return loaded["builder"], loaded["cnn3d"]


@pytest.fixture
def published(tmp_path, monkeypatch):
    """``(builder, cnn3d)`` modules, with ``.cuda`` as the identity and a one-process gloo group."""
    builder, cnn3d = _import_published()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    created = False
    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path / "gloo_store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created = True
    assert dist.get_world_size() == 1, "the parity test needs a one-process group (ours then runs without DDP)"
    try:
        yield builder, cnn3d
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# data: published atlas locations, published neighbour rule and location normalisation
# --------------------------------------------------------------------------------------------------
def _atlas_conditions(atlas_idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Location conditions ``(L, 3)`` and neighbour conditions ``(L, KN, 3)`` of some atlas landmarks.

    As the published ``COPD_dataset``: ``loc / loc.max(0) * 2 - 1`` and the ``KN`` nearest atlas
    corners (``argsort(dists)[1:KN + 1]``).
    """
    corners = np.load(REFERENCE / "atlas_patch_loc.npy").astype(np.float64)
    norm = corners / corners.max(0) * 2 - 1
    locs, nbrs = [], []
    for i in atlas_idx:
        d = np.linalg.norm(corners - corners[i], axis=1)
        locs.append(norm[i])
        nbrs.append(norm[np.argsort(d, kind="stable")[1:KN + 1]])
    return torch.tensor(np.array(locs)), torch.tensor(np.array(nbrs))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth random patches in [-1, 1]: anchors' query and key views (B, 1, P³) and neighbours (B, KN, 1, P³)."""
    g = torch.Generator().manual_seed(1000 + step)

    def smooth(n):
        x = F.interpolate(torch.randn(n, 1, 8, 8, 8, generator=g, dtype=torch.float64), size=P, mode="trilinear")
        return torch.tanh(x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64))

    base = smooth(B)
    x_q = (base + 0.1 * torch.randn(base.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    x_k = (base + 0.1 * torch.randn(base.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    x_nbr = smooth(B * KN).view(B, KN, 1, P, P, P)
    return x_q, x_k, x_nbr


# --------------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------------
def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _compare_state(ours: DrasCLR, pub, when: str) -> None:
    """Every parameter and buffer of both encoders, the queue and the pointers (exact for integers)."""
    ours_sd, pub_sd = ours.state_dict(), pub.state_dict()
    assert set(ours_sd) - {"queue_subject"} == set(pub_sd), f"{when}: state-dict keys differ"
    for name, ref in pub_sd.items():
        if ref.dtype in (torch.int64, torch.int32):  # queue_ptr, num_batches_tracked
            assert torch.equal(ours_sd[name], ref), f"{when}: {name} {ours_sd[name].tolist()} != {ref.tolist()}"
        else:
            _close(ours_sd[name], ref, f"{when}: {name}")


def _build(builder, cnn3d, *, num_locations, momentum, temperature, beta):
    torch.manual_seed(0)
    pub = builder.DrasCLR(cnn3d.Encoder, num_locations, 128, 128, 8, 1, K, momentum, temperature, True).double()
    enc = DrasEncoder(rep_dim=128, proj_dim=128, num_experts=8).double()
    enc.load_state_dict(pub.encoder_q.state_dict())  # strict: the published names and shapes
    ours = DrasCLR(enc, num_locations=num_locations, queue_size=K, momentum=momentum, temperature=temperature,
                   neighbor_weight=beta, split_bn=1, exclude_same_subject=False).double()
    with torch.no_grad():
        ours.queue.copy_(pub.queue)
    assert ours.queue.dtype == pub.queue.dtype == torch.float64
    _compare_state(ours, pub, "initial state")
    # the published optimiser holds the key encoder's parameters too; they never get a gradient
    opt_pub = torch.optim.SGD(pub.parameters(), LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    opt_ours = torch.optim.SGD(ours.encoder_q.parameters(), lr=LR, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
    return ours, pub, opt_ours, opt_pub


CASES = {
    # one location, the published temperature and beta; 3 steps of B=4 in a K=8 queue: the pointer wraps
    # (4, 0, 4); step 2 meets a queue made only of keys of steps 0 and 1, with an older key of every
    # anchor's own subject among them
    "one_location": dict(atlas_idx=[290], schedule=[0, 0, 0], momentum=0.99, temperature=0.2, beta=1.0),
    # two locations in turn: separate queues and pointers; beta != 1 so that its weight shows
    "two_locations": dict(atlas_idx=[100, 400], schedule=[0, 1, 0, 1], momentum=0.9, temperature=0.2, beta=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_steps_match_published(published, case):
    builder, cnn3d = published
    cfg = CASES[case]
    locs_all, nbr_locs_all = _atlas_conditions(cfg["atlas_idx"])
    num_locations = len(cfg["atlas_idx"])
    ours, pub, opt_ours, opt_pub = _build(builder, cnn3d, num_locations=num_locations, momentum=cfg["momentum"],
                                          temperature=cfg["temperature"], beta=cfg["beta"])
    ours.train()
    pub.train()
    criterion = torch.nn.CrossEntropyLoss()
    q_params_ours = dict(ours.encoder_q.named_parameters())
    q_params_pub = dict(pub.encoder_q.named_parameters())
    assert set(q_params_ours) == set(q_params_pub)

    expected_ptr = [0] * num_locations
    visits = [0] * num_locations
    queue_subjects = {loc: [] for loc in range(num_locations)}  # subjects of the keys written, per location
    for step, loc in enumerate(cfg["schedule"]):
        when = f"{case}, step {step} (location {loc})"
        x_q, x_k, x_nbr = _batch(step)
        locs = locs_all[loc].expand(B, 3).clone()
        nbr_locs = nbr_locs_all[loc].expand(B, KN, 3).clone()
        # the same subjects come back on every other visit of a location, so older keys of an
        # anchor's own subject sit in its queue: published behaviour keeps them as negatives
        subjects = torch.arange(B) + B * (visits[loc] % 2) + 100 * loc
        own_in_queue = sum(queue_subjects[loc][-K:].count(int(s)) for s in subjects)

        # ---- forward (the momentum update and the enqueue happen inside)
        logits_pch, logits_ngb, labels = pub(patch_idx=loc, pch_q=[x_q.clone(), locs.clone()],
                                             pch_k=[x_k.clone(), locs.clone()],
                                             ngb_q=[x_nbr[:, :, 0].clone(), nbr_locs.clone()])
        loss_pch = criterion(logits_pch, labels)
        loss_ngb = criterion(logits_ngb, labels)
        loss_pub = loss_pch + cfg["beta"] * loss_ngb
        out = ours(x_q, x_k, torch.full((B,), loc, dtype=torch.long), locs, x_nbr=x_nbr, nbr_locs=nbr_locs,
                   subjects=subjects)

        assert labels.tolist() == [0] * B
        _close(out["logits"], logits_pch, f"{when}: local logits")
        _close(out["logits_neighbor"], logits_ngb, f"{when}: neighbour logits")
        _close(out["loss_local"], loss_pch, f"{when}: local loss")
        _close(out["loss_neighbor"], loss_ngb, f"{when}: neighbour loss")
        _close(out["loss"], loss_pub, f"{when}: total loss")
        assert out["masked_negatives"] == 0 and out["self_negatives"] == own_in_queue, when
        # key encoder after the momentum update, BatchNorm running statistics of both encoders, queues
        expected_ptr[loc] = (expected_ptr[loc] + B) % K
        assert ours.queue_ptr.tolist() == pub.queue_ptr.tolist() == expected_ptr, when
        _compare_state(ours, pub, f"{when}, after forward")

        # ---- backward
        opt_pub.zero_grad()
        loss_pub.backward()
        opt_ours.zero_grad(set_to_none=True)
        out["loss"].backward()
        for name, p_pub in q_params_pub.items():
            assert p_pub.grad is not None and q_params_ours[name].grad is not None, f"{when}: no gradient for {name}"
            _close(q_params_ours[name].grad, p_pub.grad, f"{when}: gradient of encoder_q.{name}")
        assert all(p.grad is None for p in pub.encoder_k.parameters())
        assert all(p.grad is None for p in ours.encoder_k.parameters())

        # ---- SGD step
        opt_pub.step()
        opt_ours.step()
        _compare_state(ours, pub, f"{when}, after the SGD step")
        for name, p_pub in q_params_pub.items():
            _close(opt_ours.state[q_params_ours[name]]["momentum_buffer"], opt_pub.state[p_pub]["momentum_buffer"],
                   f"{when}: SGD momentum buffer of encoder_q.{name}")
        assert all(p not in opt_pub.state or not opt_pub.state[p] for p in pub.encoder_k.parameters()), \
            "the published optimiser must leave the key encoder alone"

        visits[loc] += 1
        queue_subjects[loc].extend(int(s) for s in subjects)

    assert all(v >= 2 for v in visits), "every location's pointer must wrap around its queue"
