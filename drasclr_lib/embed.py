"""Patch and subject embeddings: the representation ``h`` of every atlas patch of every subject.

:func:`embed_cohort` runs an encoder over a patch store and returns an :class:`EmbeddingSet`
``h (N, L, D)``; batches hold **one location across subjects**, so every conditional convolution
of a batch uses a single mixed kernel (the fast path). :func:`embed_subject` embeds one new scan,
whose batches mix locations. :func:`pool_subjects` reduces patch embeddings to one vector per
subject.

Invalid patches (less than the store's ``min_patch_fov``, half, inside the scanned volume:
:meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`) are mostly padding, which reads as
-1024 HU air: their embeddings are **NaN** rows (``h[n, l] = nan``, so ``h`` keeps its (N, L, D)
shape and every location its column), and :func:`pool_subjects` skips them. Code that takes
patch rows of ``h`` keeps the finite ones (``np.isfinite(h).all(-1)``). Length (~380 lines): the
embedding set, the two ways of embedding and the pooling share the invalid-patch convention. (The random-weight baseline encoder is :func:`drasclr_lib.models.random_encoder`, the
per-patch facts the maps and metrics colour by are :func:`drasclr_lib.data.patch_store.patch_table`,
and the ``drasclr embed`` command is :mod:`drasclr_lib.embed_cli`.)
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from drasclr_lib.host_memory import keep_freed_memory, resolve_host_memory
from drasclr_lib.intensity import hu_to_input
from drasclr_lib.utils import atomic_path, resolve_device

__all__ = [
    "EmbeddingSet",
    "embed_cohort",
    "embed_subject",
    "pool_subjects",
]


@dataclass
class EmbeddingSet:
    """Patch embeddings of a cohort.

    Attributes:
        h: (N, L, D) float32 representation of every patch (subject, location).
        sids: N subject ids, in the order of ``h``.
        locs: (L, 3) float32 normalised locations in [-1, 1] fed to the encoder.
        atlas_corners: (L, 3) int64 atlas voxel corners (i, j, k) of the locations.
        meta: JSON-serialisable facts about how ``h`` was made (checkpoint, encoder, store).

    Raises:
        ValueError: when the shapes disagree.
    """

    h: np.ndarray
    sids: list[str]
    locs: np.ndarray
    atlas_corners: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.h = np.asarray(self.h, dtype=np.float32)
        self.sids = [str(s) for s in self.sids]
        self.locs = np.asarray(self.locs, dtype=np.float32)
        self.atlas_corners = np.asarray(self.atlas_corners, dtype=np.int64)
        if self.h.ndim != 3:
            raise ValueError(f"h must be (N, L, D), got shape {self.h.shape}")
        n, L, _ = self.h.shape
        if len(self.sids) != n:
            raise ValueError(f"{len(self.sids)} subject ids for {n} subjects in h")
        if len(set(self.sids)) != n:
            raise ValueError("subject ids must be unique")
        if self.locs.shape != (L, 3) or self.atlas_corners.shape != (L, 3):
            raise ValueError(f"locs {self.locs.shape} and atlas_corners {self.atlas_corners.shape} must be ({L}, 3)")
        json.dumps(self.meta)  # fail early on a meta that cannot be saved

    @property
    def num_subjects(self) -> int:
        return self.h.shape[0]

    @property
    def num_locations(self) -> int:
        return self.h.shape[1]

    @property
    def dim(self) -> int:
        return self.h.shape[2]

    def index(self, sid: str) -> int:
        """Row of subject ``sid`` in ``h``; raises ``KeyError`` naming it when absent."""
        try:
            return self.sids.index(str(sid))
        except ValueError:
            raise KeyError(f"subject {sid!r} is not in this embedding set ({self.num_subjects} subjects)") from None

    def __repr__(self) -> str:
        return f"EmbeddingSet(subjects={self.num_subjects}, locations={self.num_locations}, dim={self.dim})"

    def save(self, path: str | os.PathLike) -> Path:
        """Write everything to one ``.npz`` file atomically (no pickles)."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, h=self.h, sids=np.asarray(self.sids, dtype=str), locs=self.locs,
                         atlas_corners=self.atlas_corners, meta=np.asarray(json.dumps(self.meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingSet":
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            ValueError: when the file lacks one of the arrays.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"embedding file {path} does not exist (run embed_cohort / `drasclr embed` first)")
        with np.load(path, allow_pickle=False) as z:
            missing = {"h", "sids", "locs", "atlas_corners", "meta"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not an embedding file: missing {sorted(missing)}")
            return cls(h=z["h"], sids=z["sids"].tolist(), locs=z["locs"], atlas_corners=z["atlas_corners"],
                       meta=json.loads(str(z["meta"])))


# -- embedding --------------------------------------------------------------------------------
def _h_of(encoder, x, loc):
    out = encoder(x, loc)
    h = out[1] if isinstance(out, (tuple, list)) else out
    return h.reshape(h.shape[0], -1)


class _EvalMode:
    """Context: the encoder in eval mode (BatchNorm running statistics), restored afterwards."""

    def __init__(self, encoder):
        self.encoder, self.was_training = encoder, encoder.training

    def __enter__(self):
        self.encoder.eval()
        return self.encoder

    def __exit__(self, *exc):
        self.encoder.train(self.was_training)


def _encoder_device(encoder, device):
    dev = resolve_device(device)
    encoder.to(dev)
    return dev


#: ``embed_cohort``'s batch size when none is given: 32 patches on a CPU, where larger batches run
#: slower (one location x N subjects, 2 threads of an AVX-512 core pair: 275 patches/s at 32 against
#: 238 at 150, one thread 205 against 127; ``benchmarks/results/embed.json``), and 256 on an
#: accelerator, which wants them large.
COHORT_BATCH = {"cpu": 32, "other": 256}


def cohort_batch_size(device) -> int:
    """The default patches per forward pass of :func:`embed_cohort` on ``device`` (a ``torch.device``)."""
    return COHORT_BATCH["cpu" if getattr(device, "type", str(device)) == "cpu" else "other"]


def embed_cohort(
    encoder,
    store,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    subjects: Sequence[int | str] | None = None,
    meta: dict | None = None,
    host_memory: str = "auto",
) -> EmbeddingSet:
    """Embed every patch of every subject of a patch store.

    Batches hold one location across subjects (up to ``batch_size`` subjects at a time), so the
    conditional convolutions mix one kernel per batch. The encoder runs in eval mode under
    ``torch.inference_mode``; the result does not depend on ``batch_size`` beyond float rounding
    and is identical across runs on the same device. Invalid patches
    (:meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`) get NaN rows; stores written
    before the field of view was recorded have none.

    Args:
        encoder: a ``DrasEncoder`` (``forward(x (B, 1, P, P, P), loc (B, 3)) -> (z, h)``).
        store: a ``PatchStore`` or the path of one.
        batch_size: largest number of patches per forward pass; ``None``: :func:`cohort_batch_size`
            of the device (32 on a CPU, 256 on a GPU).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        progress: show a tqdm bar over locations.
        subjects: optional subset (indices or ids); default every subject of the store.
        meta: extra facts to keep in ``EmbeddingSet.meta`` (e.g. the checkpoint path).
        host_memory: ``"auto"`` (on a CPU with glibc, freed memory is kept for reuse while the
            cohort is embedded: 2.1x the forward pass at batch 32), ``"keep"`` or ``"system"``; see
            :mod:`drasclr_lib.host_memory`.

    Returns:
        The :class:`EmbeddingSet` with ``h (N, L, D)`` float32, NaN at invalid patches;
        ``meta["invalid_patches"]`` counts them.

    Raises:
        ValueError: for a store without subjects or a non-positive ``batch_size``.

    Warns:
        UserWarning: when ``encoder`` comes from a published-format checkpoint
            (``encoder.checkpoint_format == "published"``, see ``load_encoder``) and the store was
            not built on the published atlas's 581 locations: the released weights' location
            inputs then mean other places than they were trained on.
    """
    import torch
    from tqdm.auto import tqdm

    from drasclr_lib.data.patch_store import PatchStore

    if not isinstance(store, PatchStore):
        store = PatchStore(store)
    _warn_if_not_published_atlas(encoder, store)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    idx = list(range(store.num_subjects)) if subjects is None else [store.index(s) for s in subjects]
    if not idx:
        raise ValueError(f"no subjects to embed in {store.root}")
    dev = _encoder_device(encoder, device)
    batch_size = batch_size or cohort_batch_size(dev)
    L = store.num_locations
    locs = torch.as_tensor(store.locs, dtype=torch.float32, device=dev)
    h_all = None
    kept = resolve_host_memory(host_memory, dev.type) == "keep"
    with keep_freed_memory(kept), _EvalMode(encoder), torch.inference_mode():
        for loc in tqdm(range(L), desc="embed (locations)", disable=not progress, leave=False):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                x = torch.from_numpy(hu_to_input(store.location_batch(chunk, loc)))[:, None].to(dev)
                h = _h_of(encoder, x, locs[loc].expand(len(chunk), 3)).float().cpu().numpy()
                if h_all is None:
                    h_all = np.zeros((len(idx), L, h.shape[1]), dtype=np.float32)
                h_all[start:start + len(chunk), loc] = h
    invalid = ~store.valid_mask(idx)
    h_all[invalid] = np.nan
    info = {"store": str(store.root), "num_subjects": len(idx), "num_locations": L,
            "encoder": type(encoder).__name__, "device": str(dev), "invalid_patches": int(invalid.sum()),
            "batch_size": batch_size, "host_memory": "keep" if kept else "system",
            "min_patch_fov": store.min_patch_fov, **(meta or {})}
    return EmbeddingSet(h=h_all, sids=[store.sids[i] for i in idx], locs=store.locs,
                        atlas_corners=store.atlas_corners, meta=info)


def _warn_if_not_published_atlas(encoder, store) -> None:
    """Warn when released (published-format) weights meet a store built on another atlas."""
    if getattr(encoder, "checkpoint_format", None) != "published":
        return
    from drasclr_lib.preprocess.atlas_source import PUBLISHED_NUM_LOCATIONS, is_published_corners

    if is_published_corners(store.atlas_corners):
        return
    source = store.meta.get("atlas_source") or store.meta.get("atlas") or "not recorded"
    warnings.warn(
        f"patch store {store.root} was built on atlas {source!r} with "
        f"{store.num_locations} locations, but the encoder comes from a published-format DrasCLR checkpoint, whose "
        f"location inputs were trained on the {PUBLISHED_NUM_LOCATIONS} locations of the published atlas: here they "
        "name other places, and the embeddings are not those of the released model. Preprocess the cohort on the "
        "published atlas (preprocess_cohort(..., atlas='published') or `drasclr preprocess --atlas published`).",
        UserWarning, stacklevel=3)


def embed_subject(
    encoder,
    patches_hu: np.ndarray,
    locs: np.ndarray,
    *,
    batch_size: int = 32,
    device: str = "auto",
    group_by_location: bool = False,
    valid: np.ndarray | None = None,
    host_memory: str = "auto",
) -> np.ndarray:
    """Embed the patches of one scan, every patch at its own location.

    Batches mix locations (the encoder mixes one kernel per sample). With
    ``group_by_location=True`` patches that share a location are batched together instead (useful
    when ``locs`` repeats, e.g. augmented copies).

    Args:
        encoder: a ``DrasEncoder``.
        patches_hu: (L, P, P, P) HU patches (int16 or float).
        locs: (L, 3) normalised locations in [-1, 1], one per patch.
        batch_size: largest number of patches per forward pass (32 was fastest on 2 CPU cores:
            580 patches in 2.7 s, against 3.1 s at 64 and 3.8 s at 128).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        group_by_location: batch equal locations together.
        valid: optional (L,) bool, False at invalid patches (e.g. ``store.valid_patches(s)`` or
            ``patch_fov_fraction >= 0.5``): those are not run and get NaN rows.
        host_memory: ``"auto"``, ``"keep"`` or ``"system"``, as for :func:`embed_cohort`.

    Returns:
        h (L, D) float32 (NaN rows at invalid patches).

    Raises:
        ValueError: when the shapes of ``patches_hu``, ``locs`` and ``valid`` disagree.
    """
    import torch

    patches_hu = np.asarray(patches_hu)
    locs = np.asarray(locs, dtype=np.float32)
    if patches_hu.ndim != 4:
        raise ValueError(f"patches_hu must be (L, P, P, P), got {patches_hu.shape}")
    if locs.shape != (len(patches_hu), 3):
        raise ValueError(f"locs must be ({len(patches_hu)}, 3), got {locs.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    keep = np.ones(len(patches_hu), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if keep.shape != (len(patches_hu),):
        raise ValueError(f"valid must be ({len(patches_hu)},) bool, got {keep.shape}")
    dev = _encoder_device(encoder, device)
    todo = np.flatnonzero(keep)
    if group_by_location and len(todo):
        _, inverse = np.unique(locs[todo], axis=0, return_inverse=True)
        inv = inverse.ravel()
        perm = np.argsort(inv, kind="stable")
        groups = np.split(todo[perm], np.flatnonzero(np.diff(inv[perm])) + 1)
        batches = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    else:
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    out = None
    with keep_freed_memory(resolve_host_memory(host_memory, dev.type) == "keep"), _EvalMode(encoder), \
            torch.inference_mode():
        for b in batches:
            x = torch.from_numpy(hu_to_input(patches_hu[b]))[:, None].to(dev)
            h = _h_of(encoder, x, torch.from_numpy(locs[b]).to(dev)).float().cpu().numpy()
            if out is None:
                out = np.full((len(patches_hu), h.shape[1]), np.nan, dtype=np.float32)
            out[b] = h
    if out is None:  # every patch invalid: the encoder's width from one dummy pass
        with _EvalMode(encoder), torch.inference_mode():
            x = torch.from_numpy(hu_to_input(patches_hu[:1]))[:, None].to(dev)
            dim = _h_of(encoder, x, torch.from_numpy(locs[:1]).to(dev)).shape[1]
        out = np.full((len(patches_hu), dim), np.nan, dtype=np.float32)
    return out


# -- pooling ----------------------------------------------------------------------------------
def pool_subjects(h: np.ndarray, method: str = "mean") -> np.ndarray:
    """Reduce patch embeddings to one vector per subject.

    ``"mean"`` averages every location: (N, D), a summary of the whole lung. ``"meanmax"``
    concatenates the mean and the element-wise maximum over locations: (N, 2D); the maximum keeps
    a strong response of a few patches (focal disease) that the mean dilutes. Invalid patches (NaN
    rows, see the module docstring) are skipped: a subject is pooled over its valid patches only,
    and a subject without any is a NaN row.

    Args:
        h: (N, L, D) patch embeddings (or an :class:`EmbeddingSet`).
        method: ``"mean"`` or ``"meanmax"``.

    Returns:
        (N, D) or (N, 2D) float32.

    Raises:
        ValueError: for an unknown method or a wrong shape.
    """
    if isinstance(h, EmbeddingSet):
        h = h.h
    h = np.asarray(h, dtype=np.float32)
    if h.ndim != 3:
        raise ValueError(f"h must be (N, L, D), got shape {h.shape}")
    if method not in ("mean", "meanmax"):
        raise ValueError(f"unknown pooling method {method!r}; use 'mean' or 'meanmax'")
    ok = np.isfinite(h).all(axis=2)  # (N, L) valid patches
    if ok.all():
        mean, top = h.mean(axis=1), (h.max(axis=1) if method == "meanmax" else None)
    else:
        n = ok.sum(axis=1)[:, None].astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok[..., None], h, 0.0).sum(axis=1) / n
        top = np.where(ok[..., None], h, -np.inf).max(axis=1) if method == "meanmax" else None
        if top is not None:
            top[n[:, 0] == 0] = np.nan
    return mean.astype(np.float32) if top is None else np.concatenate([mean, top], axis=1).astype(np.float32)
