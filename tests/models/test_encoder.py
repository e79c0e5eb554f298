"""DrasEncoder: published architecture and names, batched == per-sample, checkpoint loading."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from drasclr_lib.models import DrasEncoder, load_encoder



# ------------------------------------------------------------------------------------------------
# An independent re-implementation of the published encoder (batmanlab/DrasCLR models/cnn3d.py and
# models/condconv3d.py): per-sample Python loop, routing on the flattened location, MoCo v2 MLP head
# put in front of the linear fc by the published builder (mlp=True, its training default).
# ------------------------------------------------------------------------------------------------
class _PubRouting(nn.Module):
    def __init__(self, n_in, n_exp):
        super().__init__()
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(n_in, n_exp)

    def forward(self, loc):
        return torch.sigmoid(self.fc(torch.flatten(loc)))


class _PubCondConv(nn.Module):
    def __init__(self, cin, cout, stride, experts=8):
        super().__init__()
        self.stride, self.padding = stride, 1
        self.weight = nn.Parameter(torch.empty(experts, cout, cin, 3, 3, 3))
        self.bias = nn.Parameter(torch.empty(cout))
        self._routing_fn = _PubRouting(3, experts)
        # published init: _ConvNd.reset_parameters on the expert-stacked tensor
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        bound = 1 / (cout * cin * 27) ** 0.5
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, inputs, locs):
        outs = []
        for i in range(inputs.shape[0]):
            r = self._routing_fn(locs[i].unsqueeze(0))
            kernel = torch.sum(r[:, None, None, None, None, None] * self.weight, 0)
            outs.append(nn.functional.conv3d(inputs[i].unsqueeze(0), kernel, self.bias, self.stride, 1))
        return torch.cat(outs, 0)


class _PubBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = _PubCondConv(cin, cout, 1), nn.BatchNorm3d(cout)
        self.conv2, self.bn2 = _PubCondConv(cout, cout, 1), nn.BatchNorm3d(cout)
        self.conv3, self.bn3 = _PubCondConv(cout, cout, 2), nn.BatchNorm3d(cout)
        self.act = nn.ELU(inplace=True)

    def forward(self, x, loc):
        x = self.act(self.bn1(self.conv1(x, loc)))
        x = self.act(self.bn2(self.conv2(x, loc)))
        return self.act(self.bn3(self.conv3(x, loc)))


class _PubEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act = _PubCondConv(1, 8, 1), nn.BatchNorm3d(8), nn.ELU()
        self.conv2, self.bn2 = _PubCondConv(8, 8, 2), nn.BatchNorm3d(8)
        self.downsample1, self.downsample2, self.downsample3 = _PubBlock(8, 16), _PubBlock(16, 32), _PubBlock(32, 64)
        self.conv3, self.bn3 = _PubCondConv(64, 128, 1), nn.BatchNorm3d(128)
        self.conv4, self.bn4 = _PubCondConv(128, 128, 2), nn.BatchNorm3d(128)
        self.fc = nn.Linear(128, 128)
        self.fc = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), self.fc)  # builder's mlp replacement

    def forward(self, x, loc):
        x = self.act(self.bn1(self.conv1(x, loc)))
        x = self.act(self.bn2(self.conv2(x, loc)))
        x = self.downsample3(self.downsample2(self.downsample1(x, loc), loc), loc)
        x = self.act(self.bn3(self.conv3(x, loc)))
        x = self.act(self.bn4(self.conv4(x, loc)))
        h = torch.flatten(x, 1)
        return self.fc(h), h


def _randomise_bn(model, gen):
    """Give BatchNorm non-trivial affine parameters and running statistics (a "trained" state)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    for m in bns:
        m.momentum = None  # cumulative average
        m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    model.train()
    with torch.no_grad():
        x = torch.rand(4, 1, 32, 32, 32, generator=gen) * 2 - 1
        model(x, (torch.rand(1, 3, generator=gen) * 2 - 1).expand(4, 3))
    for m in bns:
        m.momentum = 0.1
    model.eval()


