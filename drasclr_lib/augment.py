"""Patch augmentations for contrastive pretraining (SPEC, "Pretraining": augmentation "agc").

A specification string picks the augmentations, one letter each, applied in a fixed order
(spatial first, then intensity) whatever the order of the letters:

=====  =====================================================================================
``a``  affine (MONAI ``RandAffine(prob=1, translate ±12 voxels, rotate ±10°, scale ±0.1,
       padding_mode="border")``), trilinear
``e``  elastic: a smooth random displacement field (coarse 4³ control grid, trilinear
       upsampling; displacement std 1.5 voxels), applied with probability 0.5 in the same
       resampling as the affine (MONAI backend: ``Rand3DElastic``)
``f``  flip: each spatial axis flipped independently with probability 0.5
``g``  Gaussian noise (MONAI ``RandGaussianNoise(prob=0.25, std=50)`` on the +1024-shifted HU
       scale; the standard deviation is drawn uniformly in [0, std] as MONAI does). On the
       network's input scale ``x = (hu + 1024) / 632 - 1`` that std is 50 / 632.
``c``  contrast (MONAI ``RandAdjustContrast(prob=0.25, gamma=(0.5, 4.5))``):
       ``x = ((x - min) / range) ** gamma * range + min`` per patch
=====  =====================================================================================

All operations are applied to patches already on the input scale [-1, 1]. The affine, the flip
and the contrast transform commute with the affine HU -> input map, and the noise std is
converted, so the result is the augmentation of the published pipeline (which worked in shifted
HU) followed by the input mapping.

Two backends:

* ``"torch"`` (default): a batched implementation (one ``grid_sample`` call for the whole batch,
  random parameters drawn per sample). It runs on whatever device the patches are on, so the
  training loop can augment on the GPU, and it is much faster than calling MONAI per patch on
  the CPU (~3.5x, measured with the loader benchmark that ``benchmarks/bench_train.py`` had before
  it timed the whole training step; see ``docs/pretraining.md``).
* ``"monai"``: the MONAI transforms themselves, one patch at a time (reference; slower).

Randomness comes from a ``torch.Generator`` (``seed=`` or ``generator=`` per call), so the same
seed gives the same views and the training loader can give every sample its own seed
(independent of DataLoader workers; needed for exact resume).

Channels: a sample ``(C, P, P, P)`` gets **one** transform shared by its C channels, as a MONAI
transform applied to a C-channel image: one affine grid, elastic field and flip for all channels,
one noise decision and std (the noise itself independent per voxel and channel), one contrast
decision and gamma with the min and max taken over all channels (MONAI's ``AdjustContrast``). The
training data uses this for the K neighbours of an anchor, passed as the channels of one sample as
in the published code (``drasclr_lib.training.data.PatchPairDataset.augment_views``). The random
parameters drawn depend on the batch size only, not on C.

(About 350 lines, one idea: the augmentation of the spec string, in its two backends, the batched
torch one and the MONAI reference it is checked against; splitting them would separate the two
implementations a test compares.)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_LETTERS", "parse_augment_spec", "PatchAugment", "MonaiPatchAugment", "build_augment",
           "affine_resample"]

#: Letters understood by :func:`parse_augment_spec`, in the order the operations are applied.
AUGMENT_LETTERS = "aefgc"
#: Noise std of the published pipeline: 50 on the +1024-shifted HU scale, on the input scale.
NOISE_STD_INPUT = 50.0 / 632.0


def parse_augment_spec(spec: str | None) -> tuple[str, ...]:
    """Validate an augmentation string such as ``"agc"`` or ``"agcef"``.

    Args:
        spec: letters from ``"aefgc"`` (any order, each at most once); ``""``, ``"none"`` or
            ``None`` mean no augmentation.

    Returns:
        The letters in application order (e.g. ``("a", "g", "c")``).

    Raises:
        ValueError: on an unknown or repeated letter, or a non-string.
    """
    if spec is None:
        return ()
    if not isinstance(spec, str):
        raise ValueError(f"augmentation spec must be a string like 'agc', got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in {"", "none"}:
        return ()
    bad = sorted(set(s) - set(AUGMENT_LETTERS))
    if bad:
        raise ValueError(f"augmentation spec {spec!r}: unknown letter(s) {bad}; allowed: "
                         "a (affine), e (elastic), f (flip), g (Gaussian noise), c (contrast)")
    if len(set(s)) != len(s):
        raise ValueError(f"augmentation spec {spec!r} repeats a letter")
    return tuple(ch for ch in AUGMENT_LETTERS if ch in s)


def _rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3) angles in radians about the three axes -> (B, 3, 3) rotations Rx @ Ry @ Rz."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rx @ ry @ rz


def affine_resample(x: torch.Tensor, rotation: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    translate: torch.Tensor | None = None, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample cubic patches through an affine map about the patch centre (border padding).

    The output voxel at offset ``p`` from the centre reads the input at ``R @ diag(s) @ p + R @ t``
    (MONAI's ``AffineGrid`` composition rotate @ translate @ scale).

    Args:
        x: (B, C, P, P, P) patches.
        rotation: (B, 3) angles in radians, or ``None`` (no rotation).
        scale: (B, 3) scale factors (1 = none), or ``None``.
        translate: (B, 3) shifts in voxels along the tensor axes (D, H, W): a positive shift
            ``t`` along an axis gives ``out[i] = x[i + t]``.
        displacement: optional (B, 3, P, P, P) extra displacement in voxels, (D, H, W) order.

    Returns:
        (B, C, P, P, P), same dtype and device.

    Raises:
        ValueError: when ``x`` is not a batch of cubic patches.
    """
    if x.ndim != 5 or not (x.shape[2] == x.shape[3] == x.shape[4]):
        raise ValueError(f"expected (B, C, P, P, P) patches, got {tuple(x.shape)}")
    b, p = x.shape[0], x.shape[2]
    half = (p - 1) / 2.0
    dev, dt = x.device, torch.float32
    mat = torch.eye(3, device=dev, dtype=dt).expand(b, 3, 3)
    if rotation is not None:
        mat = _rotation_matrices(rotation.to(dev, dt))
    if scale is not None:
        mat = mat * scale.to(dev, dt)[:, None, :]  # R @ diag(s)
    # grid_sample's coordinates are (x, y, z) = (W, H, D): reverse the tensor-axis order
    offset = torch.zeros(b, 3, device=dev, dtype=dt)
    if translate is not None:
        offset = translate.to(dev, dt).flip(-1) / half
        offset = (mat if scale is None else mat / scale.to(dev, dt)[:, None, :]) @ offset[..., None]
        offset = offset[..., 0]
    theta = torch.cat([mat, offset[..., None]], dim=2)  # (B, 3, 4)
    grid = F.affine_grid(theta, [b, 1, p, p, p], align_corners=True)  # (B, P, P, P, 3)
    if displacement is not None:
        grid = grid + displacement.to(dev, dt).flip(1).permute(0, 2, 3, 4, 1) / half
    out = F.grid_sample(x.to(dt), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(x.dtype)


class PatchAugment:
    """Batched random augmentation of patches on the input scale (``"torch"`` backend).

    Args:
        spec: augmentation letters (see the module docstring), e.g. ``"agc"``.
        seed: seed of the internal generator used when a call gets no ``generator``;
            ``None`` seeds it from torch's global RNG.
        translate: max |shift| in voxels per axis (default 12).
        rotate_deg: max |angle| in degrees per axis (default 10).
        scale: max |scale - 1| per axis (default 0.1).
        noise_prob: probability of Gaussian noise (default 0.25).
        noise_std: max noise std on the input scale (default 50 / 632).
        contrast_prob: probability of the gamma contrast change (default 0.25).
        gamma: (low, high) range of the contrast gamma (default (0.5, 4.5), MONAI's).
        flip_prob: per-axis flip probability (default 0.5).
        elastic_prob: probability of the elastic deformation (default 0.5).
        elastic_std: std of the control-point displacements in voxels (default 1.5).
        elastic_grid: control grid size per axis (default 4).

    Raises:
        ValueError: on a bad spec or out-of-range parameter.

    Example:
        >>> aug = PatchAugment("agc", seed=0)
        >>> views = aug(torch.zeros(8, 1, 32, 32, 32))   # (8, 1, 32, 32, 32)
    """

    backend = "torch"

    def __init__(self, spec: str = "agc", *, seed: int | None = None, translate: float = 12.0,
                 rotate_deg: float = 10.0, scale: float = 0.1, noise_prob: float = 0.25,
                 noise_std: float = NOISE_STD_INPUT, contrast_prob: float = 0.25,
                 gamma: Sequence[float] = (0.5, 4.5), flip_prob: float = 0.5, elastic_prob: float = 0.5,
                 elastic_std: float = 1.5, elastic_grid: int = 4):
        self.spec = "".join(parse_augment_spec(spec))
        for name, v in [("noise_prob", noise_prob), ("contrast_prob", contrast_prob), ("flip_prob", flip_prob),
                        ("elastic_prob", elastic_prob)]:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name, v in [("translate", translate), ("rotate_deg", rotate_deg), ("scale", scale),
                        ("noise_std", noise_std), ("elastic_std", elastic_std)]:
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if scale >= 1:
            raise ValueError(f"scale must be < 1 (a factor 1 ± scale), got {scale}")
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {gamma}")
        if elastic_grid < 2:
            raise ValueError(f"elastic_grid must be >= 2, got {elastic_grid}")
        self.translate, self.rotate = float(translate), math.radians(rotate_deg)
        self.scale, self.noise_prob, self.noise_std = float(scale), float(noise_prob), float(noise_std)
        self.contrast_prob, self.gamma = float(contrast_prob), (float(gamma[0]), float(gamma[1]))
        self.flip_prob, self.elastic_prob = float(flip_prob), float(elastic_prob)
        self.elastic_std, self.elastic_grid = float(elastic_std), int(elastic_grid)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one patch ``(C, P, P, P)`` or a batch ``(B, C, P, P, P)`` (each sample drawn
        independently; the C channels of a sample share its transform), on ``x``'s device.

        Args:
            x: float patches on the input scale.
            generator: CPU ``torch.Generator`` for the random parameters (default: the internal one).

        Returns:
            A tensor of the same shape, dtype and device.

        Raises:
            ValueError: when ``x`` is not 4-D or 5-D with cubic spatial size.
        """
        if x.ndim == 4:
            return self.batch(x[None], generator=generator)[0]
        return self.batch(x, generator=generator)

    def batch(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch (B, C, P, P, P); see :meth:`__call__`."""
        if x.ndim != 5 or not (x.shape[2] == x.shape[3] == x.shape[4]):
            raise ValueError(f"expected patches (C, P, P, P) or (B, C, P, P, P), got {tuple(x.shape)}")
        if not self.spec:
            return x
        g = generator if generator is not None else self.generator
        b, p, dev = x.shape[0], x.shape[2], x.device

        def uniform(*shape, low=-1.0, high=1.0):
            return torch.rand(*shape, generator=g) * (high - low) + low

        # draw every parameter on the CPU in a fixed order (same numbers on every device)
        rot = uniform(b, 3) * self.rotate if "a" in self.spec else None
        scl = 1.0 + uniform(b, 3) * self.scale if "a" in self.spec else None
        shift = uniform(b, 3) * self.translate if "a" in self.spec else None
        disp = None
        if "e" in self.spec:
            on = (torch.rand(b, generator=g) < self.elastic_prob).float()
            ctrl = torch.randn(b, 3, *(3 * [self.elastic_grid]), generator=g) * self.elastic_std
            disp = (ctrl * on[:, None, None, None, None]).to(dev)
            disp = F.interpolate(disp, size=(p, p, p), mode="trilinear", align_corners=True)
        flips = torch.rand(b, 3, generator=g) < self.flip_prob if "f" in self.spec else None
        noise_on = (torch.rand(b, generator=g) < self.noise_prob) if "g" in self.spec else None
        noise_sd = torch.rand(b, generator=g) * self.noise_std if "g" in self.spec else None
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=g)) if "g" in self.spec else 0
        con_on = (torch.rand(b, generator=g) < self.contrast_prob) if "c" in self.spec else None
        gam = uniform(b, low=self.gamma[0], high=self.gamma[1]) if "c" in self.spec else None

        out = x
        if rot is not None or disp is not None:
            out = affine_resample(out, rot, scl, shift, disp)
        if flips is not None:
            out = out.clone()
            for axis in range(3):
                sel = flips[:, axis].nonzero()[:, 0].to(dev)
                if len(sel):
                    out[sel] = out[sel].flip(2 + axis)
        if noise_on is not None and bool(noise_on.any()):
            gd = torch.Generator(device=dev)
            gd.manual_seed(noise_seed)
            noise = torch.randn(out.shape, generator=gd, device=dev, dtype=out.dtype)
            out = out + noise * (noise_sd * noise_on).to(dev, out.dtype).view(-1, 1, 1, 1, 1)
        if con_on is not None and bool(con_on.any()):
            flat = out.reshape(b, -1)
            lo = flat.min(1).values.view(-1, 1, 1, 1, 1)
            rng = flat.max(1).values.view(-1, 1, 1, 1, 1) - lo
            gexp = torch.where(con_on, gam, torch.ones_like(gam)).to(dev, out.dtype).view(-1, 1, 1, 1, 1)
            adj = ((out - lo) / (rng + 1e-7)).clamp_min(0) ** gexp * rng + lo
            out = torch.where(con_on.to(dev).view(-1, 1, 1, 1, 1), adj, out)
        return out


