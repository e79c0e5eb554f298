"""The model card written next to every checkpoint the toolkit trains (``MODEL_CARD.md``).

A checkpoint alone does not say what it was trained on or what it is for. Every time
:func:`~drasclr_lib.training.loop.pretrain` saves ``checkpoint.pt`` (rank 0), :func:`write_model_card`
writes ``MODEL_CARD.md`` beside it, so the card always describes the checkpoint next to it, even
one of an interrupted run:

* **data**: the patch store (folder, subjects, locations, patch size, the atlas its locations come
  from), with a warning when the store is the synthetic cohort or a toy test store;
* **settings**: every field of the :class:`~drasclr_lib.training.config.PretrainConfig` and the
  effective values of the run (learning rate, queue, global batch, processes, device);
* **progress**: steps and epochs reached, of the schedule's total;
* **metrics**: the final loss and the last row of ``history.csv``;
* **intended use and limits**: research, not diagnosis; the location inputs belong to the atlas.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Sequence

from drasclr_lib.utils import atomic_path

__all__ = ["write_model_card", "data_kind", "MODEL_CARD"]

MODEL_CARD = "MODEL_CARD.md"
_SYNTHETIC_SID = re.compile(r"^syn\d{4}$")  # drasclr_lib.data.synthetic's subject ids
_TOY_SID = re.compile(r"^toy\d{3}$")  # drasclr_lib.testing.make_toy_store's


def data_kind(store) -> str | None:
    """``"synthetic"`` for a store of the generated cohort, ``"toy"`` for a test store, else ``None``.

    The synthetic cohort is recognised by its subject ids (``syn0000`` ...) or image paths under a
    ``synthetic_cohort`` folder; a toy store by its ``store.json`` (``"atlas": "toy"``) or ids.

    Args:
        store: a ``PatchStore``.
    """
    sids = [str(s) for s in store.sids]
    if store.meta.get("atlas") == "toy" or (sids and all(_TOY_SID.match(s) for s in sids)):
        return "toy"
    images = store.table["image"].astype(str).tolist() if "image" in store.table.columns else []
    if (sids and all(_SYNTHETIC_SID.match(s) for s in sids)) or any("synthetic_cohort" in p for p in images):
        return "synthetic"
    return None


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v).replace("|", "\\|")


def _table(rows: dict) -> list[str]:
    return ["| field | value |", "|---|---|"] + [f"| `{k}` | {_value(v)} |" for k, v in rows.items()]


def write_model_card(out_dir: str | os.PathLike, *, cfg, run: dict, step: int, history: Sequence[dict],
                     store) -> Path:
    """Write ``out_dir/MODEL_CARD.md`` for the checkpoint of a pretraining run (atomically).

    Args:
        out_dir: the run's folder (holding ``checkpoint.pt``).
        cfg: the run's :class:`~drasclr_lib.training.config.PretrainConfig`.
        run: the effective values the loop records in the checkpoint (``num_subjects``,
            ``num_locations``, ``steps_per_epoch``, ``total_steps``, ``lr``, ``queue_size``,
            ``global_batch``, ``world_size``, ``device``, ``store``).
        step: optimisation steps reached (the checkpoint's ``step``).
        history: the rows of ``history.csv`` so far (dicts with ``step``, ``epoch``, ``loss`` ...).
        store: the ``PatchStore`` trained on.

    Returns:
        Path of the card.
    """
    from drasclr_lib import __version__

    out_dir = Path(out_dir)
    steps_per_epoch = max(int(run.get("steps_per_epoch", 1)), 1)
    total = int(run.get("total_steps", 0))
    stop = cfg.stop_step(total) if hasattr(cfg, "stop_step") else total
    kind = data_kind(store)
    method = ("DrasCLR (location-conditioned convolutions" if cfg.conditional else "MoCo (plain convolutions") + (
        f", local + {cfg.neighbor_weight:g} x neighbour InfoNCE with {cfg.num_neighbors} neighbours)"
        if cfg.neighbor_weight > 0 and cfg.num_neighbors > 0 else ", local InfoNCE only)")
    last = dict(history[-1]) if history else None
    lines = [
        f"# Model card: {method.split(' (')[0]} encoder, `{out_dir / 'checkpoint.pt'}`",
        "",
        f"Written by drasclr_lib {__version__} on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"at step {step}; it describes the `checkpoint.pt` beside it.",
        "",
        "## Model",
        f"- Method: {method}; self-supervised, no labels used.",
        f"- Encoder: `DrasEncoder(rep_dim={cfg.rep_dim}, proj_dim={cfg.proj_dim}, num_experts={cfg.num_experts}, "
        f"conditional={cfg.conditional})`; input one {store.patch_size}³-voxel patch at 1 mm scaled to [-1, 1] "
        f"and its atlas location in [-1, 1]³; output a {cfg.rep_dim}-value representation.",
        "- Load: `drasclr_lib.models.load_encoder(path)` (own checkpoint format, read with "
        "`torch.load(weights_only=True)`).",
        "",
        "## Data",
    ]
    if kind == "synthetic":
        lines += ["", "> **Warning: trained on the synthetic cohort** (`drasclr_lib.data.synthetic`), generated "
                      "volumes with simulated emphysema. These weights demonstrate the pipeline; they say "
                      "nothing about real CT and must not be used as a model of real lungs.", ""]
    elif kind == "toy":
        lines += ["", "> **Warning: trained on a toy test store** (random patches from "
                      "`drasclr_lib.testing.make_toy_store`): for tests only.", ""]
    lines += [
        f"- Patch store: `{Path(str(store.root)).resolve()}`",
        f"- Subjects: {run.get('num_subjects', store.num_subjects)}; locations per subject: "
        f"{run.get('num_locations', store.num_locations)}; patch: {store.patch_size}³ voxels at 1 mm.",
        f"- Atlas of the locations: {store.meta.get('atlas_source') or store.meta.get('atlas') or 'not recorded'}. "
        "The location inputs mean something only on this atlas's locations.",
        "",
        "## Training",
        f"- Steps reached: {step} of {stop}" + (f" (the schedule spans {total} steps; stopped by `max_steps`)"
                                                 if stop < total else "")
        + f"; epochs: {step / steps_per_epoch:.2f} of {cfg.epochs} ({steps_per_epoch} steps each).",
        f"- Effective: learning rate {_value(run.get('lr'))}, queue {run.get('queue_size')} negatives per location, "
        f"global batch {run.get('global_batch')}, {run.get('world_size', 1)} process(es) on {run.get('device')}.",
        "- Settings (`config.json`):",
        "",
        *_table(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)),
        "",
        "## Metrics",
    ]
    if last is None:
        lines.append(f"- No history row yet (rows are written every {cfg.log_every} steps).")
    else:
        lines += [f"- Final loss: {_value(last.get('loss'))} (mean over the last logging window, step "
                  f"{last.get('step')}); top-1 accuracy of the positive among the negatives: "
                  f"{_value(last.get('acc1'))} %.", "- Last row of `history.csv`:", "", *_table(last)]
    lines += [
        "",
        "## Intended use and limits",
        "- Research use: representations of lung CT patches for studying emphysema and COPD (probing, "
        "clustering, subject-level features, initialising a segmenter).",
        "- **Not for diagnosis** or any clinical decision; not a medical device; no clinical validation.",
        "- Valid only for inputs preprocessed as the store was (1 mm resampling, registration to the same "
        "atlas, HU scaled to [-1, 1]); scans from other scanners, protocols or populations than the "
        f"{run.get('num_subjects', store.num_subjects)} training subjects are not covered by any evaluation here.",
        "- Contrastive pretraining alone makes no claim about any outcome: evaluate downstream "
        "(notebooks 03-05, `drasclr downstream`) before relying on the features.",
        "",
        "## Citation",
        "Yu K., Sun L., Chen J., Reynolds M., Chaudhary T., Batmanghelich K. DrasCLR: A self-supervised framework "
        "of learning disease-related and anatomy-specific representation for 3D lung CT images. Medical Image "
        "Analysis (2023) 103062, doi:10.1016/j.media.2023.103062; and the toolkit (`CITATION.cff`).",
        "",
    ]
    path = out_dir / MODEL_CARD
    with atomic_path(path, suffix=".md") as tmp:
        Path(tmp).write_text("\n".join(lines), encoding="utf-8")
    return path