def _inputs(b=3, seed=0, mixed=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 32, 32, 32, generator=gen) * 2 - 1
    loc = torch.rand(b if mixed else 1, 3, generator=gen) * 2 - 1
    return x, loc.expand(b, 3).clone()


def _published_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    pub_q, pub_k = _PubEncoder(), _PubEncoder()
    _randomise_bn(pub_q, torch.Generator().manual_seed(seed + 1))
    sd = {f"module.encoder_q.{k}": v for k, v in pub_q.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v for k, v in pub_k.state_dict().items()})
    sd["module.queue"] = nn.functional.normalize(torch.randn(128, 64, 5), dim=0)
    sd["module.queue_ptr"] = torch.zeros(5, dtype=torch.long)
    opt = torch.optim.SGD(pub_q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    torch.save({"epoch": 20, "arch": "custom", "state_dict": sd, "optimizer": opt.state_dict()}, path)
    return pub_q.eval()


# ------------------------------------------------------------------------------------------------
def test_state_dict_names_and_shapes_match_published():
    enc = DrasEncoder()
    pub = _PubEncoder()
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in pub.state_dict().items()}
    assert ours == theirs
    assert ours["conv1.weight"] == (8, 8, 1, 3, 3, 3)
    assert ours["conv1._routing_fn.fc.weight"] == (8, 3)
    assert ours["downsample3.conv3.weight"] == (8, 64, 64, 3, 3, 3)
    assert ours["conv4.weight"] == (8, 128, 128, 3, 3, 3)
    assert {"bn4.running_var", "fc.0.weight", "fc.2.bias", "downsample2.bn3.num_batches_tracked"} <= set(ours)


def test_parameter_count_about_8_3_million():
    n = sum(p.numel() for p in DrasEncoder().parameters())
    assert abs(n - 8.3e6) / 8.3e6 < 0.03, n


def test_plain_encoder_names():
    enc = DrasEncoder(conditional=False)
    sd = enc.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (8, 1, 3, 3, 3)
    assert not any("_routing_fn" in k for k in sd)
    assert set(sd) == {k for k in DrasEncoder().state_dict() if "_routing_fn" not in k}
    x, _ = _inputs(2)
    z, h = enc(x, None)
    assert z.shape == (2, 128) and h.shape == (2, 128)


def test_forward_shapes_and_features():
    enc = DrasEncoder(rep_dim=96, proj_dim=64, num_experts=4)
    x, loc = _inputs(2)
    z, h = enc(x, loc)
    assert z.shape == (2, 64) and h.shape == (2, 96)
    feats = enc.forward_features(x, loc)
    assert [tuple(f.shape) for f in feats] == [(2, 8, 32, 32, 32), (2, 8, 16, 16, 16), (2, 16, 8, 8, 8),
                                               (2, 32, 4, 4, 4), (2, 64, 2, 2, 2), (2, 96, 1, 1, 1)]
    torch.testing.assert_close(torch.flatten(feats[-1], 1), h)


@pytest.mark.parametrize("mixed", [True, False])
def test_batched_equals_loop_train_mode_with_grads(mixed):
    torch.manual_seed(3)
    enc = DrasEncoder(num_experts=4).double().train()
    x, loc = _inputs(3, seed=4, mixed=mixed)
    x, loc = x.double(), loc.double()
    z, h = enc(x, loc)
    z2, h2 = enc.forward_loop(x, loc)
    torch.testing.assert_close(z, z2, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, h2, atol=1e-6, rtol=0)
    p = enc.downsample2.conv2._routing_fn.fc.weight
    g1 = torch.autograd.grad(z.square().sum(), p)[0]
    g2 = torch.autograd.grad(z2.square().sum(), p)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-6)


