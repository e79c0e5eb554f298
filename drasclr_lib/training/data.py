"""Training data: the per-location batch sampler and the anchor/neighbour pair dataset.

The published code switched location by mutating its dataset in the main process, which DataLoader
workers (holding their own copies) never see. Here the *sampler* decides everything: each batch it
yields is a list of ``(subject_idx, loc_idx)`` pairs of one location, and the dataset is a pure
function of the pair, so any number of workers returns exactly the batches the sampler chose.

Every pair the sampler yields is a :class:`SampleIndex` (a 2-tuple ``(subject, loc)`` carrying a
per-sample random ``seed`` derived from ``(seed, epoch, subject, loc)``); the dataset seeds the
sample's augmentation with it. The views of a sample therefore do not depend on the number of
workers or on where a run was resumed, which makes resume exact.

Patients with several scans (the manifest's optional ``group`` column, a patient id): every sample
carries its subject's *group* index (:func:`subject_groups`), which the model records with its keys
and uses to keep two scans of one patient out of each other's negatives. Without the column every
subject is its own group and the group index is the subject index.

Patches mostly outside the scanned volume are never drawn: :func:`trainable_pairs` gives the
sampler the (subject, location) pairs whose anchor and neighbours are valid. Length (~350 lines):
the sampler and the dataset it drives are one contract.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from drasclr_lib.augment import build_augment
from drasclr_lib.intensity import hu_to_input

__all__ = ["GROUP_COLUMN", "SampleIndex", "LocationBatchSampler", "PatchPairDataset", "subject_groups",
           "trainable_pairs"]

#: The manifest / ``subjects.csv`` column naming each subject's patient (several scans, one group).
GROUP_COLUMN = "group"


def _group_label(value) -> str | None:
    """A group value as a label; ``None`` for missing (NaN, None, empty). ``3.0`` and ``3`` are ``"3"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    label = str(value).strip()
    return label if label and label.lower() != "nan" else None


def subject_groups(table, sids, column: str = GROUP_COLUMN) -> np.ndarray:
    """The group (patient) index of every subject: the position of the group's first subject.

    Args:
        table: subject table indexed by sid (``PatchStore.table``), optionally with ``column``.
        sids: the N subjects, in store order (``PatchStore.sids``).
        column: the column of patient ids (string or numeric; missing = the subject's own group).

    Returns:
        (N,) int64: for subject ``i``, the smallest position ``j`` in ``sids`` whose subject has
        the same group; ``arange(N)`` when the table has no such column or every group is a
        single subject, so code that compares these indices behaves as with subject indices.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"group": ["p1", None, "p1", "p2"]}, index=["a", "b", "c", "d"])
        >>> subject_groups(t, ["a", "b", "c", "d"]).tolist()
        [0, 1, 0, 3]
    """
    sids = [str(s) for s in sids]
    codes = np.arange(len(sids), dtype=np.int64)
    if column not in getattr(table, "columns", ()):
        return codes
    first: dict[str, int] = {}
    for i, value in enumerate(table.loc[sids, column].tolist()):
        label = _group_label(value)
        if label is not None:
            codes[i] = first.setdefault(label, i)
    return codes


class SampleIndex(tuple):
    """``(subject_idx, loc_idx)`` with a per-sample augmentation ``seed`` attribute.

    Behaves as the plain 2-tuple (unpacking, equality, hashing); pickles with its seed, so it
    reaches DataLoader workers intact.
    """

    def __new__(cls, subject: int, loc: int, seed: int | None = None):
        obj = super().__new__(cls, (int(subject), int(loc)))
        obj.seed = None if seed is None else int(seed)
        return obj

    def __reduce__(self):
        return (SampleIndex, (self[0], self[1], self.seed))

    def __repr__(self) -> str:
        return f"SampleIndex(subject={self[0]}, loc={self[1]}, seed={self.seed})"


def _sample_seeds(seed: int, epoch: int, loc: int, subjects: np.ndarray) -> np.ndarray:
    """Deterministic 63-bit seeds, one per subject, from (seed, epoch, loc, subject)."""
    base = np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(loc)]).generate_state(2, np.uint64)
    # splitmix64-style mixing of the subject index into the location's base state
    z = (subjects.astype(np.uint64) + base[0]) * np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(31)
    z = (z ^ base[1]) * np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(29)
    return (z >> np.uint64(1)).astype(np.int64)


