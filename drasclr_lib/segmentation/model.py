"""A segmentation network whose encoder is the location-conditioned :class:`DrasEncoder`.

The encoder's six stages (32³ … 1³) give the skip connections, still conditioned on the patch's
anatomical location; a light 3D decoder brings the features back to the patch's 32³ voxel grid:
trilinear upsampling, concatenation with the skip, then one 3x3x3 convolution per level from 2³
to 16³ and a 1x1x1 convolution at 32³ (the 32³ skip is the encoder's first 3x3x3 convolution,
which already sees each voxel's neighbourhood). Two 3x3x3 convolutions per level, the usual
U-Net, cost ~7x the encoder's FLOPs on 32³ patches (most of it at 32³); this decoder costs about
a third of the encoder, which keeps CPU fine-tuning practical.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from drasclr_lib.models import DrasEncoder, load_encoder

__all__ = ["DrasSegNet", "build_segmenter", "INITS"]

INITS = ("random", "moco", "drasclr")


class _UpBlock(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin + cskip, cout, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm3d(cout),
            nn.ELU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.body(torch.cat([x, skip], dim=1))


class DrasSegNet(nn.Module):
    """U-Net-like segmenter on a :class:`DrasEncoder`.

    Args:
        encoder: the (pretrained or random) encoder; its ``forward_features`` gives the skips.
        num_classes: output channels (2 for emphysema vs not, 4 for none/CL/PL/PS).
        decoder_channels: channels of the five decoder levels, from 2³ up to 32³.
        input_skip: also give the last (32³) level the input patch itself, next to the encoder's
            first-stage features: voxel intensity is the first cue of emphysema (low attenuation),
            and a direct path to it lets short fine-tuning runs learn it in a few steps.

    Shape:
        - x: (B, 1, 32, 32, 32) in [-1, 1] (see :func:`drasclr_lib.intensity.hu_to_input`)
        - loc: (B, 3) in [-1, 1]
        - output: logits (B, num_classes, 32, 32, 32)
    """

    def __init__(self, encoder: DrasEncoder, *, num_classes: int = 2,
                 decoder_channels: tuple[int, ...] = (64, 32, 16, 16, 16), input_skip: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries (2³ to 32³), got {decoder_channels}")
        self.encoder = encoder
        self.num_classes = int(num_classes)
        rep = encoder.config["rep_dim"]
        self.input_skip = bool(input_skip)
        skips = (64, 32, 16, 8, 8 + int(self.input_skip))  # stage channels at 2³, 4³, 8³, 16³, 32³ (+ input)
        ups, cin = [], rep
        for level, (cskip, cout) in enumerate(zip(skips, decoder_channels)):
            ups.append(_UpBlock(cin, cskip, cout, kernel_size=1 if level == len(skips) - 1 else 3))
            cin = cout
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Conv3d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        f32, f16, f8, f4, f2, f1 = self.encoder.forward_features(x, loc)
        y = f1
        if self.input_skip:
            f32 = torch.cat([f32, x], dim=1)
        for up, skip in zip(self.decoder, (f2, f4, f8, f16, f32)):
            y = up(y, skip)
        return self.head(y)


def build_segmenter(init: str = "random", checkpoint: str | Path | None = None, *, num_classes: int = 2,
                    conditional: bool | None = None, seed: int = 0) -> DrasSegNet:
    """A :class:`DrasSegNet` initialised from a checkpoint or at random.

    Args:
        init: ``"random"`` (seeded random encoder), ``"moco"`` or ``"drasclr"`` (encoder weights
            from ``checkpoint``; the name only labels the experiment, the weights come from the file).
        checkpoint: a DrasCLR/MoCo checkpoint (published or own format), required unless random.
        num_classes: output classes.
        conditional: for ``init="random"``: conditional convolutions (default True).
        seed: seed of the random initialisation (encoder and decoder).

    Raises:
        ValueError: for an unknown ``init`` or a missing checkpoint.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(seed)
    if init == "random":
        encoder = DrasEncoder(conditional=True if conditional is None else conditional)
    else:
        if checkpoint is None or not Path(checkpoint).exists():
            raise ValueError(f"init={init!r} needs an existing checkpoint, got {checkpoint!r}")
        encoder = load_encoder(checkpoint)
        encoder.train()
    return DrasSegNet(encoder, num_classes=num_classes)
