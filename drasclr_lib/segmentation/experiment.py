"""The label-efficiency experiment: held-out Dice against the share of labelled subjects.

For every seed the labelled training subjects are shuffled once (``numpy`` generator seeded with
the seed) and the subset of a fraction ``f`` is the first ``n(f) = max(1, round(f * N))`` of that
order (``round`` half up), so the subsets of one seed are **nested** (the 5 % subjects are part of
the 10 % subjects, and so on) and every initialisation sees exactly the same subjects, the same
sampling seed and the same decoder initialisation: the comparison between initialisations is
paired. Two fractions that give the same ``n`` train the very same run (identical subset, seed
and settings); it is trained once and its row is repeated.

Baselines that need no training (:func:`drasclr_lib.segmentation.baselines.baseline_dice`) bound
what a broken pipeline reaches.

The run cache of :func:`label_efficiency` (``cache_dir``) is keyed on content, never on a path: a
run is reused only when the encoder weights of its initialisation
(:func:`~drasclr_lib.models.fingerprint.encoder_digest`), the store's content
(:func:`~drasclr_lib.models.fingerprint.store_digest`), the lung masks it is scored in (their
bytes), the fine-tuning settings, the subset and the test subjects are all the same. Overwriting
a checkpoint with other weights (notebook 02 rerun with other settings) therefore retrains
notebook 05's runs instead of reusing the old weights' Dice.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from drasclr_lib.data.patch_store import PatchStore
from drasclr_lib.segmentation.train import SegConfig, class_names, evaluate_segmenter, train_segmenter

__all__ = ["split_subjects", "ensure_moco_checkpoint", "subset_sizes", "nested_subsets", "label_efficiency",
           "summarize", "plot_label_efficiency"]


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def split_subjects(store: PatchStore, *, test_fraction: float = 0.25, seed: int = 0,
                   min_test_emph: float = 0.02) -> tuple[list[int], list[int]]:
    """Held-out test subjects and the labelled training pool.

    ``max(1, round(test_fraction * N))`` test subjects are drawn (seeded) among the subjects whose
    emphysema fraction (``emph_fraction`` of the store table) is at least ``min_test_emph``: on a
    scan without emphysema the Dice is 0 or 1 whatever the voxels, which says nothing about the
    segmentation. Every other subject (healthy ones included: they teach what is not emphysema)
    forms the training pool. Without an ``emph_fraction`` column every subject is a candidate.

    Returns:
        ``(train_indices, test_indices)``, each sorted.

    Raises:
        ValueError: for a fraction outside (0, 1), or fewer than 2 subjects / no candidate.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = store.num_subjects
    if n < 2:
        raise ValueError(f"need at least 2 subjects to split, the store {store.root} has {n}")
    if "emph_fraction" in store.table.columns:
        frac = pd.to_numeric(store.table["emph_fraction"], errors="coerce").to_numpy()
        candidates = np.flatnonzero(np.nan_to_num(frac, nan=0.0) >= min_test_emph)
    else:
        candidates = np.arange(n)
    if len(candidates) == 0:
        raise ValueError(f"no subject of {store.root} has emph_fraction >= {min_test_emph} to be tested on")
    n_test = min(max(1, _round_half_up(test_fraction * n)), len(candidates), n - 1)
    test = np.sort(np.random.default_rng(seed).choice(candidates, size=n_test, replace=False))
    train = np.setdiff1d(np.arange(n), test)
    return [int(i) for i in train], [int(i) for i in test]


