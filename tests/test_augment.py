"""Augmentations: shapes, ranges, determinism, the flip and the affine geometry, spec parsing."""

from __future__ import annotations

import math

import pytest
import torch

from drasclr_lib.augment import NOISE_STD_INPUT, PatchAugment, affine_resample, build_augment, parse_augment_spec


def _patches(b=6, p=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, p, p, p, generator=g) * 2 - 1


def test_parse_spec():
    assert parse_augment_spec("agc") == ("a", "g", "c")
    assert parse_augment_spec("fecga") == ("a", "e", "f", "g", "c")  # application order, not letter order
    assert parse_augment_spec("") == () and parse_augment_spec("none") == () and parse_augment_spec(None) == ()
    for bad in ["agx", "aa", "AG C"]:
        with pytest.raises(ValueError):
            parse_augment_spec(bad)
    with pytest.raises(ValueError):
        build_augment("agz")
    with pytest.raises(ValueError):
        build_augment("agc", backend="tensorflow")
    with pytest.raises(ValueError):
        PatchAugment("agc", noise_prob=1.5)


@pytest.mark.parametrize("backend", ["torch", "monai"])
@pytest.mark.parametrize("spec", ["agc", "agcef", "e", "f"])
def test_shape_dtype_range_and_seed(backend, spec):
    x = _patches()
    a1, a2, a3 = (build_augment(spec, seed=s, backend=backend) for s in (1, 1, 2))
    y1, y2, y3 = a1(x), a2(x), a3(x)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.isfinite(y1).all()
    # affine and flip only move values; noise (std <= 50/632, 5 sigma) and contrast stay near [-1, 1]
    assert y1.min() >= -1 - 6 * NOISE_STD_INPUT and y1.max() <= 1 + 6 * NOISE_STD_INPUT
    assert torch.equal(y1, y2), "same seed must give the same views"
    assert not torch.equal(y1, y3), "different seeds must give different views"
    # one patch (C, P, P, P) works too
    assert a1(x[0]).shape == x[0].shape


def test_generator_argument_is_deterministic():
    aug = build_augment("agcef", seed=0)
    x = _patches()
    ya = aug(x, generator=torch.Generator().manual_seed(5))
    yb = aug(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ya, yb)


def test_flip_flips():
    x = _patches(b=32)
    y = build_augment("f", seed=0)(x)
    n_flipped = 0
    for xi, yi in zip(x, y):
        candidates = [xi.flip([d + 1 for d in range(3) if mask >> d & 1]) if mask else xi for mask in range(8)]
        match = [m for m, c in enumerate(candidates) if torch.equal(c, yi)]
        assert match, "a flipped patch must equal the input flipped along some axes"
        n_flipped += match[0] != 0
    assert 20 <= n_flipped <= 32  # each of 3 axes with p = 0.5: 7/8 of the patches change


def test_no_augmentation_is_identity():
    x = _patches()
    assert torch.equal(build_augment("", seed=0)(x), x)


def test_affine_translation_and_rotation_geometry():
    x = _patches(b=1, p=12)
    y = affine_resample(x, translate=torch.tensor([[3.0, 0.0, 0.0]]))
    assert torch.allclose(y[0, 0, :-3], x[0, 0, 3:], atol=1e-5)  # out[i] = x[i + 3] along D
    y = affine_resample(x, translate=torch.tensor([[0.0, 0.0, -2.0]]))
    assert torch.allclose(y[0, 0, :, :, 2:], x[0, 0, :, :, :-2], atol=1e-5)
    assert torch.allclose(y[0, 0, :, :, 0], x[0, 0, :, :, 0], atol=1e-5)  # border padding repeats the edge
    y = affine_resample(x, rotation=torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    assert torch.allclose(y[0, 0], torch.rot90(x[0, 0], 1, (0, 1)), atol=1e-4)
    y = affine_resample(x, rotation=torch.zeros(1, 3), scale=torch.ones(1, 3), translate=torch.zeros(1, 3))
    assert torch.allclose(y, x, atol=1e-5)


def test_noise_std_matches_hu_scale():
    aug = PatchAugment("g", noise_prob=1.0, seed=0)
    x = torch.zeros(400, 1, 8, 8, 8)
    sd = aug(x).flatten(1).std(1)
    # std drawn uniformly in [0, 50/632]: mean std is half of it
    assert abs(sd.mean().item() - NOISE_STD_INPUT / 2) < 0.1 * NOISE_STD_INPUT
    assert sd.max().item() <= NOISE_STD_INPUT * 1.1


def test_channels_of_a_sample_share_one_transform():
    # a (B, C, P, P, P) batch: one transform per sample, the same for all of its channels, and the
    # parameters drawn do not depend on C (the neighbours of an anchor are passed as channels)
    x = torch.rand(4, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for spec in ["a", "aef"]:
        aug = build_augment(spec, seed=0)
        multi = aug(x, generator=torch.Generator().manual_seed(5))
        for c in range(3):
            single = aug(x[:, c:c + 1], generator=torch.Generator().manual_seed(5))
            assert torch.allclose(multi[:, c:c + 1], single, atol=1e-6), (spec, c)
    # identical channels stay identical through the affine, the flip and the contrast (one gamma,
    # min and max over the whole sample), and they were transformed
    same = x[:, :1].expand(4, 2, 16, 16, 16).contiguous()
    y = PatchAugment("agcf", noise_prob=0.0, contrast_prob=1.0, seed=3)(same)
    assert torch.equal(y[:, 0], y[:, 1])
    assert not torch.allclose(y[:, 0], same[:, 0], atol=1e-3)
    # noise: one decision and std per sample, independent values per channel
    y = PatchAugment("g", noise_prob=0.5, seed=4)(torch.zeros(64, 2, 8, 8, 8))
    noisy = y.flatten(2).abs().amax(2) > 0  # (64, 2)
    assert torch.equal(noisy[:, 0], noisy[:, 1]) and 8 <= int(noisy[:, 0].sum()) <= 56
    assert not torch.equal(y[noisy[:, 0], 0], y[noisy[:, 0], 1])
    ratio = y[noisy[:, 0], 0].flatten(1).std(1) / y[noisy[:, 0], 1].flatten(1).std(1)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=0.3)  # same std for both channels


def test_monai_backend_shares_the_transform_across_channels():
    x = _patches(b=2, p=16)
    same = x.expand(2, 2, 16, 16, 16).contiguous()
    y = build_augment("a", seed=0, backend="monai")(same, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y[:, 0], y[:, 1], atol=1e-6)
    assert not torch.allclose(y[:, 0], x[:, 0], atol=1e-3)
