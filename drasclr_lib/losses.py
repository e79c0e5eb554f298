"""Contrastive losses of DrasCLR as pure functions (the queue and the encoders live in ``DrasCLR``).

Notation: ``B`` batch, ``D`` embedding size, ``K`` negatives (queue length), ``Kn`` neighbours.
The positive is always column 0 of the logits, so the target class is 0 for every row. Keys and
negatives are treated as constants (detached), as in MoCo: only the queries receive gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["info_nce", "neighbor_info_nce", "topk_accuracy"]


def _negative_logits(query: torch.Tensor, negs: torch.Tensor) -> torch.Tensor:
    """(B, D) x negatives (K, D) or (B, K, D) -> (B, K)."""
    if negs.dim() == 3:
        if negs.shape[0] != query.shape[0]:
            raise ValueError(f"per-sample negatives have {negs.shape[0]} rows for a batch of {query.shape[0]}")
        return torch.einsum("bd,bkd->bk", query, negs.to(query.dtype))
    return query @ negs.to(query.dtype).T


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


def _negatives_kd(negatives: torch.Tensor, dim: int) -> torch.Tensor:
    """Return negatives as (K, D) or (B, K, D).

    Accepts (K, D), the queue's (D, K) (a square matrix is read as (K, D)), or per-sample
    negatives (B, K, D).
    """
    if negatives.dim() == 3:
        if negatives.shape[2] != dim:
            raise ValueError(f"per-sample negatives must be (B, K, D={dim}), got shape {tuple(negatives.shape)}")
        return negatives
    if negatives.dim() != 2:
        raise ValueError(f"negatives must be (K, D), (D, K) or (B, K, D), got shape {tuple(negatives.shape)}")
    if negatives.shape[1] == dim:
        return negatives
    if negatives.shape[0] == dim:
        return negatives.T
    raise ValueError(f"negatives of shape {tuple(negatives.shape)} do not match the embedding size D={dim}")


def _masked(l_neg: torch.Tensor, neg_mask: torch.Tensor | None) -> torch.Tensor:
    """Set the excluded negatives of ``l_neg (B, K)`` to -inf (``neg_mask (B, K)`` or ``(K,)`` bool, True = exclude)."""
    if neg_mask is None:
        return l_neg
    if neg_mask.shape not in (l_neg.shape, l_neg.shape[1:]):
        raise ValueError(f"neg_mask must be (B, K) or (K,) for negative logits {tuple(l_neg.shape)}, "
                         f"got {tuple(neg_mask.shape)}")
    return l_neg.masked_fill(neg_mask.to(torch.bool), float("-inf"))


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.2,
             neg_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of queries against their keys and a set of shared negatives (MoCo).

    Args:
        q: (B, D) queries (L2-normalised by the caller).
        k: (B, D) positive keys, one per query (detached here).
        negatives: (K, D), or (D, K) as the queue stores them, or per-sample (B, K, D) (detached here).
        temperature: softmax temperature ``tau > 0``.
        neg_mask: optional (B, K) or (K,) bool, True where a negative must not count (e.g. an older
            key of the anchor's own subject); its logit becomes -inf, so it adds nothing to the
            softmax. ``None`` keeps every negative (the published behaviour).

    Returns:
        ``(loss, logits)``: the mean cross-entropy with target 0 (scalar) and ``logits (B, 1 + K)``
        (already divided by ``tau``; column 0 is the positive; excluded negatives are -inf).

    Raises:
        ValueError: on mismatched shapes or a non-positive temperature.
    """
    _check_temperature(temperature)
    if q.dim() != 2 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    negs = _negatives_kd(negatives, q.shape[1]).detach()  # negs: KxD
    k = k.detach().to(q.dtype)
    l_pos = torch.einsum("bd,bd->b", q, k).unsqueeze(-1)  # l_pos: Bx1
    l_neg = _masked(_negative_logits(q, negs), neg_mask)  # l_neg: BxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # logits: Bx(1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), logits


def neighbor_info_nce(r: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.2,
                      neg_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour InfoNCE: the anchor's anatomical neighbours (same subject) must identify its key.

    Positive logit ``sum_j <r_j, k>``; negative logits ``sum_j <r_j, n>`` for each negative ``n``
    (the published ``einsum('nrc,nc->n')`` / ``einsum('nrc,ck->nk')``), i.e. the summed neighbour
    embedding ``sum_j r_j`` plays the query.

    Args:
        r: (B, Kn, D) neighbour embeddings (each L2-normalised by the caller).
        k: (B, D) the anchors' keys (detached here).
        negatives: (K, D), (D, K) or per-sample (B, K, D) negatives of the anchor's location (detached).
        temperature: softmax temperature ``tau > 0``.
        neg_mask: optional (B, K) or (K,) bool of negatives to exclude, as in :func:`info_nce`.

    Returns:
        ``(loss, logits (B, 1 + K))`` as :func:`info_nce`.

    Raises:
        ValueError: on mismatched shapes or a non-positive temperature.
    """
    _check_temperature(temperature)
    if r.dim() != 3 or k.dim() != 2 or r.shape[0] != k.shape[0] or r.shape[2] != k.shape[1]:
        raise ValueError(f"r must be (B, Kn, D) and k (B, D), got {tuple(r.shape)} and {tuple(k.shape)}")
    negs = _negatives_kd(negatives, k.shape[1]).detach()  # negs: KxD
    r_sum = r.sum(dim=1)  # r_sum: BxD
    l_pos = torch.einsum("bd,bd->b", r_sum, k.detach().to(r_sum.dtype)).unsqueeze(-1)  # l_pos: Bx1
    l_neg = _masked(_negative_logits(r_sum, negs), neg_mask)  # l_neg: BxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # logits: Bx(1+K)
    labels = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
    return F.cross_entropy(logits, labels), logits


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, k: int = 1, target: torch.Tensor | None = None) -> float:
    """Top-k accuracy in percent of a (B, C) logit matrix (target class 0 unless given).

    Ties count against the target (a row of equal logits is correct only when ``k >= C``).

    Raises:
        ValueError: when ``k`` is not in [1, C] or ``logits`` is not 2-d.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got {tuple(logits.shape)}")
    if not (1 <= k <= logits.shape[1]):
        raise ValueError(f"k must be in [1, {logits.shape[1]}], got {k}")
    if logits.shape[0] == 0:
        return float("nan")
    if target is None:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    target_logit = logits.gather(1, target.view(-1, 1))  # B x 1
    # rank = number of classes strictly better, plus the other classes that tie with the target
    better = (logits > target_logit).sum(1)
    ties = (logits == target_logit).sum(1) - 1
    return float(((better + ties) < k).float().mean() * 100.0)