def ensure_moco_checkpoint(*, drasclr_run: str | Path | None, store: str | Path, out_root: str | Path,
                           reuse_roots: Sequence[str | Path] = (), max_steps: int = 50,
                           any_budget: bool = True, progress: bool = False) -> tuple[Path, str]:
    """A plain-MoCo checkpoint with the DrasCLR run's budget: reused when one exists, else trained.

    The budget (epochs, steps, batch, queue, lr, seed ...) is the DrasCLR run's ``config.json``
    (notebook 02) with the MoCo flags of :data:`drasclr_lib.training.runs.ABLATION_FLAGS`
    (plain convolutions, no neighbour loss), so the two initialisations are compared at equal
    cost. Without that run, ``PretrainConfig(store=store, epochs=1, max_steps=max_steps, batch_size=8,
    queue_size=64, workers=0)``.

    Args:
        drasclr_run: notebook 02's folder (with ``config.json``), or ``None``.
        store: the patch store the MoCo model is pretrained on.
        out_root: where a new run goes (``<out_root>/ckpt_moco_<hash>/``).
        reuse_roots: folders searched first for a finished run with the same budget (e.g.
            notebook 04's ``output_dir("04_downstream")``).
        max_steps: steps of the fallback budget.
        any_budget: when no run of the same budget exists in ``reuse_roots``, reuse any finished
            MoCo run there trained on this store's content (``ckpt_moco_*/done.json`` with the
            store's :func:`~drasclr_lib.models.fingerprint.store_digest`; ``how`` then names it and
            says that its budget differs) instead of training a new one.

    Returns:
        ``(checkpoint path, how)``: how it was obtained (``"cached"``, ``"trained"``, ``"reused ..."``).
    """
    from drasclr_lib.models.fingerprint import store_digest
    from drasclr_lib.training import PretrainConfig
    from drasclr_lib.training.runs import (CHECKPOINT, DONE, ensure_checkpoint, find_finished, finished_runs,
                                           method_config)
    from drasclr_lib.utils import load_json

    cfg_path = Path(drasclr_run) / "config.json" if drasclr_run else None
    if cfg_path is not None and cfg_path.exists():
        saved = load_json(cfg_path)
        base = PretrainConfig.from_dict({k: v for k, v in saved.items() if k in PretrainConfig.__dataclass_fields__})
        base = base.replace(store=str(store), progress=progress, tensorboard=False)
    else:
        base = PretrainConfig(store=str(store), epochs=1, max_steps=int(max_steps), batch_size=8, queue_size=64,
                              workers=0, progress=progress, tensorboard=False)
    found = find_finished(method_config("moco", base, out_root),
                          [method_config("moco", base, root).out_dir for root in reuse_roots])
    if found is not None:
        return found / CHECKPOINT, f"reused {found} (same budget)"
    others = [folder for root in reuse_roots for folder in finished_runs(root, "moco")] if any_budget else []
    same_data = store_digest(store)  # another budget is fine, a run on other data (a rebuilt store) is not
    others = [folder for folder in others if (load_json(folder / DONE).get("store_digest") or None) == same_data]
    if others:
        return others[0] / CHECKPOINT, f"reused {others[0]} (its own budget, see its config.json)"
    return ensure_checkpoint("moco", base, out_root)


def subset_sizes(n_train: int, fractions: Sequence[float]) -> list[int]:
    """Labelled subjects per fraction: ``max(1, round(f * n_train))`` (half up), capped at ``n_train``.

    Raises:
        ValueError: for ``n_train < 1`` or a fraction outside (0, 1].
    """
    if n_train < 1:
        raise ValueError(f"need at least one training subject, got {n_train}")
    out = []
    for f in fractions:
        if not 0 < float(f) <= 1:
            raise ValueError(f"label fractions must lie in (0, 1], got {f}")
        out.append(min(n_train, max(1, _round_half_up(float(f) * n_train))))
    return out


def nested_subsets(train_subjects: Sequence[int], fractions: Sequence[float], seed: int) -> dict[float, list[int]]:
    """The labelled subset of every fraction for one seed (nested: prefixes of one shuffled order).

    Args:
        train_subjects: subject indices available for training (N of them).
        fractions: label fractions in (0, 1].
        seed: seed of the shuffle.

    Returns:
        ``{fraction: [subject indices]}``; a smaller fraction's subset is a prefix of a larger one's.
    """
    subjects = np.asarray(list(train_subjects), dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(subjects))
    sizes = subset_sizes(len(subjects), fractions)
    return {float(f): [int(s) for s in subjects[order[:n]]] for f, n in zip(fractions, sizes)}


def _bytes_digest(paths) -> str:
    """SHA-256 (16 hex characters) of the files' bytes, in the given order (a missing file counts as absent)."""
    h = hashlib.sha256()
    for path in paths:
        path = Path(path)
        h.update(f"{path.name}|".encode())
        h.update(path.read_bytes() if path.is_file() else b"<absent>")
    return h.hexdigest()[:16]


