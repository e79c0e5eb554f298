"""The published DrasCLR 3D patch encoder (conditional or plain convolutions).

Layout (E experts, BatchNorm3d + ELU after every convolution), for a 32³ input::

    conv1 1->8 s1 (8@32³) -> conv2 8->8 s2 (8@16³)
    downsample1 [conv1 8->16 s1, conv2 16->16 s1, conv3 16->16 s2]   (16@8³)
    downsample2 [conv1 16->32, conv2 32->32, conv3 32->32 s2]        (32@4³)
    downsample3 [conv1 32->64, conv2 64->64, conv3 64->64 s2]        (64@2³)
    conv3 64->128 s1, conv4 128->rep_dim s2                          (rep_dim@1³)
    h = flatten (B, rep_dim);  z = fc(h) with fc = Linear(rep, rep), ReLU, Linear(rep, proj)

Parameter and buffer names equal the published ``models/cnn3d.Encoder`` with the MoCo MLP head
(``conv1.weight (8, 8, 1, 3, 3, 3)``, ``conv1._routing_fn.fc.weight (8, 3)``, ``bn1.*``,
``downsample1.conv1.*``, ..., ``fc.0.*``, ``fc.2.*``), so a released checkpoint loads after
stripping its ``module.encoder_q.`` prefix. ``conditional=False`` builds the same network with
plain ``nn.Conv3d`` (the MoCo baseline; ``conv1.weight (8, 1, 3, 3, 3)``).
"""

from __future__ import annotations

import torch
from torch import nn

from drasclr_lib.models.condconv import CondConv3d, is_same_location, location_groups

__all__ = ["DrasEncoder"]


class _PlainConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the conditional convolution's call signature (the location is ignored)."""

    def forward(self, x: torch.Tensor, loc: torch.Tensor | None = None, **_unused) -> torch.Tensor:  # noqa: D102
        return super().forward(x)


def _make_conv(cin: int, cout: int, stride: int, conditional: bool, num_experts: int) -> nn.Module:
    if conditional:
        return CondConv3d(cin, cout, 3, stride, 1, num_experts=num_experts)
    return _PlainConv3d(cin, cout, 3, stride, 1)


class _Block(nn.Module):
    """conv c->2c s1, conv 2c->2c s1, conv 2c->2c s2, each followed by BatchNorm3d and ELU."""

    def __init__(self, cin: int, cout: int, conditional: bool, num_experts: int):
        super().__init__()
        self.conv1 = _make_conv(cin, cout, 1, conditional, num_experts)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = _make_conv(cout, cout, 1, conditional, num_experts)
        self.bn2 = nn.BatchNorm3d(cout)
        self.conv3 = _make_conv(cout, cout, 2, conditional, num_experts)
        self.bn3 = nn.BatchNorm3d(cout)
        self.act = nn.ELU()

    def forward(self, x: torch.Tensor, loc, **route) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x, loc, **route)))
        x = self.act(self.bn2(self.conv2(x, loc, **route)))
        return self.act(self.bn3(self.conv3(x, loc, **route)))


