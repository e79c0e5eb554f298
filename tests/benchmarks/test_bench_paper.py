"""``benchmarks/bench_paper.py`` runs end to end on a toy store in a tiny setting (about 40 s on 2 cores):
every output file is written, and the intervals of its summary and paired tables are those recomputed
by hand from its per-fold CSV (the Nadeau-Bengio correction with the CSV's own n_train / n_test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from drasclr_lib.data.patch_store import finalize_store
from drasclr_lib.testing import make_toy_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    """16 toy subjects with the paper's labels, survival and two of the generator's latent columns."""
    root = make_toy_store(tmp_path_factory.mktemp("paper_store"), n_subjects=16, grid=(2, 2, 1), seed=3)
    rng = np.random.default_rng(0)
    d = np.arange(16) / 15
    t_event = rng.exponential(1 / np.exp(2 * d))
    t_cens = rng.exponential(1.0, size=16)
    finalize_store(root, pd.DataFrame({
        "sid": [f"toy{s:03d}" for s in range(16)],
        "FEV1pp": 100 - 60 * d + rng.normal(0, 5, 16), "FEV1_FVC": 0.8 - 0.3 * d + rng.normal(0, 0.03, 16),
        "GOLD": np.round(4 * d), "emph_grade": np.round(3 * d),
        "paraseptal_grade": rng.integers(0, 2, 16).astype(float),
        "time": np.minimum(t_event, t_cens), "event": (t_event <= t_cens).astype(float),
        "airway_wall": rng.uniform(size=16), "age": 50 + 20 * d,
    }))
    return root


def _by_hand(values: pd.DataFrame) -> tuple[float, float]:
    """Corrected interval from a per-fold slice: seed average per (repeat, fold), then 1/J + n_test/n_train."""
    cells = values.groupby(["repeat", "fold"]).agg(v=("value", "mean"), tr=("n_train", "mean"), te=("n_test", "mean"))
    x = cells["v"].to_numpy()
    J = len(x)
    se = np.sqrt((1 / J + cells["te"].mean() / cells["tr"].mean()) * x.var(ddof=1))
    half = stats.t.ppf(0.975, J - 1) * se
    return x.mean() - half, x.mean() + half


@pytest.mark.slow
def test_bench_paper_tiny(paper_store, tmp_path):
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_paper.py"), "--store", str(paper_store),
           "--work", str(work), "--results", str(results), "--seeds", "2", "--max-steps", "2", "--batch-size", "4",
           "--queue-size", "16",
           "--repeats", "2", "--folds", "3", "--pca-components", "2", "--max-train-patches", "200",
           "--seg-fractions", "1.0", "--seg-seeds", "1", "--seg-steps", "2", "--seg-batch", "2",
           "--seg-eval-patches", "2", "--calibration-batches", "2", "--workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("per_fold.csv", "summary.csv", "paired.csv", "segmentation.csv", "paper.json", "summary.png",
                 "paired.png", "segmentation.png"):
        assert (results / name).is_file() and (results / name).stat().st_size > 0, name
    pf = pd.read_csv(results / "per_fold.csv")
    assert list(pf.columns) == ["method", "seed", "repeat", "fold", "task", "metric", "value", "n_train", "n_test"]
    assert set(pf.method) == {"drasclr", "moco", "drasclr_no_nbr", "random", "qct", "qct+drasclr", "oracle"}
    assert set(pf.repeat) == {0, 1} and set(pf[pf.method == "moco"].seed) == {0, 1}
    assert set(pf[pf.method == "random"].seed) == {0}  # --random-seeds 1: random weights are not pretrained
    assert pf[pf.method.isin(["qct", "oracle"])].seed.isna().all()
    assert {"FEV1pp", "GOLD", "survival", "subtype"} <= set(pf.task)
    assert not ((pf.method == "oracle") & (pf.task == "subtype")).any()
    assert set(pf[pf.task == "subtype"].repeat) == {0}  # --subtype-repeats 1 (default): the costly task runs once
    assert (pf.n_test > 0).all() and (pf.n_train > pf.n_test).all()
    summary = pd.read_csv(results / "summary.csv")
    checked = 0
    for row in summary.itertuples():
        part = pf[(pf.method == row.method) & (pf.task == row.task) & (pf.metric == row.metric)]
        part = part.dropna(subset=["value"])
        if part.empty:  # no fold could score it (an AUC without both classes in any test fold)
            assert np.isnan(row.mean)
            continue
        assert row.mean == pytest.approx(part.value.mean())
        if part.groupby(["repeat", "fold"]).ngroups >= 2:
            lo, hi = _by_hand(part)
            assert (row.ci_low, row.ci_high) == (pytest.approx(lo), pytest.approx(hi)), row
            checked += 1
    assert checked > 20
    paired = pd.read_csv(results / "paired.csv")
    assert {("drasclr", "moco"), ("drasclr", "qct"), ("qct+drasclr", "qct")} <= set(zip(paired.a, paired.b))
    row = paired[(paired.a == "drasclr") & (paired.b == "moco") & (paired.task == "FEV1pp")
                 & (paired.metric == "r2")].iloc[0]
    a = pf[(pf.method == "drasclr") & (pf.task == "FEV1pp") & (pf.metric == "r2")]
    b = pf[(pf.method == "moco") & (pf.task == "FEV1pp") & (pf.metric == "r2")]
    m = a.merge(b[["seed", "repeat", "fold", "value"]], on=["seed", "repeat", "fold"], suffixes=("", "_b"))
    m["value"] = m["value"] - m["value_b"]
    lo, hi = _by_hand(m)
    assert (row.ci_low, row.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    seg = pd.read_csv(results / "segmentation.csv")
    assert set(seg[seg.kind == "model"].init) == {"random", "moco", "drasclr"}
    assert "laa950" in set(seg[seg.kind == "rule"].init) and "dice_paraseptal" in seg.columns
    info = json.loads((results / "paper.json").read_text(encoding="utf-8"))
    assert set(info["timings_s"]) == {"cohort", "store", "pretrain", "embed", "downstream", "segmentation", "tables"}
    assert {"python", "torch", "numpy", "sklearn", "lifelines", "git_commit", "cpu"} <= set(info["versions"])
    # every pretraining run's precision and speed outlive the cache
    runs = info["pretrain_runs"]
    assert set(runs) == {k for k in info["weights"] if not k.startswith("random")} and runs
    assert all(r["precision"] in ("fp32", "bf16") and r["s_per_step"] > 0 and r["steps"] > 0 for r in runs.values())
    assert all(r["host_memory"] in ("keep", "system") for r in runs.values())
    assert info["oracle_columns"] == ["airway_wall", "age"] and "mucus_plugging" in info["oracle_missing"]
    # a second run reuses every cached stage and writes the same per-fold table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_csv(results / "per_fold.csv"), pf)
    info2 = json.loads((results / "paper.json").read_text(encoding="utf-8"))
    assert info2["timings_s"]["pretrain"] < 5 and info2["timings_s"]["downstream"] < 5
    # --methods narrows what is pretrained and scored (the learning curve's runs): qct, its
    # composition and the oracle stay; the cached checkpoints and embeddings are reused
    narrow = results.parent / "narrow"
    cmd_narrow = [*cmd[:cmd.index("--results") + 1], str(narrow), *cmd[cmd.index("--results") + 2:],
                  "--methods", "drasclr,moco", "--no-segmentation"]
    proc = subprocess.run(cmd_narrow, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pf3 = pd.read_csv(narrow / "per_fold.csv")
    assert set(pf3.method) == {"drasclr", "moco", "qct", "qct+drasclr", "oracle"}
    assert not (narrow / "segmentation.csv").exists()
    assert json.loads((narrow / "paper.json").read_text(encoding="utf-8"))["setting"]["methods"] == ["drasclr", "moco"]
    # a budget beyond one epoch (16 subjects // 4 x 4 locations = 16 steps) stops there, says so and
    # records the steps trained, which the learning curve reads
    epoch = results.parent / "epoch"
    cmd_epoch = [*cmd_narrow[:cmd_narrow.index("--results") + 1], str(epoch),
                 *cmd_narrow[cmd_narrow.index("--results") + 2:], "--max-steps", "40", "--seeds", "1"]
    proc = subprocess.run(cmd_epoch, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at [16] steps" in proc.stderr
    runs = json.loads((epoch / "paper.json").read_text(encoding="utf-8"))["pretrain_runs"]
    assert set(runs) == {"drasclr@0", "moco@0"} and {r["steps"] for r in runs.values()} == {16}
    # --epochs 2 spans the schedule over two epochs: the same budget now trains 32 steps
    two = results.parent / "two_epochs"
    cmd_two = [*cmd_epoch[:cmd_epoch.index("--results") + 1], str(two), *cmd_epoch[cmd_epoch.index("--results") + 2:],
               "--epochs", "2"]
    proc = subprocess.run(cmd_two, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped at [32] steps: 2 epoch(s)" in proc.stderr
    info = json.loads((two / "paper.json").read_text(encoding="utf-8"))
    assert info["setting"]["epochs"] == 2 and {r["steps"] for r in info["pretrain_runs"].values()} == {32}


@pytest.mark.parametrize("extra, message", [(["--methods", "drasclr,simclr"], "unknown ['simclr']"),
                                            (["--methods", "drasclr"], "add them to --methods")])
def test_bench_paper_methods_are_checked(extra, message, tmp_path, capsys):
    """A misspelt method, or segmentation without the checkpoints it fine-tunes, stops before any work."""
    with pytest.raises(SystemExit):
        _bench_module().main(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"), *extra])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_paper", ROOT / "benchmarks" / "bench_paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_columns_follow_the_generator(monkeypatch):
    """The oracle takes the generator's own list when it has one, else the documented default."""
    from drasclr_lib.data.synthetic import clinical

    bench = _bench_module()
    table = pd.DataFrame(columns=["sid", "airway_wall", "age", "emph_panlobular", "texture"])
    monkeypatch.delattr(clinical, "ORACLE_COLUMNS", raising=False)
    present, missing = bench.oracle_columns(table)
    assert present == ["emph_panlobular", "airway_wall", "age"] and "mucus_plugging" in missing
    monkeypatch.setattr(clinical, "ORACLE_COLUMNS", ("texture", "airway_wall", "gone"), raising=False)
    assert bench.oracle_columns(table) == (["texture", "airway_wall"], ["gone"])
    assert bench.split_name("qct+drasclr@2") == ("qct+drasclr", 2.0)
    assert bench.split_name("qct")[0] == "qct" and np.isnan(bench.split_name("qct")[1])


