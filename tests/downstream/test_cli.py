"""``drasclr downstream``: a toy store with labels + random embedding files -> results tables."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from drasclr_lib.cli import main as drasclr
from drasclr_lib.data.patch_store import PatchStore, finalize_store
from drasclr_lib.downstream.cli import cli_main, parse_embedding_args
from drasclr_lib.embed import EmbeddingSet
from drasclr_lib.testing import make_toy_store


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 16-subject toy store (FEV1pp and GOLD from make_toy_store, plus a 'pack_years' column and two
    visits per patient) and two embedding files: one that carries the disease level, one noise."""
    tmp = tmp_path_factory.mktemp("ds_cli")
    root = make_toy_store(tmp / "store", n_subjects=16, grid=(2, 2, 1), patch_size=16, seed=4)
    store = PatchStore(root)
    d = np.arange(16) / 15
    extra = pd.DataFrame({"sid": store.sids, "group": [f"P{i // 2}" for i in range(16)], "pack_years": 50 * d,
                          "FEV1pp": store.table["FEV1pp"].to_numpy(), "GOLD": store.table["GOLD"].to_numpy()})
    finalize_store(root, extra)
    store = PatchStore(root)
    rng = np.random.default_rng(0)
    good = rng.normal(size=(16, store.num_locations, 8)) * 0.2
    good[..., 0] += 3 * d[:, None]
    paths = {}
    for name, h in (("good", good), ("noise", rng.normal(size=good.shape))):
        paths[name] = EmbeddingSet(h=h.astype(np.float32), sids=store.sids, locs=store.locs,
                                   atlas_corners=store.atlas_corners).save(tmp / f"emb_{name}.npz")
    return root, paths


def test_downstream_command_writes_the_tables(files, tmp_path, capsys):
    root, paths = files
    out = tmp_path / "res"
    rc = drasclr(["downstream", "--store", str(root), "--embeddings", f"drasclr={paths['good']}",
                  "--embeddings", str(paths["noise"]), "--tasks", "pack_years:continuous, GOLD:ordinal",
                  "--folds", "4", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == ["method", "task", "metric", "mean", "sd", "folds", "n"]
    assert set(table.method) == {"qct", "drasclr", "emb_noise"}  # a bare path is named after its file
    assert list(dict.fromkeys(table.task)) == ["pack_years", "GOLD"]
    by_task = pd.read_csv(out / "results_by_task.csv", index_col=[0, 1])
    assert list(by_task.columns) == ["qct", "drasclr", "emb_noise"]  # known methods first, then the rest
    assert by_task.loc[("pack_years", "r2_oof"), "drasclr"] > 0.8 > by_task.loc[("pack_years", "r2_oof"), "emb_noise"]
    per_fold = pd.read_csv(out / "results_per_fold.csv")
    assert set(per_fold.fold) == {0, 1, 2, 3}
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["tasks"] == "pack_years:continuous, GOLD:ordinal"
    assert settings["settings"]["num_groups"] == 8 and sum(settings["fold_sizes"]) == 16
    assert set(settings["embeddings"]) == {"drasclr", "emb_noise"}
    assert "pack_years" in capsys.readouterr().out
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*"))  # nothing half-written left


def test_downstream_command_errors_name_the_problem(files, tmp_path, capsys):
    root, paths = files
    base = ["--store", str(root), "--out", str(tmp_path / "o"), "--no-progress", "--folds", "4"]
    cases = [
        (["--embeddings", str(paths["good"]), "--tasks", "pack_Years:continuous"],
         "no column 'pack_Years'; did you mean 'pack_years'"),
        (["--embeddings", str(paths["good"]), "--tasks", "GOLD"], "no kind"),
        (["--embeddings", f"x={tmp_path / 'missing.npz'}"], "missing.npz does not exist"),
        (["--embeddings", f"a={paths['good']}", f"a={paths['noise']}"], "'a' is given twice"),
        (["--no-qct"], "nothing to compare"),
        (["--embeddings", str(paths["good"]), "--folds", "9"], "9 folds from 8 patient groups"),
    ]
    for extra, message in cases:
        assert cli_main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, (extra, message)
    assert cli_main(["--store", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--embeddings", "x.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parse_embedding_args():
    assert parse_embedding_args(["a=x/e.npz", "y/run_1.npz", " b = z.npz"]) == {
        "a": Path("x/e.npz"), "run_1": Path("y/run_1.npz"), "b": Path("z.npz")}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_embedding_args(["=e.npz"])


def test_help_shows_every_default_and_an_example(capsys):
    assert drasclr(["downstream", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--tasks", "paper"), ("--folds", "5"), ("--seed", "0"), ("--pool", "mean"),
                          ("--pca-components", "8"), ("--penalizer", "0.1"), ("--logistic-c", "0.1"),
                          ("--patch-c", "1.0"), ("--subtype-threshold", "0.05"), ("--max-train-patches", "20000")]:
        assert flag in text and f"(default: {default})" in text, flag
    assert "--store DIR" in text and "(required)" in text and "--embeddings NAME=PATH" in text
    assert "examples:" in text and "drasclr downstream --store" in text
    assert "%LAA-950" in text  # the literal percent sign survives argparse's formatting
    assert drasclr(["--help"]) == 0
    assert "downstream" in capsys.readouterr().out
