"""Location-conditioned 3D convolution (DrasCLR's hyper-parameterised convolution), batched.

For a sample at anatomical location ``loc`` (3 atlas coordinates in [-1, 1]) the kernel is a
mixture of ``E`` expert kernels with *sigmoid* (not softmax) routing weights::

    r = sigmoid(fc(loc))                    # r: (E,)
    W = sum_e r_e * weight[e]               # W: (out, in, k, k, k)
    y = conv3d(x, W, bias, stride, padding)

The published code evaluates this with a Python loop over the batch, one ``conv3d`` per sample.
Here the same numbers come from batched convolutions:

* **one location** (the training case: a batch holds one anatomical location): one mixed kernel,
  one ``conv3d`` over the whole batch;
* **mixed locations**: samples are grouped by unique location; when there are few groups each one
  is a single batched ``conv3d`` (on contiguous slices when the batch is already ordered by
  location, as DrasCLR's neighbour batch is; otherwise gathered and scattered back); when
  (almost) every sample has its own location the batch is folded into the channel axis and
  evaluated as one grouped convolution (``groups=B``).

:meth:`CondConv3d.forward_loop` keeps the per-sample definition for tests and benchmarks.
Parameter names (``weight``, ``bias``, ``_routing_fn.fc.weight``, ``_routing_fn.fc.bias``) match
the published ``CondConv3D`` so its checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CondConv3d", "location_groups", "location_runs", "is_same_location", "conv3d_autocast_safe",
           "FLOAT32_MAX_SIZE"]


#: Under autocast, convolutions whose input is at most this many voxels a side run in float32.
#: oneDNN's bfloat16 convolution returns a wrong *weight gradient* (garbage, different on every
#: call, sometimes NaN) for such maps on the CPU (torch 2.13: the encoder's conv3 and conv4 on the
#: 2³ map; ``tests/models/test_precision.py`` checks the encoder's gradients against float32). They
#: hold under 3 % of the encoder's FLOPs, so float32 there costs nothing measurable.
FLOAT32_MAX_SIZE = 2


def conv3d_autocast_safe(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                         padding: int, groups: int = 1) -> torch.Tensor:
    """``F.conv3d``, in float32 (autocast off) when autocast is on and the map is tiny (:data:`FLOAT32_MAX_SIZE`)."""
    if min(x.shape[2:]) <= FLOAT32_MAX_SIZE and torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.conv3d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, 1,
                            groups)
    return F.conv3d(x, weight, bias, stride, padding, 1, groups)


class _Routing(nn.Module):
    """Routing function ``loc (B, 3) -> r (B, E)``, sigmoid of one linear layer (published ``_routing``)."""

    def __init__(self, in_features: int, num_experts: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_experts)

    def forward(self, loc: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(loc))


def location_groups(loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the samples of a batch by location.

    Args:
        loc: (B, 3) location conditions.

    Returns:
        ``(unique_locs (U, 3), inverse (B,) long)`` with ``loc == unique_locs[inverse]``.
    """
    return torch.unique(loc, dim=0, return_inverse=True)


def location_runs(inverse: torch.Tensor, n_unique: int) -> list[tuple[int, int]]:
    """``[(group, length), ...]`` when each location's samples form one contiguous run of ``inverse (B,)``, else ``[]``."""
    inv = inverse.reshape(-1)
    starts = (torch.nonzero(inv[1:] != inv[:-1]).flatten() + 1).tolist()
    if len(starts) + 1 != n_unique:  # some location appears in more than one run
        return []
    bounds = [0, *starts, inv.numel()]
    first = inv[bounds[:-1]].tolist()
    return [(int(g), bounds[i + 1] - bounds[i]) for i, g in enumerate(first)]


def is_same_location(loc: torch.Tensor) -> bool:
    """True when every row of ``loc (B, 3)`` equals the first (exact comparison)."""
    return bool(torch.equal(loc, loc[:1].expand_as(loc)))


