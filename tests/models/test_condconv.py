"""Batched conditional convolution equals the per-sample definition; routing and validation."""

from __future__ import annotations

import pytest
import torch

from drasclr_lib.models.condconv import CondConv3d, location_runs, is_same_location, location_groups



def _loop_reference(conv: CondConv3d, x, loc):
    """Independent per-sample definition: r = sigmoid(A loc + b), W = sum_e r_e W_e, conv3d."""
    out = []
    for i in range(x.shape[0]):
        r = torch.sigmoid(loc[i] @ conv._routing_fn.fc.weight.T + conv._routing_fn.fc.bias)
        w = (r.view(-1, 1, 1, 1, 1, 1) * conv.weight).sum(0)
        out.append(torch.nn.functional.conv3d(x[i:i + 1], w, conv.bias, conv.stride, conv.padding))
    return torch.cat(out)


def _locs(kind: str, b: int, gen):
    if kind == "same":
        return (torch.rand(1, 3, generator=gen) * 2 - 1).expand(b, 3).clone()
    if kind == "mixed":
        return torch.rand(b, 3, generator=gen) * 2 - 1
    two = torch.rand(2, 3, generator=gen) * 2 - 1
    if kind == "blocks":  # two locations in contiguous runs, the one torch.unique sorts last first (slicing path)
        later = int(location_groups(two)[1].argmax())
        return two[torch.where(torch.arange(b) < 4, later, 1 - later)]
    # two locations, interleaved (the gather/scatter path)
    return two[torch.arange(b) % 2]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kind", ["same", "mixed", "two", "blocks"])
def test_batched_equals_per_sample_definition(stride, kind):
    gen = torch.Generator().manual_seed(stride * 7 + len(kind))
    torch.manual_seed(0)
    conv = CondConv3d(3, 5, 3, stride, 1, num_experts=4).double()
    b = 9 if kind != "mixed" else 6
    if kind in ("two", "blocks"):
        conv.GROUPED_MIN_UNIQUE_FRACTION = 0.5  # 2 of 9 locations: per-group path
    x = torch.randn(b, 3, 9, 8, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    loc = _locs(kind, b, gen).double()
    y = conv(x, loc)
    ref = _loop_reference(conv, x, loc)
    assert y.shape == ref.shape == (b, 5) + tuple((s + 2 - 3) // stride + 1 for s in (9, 8, 7))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(conv.forward_loop(x, loc), ref, atol=1e-5, rtol=0)
    # gradients (input, expert weights, bias, routing) agree too
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, conv.weight, conv.bias, conv._routing_fn.fc.weight])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, conv.weight, conv.bias, conv._routing_fn.fc.weight])
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_all_paths_agree_float32(stride):
    torch.manual_seed(1)
    conv = CondConv3d(4, 6, stride=stride, num_experts=8)
    x = torch.randn(8, 4, 10, 10, 10)
    loc = torch.rand(8, 3) * 2 - 1
    ref = conv.forward_loop(x, loc)
    torch.testing.assert_close(conv.forward_grouped(x, loc), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(conv(x, loc), ref, atol=1e-5, rtol=0)
    same = loc[:1].expand(8, 3)
    torch.testing.assert_close(conv.forward_single(x, same[:1]), conv.forward_loop(x, same), atol=1e-5, rtol=0)
    torch.testing.assert_close(conv(x, same, same_location=True), conv.forward_loop(x, same), atol=1e-5, rtol=0)


def test_routing_is_sigmoid_and_location_changes_output():
    torch.manual_seed(2)
    conv = CondConv3d(2, 3, num_experts=5)
    loc = torch.tensor([[0.5, -0.2, 0.1], [-0.9, 0.8, 0.3]])
    r = conv.routing_weights(loc)
    torch.testing.assert_close(r, torch.sigmoid(loc @ conv._routing_fn.fc.weight.T + conv._routing_fn.fc.bias))
    assert not torch.allclose(r.sum(1), torch.ones(2))  # not a softmax
    x = torch.randn(1, 2, 6, 6, 6).expand(2, -1, -1, -1, -1)
    y = conv(x, loc)
    assert (y[0] - y[1]).abs().max() > 1e-4


def test_parameter_names_shapes_and_init_bound():
    conv = CondConv3d(8, 16, num_experts=8)
    shapes = {k: tuple(v.shape) for k, v in conv.state_dict().items()}
    assert shapes == {"weight": (8, 16, 8, 3, 3, 3), "bias": (16,), "_routing_fn.fc.weight": (8, 3),
                      "_routing_fn.fc.bias": (8,)}
    bound = 1 / (16 * 8 * 27) ** 0.5  # published: kaiming_uniform(a=sqrt 5) with fan_in of the 6-d tensor
    assert conv.weight.abs().max() <= bound + 1e-7
    assert conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() <= bound + 1e-7
    assert CondConv3d(2, 2, bias=False).bias is None


def test_location_helpers():
    loc = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]])
    uniq, inv = location_groups(loc)
    torch.testing.assert_close(uniq[inv], loc)
    assert uniq.shape[0] == 2
    assert is_same_location(loc[[0, 2]]) and not is_same_location(loc)
    assert location_runs(torch.tensor([1, 1, 0, 0, 0]), 2) == [(1, 2), (0, 3)]
    assert location_runs(torch.tensor([2, 0, 0, 1]), 3) == [(2, 1), (0, 2), (1, 1)]
    assert location_runs(torch.tensor([0, 1, 0]), 2) == []  # location 0 in two runs


@pytest.mark.parametrize("kwargs", [dict(in_channels=0, out_channels=2), dict(in_channels=2, out_channels=2, stride=0),
                                    dict(in_channels=2, out_channels=2, num_experts=0),
                                    dict(in_channels=2, out_channels=2, padding=-1),
                                    dict(in_channels=2.0, out_channels=2)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        CondConv3d(**kwargs)


def test_bad_inputs_raise():
    conv = CondConv3d(2, 3)
    with pytest.raises(ValueError, match="x must be"):
        conv(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="loc must be"):
        conv(torch.zeros(2, 2, 4, 4, 4), torch.zeros(1, 3))
