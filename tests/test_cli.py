"""The ``drasclr`` command as a new user meets it: ``--version``, the command list, every command's
help (each option described, each default shown, examples that parse), ``validate`` and
``segment`` end to end."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import drasclr_lib
from drasclr_lib import cli
from drasclr_lib.cli_help import HelpFormatter, command_parser


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """Help text wrapped at a fixed width, whatever the terminal running the tests."""
    monkeypatch.setenv("COLUMNS", "110")


# -- the command itself ----------------------------------------------------------------------
def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"drasclr {drasclr_lib.__version__}"
    res = subprocess.run([sys.executable, "-m", "drasclr_lib.cli", "-V"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"drasclr {drasclr_lib.__version__}"


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, line) in cli.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)}\s+{re.escape(line)}$", out, re.M), name
    assert "--version" in out and "drasclr <command> --help" in out
    assert {"validate", "segment"} <= set(cli.COMMANDS)


def test_unknown_command_suggests_the_close_one(capsys):
    assert cli.main(["segmnt"]) == 2
    assert "did you mean 'segment'" in capsys.readouterr().err


def test_help_subcommand_is_the_commands_help(capsys):
    assert cli.main(["help", "validate"]) == 0
    assert capsys.readouterr().out.startswith("usage: drasclr validate")


# -- reading a help text ---------------------------------------------------------------------
_SECTIONS = {"options:", "optional arguments:", "positional arguments:"}


def help_entries(text: str) -> list[tuple[str, str]]:
    """``(invocation, help text)`` of every argument listed in an argparse help output."""
    entries: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        if line and not line.startswith(" "):
            inside = line.strip() in _SECTIONS
            continue
        if not inside or not line.strip():
            continue
        if re.match(r"^  \S", line):
            m = re.match(r"^  (\S+(?:,? \S+)*?)(?:\s{2,}(\S.*))?$", line)
            entries.append([m.group(1), m.group(2) or ""])
        elif entries:
            entries[-1][1] = (entries[-1][1] + " " + line.strip()).strip()
    return [(a, b) for a, b in entries]


def help_problems(text: str) -> list[str]:
    """Arguments without a description, and value options that show neither a default nor that they are required."""
    problems = []
    for invocation, desc in help_entries(text):
        if invocation.startswith(("-h", "-V")):
            continue
        if not desc:
            problems.append(f"{invocation}: no help text")
            continue
        last = invocation.split(", ")[-1]
        takes_value = last.startswith("-") and " " in last
        if takes_value and "(default: " not in desc and not re.search(r"\brequired\b", desc):
            problems.append(f"{invocation}: no default shown ({desc!r})")
    return problems


def example_lines(text: str) -> list[str]:
    """The command lines of the help's ``examples:`` epilog."""
    block = text.split("\nexamples:\n", 1)[1] if "\nexamples:\n" in text else ""
    return [line.strip() for line in block.splitlines() if line.startswith("  ") and not line.strip().startswith("#")]


def test_the_help_checker_finds_what_is_missing():
    """The checker is not vacuous: a plain argparse help fails it, the shared formatter passes."""
    plain = argparse.ArgumentParser(prog="x", formatter_class=argparse.RawDescriptionHelpFormatter)
    plain.add_argument("--count", type=int, default=3, help="how many")
    plain.add_argument("--quiet", action="store_true")
    plain.add_argument("--very-long-option-name", default="abc", metavar="VERY_LONG_VALUE", help="wrapped below")
    assert sorted(help_problems(plain.format_help())) == [
        "--count COUNT: no default shown ('how many')", "--quiet: no help text",
        "--very-long-option-name VERY_LONG_VALUE: no default shown ('wrapped below')"]
    good = command_parser("x", "does x", [("the usual", "x --count 4")])
    good.add_argument("--count", type=int, default=3, help="how many")
    good.add_argument("--quiet", action="store_true", help="say less")
    good.add_argument("--out", required=True, help="where")
    text = good.format_help()
    assert help_problems(text) == [] and example_lines(text) == ["x --count 4"]
    assert "(default: 3)" in text and "where (required)" in text


def test_formatter_shows_defaults_as_typed():
    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    p.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5), help="voxel size")
    p.add_argument("--frac", type=float, default=0.5, help="a 50%% share")
    p.add_argument("--cache", default=None, help="cache folder (default: ~/.cache)")
    p.add_argument("--none", default=None, help="nothing shown")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="off")
    text = " ".join(p.format_help().split())
    assert "voxel size (default: 0.8 0.8 2.5)" in text and "a 50% share (default: 0.5)" in text
    assert "cache folder (default: ~/.cache)" in text and "(default: None)" not in text
    assert "off (default" not in text  # a switch: leaving it out is the default


