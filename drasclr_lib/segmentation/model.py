"""A segmentation network whose encoder is the location-conditioned :class:`DrasEncoder`.

The encoder's six stages (32³ … 1³) give the skip connections, still conditioned on the patch's
anatomical location; a light 3D decoder brings the features back to the patch's 32³ voxel grid:
trilinear upsampling, concatenation with the skip, then one 3x3x3 convolution per level from 2³
to 16³ and a 1x1x1 convolution at 32³ (the 32³ skip is the encoder's first 3x3x3 convolution,
which already sees each voxel's neighbourhood). Two 3x3x3 convolutions per level, the usual
U-Net, cost ~7x the encoder's FLOPs on 32³ patches (most of it at 32³); this decoder costs about
a third of the encoder, which keeps CPU fine-tuning practical.

A fine-tuned segmenter is kept as one file (:func:`save_segmenter`, read back by
:func:`load_segmenter` with ``torch.load(weights_only=True)``): its weights, the constructor
arguments, and the atlas its training store was made on (the store folder and the (L, 3) atlas
corners), so that whole-scan inference (``drasclr segment``) can find that atlas and refuse
another one.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from drasclr_lib.models import DrasEncoder, load_encoder
from drasclr_lib.utils import atomic_path

__all__ = ["DrasSegNet", "build_segmenter", "INITS", "save_segmenter", "load_segmenter", "SEGMENTER_FORMAT"]

INITS = ("random", "moco", "drasclr")
#: ``format`` entry of a segmenter file (:func:`save_segmenter`); ``version`` is 1.
SEGMENTER_FORMAT = "drasclr-segmenter"


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


def save_segmenter(model: DrasSegNet, path: str | os.PathLike, *, store=None, meta: dict | None = None) -> Path:
    """Write a (fine-tuned) segmenter to one file, atomically, for :func:`load_segmenter` / ``drasclr segment``.

    File content (tensors and plain containers only, so it loads with ``weights_only=True``)::

        {"format": "drasclr-segmenter", "version": 1, "state_dict": {...} (CPU tensors),
         "num_classes": C, "decoder_channels": [5 ints], "input_skip": bool,
         "encoder": DrasEncoder.config, "atlas_store": str or None,
         "atlas_corners": (L, 3) int64 tensor or None, "meta": {...}}

    Args:
        model: the segmenter.
        path: output file (``.pt``; its folder is created).
        store: the patch store (folder or ``PatchStore``) the model was fine-tuned on: its folder
            and atlas corners are recorded, so inference finds its atlas and checks it.
        meta: plain values worth keeping (init, label fraction, steps, Dice ...): str, int,
            float, bool, None, lists and dicts of them.

    Returns:
        ``path``.

    Raises:
        ValueError: when ``meta`` holds something other than plain values.
    """
    from drasclr_lib.data.patch_store import PatchStore

    _check_plain(meta or {}, "meta")
    root = corners = None
    if store is not None:
        store = store if isinstance(store, PatchStore) else PatchStore(store)
        root = str(Path(store.root).resolve())
        corners = torch.as_tensor(np.asarray(store.atlas_corners, dtype=np.int64))
    obj = {"format": SEGMENTER_FORMAT, "version": 1,
           "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
           "num_classes": int(model.num_classes),
           "decoder_channels": [int(up.body[0].out_channels) for up in model.decoder],
           "input_skip": bool(model.input_skip), "encoder": dict(model.encoder.config),
           "atlas_store": root, "atlas_corners": corners, "meta": dict(meta or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be str, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise ValueError(f"{where}: {type(value).__name__} is not a plain value (str, int, float, bool, None, "
                         "list, dict)")


def load_segmenter(path: str | os.PathLike, *, map_location="cpu") -> tuple[DrasSegNet, dict]:
    """Read a segmenter written by :func:`save_segmenter` (``torch.load(weights_only=True)``), in eval mode.

    Args:
        path: the segmenter file.
        map_location: passed to ``torch.load``.

    Returns:
        ``(model, info)``: the :class:`DrasSegNet` and ``{"atlas_store": str or None,
        "atlas_corners": (L, 3) int64 array or None, "meta": dict}``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file would need code to unpickle (refused without running it), is not
            a segmenter file (a pretraining checkpoint, for instance), or its weights do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter file not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain containers "
                         f"(torch.load weights_only=True said: {str(exc).splitlines()[0] if str(exc) else exc!r})") \
            from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or obj.get("format") != SEGMENTER_FORMAT:
        what = "a DrasCLR pretraining checkpoint (an encoder)" if isinstance(obj, dict) and "state_dict" in obj \
            else "not a segmenter file"
        raise ValueError(f"{path}: {what}, not a fine-tuned segmenter written by save_segmenter "
                         "(drasclr_lib.segmentation.model; notebook 05 writes one as segmenter.pt)")
    if obj.get("version") != 1:
        raise ValueError(f"{path}: segmenter file version {obj.get('version')!r} is not supported (1)")
    try:
        model = DrasSegNet(DrasEncoder(**obj["encoder"]), num_classes=int(obj["num_classes"]),
                           decoder_channels=tuple(obj["decoder_channels"]), input_skip=bool(obj["input_skip"]))
        model.load_state_dict(obj["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path}: the segmenter's weights do not fit its recorded architecture: {exc}") from exc
    corners = obj.get("atlas_corners")
    info = {"atlas_store": obj.get("atlas_store"),
            "atlas_corners": None if corners is None else np.asarray(corners, dtype=np.int64),
            "meta": dict(obj.get("meta") or {})}
    return model.eval(), info
