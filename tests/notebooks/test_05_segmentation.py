"""Notebook 05: the label-efficiency table is complete and the fine-tuned model beats rules a
broken pipeline cannot beat; the whole-scan predictions are aligned with their inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from tests.notebooks.ci_params import ALIGNMENT_MARGIN, CI_PARAMS, MAX_NEGATIVE_SIMILARITY
from tests.notebooks.conftest import read_metrics


def test_05_segmentation(run_notebook, notebook_out):
    nb_out = run_notebook("05_segmentation")
    m = read_metrics(nb_out)
    params = CI_PARAMS["05_segmentation"]
    fractions = [float(f) for f in params["FRACTIONS"].split(",")]

    runs = pd.read_csv(nb_out / "dice_runs.csv")
    assert len(runs) == 3 * len(fractions) * params["SEEDS"]
    assert set(runs["init"]) == {"random", "moco", "drasclr"}
    assert runs["dice"].between(0, 1).all()
    table = pd.read_csv(nb_out / "dice_table.csv")
    assert len(table) == 3 * len(fractions)
    assert set(m["dice_100"]) == {"random", "moco", "drasclr"}

    # a broken pipeline (labels misaligned with patches, no learning, wrong classes) predicts
    # nothing, everything or noise: it cannot clear these floors
    base = m["baselines"]
    assert base["no emphysema (background)"] == 0.0
    floor = base["every lung voxel"]
    # At CI's budget (80 steps of batch 8) single fine-tuning runs vary a lot on the 16-subject
    # cohort (held-out Dice ~0.15-0.6), so the learning floor is set on the best run of the table
    assert runs["dice"].max() > floor + 0.1
    # ... which random initialisation alone could provide: each pretrained initialisation must beat
    # the floor with its own best run. Measured (floor 0.148; best of the 25 % and 100 % runs) for
    # fine-tuning seeds 0 / 1 / 2: MoCo 0.41 / 0.54 / 0.32, DrasCLR 0.35 / 0.60 / 0.18 (random init
    # 0.33 / 0.34 / 0.17, too close to the floor at seed 2 to be asserted). No margin: DrasCLR's
    # seed 2 cleared the floor by 0.04 only.
    best = runs.groupby("init")["dice"].max()
    for init in ("moco", "drasclr"):
        assert best[init] > floor, (init, best.to_dict(), floor)
    assert np.allclose([m["best_dice_by_init"][k] for k in best.index], best.to_numpy())
    # the checkpoints fine-tuned here are pretrained: on the same augmented views their encoders
    # align a patch's two views far better than random weights (measured 0.97 / 0.97 against 0.54);
    # a checkpoint whose pretraining never moved its weights scores the random encoder's alignment
    views = m["views"]
    for init in ("moco", "drasclr"):
        assert views[init]["alignment"] > views["random"]["alignment"] + ALIGNMENT_MARGIN, (init, views)
        assert views[init]["negative_similarity"] < MAX_NEGATIVE_SIMILARITY, (init, views)  # not one vector for all
    # and the best model trained on all labels beats calling every lung voxel emphysema, per patch
    # and on the whole held-out scan
    assert m["best_dice_100"] > floor
    assert m["scan_dice_synthetic"]["dice"] > floor

    # the predicted NIfTI has the input scan's geometry
    sid = m["scan_sid"]
    manifest = pd.read_csv(notebook_out / "synthetic_cohort" / "manifest.csv")
    image = notebook_out / "synthetic_cohort" / manifest.set_index("sid").loc[sid, "image"]
    seg = sitk.ReadImage(str(nb_out / f"{sid}_emphysema_seg.nii.gz"))
    src = sitk.ReadImage(str(image))
    assert seg.GetSize() == src.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), src.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), src.GetDirection(), atol=1e-6)

    for fig in ("label_efficiency.png", "segmentation_synthetic.png"):
        assert (nb_out / fig).stat().st_size > 10000, fig
    if params["REAL_SCAN"]:
        assert m["real_scan"]["run"] and (nb_out / "segmentation_real_scan.png").stat().st_size > 10000
        assert (nb_out / "lung_pet_ct_dx_emphysema_seg.nii.gz").exists()