class MonaiPatchAugment:
    """The same augmentations with MONAI's own transforms, one patch at a time (reference backend).

    Args:
        spec: augmentation letters, e.g. ``"agc"``.
        seed: seed for MONAI's random state; ``None`` for a random one.

    Raises:
        ValueError: on a bad spec.
    """

    backend = "monai"

    def __init__(self, spec: str = "agc", *, seed: int | None = None):
        from monai.transforms import (Compose, Rand3DElastic, RandAdjustContrast, RandAffine, RandAxisFlip,
                                      RandGaussianNoise)

        self.spec = "".join(parse_augment_spec(spec))
        ops: list[Callable] = []
        if "a" in self.spec:
            ops.append(RandAffine(prob=1.0, rotate_range=(math.radians(10),) * 3, translate_range=(12,) * 3,
                                  scale_range=(0.1,) * 3, padding_mode="border", mode="bilinear"))
        if "e" in self.spec:
            ops.append(Rand3DElastic(sigma_range=(4, 6), magnitude_range=(20, 40), prob=0.5, padding_mode="border"))
        if "f" in self.spec:
            ops += [RandAxisFlip(prob=0.5)]
        if "g" in self.spec:
            ops.append(RandGaussianNoise(prob=0.25, std=NOISE_STD_INPUT))
        if "c" in self.spec:
            ops.append(RandAdjustContrast(prob=0.25, gamma=(0.5, 4.5)))
        self.transform = Compose(ops)
        self.transform.set_random_state(seed=None if seed is None else int(seed) % 2**32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def __call__(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment (C, P, P, P) or (B, C, P, P, P) patches (a loop over the batch; the C channels of
        a sample share its transform, as MONAI applies one transform to a multi-channel image);
        same shape out."""
        if x.ndim == 5:
            return torch.stack([self(xi, generator=generator) for xi in x])
        if x.ndim != 4:
            raise ValueError(f"expected patches (C, P, P, P) or (B, C, P, P, P), got {tuple(x.shape)}")
        if not self.spec:
            return x
        if generator is not None:
            self.transform.set_random_state(seed=int(torch.randint(0, 2**32, (1,), generator=generator)))
        out = self.transform(x.float())
        out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)  # drop MONAI's MetaTensor
        return out.to(x.device, x.dtype)

    batch = __call__


def build_augment(spec: str = "agc", *, seed: int | None = None, backend: str = "torch", **kwargs):
    """The augmentation callable for a spec string.

    Args:
        spec: letters from ``"aefgc"`` (default ``"agc"``, the published setting).
        seed: seed of its random generator (same seed, same views).
        backend: ``"torch"`` (batched, any device; default) or ``"monai"`` (MONAI per patch).
        **kwargs: parameters of :class:`PatchAugment` (torch backend only).

    Returns:
        A callable ``aug(x, *, generator=None)`` on (C, P, P, P) or (B, C, P, P, P) tensors.

    Raises:
        ValueError: on a bad spec or backend.
    """
    if backend == "torch":
        return PatchAugment(spec, seed=seed, **kwargs)
    if backend == "monai":
        if kwargs:
            raise ValueError(f"the monai backend takes no extra parameters, got {sorted(kwargs)}")
        return MonaiPatchAugment(spec, seed=seed)
    raise ValueError(f"backend must be 'torch' or 'monai', got {backend!r}")
