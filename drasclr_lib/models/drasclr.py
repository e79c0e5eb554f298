"""DrasCLR: MoCo v2 with one negative queue per anatomical location and a neighbour loss.

The module holds the state (query encoder, momentum key encoder, queues ``(dim, K, L)`` and one
pointer per location); the losses are the pure functions of :mod:`drasclr_lib.losses`. The same
code runs on a CPU, one GPU, or under ``torchrun`` (DDP is used only when
``torch.distributed.is_initialized()``). State-dict keys are ``encoder_q.*``, ``encoder_k.*``,
``queue``, ``queue_ptr``; the published checkpoint has the same keys behind a ``module.`` prefix
(:func:`strip_module_prefix`).

Why split-batch BatchNorm on one device: BatchNorm in train mode normalises with the statistics of
the batch it sees. If query and key encoders see the same batch statistics, the positive pair can
be recognised through them (the model "cheats" through BN). MoCo shuffles the key batch across
GPUs so each GPU's key sub-batch differs from its query sub-batch. On one device a permutation
alone changes nothing: the mean and variance of a batch do not depend on its order. So the key
batch is shuffled, split into ``split_bn`` sub-batches that are normalised separately (train mode,
statistics per sub-batch), concatenated and unshuffled (MoCo's single-GPU demo does the same).

Why a subject index per queue entry: the local task's negatives are *other subjects* at the
anchor's location. The published code visits the subjects of a location in one fixed order every
epoch, so an anchor never meets an older key of itself in the queue. Our sampler reshuffles the
subjects each epoch (better for SGD), and then, from the second epoch on, the first batches at a
location would meet keys of the same subjects written one epoch earlier (10-40 % of the anchors,
depending on cohort and batch size). ``queue_subject (K, L)`` records the subject of every queue
entry (-1 = none), and with ``exclude_same_subject`` those entries are masked out of the anchor's
local and neighbour logits. ``forward`` reports how many same-subject pairs reached the loss
(``self_negatives``, counted from the indices; 0 with the mask) and how many were masked.

(About 370 lines: one module, one model; its state (encoders, queues, subject indices), the
shuffled key encoding and the forward belong together, and the long input checks name every bad shape.)
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from drasclr_lib.losses import info_nce, neighbor_info_nce, topk_accuracy
from drasclr_lib.models.encoder import DrasEncoder

__all__ = ["DrasCLR", "concat_all_gather", "strip_module_prefix"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every process) from all processes along dim 0 (no gradient).

    Returns the tensor itself when not running distributed.
    """
    if not _distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def _embed(z: torch.Tensor) -> torch.Tensor:
    """L2-normalised embeddings ``(N, dim)`` of an encoder's ``z``: float32 from bfloat16 / float16 (autocast),
    else ``z``'s own dtype (float32, float64)."""
    with _full_precision(z):
        return F.normalize(z if z.dtype in (torch.float32, torch.float64) else z.float(), dim=1)


def _full_precision(t: torch.Tensor):
    """A context that switches autocast off on ``t``'s device (float32 maths inside an autocast region)."""
    return torch.autocast(t.device.type, enabled=False)