# -- every command's help --------------------------------------------------------------------
def _help_of(name: str, capsys) -> str:
    assert cli.main([name, "--help"]) == 0, f"drasclr {name} --help did not exit 0"
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_is_described_with_its_default(name, capsys):
    text = _help_of(name, capsys)
    assert text.startswith(f"usage: drasclr {name}")
    assert len(help_entries(text)) >= 2, text
    problems = help_problems(text)
    assert not problems, f"drasclr {name} --help:\n  " + "\n  ".join(problems)


class _Parsed(Exception):
    """Raised instead of running the command once its arguments are parsed."""


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_examples_that_parse(name, capsys, monkeypatch):
    examples = example_lines(_help_of(name, capsys))
    assert examples, f"drasclr {name} --help has no examples"
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    for line in examples:
        words = shlex.split(line)
        if words[0] == "torchrun":  # ... -m drasclr_lib.training ARGS is drasclr pretrain ARGS
            words = ["drasclr", "pretrain", *words[words.index("drasclr_lib.training") + 1:]]
        assert words[:2] == ["drasclr", name], line
        with pytest.raises(_Parsed):
            cli.main(words[1:])  # a usage error would return 2 instead


def test_the_study_in_the_top_level_help_parses(capsys, monkeypatch):
    assert cli.main(["--help"]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  drasclr ")]
    assert [ln.split()[1] for ln in lines] == ["validate", "preprocess", "pretrain", "embed", "downstream"]
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    for line in lines:
        with pytest.raises(_Parsed):
            cli.main(shlex.split(line)[1:])


def test_defaults_shown_are_the_real_ones(capsys):
    text = " ".join(_help_of("synth", capsys).split())
    assert "(default: 24)" in text and "(default: 0.8 0.8 2.5)" in text
    text = " ".join(_help_of("pretrain", capsys).split())
    assert "negatives per location (default: 4096)" in text and "InfoNCE temperature (default: 0.2)" in text


# -- drasclr validate ------------------------------------------------------------------------
def _validate(args, capsys) -> tuple[int, str, str]:
    code = cli.main(["validate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def cohort_files(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_validate_a_good_manifest(cohort_files, capsys, monkeypatch):
    pd.DataFrame({"sid": ["s1", "s2", "s3"], "image": ["a.nii.gz", "b.nii.gz", "c.nii.gz"], "GOLD": [0, 2, 4],
                  "split": ["train", "train", "test"], "group": ["p1", "p1", "p2"], "my_score": [1, 2, 3]}
                 ).to_csv(cohort_files / "m.csv", index=False)
    monkeypatch.chdir(cohort_files)  # a relative path is taken from the working directory
    code, out, _ = _validate(["m.csv"], capsys)
    assert code == 0, out
    assert f"{cohort_files / 'm.csv'}: valid manifest" in out
    assert "3 subjects" in out and "GOLD 3/3" in out and "train 2, test 1" in out
    assert "2 patient(s), 1 with more than one scan" in out and "my_score" in out


def test_validate_lists_every_problem(cohort_files, capsys):
    n = 25  # more than the library's message shows
    df = pd.DataFrame({"sid": [f"s{i}" for i in range(n)], "image": ["a.nii.gz"] * n, "GOLD": [7] * n})
    df.loc[3, "image"] = "missing.nii.gz"
    df.to_csv(cohort_files / "bad.csv", index=False)
    code, out, err = _validate([cohort_files / "bad.csv"], capsys)
    assert code == 1
    gold = [line for line in out.splitlines() if "column 'GOLD'" in line]
    assert len(gold) == n and all("'7'" in line for line in gold)
    assert "row 4 (line 5, sid 's3'), column 'image': file not found" in out
    assert f"{n + 1} problem(s)" in out and "--no-check-files" in err
    code, out, _ = _validate([cohort_files / "bad.csv", "--no-check-files"], capsys)
    assert code == 1 and "file not found" not in out and f"{n} problem(s)" in out


def test_validate_a_first_manifest_from_a_spreadsheet(cohort_files, capsys):
    """Wrong case, tabs, days, and 'dead' as the event: read where it can be, refused where it cannot."""
    (cohort_files / "first.csv").write_text("SID\tImage\ttime\tevent\ns1\ta.nii.gz\t1200\tdead\n"
                                            "s2\tb.nii.gz\t800\talive\ns3\tc.nii.gz\t2000\tdead\n")
    code, out, _ = _validate([cohort_files / "first.csv"], capsys)
    assert code == 1
    assert re.search(r"column 'time': .*days", out) and "event" not in out.split("notes")[0]
    assert "tab-separated" in out and "'SID' read as 'sid'" in out
    (cohort_files / "first.csv").write_text("SID\tImage\ttime\tevent\ns1\ta.nii.gz\t3.3\tdead\n")
    code, out, _ = _validate([cohort_files / "first.csv"], capsys)
    assert code == 0 and "event 1/1" in out and "tab-separated" in out


def test_validate_unreadable(tmp_path, capsys):
    code, _, err = _validate([tmp_path / "nothere.csv"], capsys)
    assert code == 2 and "nothere.csv" in err
    (tmp_path / "folder").mkdir()
    assert _validate([tmp_path / "folder"], capsys)[0] == 2
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    assert _validate([tmp_path / "bin.csv"], capsys)[0] == 2
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    code, _, err = _validate([tmp_path / "broken.yaml"], capsys)
    assert code == 2 and "YAML" in err
    code, _, err = _validate(["synthetic"], capsys)  # never generated by a check
    assert code == 2 and "drasclr synth" in err


# -- drasclr segment -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_case(tmp_path_factory):
    """A small synthetic scan, a store folder holding the atlas of another subject, and a saved
    segmenter that says "emphysema" wherever a patch reaches (its head ignores the features)."""
    from drasclr_lib.data.patch_store import write_store_meta
    from drasclr_lib.data.synthetic import make_cohort
    from drasclr_lib.preprocess.atlas import Atlas
    from drasclr_lib.preprocess.landmarks import nearest_neighbors
    from drasclr_lib.segmentation.model import build_segmenter, save_segmenter

    root = tmp_path_factory.mktemp("segment_cli")
    manifest = make_cohort(root / "cohort", n_subjects=2, seed=5, size=0.4, spacing=(1.5, 1.5, 3.0), workers=1,
                           progress=False)
    df = pd.read_csv(manifest).set_index("sid")
    files = {sid: {k: manifest.parent / df.loc[sid, k] for k in ("image", "lung_mask")} for sid in df.index}
    atlas = Atlas.from_subject(files["syn0000"]["image"], files["syn0000"]["lung_mask"], sid="syn0000")
    store = root / "store"
    atlas.save(store)
    write_store_meta(store, atlas.corners, atlas.locs, nearest_neighbors(atlas.corners, 2), atlas="syn0000")
    model = build_segmenter("random", seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([-5.0, 5.0]))
    save_segmenter(model, root / "segmenter.pt", store=store, meta={"init": "random", "steps": 0})
    return {"root": root, "scan": files["syn0001"], "store": store, "model": root / "segmenter.pt",
            "atlas": atlas}


def test_segment_end_to_end(seg_case, tmp_path, capsys):
    scan = seg_case["scan"]
    code = cli.main(["segment", str(scan["image"]), "--model", str(seg_case["model"]), "--lung-mask",
                     str(scan["lung_mask"]), "--out", str(tmp_path / "labels"), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    seg_path = tmp_path / "labels" / "syn0001_emphysema_seg.nii.gz"
    assert f"-> {seg_path}" in out and "emphysema" in out
    seg, src = sitk.ReadImage(str(seg_path)), sitk.ReadImage(str(scan["image"]))
    assert seg.GetSize() == src.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), src.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), src.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), src.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(seg)
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(scan["lung_mask"]))) > 0
    assert set(np.unique(labels)) == {0, 1}
    assert not labels[~lung].any()  # nothing outside the lungs
    assert labels[lung].mean() > 0.5  # the patches cover most of the lungs, all called emphysema
    ml = float(re.search(r"emphysema ([\d.]+) ml", out).group(1))
    assert ml == pytest.approx(labels.sum() * np.prod(src.GetSpacing()) / 1000, rel=1e-3)