class _Bar:
    """What run_jobs needs of the tqdm bar."""

    def __init__(self):
        self.said = []

    def set_postfix_str(self, text):
        self.said.append(text)


def test_run_jobs_runs_n_at_a_time_on_their_share_of_the_cores(monkeypatch):
    """--jobs 2: the runs go to two spawned processes with cores // 2 torch threads each, results keyed
    in the order given; --jobs 1 runs them here; a failing run raises once the others are done."""
    import os

    import torch

    bench = _bench_module()
    monkeypatch.setattr("drasclr_lib.preprocess.resample.available_cores", lambda: 4)
    jobs = {f"run{i}": () for i in range(5)}
    pids = bench.run_jobs(os.getpid, jobs, 2, _Bar(), "probe")
    assert list(pids) == list(jobs)
    assert os.getpid() not in pids.values() and 1 <= len(set(pids.values())) <= 2
    assert set(bench.run_jobs(torch.get_num_threads, jobs, 2, _Bar(), "probe").values()) == {2}
    assert set(bench.run_jobs(os.getpid, jobs, 1, _Bar(), "probe").values()) == {os.getpid()}
    with pytest.raises(ValueError, match="invalid literal"):
        bench.run_jobs(int, {"ok": ("1",), "bad": ("x",), "ok2": ("2",)}, 2, _Bar(), "probe")


