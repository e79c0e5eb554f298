"""What the notebooks do first: one output root whatever the working directory, the laptop/paper
profiles, batches the cohort can form, and `drasclr run-notebooks -p` parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from drasclr_lib import runner
from drasclr_lib.notebook_setup import fit_batch, load_profile, notebook_parameters, use_output_root, use_profile
from drasclr_lib.utils import output_dir, output_root, print_config, project_root

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = runner.list_notebooks(runner.REPO_NOTEBOOKS)


def test_output_root_is_the_clones_outputs_from_any_working_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("DRASCLR_OUT", raising=False)
    roots = set()
    for cwd in (ROOT, ROOT / "notebooks", tmp_path):  # make demo, JupyterLab started in notebooks/, elsewhere
        monkeypatch.chdir(cwd)
        roots.add(output_root())
    assert roots == {ROOT / "outputs"} and project_root() == ROOT


def test_drasclr_out_wins_and_output_root_parameter_sets_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DRASCLR_OUT", str(tmp_path / "a"))
    monkeypatch.chdir(ROOT / "notebooks")
    assert output_root() == tmp_path / "a" and output_dir("x") == tmp_path / "a" / "x"
    assert use_output_root(str(tmp_path / "drive")) == tmp_path / "drive"
    assert output_dir("02_pretraining") == tmp_path / "drive" / "02_pretraining"
    assert f"outputs: {tmp_path / 'drive'}" in capsys.readouterr().out


def test_print_config_names_torch_cuda_device_and_outputs(capsys):
    info = print_config()
    for key in ("drasclr_lib", "torch", "CUDA (torch build)", "CUDA available", "device (auto)", "Colab", "output root"):
        assert key in info and info[key]
    assert "device (auto)" in capsys.readouterr().out


def test_paper_profile_replaces_only_untouched_laptop_values(capsys):
    laptop, paper = load_profile("laptop")["02_pretraining"], load_profile("paper")["02_pretraining"]
    assert use_profile("laptop", "02_pretraining", dict(laptop)) == {}
    current = dict(laptop, LR=0.5)  # the user set LR
    applied = use_profile("paper", "02_pretraining", current)
    assert applied == {k: v for k, v in paper.items() if k != "LR"} and applied["BATCH_SIZE"] == 128
    assert "kept because you set them: LR=0.5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="PROFILE must be one of"):
        use_profile("gpu", "02_pretraining", current)


def test_fit_batch_never_exceeds_what_the_cohort_can_form(capsys):
    assert fit_batch(8, 16) == 8 and capsys.readouterr().out == ""
    assert fit_batch(128, 16) == 8
    assert "BATCH_SIZE 128 -> 8" in capsys.readouterr().out
    assert fit_batch(128, 3) == 2
    with pytest.raises(ValueError, match="at least 2"):
        fit_batch(8, 1)


def test_parameter_args_target_all_notebooks_or_one():
    params = runner.parse_parameter_args(["SEED=1", "02:LR=0.5", "03_embeddings:INTERACTIVE=False"], NOTEBOOKS)
    having_seed = {nb.stem for nb in NOTEBOOKS if "SEED" in notebook_parameters(nb)}
    assert {s for s, p in params.items() if p.get("SEED") == 1} == having_seed and len(having_seed) >= 5
    assert params["02_pretraining"]["LR"] == 0.5 and "LR" not in params.get("04_downstream", {})
    assert params["03_embeddings"]["INTERACTIVE"] is False
    assert runner.parse_parameter_args(["01:DATA_MANIFEST=copdgene"], NOTEBOOKS) == {
        "01_preprocessing": {"DATA_MANIFEST": "copdgene"}}
    for bad, match in [("LR", "NAME=VALUE"), ("09:LR=1", "no notebook"), ("00:LR=1", "has no parameter LR"),
                       ("NO_SUCH=1", "any notebook has no parameter")]:
        with pytest.raises(ValueError, match=match):
            runner.parse_parameter_args([bad], NOTEBOOKS)


def test_profiles_as_runner_parameters():
    assert runner.profile_parameters("laptop", NOTEBOOKS) == {}  # the notebooks as committed
    paper = runner.profile_parameters("paper", NOTEBOOKS)
    assert set(paper) == {nb.stem for nb in NOTEBOOKS} - {"00_synthetic_cohort"}
    assert all(p == {"PROFILE": "paper"} for p in paper.values())


def test_run_notebooks_cli_rejects_an_unknown_parameter(capsys, tmp_path):
    with pytest.raises(SystemExit):
        runner.main(["--out", str(tmp_path), "--only", "00", "-p", "00:BATCH_SIZE=4"])
    assert "has no parameter BATCH_SIZE" in capsys.readouterr().err


def test_missing_inputs_are_made_with_the_earlier_notebooks_settings_then_found(monkeypatch, tmp_path, capsys):
    """On a fresh runtime (Colab, a notebook opened alone), ``input_checkpoint`` makes the cohort
    (notebook 00's settings), the patch store (01's) and a short pretraining (02's), each where the
    earlier notebook would have written it, says so with its time, and a second call makes nothing.
    The committed profile is shrunk here (4 subjects, 2 steps); notebook 03's own run in an empty
    folder (``tests/notebooks/test_03_alone.py``) checks the wiring at the committed settings."""
    from drasclr_lib import notebook_setup
    from drasclr_lib.data.patch_store import PatchStore

    laptop = load_profile("laptop")
    small = {**laptop,
             "00_synthetic_cohort": {**laptop["00_synthetic_cohort"], "N_SUBJECTS": 4, "WORKERS": 1},
             "01_preprocessing": {**laptop["01_preprocessing"], "WORKERS": 1},
             "02_pretraining": {**laptop["02_pretraining"], "MAX_STEPS": 2, "BATCH_SIZE": 2, "QUEUE_SIZE": 2,
                                "WORKERS": 0}}
    monkeypatch.setattr(notebook_setup, "load_profile", lambda name, *a, **k: small)
    monkeypatch.setenv("DRASCLR_OUT", str(tmp_path / "fresh"))
    ckpt = notebook_setup.input_checkpoint()
    text = capsys.readouterr().out
    for what in ("notebook 00 has not run here: making the synthetic cohort, 4 subjects",
                 "notebook 01's patch store is missing: preprocessing 4 subjects",
                 "notebook 02's checkpoint is missing: a short pretraining, 2 steps of batch 2"):
        assert what in text, (what, text)
    assert text.count("[inputs] done in") == 3
    root = tmp_path / "fresh"
    assert (root / "synthetic_cohort" / "manifest.csv").is_file()
    store = PatchStore(root / "patch_store")
    assert store.num_subjects == 4 and store.failures().empty
    assert ckpt == root / "02_pretraining" / "checkpoint.pt" and ckpt.is_file()
    # the next notebook finds them all and makes nothing
    assert notebook_setup.input_checkpoint() == ckpt and notebook_setup.input_store().num_subjects == 4
    assert "[inputs]" not in capsys.readouterr().out
