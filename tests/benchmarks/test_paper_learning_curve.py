"""``benchmarks/paper_learning_curve.py``: budgets in epochs, the log-linear fit and its projection,
on results folders written here with known differences."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("paper_learning_curve", ROOT / "benchmarks" / "paper_learning_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _budget(folder: Path, steps: int, diffs: dict, half: float = 0.02, pretrain_s: float | None = None,
            subjects: int = 100, methods=("drasclr", "moco"), rates: dict | None = None,
            recorded: dict | None = None, asked: int | None = None) -> Path:
    """A results folder: ``steps`` of batch 32 on ``subjects`` x 581; ``diffs`` {(a, b, task): diff};
    ``rates`` {"method@seed": seconds per step} writes those runs' ``history.csv``; ``recorded``
    (the same) goes into ``paper.json``'s ``pretrain_runs``; ``asked``: a ``--max-steps`` larger than
    the ``steps`` the runs trained (bench_paper stops at one epoch)."""
    folder.mkdir(parents=True)
    info = {"setting": {"max_steps": asked or steps, "batch_size": 32, "batch_size_used": 32, "seeds": 2,
                        "methods": list(methods)},
            "num_subjects": subjects, "num_locations": 581, "timings_total_s": {}, "weights": {}}
    for name, rate in (rates or {}).items():
        run = folder / "runs" / name.replace("@", "_")
        run.mkdir(parents=True)
        pd.DataFrame({"step": [10, steps], "seconds": [10 * rate + 5, steps * rate]}).to_csv(run / "history.csv")
        info["weights"][name] = f"{run / 'checkpoint.pt'} (trained)"
    if recorded:
        info["pretrain_runs"] = {k: {"precision": "fp32", "steps": steps, "s_per_step": v} for k, v in recorded.items()}
    if pretrain_s is not None:
        info["timings_total_s"]["pretrain"] = pretrain_s
    (folder / "paper.json").write_text(json.dumps(info), encoding="utf-8")
    metric = {"FEV1pp": "r2", "survival": "c_index"}
    rows = [{"a": a, "b": b, "task": t, "metric": metric[t], "diff": d, "ci_low": d - half, "ci_high": d + half,
             "p": 0.5} for (a, b, t), d in diffs.items()]
    rows.append({"a": "drasclr", "b": "moco", "task": "FEV1pp", "metric": "mae", "diff": 9.0, "ci_low": 8.0,
                 "ci_high": 10.0, "p": 0.01})  # not the primary metric: ignored
    pd.DataFrame(rows).to_csv(folder / "paired.csv", index=False)
    return folder


def test_epochs_fit_and_projection(tmp_path, capsys):
    mod = _module()
    n_loc = 100 * 581
    # epochs = steps * 32 / (100 * 581): choose steps so that the budgets are 0.01, 0.1 and 0.5 epochs
    s1, s2, s3 = round(0.01 * n_loc / 32), round(0.1 * n_loc / 32), round(0.5 * n_loc / 32)
    e1, e2, e3 = s1 * 32 / n_loc, s2 * 32 / n_loc, s3 * 32 / n_loc
    # DrasCLR - MoCo on FEV1pp gains 0.05 per decade of budget, reaching 0 at 1 epoch (by construction);
    # DrasCLR - qct loses with budget; qct+DrasCLR - qct is already above zero with its interval;
    # DrasCLR - MoCo on survival is above zero in the mean only, gaining 0.005 a decade (+0.015 at 1 epoch)
    d = lambda e: 0.05 * math.log10(e)  # noqa: E731
    sv = lambda e: 0.015 + 0.005 * math.log10(e)  # noqa: E731
    # b1's DrasCLR runs took 1.2 and 1.4 s a step (median 1.3; MoCo's faster steps are not DrasCLR's)
    b1 = _budget(tmp_path / "b1", s1, {("drasclr", "moco", "FEV1pp"): d(e1), ("drasclr", "qct", "FEV1pp"): -0.1,
                                       ("qct+drasclr", "qct", "FEV1pp"): 0.05,
                                       ("drasclr", "moco", "survival"): sv(e1)},
                 rates={"drasclr@0": 1.2, "drasclr@1": 1.4, "moco@0": 0.3}, pretrain_s=999.0)
    # b2 recorded its DrasCLR runs in paper.json (1.35 s a step; its cache has gone); it asked for
    # more steps than one epoch and stopped at s2
    b2 = _budget(tmp_path / "b2", s2, {("drasclr", "moco", "FEV1pp"): d(e2), ("drasclr", "qct", "FEV1pp"): -0.2,
                                       ("qct+drasclr", "qct", "FEV1pp"): 0.06,
                                       ("drasclr", "moco", "survival"): sv(e2)},
                 recorded={"drasclr@0": 1.35, "moco@0": 0.2}, pretrain_s=999.0, asked=3 * s2)
    # b3 has neither: 2 pretrained methods x 2 seeds x s3 steps took 4 * s3 * 1.0 s, 1.0 s a step
    # averaged over DrasCLR and the faster MoCo: faster than the others' DrasCLR steps, but not a DrasCLR step
    b3 = _budget(tmp_path / "b3", s3, {("drasclr", "moco", "FEV1pp"): d(e3), ("drasclr", "qct", "FEV1pp"): -0.3,
                                       ("qct+drasclr", "qct", "FEV1pp"): 0.07,
                                       ("drasclr", "moco", "survival"): sv(e3)}, pretrain_s=4 * s3 * 1.0)
    out = tmp_path / "out"
    assert mod.main([str(b3), str(b2), str(b1), "--out", str(out)]) == 0  # any order: sorted by budget
    table = pd.read_csv(out / "learning_curve.csv")
    assert set(table.metric) == {"r2", "c_index"} and len(table) == 12
    assert table[(table.a == "drasclr") & (table.b == "moco") & (table.task == "FEV1pp")].epochs.tolist() == pytest.approx([e1, e2, e3])
    proj = pd.read_csv(out / "projection.csv").set_index(["a", "b", "task"])
    row = proj.loc[("drasclr", "moco", "FEV1pp")]
    assert row.status == "fit" and row.slope_per_decade == pytest.approx(0.05)
    assert row.epochs_zero == pytest.approx(1.0)
    assert row.epochs_significant == pytest.approx(10 ** (0.02 / 0.05))  # the largest budget's half-width
    hours_per_epoch = n_loc / 32 * 1.3 / 3600  # the DrasCLR runs' own steps before the stage average
    assert row.hours_significant == pytest.approx(row.epochs_significant * hours_per_epoch)
    assert bool(row.within_paper_schedule)  # 2.5 epochs <= the paper's 20
    assert proj.loc[("drasclr", "qct", "FEV1pp")].status == "not improving with budget"
    assert proj.loc[("qct+drasclr", "qct", "FEV1pp")].status == "already significant"
    surv = proj.loc[("drasclr", "moco", "survival")]
    assert surv.status == "above zero, not yet significant" and math.isnan(surv.epochs_zero)
    assert surv.epochs_significant == pytest.approx(10.0)  # 0.015 + 0.005 log10(e) = the half-width 0.02
    assert (out / "learning_curve.png").stat().st_size > 0
    info = json.loads((out / "learning_curve.json").read_text(encoding="utf-8"))
    assert info["s_per_step_used"] == pytest.approx(1.3) and len(info["budgets"]) == 3
    assert [b["s_per_step_source"] for b in info["budgets"]] == ["DrasCLR runs' history.csv",
                                                                 "DrasCLR runs (paper.json)",
                                                                 "pretrain stage / runs x steps"]
    assert [b["s_per_step"] for b in info["budgets"]] == pytest.approx([1.3, 1.35, 1.0])
    assert "drasclr" in capsys.readouterr().out


def test_one_budget_is_not_projected(tmp_path):
    mod = _module()
    b1 = _budget(tmp_path / "b1", 100, {("drasclr", "moco", "FEV1pp"): -0.1})
    mod.main([str(b1), "--out", str(tmp_path / "out")])
    assert pd.read_csv(tmp_path / "out" / "projection.csv").status.tolist() == ["one budget"]


def test_folders_must_share_a_store_and_be_results(tmp_path):
    mod = _module()
    b1 = _budget(tmp_path / "b1", 100, {("drasclr", "moco", "FEV1pp"): -0.1})
    b2 = _budget(tmp_path / "b2", 200, {("drasclr", "moco", "FEV1pp"): -0.1}, subjects=50)
    with pytest.raises(SystemExit, match="different sizes"):
        mod.main([str(b1), str(b2), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="no paper.json"):
        mod.main([str(tmp_path), "--out", str(tmp_path / "out")])