def test_jobs_auto_is_two_on_a_multicore_cpu_and_one_elsewhere(monkeypatch, tmp_path, capsys):
    bench = _bench_module()
    monkeypatch.setattr("drasclr_lib.preprocess.resample.available_cores", lambda: 2)
    assert bench.resolve_jobs("auto", "cpu") == 2 and bench.resolve_jobs("3", "cpu") == 3
    monkeypatch.setattr("drasclr_lib.preprocess.resample.available_cores", lambda: 1)
    assert bench.resolve_jobs("auto", "cpu") == 1
    # an unknown method too: were --jobs 0 accepted, that error (not the benchmark) stops main here
    with pytest.raises(SystemExit):
        bench.main(["--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--jobs", "0",
                    "--methods", "not-a-method"])
    assert "--jobs must be 'auto' or a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_segmentation_jobs_leave_the_runs_the_stage_then_reads(paper_store, tmp_path, monkeypatch):
    """With --jobs > 1 each init x fraction fine-tunes in its own job; the stage's full call then
    finds every run in the cache (same subsets, same keys) and trains none again."""
    from drasclr_lib.data.patch_store import PatchStore
    from drasclr_lib.segmentation import SegConfig
    from drasclr_lib.segmentation import experiment as ex

    bench = _bench_module()
    store = PatchStore(paper_store)
    train_pool, test_idx = ex.split_subjects(store, test_fraction=0.25, seed=0)
    cfg = SegConfig(num_classes=4, steps=2, batch_size=2, eval_patches=2, device="cpu")
    for f in (0.5, 1.0):
        bench._segmentation_job(str(store.root), train_pool, test_idx, f, "random", None, (0,), cfg, None, tmp_path)
    assert len(list(tmp_path.glob("random_n*_s0.json"))) == 2
    monkeypatch.setattr(ex, "train_segmenter", lambda *a, **k: pytest.fail("a run the jobs made was trained again"))
    runs = ex.label_efficiency(store, train_subjects=train_pool, test_subjects=test_idx, fractions=(0.5, 1.0),
                               inits={"random": None}, seeds=(0,), cfg=cfg, cache_dir=tmp_path, progress=False)
    assert list(runs["fraction"]) == [0.5, 1.0] and runs["n_labelled"].is_monotonic_increasing