class DrasEncoder(nn.Module):
    """DrasCLR patch encoder: ``forward(x, loc) -> (z, h)``.

    Args:
        rep_dim: representation size (channels of the last convolution, length of ``h``).
        proj_dim: projection size (length of ``z``, the contrastive embedding).
        num_experts: experts per conditional convolution (ignored when ``conditional=False``).
        conditional: location-conditioned convolutions (DrasCLR) or plain ones (MoCo baseline).

    Shape:
        - x: (B, 1, 32, 32, 32) float, input scale [-1, 1] (``drasclr_lib.intensity.hu_to_input``)
        - loc: (B, 3) location condition in [-1, 1] (may be ``None`` when ``conditional=False``)
        - z: (B, proj_dim); h: (B, rep_dim)

    Raises:
        ValueError: on non-positive sizes or a non-bool ``conditional``.
    """

    def __init__(self, rep_dim: int = 128, proj_dim: int = 128, num_experts: int = 8, conditional: bool = True):
        super().__init__()
        for name, value in (("rep_dim", rep_dim), ("proj_dim", proj_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DrasEncoder: {name} must be a positive int, got {value!r}")
        if not isinstance(conditional, bool):
            raise ValueError(f"DrasEncoder: conditional must be a bool, got {conditional!r}")
        self.rep_dim = rep_dim
        self.proj_dim = proj_dim
        self.num_experts = num_experts
        self.conditional = conditional
        c, e = conditional, num_experts
        self.conv1 = _make_conv(1, 8, 1, c, e)
        self.bn1 = nn.BatchNorm3d(8)
        self.act = nn.ELU()
        self.conv2 = _make_conv(8, 8, 2, c, e)
        self.bn2 = nn.BatchNorm3d(8)
        self.downsample1 = _Block(8, 16, c, e)
        self.downsample2 = _Block(16, 32, c, e)
        self.downsample3 = _Block(32, 64, c, e)
        self.conv3 = _make_conv(64, 128, 1, c, e)
        self.bn3 = nn.BatchNorm3d(128)
        self.conv4 = _make_conv(128, rep_dim, 2, c, e)
        self.bn4 = nn.BatchNorm3d(rep_dim)
        self.fc = nn.Sequential(nn.Linear(rep_dim, rep_dim), nn.ReLU(), nn.Linear(rep_dim, proj_dim))

    @property
    def config(self) -> dict:
        """Constructor arguments (saved in checkpoints next to the state dict)."""
        return {"rep_dim": self.rep_dim, "proj_dim": self.proj_dim, "num_experts": self.num_experts,
                "conditional": self.conditional}

    def _route(self, x: torch.Tensor, loc: torch.Tensor | None) -> dict:
        """Check the inputs and decide the convolution path once for all layers."""
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"DrasEncoder: x must be (B, 1, D, H, W), got {tuple(x.shape)}")
        if not self.conditional:
            return {}
        if loc is None or loc.dim() != 2 or loc.shape != (x.shape[0], 3):
            got = None if loc is None else tuple(loc.shape)
            raise ValueError(f"DrasEncoder: loc must be (B={x.shape[0]}, 3), got {got}")
        if is_same_location(loc):
            return {"same_location": True}
        return {"same_location": False, "groups": location_groups(loc)}

    def forward_features(self, x: torch.Tensor, loc: torch.Tensor | None) -> list[torch.Tensor]:
        """Stage outputs for U-Net-like decoders.

        Args:
            x: (B, 1, D, H, W), D = H = W = 32 for the published patches (any size divisible by 32).
            loc: (B, 3) location condition (``None`` allowed when ``conditional=False``).

        Returns:
            Six tensors (for a 32³ input): after conv1 ``(B, 8, 32³)``, after conv2 ``(B, 8, 16³)``,
            after downsample1 ``(B, 16, 8³)``, downsample2 ``(B, 32, 4³)``, downsample3
            ``(B, 64, 2³)``, and after conv3 + conv4 ``(B, rep_dim, 1³)``.

        Raises:
            ValueError: on inputs of the wrong shape.
        """
        route = self._route(x, loc)
        feats = []
        x = self.act(self.bn1(self.conv1(x, loc, **route)))
        feats.append(x)
        x = self.act(self.bn2(self.conv2(x, loc, **route)))
        feats.append(x)
        for block in (self.downsample1, self.downsample2, self.downsample3):
            x = block(x, loc, **route)
            feats.append(x)
        x = self.act(self.bn3(self.conv3(x, loc, **route)))
        x = self.act(self.bn4(self.conv4(x, loc, **route)))
        feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, loc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode patches.

        Args:
            x: (B, 1, 32, 32, 32) patches in [-1, 1].
            loc: (B, 3) location condition.

        Returns:
            ``(z (B, proj_dim), h (B, rep_dim))``: projection and representation.

        Raises:
            ValueError: on inputs of the wrong shape (the last feature map must be 1³).
        """
        last = self.forward_features(x, loc)[-1]
        if last.shape[2:].numel() != 1:
            raise ValueError(f"DrasEncoder: input {tuple(x.shape[2:])} gives a {tuple(last.shape[2:])} final map; "
                             "forward() needs 32³ patches (use forward_features for larger inputs)")
        h = torch.flatten(last, 1)  # h: B x rep_dim
        z = self.fc(h)  # z: B x proj_dim
        return z, h

    def forward_loop(self, x: torch.Tensor, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference forward with the per-sample-loop conditional convolutions (tests, benchmarks)."""
        if not self.conditional:
            return self.forward(x, loc)

        def conv(layer, t):
            return layer.forward_loop(t, loc)

        x = self.act(self.bn1(conv(self.conv1, x)))
        x = self.act(self.bn2(conv(self.conv2, x)))
        for b in (self.downsample1, self.downsample2, self.downsample3):
            x = b.act(b.bn1(conv(b.conv1, x)))
            x = b.act(b.bn2(conv(b.conv2, x)))
            x = b.act(b.bn3(conv(b.conv3, x)))
        x = self.act(self.bn3(conv(self.conv3, x)))
        x = self.act(self.bn4(conv(self.conv4, x)))
        h = torch.flatten(x, 1)
        return self.fc(h), h
