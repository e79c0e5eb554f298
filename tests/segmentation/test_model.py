"""DrasSegNet: shapes, location conditioning, initialisation from checkpoints, validation."""

from __future__ import annotations

import pytest
import torch

from drasclr_lib.models import DrasEncoder
from drasclr_lib.segmentation.model import DrasSegNet, build_segmenter


@pytest.fixture(scope="module")
def x_loc():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 32, 32, 32, generator=g) * 2 - 1, torch.tensor([[0.5, -0.2, 0.1], [0.5, -0.2, 0.1]])


@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shape(num_classes, x_loc):
    model = build_segmenter("random", num_classes=num_classes, seed=0).eval()
    with torch.no_grad():
        out = model(*x_loc)
    assert out.shape == (2, num_classes, 32, 32, 32)
    assert torch.isfinite(out).all()


def test_without_input_skip(x_loc):
    from drasclr_lib.models import DrasEncoder

    model = DrasSegNet(DrasEncoder(), num_classes=2, input_skip=False).eval()
    with torch.no_grad():
        assert model(*x_loc).shape == (2, 2, 32, 32, 32)


def test_output_depends_on_location(x_loc):
    model = build_segmenter("random", seed=0).eval()
    x, loc = x_loc
    with torch.no_grad():
        a = model(x, loc)
        b = model(x, -loc)
    assert not torch.allclose(a, b, atol=1e-5)


def test_gradients_reach_encoder_and_decoder(x_loc):
    model = build_segmenter("random", seed=0).train()
    out = model(*x_loc)
    out[:, 1].mean().backward()
    enc_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad and p.grad is not None]
    dec_grads = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert enc_grads and any(g.abs().sum() > 0 for g in enc_grads)
    assert dec_grads and all(torch.isfinite(g).all() for g in dec_grads)


def test_random_init_is_seeded():
    a = build_segmenter("random", seed=3).state_dict()
    b = build_segmenter("random", seed=3).state_dict()
    c = build_segmenter("random", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("conditional", [True, False])
def test_checkpoint_weights_are_loaded(tmp_path, conditional):
    torch.manual_seed(11)
    enc = DrasEncoder(conditional=conditional)
    path = tmp_path / "enc.pt"
    torch.save({"state_dict": {f"encoder_q.{k}": v for k, v in enc.state_dict().items()}}, path)
    model = build_segmenter("moco" if not conditional else "drasclr", path, num_classes=2, seed=0)
    own = model.encoder.state_dict()
    assert model.encoder.conditional is conditional
    assert all(torch.equal(own[k], v) for k, v in enc.state_dict().items())
    assert model.encoder.training  # fine-tuning mode, not the eval mode load_encoder returns


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="init"):
        build_segmenter("imagenet")
    with pytest.raises(ValueError, match="checkpoint"):
        build_segmenter("drasclr", None)
    with pytest.raises(ValueError, match="checkpoint"):
        build_segmenter("moco", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="num_classes"):
        DrasSegNet(DrasEncoder(), num_classes=1)
    with pytest.raises(ValueError, match="decoder_channels"):
        DrasSegNet(DrasEncoder(), decoder_channels=(8, 8))