def test_output_depends_on_location():
    torch.manual_seed(5)
    enc = DrasEncoder().eval()
    _randomise_bn(enc, torch.Generator().manual_seed(0))
    x, _ = _inputs(1)
    x = x.expand(2, -1, -1, -1, -1)
    loc = torch.tensor([[-0.8, -0.5, 0.9], [0.7, 0.6, -0.9]])
    with torch.no_grad():
        _, h = enc(x, loc)
    assert (h[0] - h[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs", [dict(rep_dim=0), dict(proj_dim=-1), dict(num_experts=0), dict(conditional=1),
                                    dict(rep_dim=12.5)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        DrasEncoder(**kwargs)


def test_bad_inputs_raise():
    enc = DrasEncoder(num_experts=2)
    with pytest.raises(ValueError, match="x must be"):
        enc(torch.zeros(1, 2, 32, 32, 32), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="loc must be"):
        enc(torch.zeros(2, 1, 32, 32, 32), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="loc must be"):
        enc(torch.zeros(2, 1, 32, 32, 32), None)
    with pytest.raises(ValueError, match="forward_features"):
        enc.eval()(torch.zeros(1, 1, 64, 64, 64), torch.zeros(1, 3))


# ---------------------------------------------------------------------------------- load_encoder
def test_published_checkpoint_gives_same_z_and_h(tmp_path):
    path = tmp_path / "checkpoint_0020.pth.tar"
    pub = _published_checkpoint(path)
    enc = load_encoder(path)
    assert not enc.training and enc.conditional and enc.num_experts == 8
    x, loc = _inputs(3, seed=9)
    with torch.no_grad():
        z_ref, h_ref = pub(x, loc)
        z, h = enc(x, loc)
        zs, hs = enc(x, loc[:1].expand(3, 3))
        zs_ref, hs_ref = pub(x, loc[:1].expand(3, 3))
    assert (z - z_ref).abs().max() < 1e-4 and (h - h_ref).abs().max() < 1e-4
    assert (zs - zs_ref).abs().max() < 1e-4 and (hs - hs_ref).abs().max() < 1e-4
    assert h.abs().max() > 1e-2  # a real signal, not all zeros


def test_own_and_bare_formats(tmp_path):
    torch.manual_seed(0)
    enc = DrasEncoder(rep_dim=64, proj_dim=32, num_experts=3)
    sd = {f"encoder_q.{k}": v for k, v in enc.state_dict().items()}
    sd.update({f"encoder_k.{k}": torch.zeros_like(v) for k, v in enc.state_dict().items()})
    sd["queue"], sd["queue_ptr"] = torch.randn(32, 8, 2), torch.zeros(2, dtype=torch.long)
    torch.save({"epoch": 1, "arch": "drasclr", "state_dict": sd, "config": {"num_experts": 3, "lr": 0.01}},
               tmp_path / "own.pt")
    torch.save(DrasEncoder(conditional=False).state_dict(), tmp_path / "bare.pt")
    own = load_encoder(tmp_path / "own.pt")
    assert own.config == {"rep_dim": 64, "proj_dim": 32, "num_experts": 3, "conditional": True}
    for k, v in enc.state_dict().items():
        assert torch.equal(own.state_dict()[k], v), k
    bare = load_encoder(tmp_path / "bare.pt")
    assert not bare.conditional and not bare.training
    with pytest.raises(ValueError, match="conditional"):
        load_encoder(tmp_path / "bare.pt", conditional=True)


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": DrasEncoder(num_experts=2).state_dict(), "payload": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt.*refused"):
        load_encoder(path)
    assert not marker.exists()


def test_wrong_shape_or_key_names_it(tmp_path):
    sd = DrasEncoder(num_experts=2).state_dict()
    sd["downsample1.bn2.weight"] = torch.ones(5)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"downsample1\.bn2\.weight.*\(5,\).*\(16,\)"):
        load_encoder(tmp_path / "shape.pt")
    sd = DrasEncoder(num_experts=2).state_dict()
    del sd["conv3.bias"]
    sd["extra.weight"] = torch.ones(1)
    torch.save(sd, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"missing keys 'conv3\.bias'.*unexpected keys 'extra\.weight'"):
        load_encoder(tmp_path / "keys.pt")
    assert not load_encoder(tmp_path / "keys.pt", strict=False).training
    torch.save({"state_dict": {"foo": torch.ones(1)}}, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="no encoder weights"):
        load_encoder(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_encoder(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "missing.pt")
