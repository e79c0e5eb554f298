"""MODEL_CARD.md beside every checkpoint pretraining writes: data, settings, steps, metrics, use."""

from __future__ import annotations

import csv
import re

import pytest

from drasclr_lib.data.patch_store import PatchStore, write_store_meta
from drasclr_lib.testing import make_toy_store
from drasclr_lib.training import PretrainConfig, pretrain
from drasclr_lib.training.checkpoint import load_checkpoint
from drasclr_lib.training.model_card import MODEL_CARD, data_kind, write_model_card


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("card_store"), n_subjects=6, grid=(2, 2, 1), patch_size=16)


def test_a_short_pretraining_run_writes_the_card(store, tmp_path):
    cfg = PretrainConfig(store=str(store), out_dir=str(tmp_path / "run"), epochs=2, batch_size=4, queue_size=4,
                         workers=0, log_every=2, progress=False, tensorboard=False, save_every_steps=0, max_steps=3)
    path = pretrain(cfg)
    card = (path.parent / MODEL_CARD).read_text(encoding="utf-8")
    ckpt = load_checkpoint(path)
    total = ckpt["run"]["total_steps"]
    assert ckpt["step"] == 3 and total == 8  # 4 locations x 1 batch of 4 subjects x 2 epochs, stopped at 3
    assert "- Steps reached: 3 of 3 (the schedule spans 8 steps; stopped by `max_steps`); epochs: 0.75 of 2" in card
    with open(path.parent / "history.csv") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert last["step"] == "2"  # rows every 2 steps: the 3rd step's window is still open
    assert f"- Final loss: {float(last['loss']):.6g} (mean over the last logging window, step 2)" in card
    assert "| `step` | 2 |" in card and "| `max_steps` | 3 |" in card and "| `queue_size` | 4 |" in card
    assert f"- Patch store: `{store.resolve()}`" in card
    assert "- Subjects: 6; locations per subject: 4; patch: 16³ voxels at 1 mm." in card
    assert "**Warning: trained on a toy test store**" in card and "**Not for diagnosis**" in card
    assert "doi:10.1016/j.media.2023.103062" in card
    # the resumed run to the schedule's end rewrites the card with its own progress
    path = pretrain(cfg.replace(max_steps=None, resume=True))
    card = (path.parent / MODEL_CARD).read_text(encoding="utf-8")
    assert "- Steps reached: 8 of 8; epochs: 2.00 of 2 (4 steps each)." in card and "| `step` | 8 |" in card


def _named_store(root, sids, **meta):
    import numpy as np

    from drasclr_lib.data.patch_store import finalize_store, write_subject

    corners = np.array([[0, 0, 0], [20, 0, 0]])
    write_store_meta(root, corners, np.zeros((2, 3), np.float32), np.array([[1], [0]]), patch_size=8, **meta)
    for sid in sids:
        write_subject(root, sid, np.zeros((2, 8, 8, 8), np.int16))
    finalize_store(root)
    return PatchStore(root)


def test_synthetic_and_real_stores(tmp_path):
    synthetic = _named_store(tmp_path / "syn", ["syn0000", "syn0001"], atlas_source="reference subject syn0001")
    real = _named_store(tmp_path / "real", ["10001A", "10002B"], atlas_source="published DrasCLR atlas (581)")
    assert (data_kind(synthetic), data_kind(real)) == ("synthetic", None)
    assert data_kind(_named_store(tmp_path / "toy", ["a1"], atlas="toy")) == "toy"
    cfg = PretrainConfig(store=str(real.root), epochs=1, conditional=False, neighbor_weight=0.0, num_neighbors=0)
    run = {"num_subjects": 2, "num_locations": 2, "steps_per_epoch": 2, "total_steps": 2, "lr": 0.01,
           "queue_size": 4, "global_batch": 2, "world_size": 1, "device": "cpu"}
    card = write_model_card(tmp_path / "a", cfg=cfg, run=run, step=0, history=[], store=real).read_text(encoding="utf-8")
    assert "Warning" not in card and "Atlas of the locations: published DrasCLR atlas (581)" in card
    assert card.startswith("# Model card: MoCo encoder") and "local InfoNCE only" in card
    assert "- No history row yet (rows are written every 10 steps)." in card
    card = write_model_card(tmp_path / "b", cfg=cfg.replace(store=str(synthetic.root)), run=run, step=2,
                            history=[{"step": 2, "loss": 4.25, "acc1": 12.5}], store=synthetic).read_text(encoding="utf-8")
    assert "**Warning: trained on the synthetic cohort**" in card
    assert re.search(r"Final loss: 4\.25 .*step 2\); top-1 accuracy .*: 12\.5 %", card)
