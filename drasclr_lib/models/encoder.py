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

(About 365 lines: the encoder and the loading of every checkpoint layout into it; the loading
code checks each layout's names and shapes against this architecture, so it stays beside it.)
"""

from __future__ import annotations

import torch
from torch import nn

from drasclr_lib.models.condconv import (CondConv3d, conv3d_autocast_safe, is_same_location, location_groups,
                                         location_runs)

__all__ = ["DrasEncoder", "load_encoder"]


class _PlainConv3d(nn.Conv3d):
    """``nn.Conv3d`` with the conditional convolution's call signature (the location is ignored)."""

    channels_last: bool = False  # as CondConv3d.channels_last

    def forward(self, x: torch.Tensor, loc: torch.Tensor | None = None, **_unused) -> torch.Tensor:  # noqa: D102
        weight = self.weight
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
            weight = weight.contiguous(memory_format=torch.channels_last_3d)
        return conv3d_autocast_safe(x, weight, self.bias, self.stride[0], self.padding[0])


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

    Attributes:
        checkpoint_format: set by :func:`load_encoder`: ``"published"`` (the released DrasCLR
            layout, ``module.encoder_q.*``: its locations are the published atlas's 581),
            ``"own"`` (this toolkit's ``encoder_q.*``) or ``"bare"`` (an encoder state dict);
            ``None`` for an encoder not loaded from a file.

    Shape:
        - x: (B, 1, 32, 32, 32) float, input scale [-1, 1] (``drasclr_lib.intensity.hu_to_input``)
        - loc: (B, 3) location condition in [-1, 1] (may be ``None`` when ``conditional=False``)
        - z: (B, proj_dim); h: (B, rep_dim)

    Raises:
        ValueError: on non-positive sizes or a non-bool ``conditional``.
    """

    checkpoint_format: str | None = None

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

    @property
    def channels_last(self) -> bool:
        """Whether the convolutions run in the channels-last 3D layout (:meth:`set_channels_last`)."""
        return bool(self.conv1.channels_last)

    def set_channels_last(self, enabled: bool = True) -> "DrasEncoder":
        """Run every convolution in the channels-last 3D layout (NDHWC) or back in the default one.

        The parameters keep their layout (state dicts, checkpoints and the momentum update are
        unchanged); each convolution converts its input and kernel, and the activations between
        layers stay channels-last. Outputs equal the default layout's up to float rounding; the
        speed differs (see ``docs/pretraining.md``).

        Returns:
            ``self``.
        """
        for m in self.modules():
            if isinstance(m, (CondConv3d, _PlainConv3d)):
                m.channels_last = bool(enabled)
        return self

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
        unique_locs, inverse = groups = location_groups(loc)
        return {"same_location": False, "groups": groups, "runs": location_runs(inverse, unique_locs.shape[0])}

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


# --------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------
_ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.", "")


def _read_checkpoint(path, map_location):
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code."""
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
                         f"containers, and loading it could run code (torch.load weights_only=True said: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc


_FORMATS = {"module.encoder_q.": "published", "encoder_q.": "own"}  # else "bare"


def _encoder_state(obj, path) -> tuple[dict, dict, str]:
    """Return ``(encoder_state_dict, config, format)`` from any supported checkpoint layout
    (format as :attr:`DrasEncoder.checkpoint_format`)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj.get("model"), dict):
        sd = obj["model"]
    else:
        sd = obj
    for prefix in _ENCODER_PREFIXES:
        if f"{prefix}conv1.weight" in sd:
            n = len(prefix)
            return ({k[n:]: v for k, v in sd.items() if k.startswith(prefix) and torch.is_tensor(v)}, config,
                    _FORMATS.get(prefix, "bare"))
    some = ", ".join(list(sd)[:5])
    raise ValueError(f"{path}: no encoder weights found (looked for 'conv1.weight' under prefixes "
                     f"{', '.join(repr(p) for p in _ENCODER_PREFIXES)}; first keys: {some})")


def _infer_config(sd: dict, config: dict, path) -> dict:
    """Encoder constructor arguments from the weight shapes (config values are only a fallback)."""
    def need(key):
        if key not in sd:
            raise ValueError(f"{path}: encoder weight {key!r} is missing")
        return sd[key]

    w1 = need("conv1.weight")
    if w1.dim() == 6:
        conditional, num_experts = True, int(w1.shape[0])
    elif w1.dim() == 5:
        conditional, num_experts = False, int(config.get("num_experts", 8))
    else:
        raise ValueError(f"{path}: 'conv1.weight' has shape {tuple(w1.shape)}; expected (E, 8, 1, 3, 3, 3) or "
                         "(8, 1, 3, 3, 3)")
    if "fc.weight" in sd and "fc.2.weight" not in sd:
        raise ValueError(f"{path}: the checkpoint has a linear head 'fc.weight'; DrasEncoder has the MoCo v2 MLP "
                         "head 'fc.0'/'fc.2' (the published training default)")
    rep_dim = int(need("conv4.weight").shape[-5])
    proj_dim = int(need("fc.2.weight").shape[0])
    return {"rep_dim": rep_dim, "proj_dim": proj_dim, "num_experts": num_experts, "conditional": conditional}


def load_encoder(path, *, map_location="cpu", conditional: bool | None = None, strict: bool = True,
                 num_experts: int | None = None, rep_dim: int | None = None,
                 proj_dim: int | None = None) -> DrasEncoder:
    """Load a :class:`DrasEncoder` (query encoder) from a checkpoint, in eval mode.

    Supported layouts:

    * the published DrasCLR checkpoint ``{'epoch', 'arch', 'state_dict': {'module.encoder_q.…',
      'module.encoder_k.…', 'module.queue', 'module.queue_ptr'}, 'optimizer'}``;
    * this project's checkpoint ``{'state_dict': {'encoder_q.…', 'encoder_k.…', 'queue', …},
      'config': {...}, …}`` (``drasclr_lib.training``);
    * a bare encoder state dict (optionally ``module.``-prefixed).

    The architecture (conditional or not, experts, ``rep_dim``, ``proj_dim``) is read from the
    weight shapes unless given.

    Args:
        path: checkpoint file.
        map_location: passed to ``torch.load`` (``"cpu"``, ``"cuda"``, a device).
        conditional: expect conditional (True) or plain (False) convolutions; ``None`` infers it.
        strict: require exactly the encoder's keys (missing or unexpected keys raise); shapes must
            always match.
        num_experts, rep_dim, proj_dim: expected sizes; ``None`` infers them.

    Returns:
        The encoder, in eval mode, on ``map_location``'s device, its ``checkpoint_format`` set
        (``"published"``, ``"own"`` or ``"bare"``).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file would need code to unpickle (it is refused without running
            anything), is not a checkpoint, lacks encoder weights, or a key or shape does not match
            (the message names the key and both shapes).
    """
    obj = _read_checkpoint(path, map_location)
    sd, config, fmt = _encoder_state(obj, path)
    arch = _infer_config(sd, config, path)
    for name, value in (("conditional", conditional), ("num_experts", num_experts), ("rep_dim", rep_dim),
                        ("proj_dim", proj_dim)):
        if value is not None:
            if name != "num_experts" or arch["conditional"]:
                if value != arch[name]:
                    raise ValueError(f"{path}: {name}={value!r} was requested but the checkpoint's weights give "
                                     f"{name}={arch[name]!r}")
            arch[name] = value
    encoder = DrasEncoder(**arch)
    own = encoder.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k!r}: checkpoint {tuple(sd[k].shape)} vs encoder {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if mismatched:
        raise ValueError(f"{path}: shape mismatch for " + "; ".join(mismatched))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append("missing keys " + ", ".join(repr(k) for k in missing[:10]) + (" …" if len(missing) > 10 else ""))
        if unexpected:
            parts.append("unexpected keys " + ", ".join(repr(k) for k in unexpected[:10])
                         + (" …" if len(unexpected) > 10 else ""))
        raise ValueError(f"{path}: encoder state dict does not match DrasEncoder({arch}): " + "; ".join(parts))
    encoder.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    encoder.checkpoint_format = fmt
    device = next(iter(sd.values())).device if sd else torch.device("cpu")
    return encoder.to(device).eval()
