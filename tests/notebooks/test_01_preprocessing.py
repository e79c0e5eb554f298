"""Notebook 01 on the synthetic cohort: every subject segmented and registered well, no failures."""

from __future__ import annotations

from drasclr_lib.data.patch_store import PatchStore
from tests.notebooks.conftest import read_metrics


def test_01_preprocessing(run_notebook, notebook_out):
    m = read_metrics(run_notebook("01_preprocessing"))
    assert m["n_failed"] == 0
    assert m["n_subjects"] >= 2
    assert 50 <= m["n_locations"] <= 1000  # a demo-size lung on the 26-voxel grid
    assert m["mask_dice_min"] is not None and m["mask_dice_min"] >= 0.95  # our lung mask vs the generator's
    assert m["reg_dice_min"] >= 0.85  # every subject's registered lung mask vs the atlas mask
    assert m["n_qc_fail"] == 0
    # whole synthetic scans: no QC reason, no patch outside the scan; the same subject cut above its lung
    # bases (35 % of the lung's height removed) covers clearly less lung and fails QC with partial_fov
    assert m["n_with_qc_reasons"] == 0 and m["n_invalid_patches"] == 0
    cut = m["cut_scan"]
    assert 0.5 < cut["fov_lung_coverage"] < 0.9 and cut["n_invalid_patches"] > 0
    assert any(r.startswith("partial_fov:") for r in cut["qc_reasons"])
    page = notebook_out / "01_preprocessing" / "qc_report" / "index.html"
    assert all(sid in page.read_text(encoding="utf-8") for sid in PatchStore(notebook_out / "patch_store").sids)
    assert all(v is not None and v >= 0 for v in m["seconds_per_stage"].values())
    store = PatchStore(notebook_out / "patch_store")
    assert store.num_subjects == m["n_subjects"] and store.num_locations == m["n_locations"]
    p = store.location_batch([0, 1], loc=0)
    assert p.shape == (2, 32, 32, 32) and p.dtype.name == "int16" and p.min() >= -1024 and p.max() <= 240
    for name in ("atlas_landmarks.png", "registration_overlay.png", "lung_mask_overlay.png", "same_location.png", "qc.png",
                 "qc_worst_subject.png", "cut_scan_fov.png"):
        assert (notebook_out / "01_preprocessing" / name).stat().st_size > 1000, name