def test_segment_refuses_another_atlas(seg_case, tmp_path, capsys):
    other = seg_case["scan"]["lung_mask"]  # a mask: the grid rule gives other locations
    code = cli.main(["segment", str(seg_case["scan"]["image"]), "--model", str(seg_case["model"]), "--atlas",
                     str(other), "--out", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "other locations" in err and not (tmp_path / "x.nii.gz").exists()


def test_segment_usage_errors(seg_case, tmp_path, capsys):
    image = str(seg_case["scan"]["image"])
    ckpt = tmp_path / "pretrain.pt"
    torch.save({"state_dict": {"encoder_q.conv1.weight": torch.zeros(1)}, "config": {}}, ckpt)
    cases = [
        ([image, "--model", str(tmp_path / "none.pt")], "segmenter file not found"),
        ([image, "--model", str(ckpt)], "not a fine-tuned segmenter"),
        ([image, image, "--model", str(seg_case["model"]), "--lung-mask", image], "--lung-mask is one scan's mask"),
        ([image, image, "--model", str(seg_case["model"]), "--out", "one.nii.gz"], "one file but 2 scans"),
        ([str(tmp_path / "no_scan.nii.gz"), "--model", str(seg_case["model"])], "input not found"),
        ([image, "--model", str(seg_case["model"]), "--atlas", str(seg_case["store"]), "--landmarks", "x.npy"],
         "--landmarks goes with"),
    ]
    for args, message in cases:
        assert cli.main(["segment", *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_segment_a_failing_scan_exits_1(seg_case, tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    code = cli.main(["segment", str(bad), "--model", str(seg_case["model"]), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"FAILED {bad}" in err and "1 of 1 scan(s) failed" in err


def test_scan_inputs_and_output_paths(tmp_path):
    from drasclr_lib.segmentation.cli import UsageError, output_paths, scan_inputs

    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("b.nii.gz", "a.nrrd", "a_emphysema_seg.nii.gz", "notes.txt"):
        (folder / name).write_bytes(b"")
    scans = scan_inputs([folder])
    assert [p.name for p in scans] == ["a.nrrd", "b.nii.gz"]  # sorted, CT files only, earlier outputs skipped
    assert output_paths(scans, None) == [folder / "a_emphysema_seg.nii.gz", folder / "b_emphysema_seg.nii.gz"]
    assert output_paths(scans, tmp_path / "out") == [tmp_path / "out" / "a_emphysema_seg.nii.gz",
                                                     tmp_path / "out" / "b_emphysema_seg.nii.gz"]
    assert output_paths(scans[:1], tmp_path / "x.nii.gz") == [tmp_path / "x.nii.gz"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.nii.gz").write_bytes(b"")
    with pytest.raises(UsageError, match="both be written"):
        output_paths([folder / "a.nrrd", other / "a.nii.gz"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither a DICOM series"):
        scan_inputs([tmp_path / "empty"])


# -- the segmenter file ----------------------------------------------------------------------
def test_segmenter_file_round_trip(seg_case, tmp_path):
    from drasclr_lib.segmentation.model import DrasSegNet, build_segmenter, load_segmenter, save_segmenter
    from drasclr_lib.models import DrasEncoder

    model = DrasSegNet(DrasEncoder(conditional=False, rep_dim=64), num_classes=4, decoder_channels=(32, 16, 8, 8, 8),
                       input_skip=False)
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_()
    path = save_segmenter(model, tmp_path / "sub" / "seg.pt", meta={"dice": 0.5, "fractions": [0.1, 1.0]})
    back, info = load_segmenter(path)
    assert isinstance(back, DrasSegNet) and not back.training
    assert (back.num_classes, back.input_skip, back.encoder.config) == (4, False, model.encoder.config)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, loc = torch.rand(2, 1, 32, 32, 32), torch.zeros(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, loc), back(x, loc))
    assert info == {"atlas_store": None, "atlas_corners": None, "meta": {"dice": 0.5, "fractions": [0.1, 1.0]}}
    _, info = load_segmenter(seg_case["model"])
    assert info["atlas_store"] == str(seg_case["store"].resolve())
    np.testing.assert_array_equal(info["atlas_corners"], seg_case["atlas"].corners)
    with pytest.raises(ValueError, match="plain value"):
        save_segmenter(build_segmenter("random"), tmp_path / "x.pt", meta={"path": Path("a")})
    assert not (tmp_path / "x.pt").exists()


def test_segmenter_file_with_code_is_refused(tmp_path):
    from drasclr_lib.segmentation.model import load_segmenter

    torch.save({"format": "drasclr-segmenter", "version": 1, "obj": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load"):
        load_segmenter(tmp_path / "evil.pt")