def strip_module_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Remove a DistributedDataParallel ``module.`` prefix from every key that has it."""
    n = len(prefix)
    return {(k[n:] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


class DrasCLR(nn.Module):
    """Query/key encoders, per-location queues and the DrasCLR losses.

    Args:
        encoder_q: the query encoder (trained by gradient); the key encoder is a deep copy updated
            by momentum.
        num_locations: number of anatomical locations ``L`` (one queue each).
        queue_size: negatives per location ``K``.
        momentum: key-encoder momentum ``m`` (``theta_k <- m theta_k + (1 - m) theta_q``), in [0, 1].
        temperature: InfoNCE temperature ``tau > 0``.
        neighbor_weight: weight ``beta >= 0`` of the neighbour loss (0 disables it).
        split_bn: sub-batches for the key encoder's BatchNorm on one device (1 disables; ignored
            under DDP, where the batch is shuffled across processes instead).
        exclude_same_subject: mask queue entries of the anchor's own subject out of its logits
            (needs ``subjects`` in :meth:`forward`). ``False`` keeps every entry, as published.

    Raises:
        ValueError: on invalid arguments.
    """

    def __init__(self, encoder_q: DrasEncoder, *, num_locations: int, queue_size: int = 4096,
                 momentum: float = 0.999, temperature: float = 0.2, neighbor_weight: float = 1.0, split_bn: int = 2,
                 exclude_same_subject: bool = True):
        super().__init__()
        if not isinstance(encoder_q, DrasEncoder):
            raise ValueError(f"DrasCLR: encoder_q must be a DrasEncoder, got {type(encoder_q).__name__}")
        for name, value in (("num_locations", num_locations), ("queue_size", queue_size), ("split_bn", split_bn)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DrasCLR: {name} must be a positive int, got {value!r}")
        if not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(f"DrasCLR: momentum must be in [0, 1], got {momentum!r}")
        if not float(temperature) > 0:
            raise ValueError(f"DrasCLR: temperature must be > 0, got {temperature!r}")
        if not float(neighbor_weight) >= 0:
            raise ValueError(f"DrasCLR: neighbor_weight must be >= 0, got {neighbor_weight!r}")
        self.num_locations = num_locations
        self.queue_size = queue_size
        self.momentum = float(momentum)
        self.temperature = float(temperature)
        self.neighbor_weight = float(neighbor_weight)
        self.split_bn = split_bn
        self.exclude_same_subject = bool(exclude_same_subject)
        self.dim = encoder_q.proj_dim

        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(self.dim, queue_size, num_locations), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(num_locations, dtype=torch.long))
        # subject (or patient) index of every queue entry, -1 = none (the random initial keys)
        self.register_buffer("queue_subject", torch.full((queue_size, num_locations), -1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before queue_subject existed (and the published ones) load with no
        # subject known for any queue entry
        key = prefix + "queue_subject"
        if key not in state_dict and prefix + "queue" in state_dict:
            state_dict[key] = torch.full_like(self.queue_subject, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def set_channels_last(self, enabled: bool = True) -> "DrasCLR":
        """Channels-last 3D convolutions in both encoders (:meth:`DrasEncoder.set_channels_last`); returns ``self``."""
        self.encoder_q.set_channels_last(enabled)
        self.encoder_k.set_channels_last(enabled)
        return self

    # ------------------------------------------------------------------------------ key encoder
    @torch.no_grad()
    def momentum_update(self) -> None:
        """``theta_k <- m * theta_k + (1 - m) * theta_q`` for every parameter (buffers stay the key's own)."""
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x: torch.Tensor, locs: torch.Tensor):
        """Shuffle the key batch across processes (MoCo): returns this rank's share and the unshuffle index."""
        b = x.shape[0]
        x_all, locs_all = concat_all_gather(x), concat_all_gather(locs)
        world = x_all.shape[0] // b
        idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(world, -1)[dist.get_rank()]
        return x_all[idx_this], locs_all[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, k: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        k_all = concat_all_gather(k)
        world = k_all.shape[0] // k.shape[0]
        return k_all[idx_unshuffle.view(world, -1)[dist.get_rank()]]

    @torch.no_grad()
    def encode_keys(self, x_k: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
        """Normalised keys ``k (B, dim)`` from the key encoder, with shuffled/split BatchNorm in training.

        Under DDP the batch is shuffled across processes. On one device it is shuffled and split
        into ``min(split_bn, B // 2)`` sub-batches of near-equal size (sizes differ by at most one,
        so each holds at least 2 samples, which BatchNorm needs on the 1³ last map), each
        normalised with its own statistics, then unshuffled.
        """
        if not self.training:
            return _embed(self.encoder_k(x_k, locs)[0])
        if _distributed():
            xs, ls, idx_unshuffle = self._batch_shuffle_ddp(x_k, locs)
            k = _embed(self.encoder_k(xs, ls)[0])
            return self._batch_unshuffle_ddp(k, idx_unshuffle)
        b = x_k.shape[0]
        splits = min(self.split_bn, b // 2)
        if splits <= 1:
            return _embed(self.encoder_k(x_k, locs)[0])
        perm = torch.randperm(b, device=x_k.device)
        xs, ls = x_k[perm], locs[perm]
        # tensor_split, not chunk: chunk(3) of 7 gives 3, 3, 1 and a 1-sample BatchNorm batch fails
        k = torch.cat([self.encoder_k(xc, lc)[0] for xc, lc in zip(xs.tensor_split(splits), ls.tensor_split(splits))])
        k = _embed(k)
        return k[torch.argsort(perm)]

    # ------------------------------------------------------------------------------ queue
    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor, loc_idx, subjects: torch.Tensor | None = None) -> None:
        """Write ``keys (B, dim)`` into the queue of their location(s) and advance the pointer(s) modulo K.

        Under DDP the keys (and per-sample locations and subjects) of all processes are gathered
        first, so every process holds the same queues.

        Args:
            keys: (B, dim) normalised keys.
            loc_idx: int (one location for the batch; ``K`` must be a multiple of the global batch
                size, as in the published code) or LongTensor (B,) (each location's keys are written
                at its pointer, wrapping around the end of the queue).
            subjects: LongTensor (B,) subject (or patient) index of each key, kept in
                ``queue_subject``; ``None`` records -1 (unknown).

        Raises:
            ValueError: when ``queue_size`` is not a multiple of the global batch size (one
                location), or a location receives more keys than the queue holds.
        """
        if subjects is None:
            subjects = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys = concat_all_gather(keys).to(self.queue.dtype)
        subjects = concat_all_gather(subjects.to(device=keys.device, dtype=torch.long))
        if isinstance(loc_idx, torch.Tensor):
            loc_idx = concat_all_gather(loc_idx.to(keys.device))
            for loc in torch.unique(loc_idx).tolist():
                sel = loc_idx == loc
                self._write(keys[sel], subjects[sel], int(loc))
            return
        n = keys.shape[0]
        if self.queue_size % n != 0:
            raise ValueError(f"DrasCLR: queue_size ({self.queue_size}) must be a multiple of the (global) batch size "
                             f"({n}); use drop_last batches and a queue size divisible by the batch size")
        self._write(keys, subjects, int(loc_idx))

    def _write(self, keys: torch.Tensor, subjects: torch.Tensor, loc: int) -> None:
        n = keys.shape[0]
        if n > self.queue_size:
            raise ValueError(f"DrasCLR: {n} keys for location {loc} exceed queue_size {self.queue_size}")
        ptr = int(self.queue_ptr[loc])
        idx = (torch.arange(n, device=keys.device) + ptr) % self.queue_size
        self.queue[:, idx, loc] = keys.T
        self.queue_subject[idx, loc] = subjects.to(self.queue_subject.device)
        self.queue_ptr[loc] = (ptr + n) % self.queue_size

    @torch.no_grad()
    def same_subject_mask(self, loc_idx, subjects: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` bool: True where queue entry k of the anchor's location holds the anchor's subject.

        Args:
            loc_idx: int (one location for the batch) or LongTensor (B,).
            subjects: LongTensor (B,) subject (or patient) index of each anchor (>= 0).
        """
        if isinstance(loc_idx, int):
            owners = self.queue_subject[:, loc_idx].unsqueeze(0)  # owners: 1 x K
        else:
            owners = self.queue_subject[:, loc_idx.to(self.queue_subject.device)].T  # owners: B x K
        subjects = subjects.to(owners.device).view(-1, 1)
        return (owners == subjects) & (subjects >= 0)

    # ------------------------------------------------------------------------------ forward
    def _check_inputs(self, x_q, x_k, loc_idx, locs, x_nbr, nbr_locs, subjects=None):
        if x_q.dim() != 5 or x_q.shape[1] != 1:
            raise ValueError(f"DrasCLR: x_q must be (B, 1, P, P, P), got {tuple(x_q.shape)}")
        b = x_q.shape[0]
        if x_k.shape != x_q.shape:
            raise ValueError(f"DrasCLR: x_k must have x_q's shape {tuple(x_q.shape)}, got {tuple(x_k.shape)}")
        if locs.shape != (b, 3):
            raise ValueError(f"DrasCLR: locs must be (B={b}, 3), got {tuple(locs.shape)}")
        if isinstance(loc_idx, torch.Tensor):
            if loc_idx.shape != (b,) or loc_idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"DrasCLR: loc_idx must be an int or a LongTensor (B={b},), got "
                                 f"{loc_idx.dtype} {tuple(loc_idx.shape)}")
            bad = (loc_idx < 0) | (loc_idx >= self.num_locations)
            if bool(bad.any()):
                raise ValueError(f"DrasCLR: loc_idx values must be in [0, {self.num_locations}), got "
                                 f"{loc_idx[bad][:5].tolist()}")
        elif not (isinstance(loc_idx, int) and 0 <= loc_idx < self.num_locations):
            raise ValueError(f"DrasCLR: loc_idx must be an int in [0, {self.num_locations}), got {loc_idx!r}")
        if subjects is not None and (not isinstance(subjects, torch.Tensor) or subjects.shape != (b,)
                                     or subjects.dtype not in (torch.int64, torch.int32)):
            raise ValueError(f"DrasCLR: subjects must be a LongTensor (B={b},), got "
                             f"{getattr(subjects, 'dtype', type(subjects))} {tuple(getattr(subjects, 'shape', ()))}")
        if (x_nbr is None) != (nbr_locs is None):
            raise ValueError("DrasCLR: x_nbr and nbr_locs must be given together")
        if x_nbr is not None:
            if x_nbr.dim() != 6 or x_nbr.shape[0] != b or x_nbr.shape[2:] != x_q.shape[1:]:
                raise ValueError(f"DrasCLR: x_nbr must be (B={b}, Kn, 1, P, P, P), got {tuple(x_nbr.shape)}")
            if nbr_locs.shape != (b, x_nbr.shape[1], 3):
                raise ValueError(f"DrasCLR: nbr_locs must be (B={b}, Kn={x_nbr.shape[1]}, 3), got "
                                 f"{tuple(nbr_locs.shape)}")

    def forward(self, x_q: torch.Tensor, x_k: torch.Tensor, loc_idx, locs: torch.Tensor,
                x_nbr: torch.Tensor | None = None, nbr_locs: torch.Tensor | None = None,
                subjects: torch.Tensor | None = None) -> dict:
        """One DrasCLR step's losses (in training mode also the momentum update and the enqueue).

        Args:
            x_q: (B, 1, P, P, P) query views of the anchor patches, in [-1, 1].
            x_k: (B, 1, P, P, P) key views of the same patches.
            loc_idx: int, the location of the whole batch (the training case), or LongTensor (B,).
            locs: (B, 3) location conditions of the anchors.
            x_nbr: (B, Kn, 1, P, P, P) augmented neighbour patches of the same subjects, or None.
            nbr_locs: (B, Kn, 3) their location conditions, or None.
            subjects: LongTensor (B,) subject (or patient) index of each anchor, or None. Stored with
                the keys in ``queue_subject``; with ``exclude_same_subject`` the queue entries of an
                anchor's own subject are masked out of its local and neighbour logits.

        Returns:
            dict with ``loss`` (scalar, ``loss_local + beta * loss_neighbor``), ``loss_local``,
            ``loss_neighbor`` (0 when neighbours are absent or ``beta = 0``), ``acc1`` (float, local
            InfoNCE top-1 accuracy in %), ``logits (B, 1 + K)``, ``logits_neighbor`` (or None),
            ``self_negatives`` (int: (anchor, queue entry) pairs of the same subject that reached
            the loss, counted from the subject indices; 0 when masked, -1 when ``subjects`` is None)
            and ``masked_negatives`` (int: such pairs removed by the mask).

        Raises:
            ValueError: on inputs of the wrong shape or location indices out of range.
        """
        self._check_inputs(x_q, x_k, loc_idx, locs, x_nbr, nbr_locs, subjects)
        if isinstance(loc_idx, torch.Tensor) and bool((loc_idx == loc_idx[0]).all()):
            loc_idx = int(loc_idx[0])

        # the encoders may run under autocast (bfloat16 / float16); the embeddings, the queue and the
        # losses stay float32 (_embed), so the logits / temperature keep their full precision
        q = _embed(self.encoder_q(x_q, locs)[0])  # q: B x dim
        r = None
        if x_nbr is not None and self.neighbor_weight > 0:
            b, kn = x_nbr.shape[:2]
            # neighbour-major order: each neighbour location is one contiguous block of B samples,
            # which the conditional convolutions run as plain batched convs (no gather/scatter)
            x_r = x_nbr.transpose(0, 1).reshape(kn * b, *x_nbr.shape[2:])  # x_r: (Kn*B) x 1 x P x P x P
            z_r = self.encoder_q(x_r, nbr_locs.transpose(0, 1).reshape(kn * b, 3))[0]
            r = _embed(z_r).reshape(kn, b, -1).transpose(0, 1)  # r: B x Kn x dim

        with torch.no_grad():
            if self.training:
                self.momentum_update()
            k = self.encode_keys(x_k, locs)  # k: B x dim

        with _full_precision(q):
            return self._losses(q, r, k, loc_idx, subjects)

    def _losses(self, q, r, k, loc_idx, subjects) -> dict:
        """The local and neighbour InfoNCE of float32 embeddings, the enqueue (training), the counts."""
        if isinstance(loc_idx, int):
            negs = self.queue[:, :, loc_idx].T.clone()  # negs: K x dim (explicit layout, also when K == dim)
        else:
            negs = self.queue[:, :, loc_idx.to(self.queue.device)].permute(2, 1, 0).clone()  # negs: B x K x dim
        same, neg_mask, self_negs, masked = None, None, -1, 0
        if subjects is not None:
            same = self.same_subject_mask(loc_idx, subjects)  # same: B x K (or 1 x K, broadcast)
            same = same.expand(q.shape[0], -1)
            if self.exclude_same_subject:
                neg_mask, masked, self_negs = same, int(same.sum()), 0
            else:
                self_negs = int(same.sum())
        loss_local, logits = info_nce(q, k, negs, self.temperature, neg_mask=neg_mask)
        if r is not None:
            loss_nbr, logits_nbr = neighbor_info_nce(r, k, negs, self.temperature, neg_mask=neg_mask)
            loss = loss_local + self.neighbor_weight * loss_nbr
        else:
            loss_nbr, logits_nbr = torch.zeros((), device=q.device, dtype=loss_local.dtype), None
            loss = loss_local

        if self.training:
            self.dequeue_and_enqueue(k, loc_idx, subjects)
        return {"loss": loss, "loss_local": loss_local, "loss_neighbor": loss_nbr,
                "acc1": topk_accuracy(logits, 1), "logits": logits, "logits_neighbor": logits_nbr,
                "self_negatives": self_negs, "masked_negatives": masked}