def trainable_pairs(store, num_neighbors: int) -> np.ndarray:
    """(N, L) bool: the (subject, location) pairs pretraining may draw.

    A pair is trainable when its patch and the patches of its first ``num_neighbors`` atlas
    neighbours are all valid (:meth:`~drasclr_lib.data.patch_store.PatchStore.valid_patches`: at
    least half inside the scanned volume), so no anchor, key or neighbour view is mostly padding.
    Give it to :class:`LocationBatchSampler` as ``valid``. Stores without field-of-view records:
    every pair.

    Args:
        store: a ``PatchStore``.
        num_neighbors: K, neighbours per anchor (0: the anchor alone).
    """
    valid = store.valid_mask()
    out = valid.copy()
    for j in range(int(num_neighbors)):
        out &= valid[:, store.neighbors[:, j]]
    return out


class LocationBatchSampler(Sampler):
    """Batches of one anatomical location each; an epoch walks every location.

    Per epoch (seeded by ``(seed, epoch)``): the locations are visited in a shuffled order and, at
    each location, the subjects are shuffled and cut into global batches of
    ``batch_size * world_size`` subjects. Rank ``r`` takes the ``r``-th slice of ``batch_size``
    of every global batch, so all ranks work on the same location at every step (their keys go
    into the same per-location queue) on disjoint subjects.

    Args:
        num_subjects: N, subjects in the store.
        num_locations: L, locations in the store.
        batch_size: subjects per batch *per rank*.
        shuffle: shuffle locations and subjects (``False``: locations in order, subjects in order).
        seed: base seed (the same on every rank).
        drop_last: drop each location's last incomplete global batch. With ``False`` it is kept
            (with ``world_size > 1`` it is padded by wrapping around the location's subject order,
            so that every rank gets ``batch_size`` samples).
        rank, world_size: this process's place under DDP (defaults: one process).
        valid: optional (N, L) bool, the pairs that may be drawn (:func:`trainable_pairs`); at each
            location only its valid subjects are shuffled and batched, so a location with fewer
            valid subjects has fewer batches (none below one global batch with ``drop_last``).
            ``None``: every pair.

    Raises:
        ValueError: on non-positive sizes, ``rank`` outside ``[0, world_size)``, or a global batch
            larger than the number of subjects when ``drop_last`` (no batch would remain).

    Example:
        >>> s = LocationBatchSampler(12, 18, 4, seed=0)
        >>> len(s)   # 18 locations x 3 batches
        54
    """

    def __init__(self, num_subjects: int, num_locations: int, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, rank: int = 0, world_size: int = 1,
                 valid: np.ndarray | None = None):
        for name, v in [("num_subjects", num_subjects), ("num_locations", num_locations),
                        ("batch_size", batch_size), ("world_size", world_size)]:
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        global_batch = batch_size * world_size
        if drop_last and global_batch > num_subjects:
            raise ValueError(f"batch_size {batch_size} x world_size {world_size} = {global_batch} exceeds the "
                             f"{num_subjects} subjects: with drop_last no batch would remain; lower the batch size")
        self.num_subjects, self.num_locations = int(num_subjects), int(num_locations)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world_size = bool(drop_last), int(rank), int(world_size)
        self.epoch = 0
        self.start_batch = 0
        self.valid = None
        if valid is not None:
            self.valid = np.asarray(valid, dtype=bool)
            if self.valid.shape != (self.num_subjects, self.num_locations):
                raise ValueError(f"valid must be ({self.num_subjects}, {self.num_locations}) bool, got {self.valid.shape}")
            if self.batches_per_epoch == 0:
                raise ValueError("no location has enough valid subjects for one batch of "
                                 f"{global_batch}: the valid pairs leave nothing to train on")

    def _batches_for(self, m: int) -> int:
        g = self.batch_size * self.world_size
        return m // g if self.drop_last else math.ceil(m / g)

    @property
    def batches_per_location(self) -> int:
        """Batches (steps) per location and epoch when every subject is valid there."""
        return self._batches_for(self.num_subjects)

    @property
    def batches_per_epoch(self) -> int:
        """Batches (steps) of a full epoch, the same on every rank."""
        if self.valid is None:
            return self.batches_per_location * self.num_locations
        return int(sum(self._batches_for(int(m)) for m in self.valid.sum(0)))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (its shuffles) and where in it to start (to resume mid-epoch).

        Raises:
            ValueError: when ``start_batch`` is outside ``[0, batches_per_epoch]``.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def epoch_batches(self) -> Iterator[list[SampleIndex]]:
        """Every batch of the current epoch for this rank (ignores ``start_batch``)."""
        rng = np.random.default_rng([self.seed % 2**32, self.epoch])
        n, bs, g = self.num_subjects, self.batch_size, self.batch_size * self.world_size
        locs = rng.permutation(self.num_locations) if self.shuffle else np.arange(self.num_locations)
        for loc in locs:
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            if self.valid is not None:  # only the subjects whose patches here are (mostly) scanned
                order = order[self.valid[order, loc]]
            m = len(order)
            seeds = _sample_seeds(self.seed, self.epoch, int(loc), order)
            for b in range(self._batches_for(m)):
                idx = np.arange(b * g, (b + 1) * g)
                if idx[-1] >= m:  # last incomplete global batch (drop_last=False)
                    if self.world_size == 1:
                        idx = idx[idx < m]
                    else:
                        idx = idx % m
                mine = idx[self.rank * bs:(self.rank + 1) * bs] if self.world_size > 1 else idx
                yield [SampleIndex(order[i], loc, seeds[i]) for i in mine]

    def __iter__(self) -> Iterator[list[SampleIndex]]:
        for i, batch in enumerate(self.epoch_batches()):
            if i >= self.start_batch:
                yield batch


