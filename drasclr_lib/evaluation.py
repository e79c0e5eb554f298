"""Two augmented views of each patch: what an encoder does with them, scored on fixed views.

DrasCLR's local task shows the encoder two augmented views of one patch (a positive pair) and the
patches of *other subjects at the same location* (negatives). :func:`view_metrics` scores an
encoder on that task without training anything: at each sampled location, every subject's patch
is augmented twice (views A and B) and encoded, and four numbers are averaged over locations:

- ``alignment``: mean cosine similarity of the projections ``z`` of a patch's two views (1: the
  encoder ignores the augmentation).
- ``negative_similarity``: mean cosine similarity of ``z`` of a view and ``z`` of the other
  subjects' views at the same location.
- ``separation`` = ``alignment - negative_similarity``: above 0 when a patch's views are closer to
  each other than to other subjects' patches, which is what the local InfoNCE loss rewards.
- ``retrieval_top1``: how often a view's nearest neighbour (cosine of the representation ``h``)
  among the B views of the sampled subjects is its own other view, both directions; chance is
  ``1 / n_subjects``.

The views are a pure function of ``seed`` (one ``torch.Generator`` per location), so every encoder
scored in one call, or in calls with the same arguments, sees the very same patches: comparisons
between encoders are paired. A pretraining run whose weights did not move (a frozen or vanishing
learning rate) scores exactly what its initialisation scores; a random-weight encoder scores what
no pretraining gives.

Example:
    >>> res = view_metrics({"trained": enc, "init": enc0}, store, num_locations=24, seed=0)
    >>> res["trained"]["alignment"] - res["init"]["alignment"]
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from drasclr_lib.intensity import hu_to_input
from drasclr_lib.utils import resolve_device

__all__ = ["even_indices", "retrieval_top1", "pair_similarities", "view_metrics"]


def even_indices(total: int, n: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(total)`` (all of them when ``n`` is 0 or at least
    ``total``): the fixed sample of locations, or of subjects, that :func:`view_metrics` scores.

    Raises:
        ValueError: for a negative ``n`` or ``total < 1``.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0 or n >= total:
        return np.arange(total)
    return np.unique(np.linspace(0, total - 1, n).round().astype(np.int64))


def _unit_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must be (N, D) of the same shape, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"need at least 2 items, got {len(a)}")
    return _unit_rows(a), _unit_rows(b)


def retrieval_top1(a, b) -> float:
    """Symmetric top-1 retrieval accuracy between two views of the same N items.

    Row ``i`` of ``a`` is retrieved when its most cosine-similar row of ``b`` is row ``i`` (and
    likewise from ``b`` to ``a``); ties count as misses, so identical rows score 0.

    Args:
        a, b: (N, D) features of views A and B, row ``i`` of both from the same item.

    Returns:
        The fraction of the 2N queries whose nearest neighbour is their own other view.

    Raises:
        ValueError: when the shapes differ or N < 2.
    """
    a, b = _check_pair(a, b)
    sim = a @ b.T  # (N, N): sim[i, j] = cos(a_i, b_j)
    own = np.diag(sim).copy()
    np.fill_diagonal(sim, -np.inf)
    hits = (own > sim.max(axis=1)).sum() + (own > sim.max(axis=0)).sum()
    return float(hits / (2 * len(a)))


def pair_similarities(a, b) -> tuple[float, float]:
    """Mean cosine similarity of the positive pairs ``(a_i, b_i)`` and of the others ``(a_i, b_j)``, i != j.

    Raises:
        ValueError: when the shapes differ or N < 2.
    """
    a, b = _check_pair(a, b)
    sim = a @ b.T
    n = len(a)
    pos = float(np.trace(sim) / n)
    neg = float((sim.sum() - np.trace(sim)) / (n * n - n))
    return pos, neg


def view_metrics(
    encoders,
    store,
    *,
    locations: Sequence[int] | None = None,
    num_locations: int = 24,
    subjects: Sequence[int] | None = None,
    max_subjects: int = 64,
    augment: str = "agc",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
) -> dict:
    """Alignment, negative similarity, separation and retrieval of two augmented views per patch.

    Args:
        encoders: one encoder (``forward(x, loc) -> (z, h)``), or a mapping ``name -> encoder``
            scored on the same views. Each runs in eval mode (BatchNorm running statistics) and
            is left in the mode it came in.
        store: a ``PatchStore``.
        locations: location indices to sample; default :func:`even_indices` of
            ``num_locations`` over the store.
        num_locations: how many locations when ``locations`` is not given (0: all).
        subjects: subject indices (at least 2); default up to ``max_subjects`` subjects spread
            evenly over the store (all of a small store).
        max_subjects: cap of the default subject sample, 0 for every subject (the cost grows
            with it; chance is ``1 / n_subjects``).
        augment: augmentation spec of the two views (``"agc"``, as pretraining).
        seed: seed of the views; the same seed gives the same views for every encoder.
        device: where the encoders run.
        batch_size: largest forward batch (the 2 x subjects views of one location are batched).

    Returns:
        For one encoder: ``{"alignment", "negative_similarity", "separation", "retrieval_top1",
        "chance", "n_subjects", "n_locations"}``; for a mapping, that dict per name.

    Raises:
        ValueError: for no encoders, fewer than 2 subjects, or indices outside the store.
    """
    import torch

    from drasclr_lib.augment import build_augment
    from drasclr_lib.embed import _EvalMode

    single = not isinstance(encoders, Mapping)
    encs = {"encoder": encoders} if single else dict(encoders)
    if not encs:
        raise ValueError("no encoders to score")
    subj = (even_indices(store.num_subjects, max_subjects) if subjects is None
            else np.sort(np.asarray(subjects, dtype=np.int64)))
    if len(subj) < 2 or len(np.unique(subj)) != len(subj):
        raise ValueError(f"view metrics need at least 2 distinct subjects, got {subj.tolist()}")
    if subj[0] < 0 or subj[-1] >= store.num_subjects:
        raise ValueError(f"subject indices must be in [0, {store.num_subjects}), got {subj.tolist()}")
    locs_idx = (even_indices(store.num_locations, num_locations) if locations is None
                else np.asarray(locations, dtype=np.int64))
    if len(locs_idx) == 0 or locs_idx.min() < 0 or locs_idx.max() >= store.num_locations:
        raise ValueError(f"location indices must be in [0, {store.num_locations}), got {locs_idx.tolist()}")
    aug = build_augment(augment, seed=seed)
    dev = resolve_device(device)
    n = len(subj)
    scores = {name: {"alignment": [], "negative_similarity": [], "retrieval_top1": []} for name in encs}
    modes = [_EvalMode(e.to(dev)) for e in encs.values()]
    for m in modes:
        m.__enter__()
    try:
        with torch.inference_mode():
            for loc in locs_idx:
                x = torch.from_numpy(hu_to_input(store.location_batch(subj, int(loc))))[:, None]
                gen = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([int(seed) % 2**32, int(loc)]).generate_state(1)[0]))
                views = aug(torch.cat([x, x]), generator=gen)  # (2n, 1, P, P, P): views A, then views B
                cond = torch.as_tensor(store.locs[int(loc)], dtype=torch.float32, device=dev).expand(2 * n, 3)
                for name, enc in encs.items():
                    out = [enc(views[i:i + batch_size].to(dev), cond[i:i + batch_size])
                           for i in range(0, 2 * n, batch_size)]
                    z = torch.cat([o[0].reshape(len(o[0]), -1) for o in out]).float().cpu().numpy()
                    h = torch.cat([o[1].reshape(len(o[1]), -1) for o in out]).float().cpu().numpy()
                    pos, neg = pair_similarities(z[:n], z[n:])
                    scores[name]["alignment"].append(pos)
                    scores[name]["negative_similarity"].append(neg)
                    scores[name]["retrieval_top1"].append(retrieval_top1(h[:n], h[n:]))
    finally:
        for m in modes:
            m.__exit__(None, None, None)
    res = {}
    for name, s in scores.items():
        r = {k: float(np.mean(v)) for k, v in s.items()}
        res[name] = {"alignment": r["alignment"], "negative_similarity": r["negative_similarity"],
                     "separation": r["alignment"] - r["negative_similarity"],
                     "retrieval_top1": r["retrieval_top1"], "chance": 1.0 / n,
                     "n_subjects": int(n), "n_locations": int(len(locs_idx))}
    return res["encoder"] if single else res
