"""The QC report: every subject listed worst first with its reasons, a PNG each, written atomically."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from drasclr_lib import cli
from drasclr_lib.data.patch_store import PatchStore, record_failure, write_failures_table
from drasclr_lib.testing import make_toy_store
from drasclr_lib.viz import qc_report
from drasclr_lib.viz.qc_report import qc_figure, subject_rows, worst_subjects, write_qc_report

# sid -> what preprocessing would have recorded (reasons, coverage, Dice)
CASES = {
    "toy000": {"qc_reasons": [], "qc_pass": True, "fov_lung_coverage": 1.0, "reg_dice": 0.93},
    "toy001": {"qc_reasons": ["partial_fov:0.62", "thick_slices:5.0mm"], "qc_pass": False,
               "fov_lung_coverage": 0.62, "reg_dice": 0.88},
    "toy002": {"qc_reasons": ["hu_offset:+85"], "qc_pass": True, "fov_lung_coverage": 0.97, "reg_dice": 0.91},
    "toy003": {"qc_reasons": [], "qc_pass": True, "fov_lung_coverage": 1.0, "reg_dice": 0.85},
}
EXPECTED_ORDER = ["toy001", "toy002", "toy003", "toy000"]  # failing, warning, then the lower Dice


@pytest.fixture(scope="module")
def qc_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc") / "store"
    make_toy_store(root, n_subjects=4, grid=(2, 2, 2), scans=root.parent / "scans")
    for sid, values in CASES.items():
        path = root / "subjects" / f"{sid}.json"
        rec = json.loads(path.read_text(encoding="utf-8"))
        fov = np.ones(rec["num_locations"])
        if sid == "toy001":
            fov[:3] = [0.1, 0.3, 0.7]  # two patches under the 0.5 policy threshold
        rec.update(values, patch_fov_fraction=fov.tolist())
        path.write_text(json.dumps(rec), encoding="utf-8")
    record_failure(root, "broken01", "read", "the NIfTI file is truncated or corrupt")
    write_failures_table(root)
    return root


def test_rows_are_sorted_worst_first(qc_store):
    rows = subject_rows(qc_store)
    assert list(rows["sid"]) == EXPECTED_ORDER and list(rows["rank"]) == [1, 2, 3, 4]
    first = rows.iloc[0]
    assert not first["qc_pass"] and first["n_failing"] == 1 and first["n_warnings"] == 1
    assert first["n_invalid_patches"] == 2 and first["fov_lung_coverage"] == pytest.approx(0.62)
    assert list(worst_subjects(qc_store, 2)["sid"]) == EXPECTED_ORDER[:2]


def test_report_lists_every_subject_with_reasons_and_pngs(qc_store, tmp_path):
    page = write_qc_report(qc_store, tmp_path / "qc", progress=False)
    text = page.read_text(encoding="utf-8")
    order = [m for m in re.findall(r"<b>(toy\d+)</b>", text)]
    assert order == EXPECTED_ORDER
    for token in ("partial_fov:0.62", "thick_slices:5.0mm", "hu_offset:+85"):
        assert token in text
    assert re.search(r'class="fail"[^>]*>partial_fov:0.62', text)  # failing reason marked as failing
    assert re.search(r'class="warn"[^>]*>hu_offset:\+85', text)
    assert "broken01" in text and "truncated or corrupt" in text  # failures.csv listed
    for sid in CASES:
        png = tmp_path / "qc" / "subjects" / f"{sid}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f'src="subjects/{sid}.png"' in text


def test_report_is_written_atomically(qc_store, tmp_path, monkeypatch):
    out = tmp_path / "qc"
    page = write_qc_report(qc_store, out, progress=False)
    before = page.read_text(encoding="utf-8")
    from matplotlib.figure import Figure

    calls = []
    real_save = Figure.savefig

    def failing(self, fname, *args, **kw):  # the disk fills up at the third subject's PNG
        calls.append(fname)
        if len(calls) == 3:
            real_save(self, fname, *args, **kw)
            raise OSError("disk full")
        return real_save(self, fname, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", failing)
    with pytest.raises(OSError, match="disk full"):
        write_qc_report(qc_store, out, progress=False)
    monkeypatch.setattr(Figure, "savefig", real_save)
    assert page.read_text(encoding="utf-8") == before  # the old page stands
    assert not [p for p in out.rglob("*") if ".part" in p.name]  # no temporaries left
    real_write = Path.write_text

    def write_half(self, text, *args, **kwargs):  # the disk fills up in the middle of the page
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half)
    with pytest.raises(OSError, match="No space"):
        write_qc_report(qc_store, out, progress=False)
    monkeypatch.setattr(Path, "write_text", real_write)
    assert page.read_text(encoding="utf-8") == before
    assert not [p for p in out.rglob("*") if ".part" in p.name]


def test_figure_marks_patches_outside_the_scan(qc_store):
    import matplotlib.pyplot as plt

    fig = qc_figure(qc_store, "toy001")
    colours = [tuple(np.round(p.get_edgecolor(), 3)) for ax in fig.axes[:3] for p in ax.patches]
    plt.close(fig)
    assert colours, "no patch boxes drawn"
    red = [c for c in colours if c[0] > 0.6 and c[1] < 0.3]  # fov 0.1 in RdYlGn
    assert red and len(red) < len(colours)


def test_subject_whose_ct_is_gone_is_still_reported(qc_store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(qc_store, copy)
    rec_path = copy / "subjects" / "toy002.json"
    rec = json.loads(rec_path.read_text(encoding="utf-8"))
    rec["image"] = str(tmp_path / "moved.nii.gz")
    rec_path.write_text(json.dumps(rec), encoding="utf-8")
    text = write_qc_report(copy, tmp_path / "qc", progress=False).read_text(encoding="utf-8")
    assert "<b>toy002</b>" in text and (tmp_path / "qc" / "subjects" / "toy002.png").exists()


def test_store_without_geometry_still_reported(tmp_path):
    """Records without a grid (stores not written by preprocessing): listed, a PNG saying why."""
    root = make_toy_store(tmp_path / "plain", n_subjects=3, grid=(2, 2, 1))
    text = write_qc_report(root, tmp_path / "qc", progress=False).read_text(encoding="utf-8")
    assert sorted(re.findall(r"<b>(toy\d+)</b>", text)) == ["toy000", "toy001", "toy002"]
    assert all((tmp_path / "qc" / "subjects" / f"toy00{i}.png").exists() for i in range(3))


def test_command(qc_store, tmp_path, capsys):
    assert cli.main(["qc", str(qc_store), "--out", str(tmp_path / "r"), "--worst", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 subjects, 1 fail QC, 1 failed preprocessing" in out
    assert "partial_fov 1" in out and "hu_offset 1" in out and "toy001" in out
    assert (tmp_path / "r" / "index.html").exists()
    assert cli.main(["qc", str(tmp_path / "nothing")]) == 2
    assert "not a patch store" in capsys.readouterr().err


def test_help(capsys):
    assert cli.main(["qc", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: drasclr qc") and "STORE" in text and "--out DIR" in text


def test_planes_pass_through_the_scanned_patches(qc_store, tmp_path):
    """Upper patches outside the scan: the figure's planes go through the patches that were seen."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(qc_store, copy)
    path = copy / "subjects" / "toy000.json"
    rec = json.loads(path.read_text(encoding="utf-8"))
    k = np.asarray(rec["corners_subject"])[:, 2]
    rec["patch_fov_fraction"] = np.where(k > k.min(), 0.0, 1.0).tolist()  # only the lowest layer was scanned
    path.write_text(json.dumps(rec), encoding="utf-8")
    store = PatchStore(copy)
    centre = qc_report._planes(store, "toy000", store.record("toy000"))["centre"]
    assert centre[2] == k.min() + store.patch_size // 2