class PatchPairDataset(Dataset):
    """Two augmented views of an anchor patch and its augmented anatomical neighbours.

    ``dataset[(s, l)]`` reads, through the memory-mapped store, the patch of subject ``s`` at
    location ``l`` and the patches of the same subject at ``store.neighbors[l][:num_neighbors]``,
    maps HU to the input scale (``drasclr_lib.intensity.hu_to_input``) and augments them as the
    published code does (:meth:`augment_views`): the anchor twice, views q and k, each with its own
    random transform (the published ``TwoCropsTransform``); the K neighbours together, as the
    channels of one ``(K, P, P, P)`` sample, so that they share **one** random transform (one
    affine, one elastic field, one flip, one noise decision and std, one contrast gamma; the noise
    itself is drawn per voxel), independent of q and k (the published ``neighbor_transforms``).
    The training loop's device augmentation (``augment_on="device"``) calls the same
    :meth:`augment_views`, so both paths have the same semantics.

    Args:
        store: a :class:`drasclr_lib.data.patch_store.PatchStore`.
        num_neighbors: K, neighbours per anchor (0 disables them; at most the store's list length).
        augment: a spec string (``"agc"``), a callable ``aug(x (B, C, P, P, P), generator=...)``
            that draws one transform per sample shared by its C channels (as
            :class:`drasclr_lib.augment.PatchAugment` and ``MonaiPatchAugment`` do), or ``None`` for
            no augmentation here (the training loop then augments on the device).
        seed: seed for samples that come without their own (a plain ``(s, l)`` tuple).

    Returns (``__getitem__``):
        dict with ``x_q``, ``x_k`` (1, P, P, P) float32 in ~[-1, 1]; ``loc`` (3,) float32;
        ``loc_idx`` int64; ``subject`` int64; ``group`` int64 (the subject's patient group,
        :func:`subject_groups`; the subject index without a ``group`` column); ``x_nbr``
        (K, 1, P, P, P) float32; ``nbr_locs`` (K, 3) float32; ``nbr_idx`` (K,) int64.

    Raises:
        ValueError: on a bad ``num_neighbors`` or index.
    """

    def __init__(self, store, *, num_neighbors: int = 2, augment: str | Callable | None = "agc", seed: int = 0):
        max_k = store.neighbors.shape[1]
        if not 0 <= num_neighbors <= max_k:
            raise ValueError(f"num_neighbors must be in [0, {max_k}] (the store {store.root} keeps {max_k} "
                             f"neighbours per location), got {num_neighbors}")
        self.store, self.num_neighbors, self.seed = store, int(num_neighbors), int(seed)
        self.augment = build_augment(augment, seed=seed) if isinstance(augment, str) else augment
        self._locs = torch.as_tensor(store.locs, dtype=torch.float32)
        self._nbrs = torch.as_tensor(store.neighbors[:, :num_neighbors], dtype=torch.int64)
        self.groups = torch.as_tensor(subject_groups(store.table, store.sids), dtype=torch.int64)

    def __len__(self) -> int:
        return self.store.num_subjects * self.store.num_locations

    @staticmethod
    def augment_views(augment: Callable, x_q: torch.Tensor, x_k: torch.Tensor, x_nbr: torch.Tensor | None, *,
                      generator: torch.Generator | None = None):
        """Augment a batch of anchors and their neighbours the published way.

        q and k get one independent transform per view (one batched call on ``cat([x_q, x_k])``);
        the K neighbours of sample ``b`` are passed as the K channels of one sample
        ``x_nbr[b] -> (K, P, P, P)``, so they share one transform, drawn independently of q, k and
        of the other samples' neighbours. Used by :meth:`__getitem__` (B = 1, in the DataLoader
        workers) and by the training loop's device augmentation (the whole batch at once).

        Args:
            augment: ``aug(x (B, C, P, P, P), generator=...)`` drawing one transform per sample.
            x_q, x_k: (B, 1, P, P, P) anchor patches (usually the same tensor twice).
            x_nbr: (B, K, 1, P, P, P) neighbour patches, or ``None``.
            generator: CPU ``torch.Generator`` of the random parameters (q/k first, then neighbours).

        Returns:
            ``(x_q, x_k, x_nbr)`` augmented, same shapes (``x_nbr`` stays ``None`` when ``None``).
        """
        b = len(x_q)
        views = augment(torch.cat([x_q, x_k]), generator=generator)
        q, k = views[:b], views[b:]
        if x_nbr is not None and x_nbr.shape[1] > 0:
            if x_nbr.dim() != 6 or x_nbr.shape[2] != 1:
                raise ValueError(f"x_nbr must be (B, K, 1, P, P, P), got {tuple(x_nbr.shape)}")
            x_nbr = augment(x_nbr[:, :, 0], generator=generator)[:, :, None]  # K neighbours = K channels
        return q, k, x_nbr

    def __getitem__(self, key) -> dict:
        try:
            s, l = (int(v) for v in key)
        except (TypeError, ValueError):
            raise ValueError(f"PatchPairDataset index must be a (subject_idx, loc_idx) pair, got {key!r}") from None
        if not (0 <= s < self.store.num_subjects and 0 <= l < self.store.num_locations):
            raise ValueError(f"index {(s, l)} outside the store {self.store.root} "
                             f"({self.store.num_subjects} subjects x {self.store.num_locations} locations)")
        nbr = self._nbrs[l]
        patches = self.store.patches(s)  # memory map of one subject: reads only the rows used
        try:
            stack = np.stack([patches[l]] + [patches[int(j)] for j in nbr])
        except (OSError, ValueError) as exc:
            raise OSError(f"subject {self.store.sids[s]}: cannot read patches from "
                          f"{self.store.root / 'patches' / (self.store.sids[s] + '.npy')}: {exc}") from exc
        x = hu_to_input(torch.from_numpy(stack))[:, None]  # (1 + K, 1, P, P, P)
        x_q, x_k, x_nbr = x[:1], x[:1].clone(), x[1:]
        if self.augment is not None:
            seed = getattr(key, "seed", None)
            if seed is None:  # differs per worker: DataLoader seeds torch in each worker
                seed = int(torch.randint(0, 2**62, (1,)))
            gen = torch.Generator()
            gen.manual_seed(seed)
            x_q, x_k, nbr_views = self.augment_views(self.augment, x_q, x_k, x_nbr[None], generator=gen)
            x_nbr = nbr_views[0]
        return {
            "x_q": x_q[0], "x_k": x_k[0], "x_nbr": x_nbr,
            "loc": self._locs[l], "loc_idx": torch.tensor(l), "subject": torch.tensor(s),
            "group": self.groups[s],
            "nbr_locs": self._locs[nbr], "nbr_idx": nbr,
        }