class CondConv3d(nn.Module):
    """3D convolution whose kernel is a location-dependent mixture of expert kernels.

    Args:
        in_channels: input channels ``C_in``.
        out_channels: output channels ``C_out``.
        kernel_size: cubic kernel size ``k`` (int).
        stride: stride (int).
        padding: zero padding (int).
        num_experts: number of expert kernels ``E``.
        bias: add a bias ``(C_out,)`` shared by all experts.
        num_coordinates: location dimension (3 atlas coordinates).

    Shape:
        - x: (B, C_in, D, H, W)
        - loc: (B, num_coordinates)
        - output: (B, C_out, D', H', W') with ``D' = (D + 2 * padding - k) // stride + 1``.

    Raises:
        ValueError: on non-positive sizes, negative padding, or inputs of the wrong shape.
    """

    #: Run the convolutions in the channels-last 3D layout (NDHWC); set for a whole encoder by
    #: :meth:`drasclr_lib.models.DrasEncoder.set_channels_last`. Same numbers, another memory layout.
    channels_last: bool = False

    # Above this fraction of distinct locations in a batch the grouped convolution replaces the
    # per-group loop (measured on CPU: the loop over groups wins while groups hold >= ~4 samples).
    GROUPED_MIN_UNIQUE_FRACTION = 0.25

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, *, num_experts: int = 8, bias: bool = True, num_coordinates: int = 3):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("kernel_size", kernel_size), ("stride", stride), ("num_experts", num_experts),
                            ("num_coordinates", num_coordinates)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CondConv3d: {name} must be a positive int, got {value!r}")
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"CondConv3d: padding must be a non-negative int, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.num_experts = num_experts
        self.num_coordinates = num_coordinates
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels, kernel_size, kernel_size,
                                               kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self._routing_fn = _Routing(num_coordinates, num_experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as the published ``CondConv3D`` (``_ConvNd.reset_parameters`` on the 6-d weight).

        ``kaiming_uniform_(a=sqrt(5))`` on the ``(E, out, in, k, k, k)`` tensor, i.e. uniform in
        ``±1/sqrt(fan_in)`` with ``fan_in = out * in * k³`` (torch's fan rule applied to the
        expert-stacked tensor); the bias uses the same bound. The routing layer keeps
        ``nn.Linear``'s default initialisation.
        """
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, num_experts={self.num_experts}, bias={self.bias is not None}")

    # -- helpers ---------------------------------------------------------------------------------
    def routing_weights(self, loc: torch.Tensor) -> torch.Tensor:
        """Mixture weights ``r (B, E) = sigmoid(fc(loc))`` for ``loc (B, num_coordinates)``."""
        return self._routing_fn(loc.to(self.weight.dtype))

    def mixed_kernels(self, loc: torch.Tensor) -> torch.Tensor:
        """Per-location kernels ``W (B, out, in, k, k, k) = sum_e r_e * weight[e]`` for ``loc (B, 3)``."""
        r = self.routing_weights(loc)  # r: B x E
        return torch.einsum("be,eoi...->boi...", r, self.weight)

    def _check(self, x: torch.Tensor, loc: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"CondConv3d: x must be (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        if loc.dim() != 2 or loc.shape != (x.shape[0], self.num_coordinates):
            raise ValueError(f"CondConv3d: loc must be (B={x.shape[0]}, {self.num_coordinates}), got {tuple(loc.shape)}")

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, groups: int = 1):
        if self.channels_last:  # NDHWC input and kernel: oneDNN's fast layout for these small channel counts
            x = x.contiguous(memory_format=torch.channels_last_3d)
            kernel = kernel.contiguous(memory_format=torch.channels_last_3d)
        return conv3d_autocast_safe(x, kernel, bias, self.stride, self.padding, groups)

    # -- forward paths ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, loc: torch.Tensor, *, same_location: bool | None = None,
                groups: tuple[torch.Tensor, torch.Tensor] | None = None,
                runs: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Apply the location-conditioned convolution.

        Args:
            x: (B, C_in, D, H, W) input.
            loc: (B, 3) location of each sample.
            same_location: hint that every row of ``loc`` is identical (skips the check; ``None``
                detects it with ``torch.equal``). Passing ``True`` for a mixed batch is an error the
                module cannot see: every sample then uses the first sample's location.
            groups: optional precomputed :func:`location_groups` ``(unique_locs, inverse)`` (the
                encoder computes it once for all its convolutions).
            runs: optional precomputed :func:`location_runs` of ``groups`` (likewise).

        Returns:
            (B, C_out, D', H', W') output, equal to :meth:`forward_loop` up to float rounding.
        """
        self._check(x, loc)
        if same_location is None:
            same_location = is_same_location(loc)
        if same_location:
            return self.forward_single(x, loc[:1])
        if groups is None:
            groups = location_groups(loc)
        unique_locs, inverse = groups
        n_unique = unique_locs.shape[0]
        if n_unique == 1:
            return self.forward_single(x, unique_locs)
        if n_unique >= self.GROUPED_MIN_UNIQUE_FRACTION * x.shape[0]:
            return self.forward_grouped(x, loc)
        kernels = self.mixed_kernels(unique_locs)  # kernels: U x out x in x k x k x k
        if runs is None:
            runs = location_runs(inverse, n_unique)
        if runs:
            # a few locations in contiguous blocks (e.g. DrasCLR's neighbour batch, location-major):
            # one conv per block, concatenated; no index_select / index_copy (and their backward)
            blocks = x.split([n for _, n in runs])
            return torch.cat([self._conv(xb, kernels[g], self.bias) for xb, (g, _) in zip(blocks, runs)])
        # a few locations in any order: one batched conv per location, scattered back into batch order
        out = None
        for u in range(n_unique):
            idx = (inverse == u).nonzero(as_tuple=True)[0]
            y = self._conv(x.index_select(0, idx), kernels[u], self.bias)
            if out is None:
                out = y.new_empty((x.shape[0],) + y.shape[1:])
            out = out.index_copy(0, idx, y)
        return out

    def forward_single(self, x: torch.Tensor, loc1: torch.Tensor) -> torch.Tensor:
        """Fast path: all samples share the location ``loc1 (1, 3)``: one kernel, one ``conv3d``."""
        kernel = self.mixed_kernels(loc1)[0]  # kernel: out x in x k x k x k
        return self._conv(x, kernel, self.bias)

    def forward_grouped(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """Mixed locations: fold the batch into channels and run one grouped convolution (``groups=B``)."""
        b = x.shape[0]
        kernels = self.mixed_kernels(loc)  # kernels: B x out x in x k x k x k
        xg = x.reshape(1, b * self.in_channels, *x.shape[2:])  # xg: 1 x (B*in) x D x H x W
        wg = kernels.reshape(b * self.out_channels, self.in_channels, *kernels.shape[3:])
        bg = self.bias.repeat(b) if self.bias is not None else None
        y = self._conv(xg, wg, bg, groups=b)  # y: 1 x (B*out) x D' x H' x W'
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def forward_loop(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """Reference per-sample definition (as the published code): one kernel and one conv per sample."""
        self._check(x, loc)
        res = []
        for i in range(x.shape[0]):
            r = self.routing_weights(loc[i:i + 1])[0]  # r: E
            kernel = torch.sum(r[:, None, None, None, None, None] * self.weight, 0)
            res.append(self._conv(x[i:i + 1], kernel, self.bias))
        return torch.cat(res, dim=0)