def label_efficiency(store: PatchStore, *, train_subjects: Sequence, test_subjects: Sequence,
                     fractions: Sequence[float] = (0.05, 0.1, 0.25, 1.0),
                     inits: Mapping[str, str | Path | None], seeds: Sequence[int] = (0, 1, 2),
                     cfg: SegConfig, lung_masks: Mapping[str, str | Path] | None = None, progress: bool = True,
                     cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Fine-tune one segmenter per initialisation x fraction x seed and score it on the test subjects.

    Args:
        store: a patch store with label patches.
        train_subjects: indices or sids of the labelled training pool (N subjects).
        test_subjects: indices or sids of the held-out subjects (disjoint from the pool).
        fractions: shares of the pool that are labelled, in (0, 1] (see the module docstring
            for how the subsets are drawn).
        inits: ``{name: checkpoint path}``; ``None`` means random weights. A name that is one of
            ``"random"``, ``"moco"``, ``"drasclr"`` is used as the ``init`` of
            :func:`~drasclr_lib.segmentation.model.build_segmenter`; other names load their
            checkpoint (``"drasclr"`` semantics) or are random when the path is ``None``.
        seeds: one run per seed: the subset, the sampling and the decoder initialisation.
        cfg: fine-tuning settings; ``cfg.seed`` is replaced by each seed.
        lung_masks: optional ``{sid: lung mask file}`` of the test subjects: predictions are then
            scored inside the lung only, as :func:`~drasclr_lib.segmentation.inference.segment_scan`
            restricts its output to the lung.
        progress: show a tqdm bar over the runs.
        cache_dir: optional folder; each finished run is saved there as
            ``<init>_n<n>_s<seed>.json`` and reused by a later call with the same content: the
            same encoder weights (a digest of the checkpoint's tensors, not its path), store
            content, lung masks, settings, subset and test subjects (resumable long runs; a
            changed checkpoint retrains).

    Returns:
        DataFrame, one row per init x fraction x seed: ``init``, ``fraction``, ``seed``,
        ``n_labelled``, ``dice`` (mean over the test subjects of the patch-pooled Dice of
        :func:`~drasclr_lib.segmentation.train.evaluate_segmenter`), ``dice_sd_subjects``,
        ``dice_<class>`` per foreground class, ``final_loss``, ``seconds`` (training time).

    Raises:
        ValueError: for empty or overlapping subject lists, or a store without labels.
    """
    from dataclasses import asdict, replace

    from tqdm.auto import tqdm

    from drasclr_lib.segmentation.model import INITS, build_segmenter
    from drasclr_lib.utils import load_json, save_json

    train_idx, test_idx = [store.index(s) for s in train_subjects], [store.index(s) for s in test_subjects]
    if not train_idx or not test_idx:
        raise ValueError("label_efficiency needs non-empty train_subjects and test_subjects")
    overlap = set(train_idx) & set(test_idx)
    if overlap:
        raise ValueError(f"train and test subjects overlap: {sorted(store.sids[i] for i in overlap)[:5]}")
    if not store.has_labels:
        raise ValueError(f"the patch store {store.root} has no label patches for every subject")
    if not inits:
        raise ValueError("inits is empty: give at least one {name: checkpoint or None}")
    names = class_names(cfg.num_classes)
    runs = []
    for seed in seeds:
        subsets = nested_subsets(train_idx, fractions, seed)
        for name in inits:
            for f in fractions:
                runs.append((name, float(f), int(seed), subsets[float(f)]))
    done: dict[tuple, dict] = {}
    rows = []
    cache = Path(cache_dir) if cache_dir is not None else None
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seed", "host_memory")}  # same results either way
    settings["lung_restricted"] = lung_masks is not None
    key_parts = {}
    if cache is not None:  # what a cached run must share with this call to be reused
        from drasclr_lib.models.fingerprint import encoder_digest, store_digest

        masks = None if lung_masks is None else [lung_masks[store.sids[i]] for i in test_idx
                                                 if store.sids[i] in lung_masks]
        key_parts = {"store": store_digest(store), "lung_masks": None if masks is None else _bytes_digest(masks),
                     "weights": {name: None if path is None else encoder_digest(path) for name, path in inits.items()}}
    for name, f, seed, subset in tqdm(runs, desc="label efficiency", disable=not progress):
        key = (name, len(subset), seed)
        if key not in done:
            cache_file = cache / f"{name}_n{len(subset)}_s{seed}.json" if cache is not None else None
            ckpt = inits[name]
            hit = None
            content = {} if cache is None else {"settings": settings, "weights": key_parts["weights"][name],
                                                "store": key_parts["store"], "lung_masks": key_parts["lung_masks"],
                                                "subset": subset, "test": test_idx}
            if cache_file is not None and cache_file.exists():
                saved = load_json(cache_file)
                if all(saved.get(k) == v for k, v in content.items()):
                    hit = saved["result"]
            if hit is None:
                init = "random" if ckpt is None else (name if name in INITS[1:] else "drasclr")
                model = build_segmenter(init, ckpt, num_classes=cfg.num_classes, seed=seed)
                t0 = time.perf_counter()
                hist = train_segmenter(model, store, subset, replace(cfg, seed=seed), progress=False)
                seconds = time.perf_counter() - t0
                scores = evaluate_segmenter(model, store, test_idx, num_classes=cfg.num_classes, device=cfg.device,
                                            min_lung_fraction=cfg.min_lung_fraction, max_patches=cfg.eval_patches,
                                            lung_masks=lung_masks)
                hit = {"dice": float(scores["dice"].mean()),
                       "dice_sd_subjects": float(scores["dice"].std(ddof=0)),
                       **{f"dice_{c}": float(scores[f"dice_{c}"].mean()) for c in names[1:]},
                       "final_loss": float(np.mean([h["loss"] for h in hist[-10:]])),
                       "seconds": float(seconds)}
                if cache_file is not None:  # the checkpoint's path is kept for the reader, not as a key
                    save_json({**content, "checkpoint": None if ckpt is None else str(ckpt), "result": hit},
                              cache_file)
            done[key] = hit
        rows.append({"init": name, "fraction": f, "seed": seed, "n_labelled": len(subset), **done[key]})
    return pd.DataFrame(rows)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation (over seeds) of the Dice per initialisation and fraction.

    Returns:
        DataFrame with ``init``, ``fraction``, ``n_labelled``, ``n_seeds``, ``dice_mean``,
        ``dice_sd`` (NaN for a single seed), ``seconds_mean``, and ``dice`` as text
        ``"0.712 ± 0.031"``; ordered by init (as first seen) and fraction.
    """
    if df.empty:
        raise ValueError("summarize: the results table is empty")
    order = list(dict.fromkeys(df["init"]))
    g = df.groupby(["init", "fraction"], sort=False)
    out = g.agg(n_labelled=("n_labelled", "first"), n_seeds=("seed", "nunique"), dice_mean=("dice", "mean"),
                dice_sd=("dice", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")),
                seconds_mean=("seconds", "mean")).reset_index()
    out["init"] = pd.Categorical(out["init"], categories=order, ordered=True)
    out = out.sort_values(["init", "fraction"]).reset_index(drop=True)
    out["init"] = out["init"].astype(str)
    out["dice"] = [f"{m:.3f}" + ("" if not np.isfinite(s) else f" ± {s:.3f}") for m, s in zip(out["dice_mean"], out["dice_sd"])]
    return out


def plot_label_efficiency(summary: pd.DataFrame, *, baselines: Mapping[str, float] | None = None, ax=None,
                          title: str = "Label efficiency (held-out Dice)"):
    """Dice against label fraction, one line per initialisation with a ±1 sd band over seeds.

    Args:
        summary: the output of :func:`summarize`.
        baselines: optional ``{label: dice}`` drawn as dashed horizontal lines (e.g. the
            all-lung or the -950 HU baseline).
        ax: draw into this axes (a new figure otherwise).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    colors = {"random": "tab:gray", "moco": "tab:blue", "drasclr": "tab:red"}
    for name, part in summary.groupby("init", sort=False):
        part = part.sort_values("fraction")
        x, m, s = part["fraction"].to_numpy(float), part["dice_mean"].to_numpy(float), part["dice_sd"].to_numpy(float)
        line, = ax.plot(x, m, marker="o", label=str(name), color=colors.get(str(name)))
        if np.isfinite(s).any():
            s = np.nan_to_num(s)
            ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.2, linewidth=0)
    for i, (label, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{(i + 5) % 10}", label=label)
    fractions = sorted(summary["fraction"].unique())
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([f"{100 * f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled training subjects")
    ax.set_ylabel("held-out Dice (mean ± sd over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
