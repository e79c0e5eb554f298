"""The learning curve of ``bench_paper.py``: its paired differences at two or more pretraining budgets,
and the budget at which each one would reach zero or exclude it (issue 17).

Each budget is one ``bench_paper.py`` results folder, run on the same cohort and folds with another
``--max-steps`` (and, to save time, ``--methods drasclr,moco --no-segmentation`` and fewer seeds at
the long budget)::

    python benchmarks/bench_paper.py --work /tmp/bp                   # 200 steps, the documented setting
    S=/tmp/bp/n150_seed17_demo/patch_store
    python benchmarks/bench_paper.py --store $S --work /tmp/lc50 --max-steps 50 \\
        --methods drasclr,moco --no-segmentation --results benchmarks/results/paper_steps50
    python benchmarks/bench_paper.py --store $S --work /tmp/lc800 --max-steps 800 --seeds 1 \\
        --methods drasclr,moco --no-segmentation --results benchmarks/results/paper_epoch1
    python benchmarks/paper_learning_curve.py benchmarks/results/paper_steps50 \\
        benchmarks/results/paper benchmarks/results/paper_epoch1

(``--max-steps 800`` is more than the 588 steps of one epoch of this store, where ``bench_paper``
stops: the last budget is the whole one-epoch schedule, and the shorter ones are its beginning.)

The budget is given in **epochs**: anchors seen (steps x batch) over the subject-locations of the
store (subjects x its locations: 581 on the atlas's grid, fewer at the synthetic demo size), the unit of the paper's schedule (20 epochs). For each of the three pairs the
write-up reads (:data:`PAIRS`: DrasCLR - MoCo, DrasCLR - qct, qct+DrasCLR - qct; a subset of
``bench_paper.PAIRS``) and every task's primary metric, the difference is fitted by least squares
as ``a + b log10(epochs)`` over the budgets; where the slope is positive and the difference at the
largest budget is not yet above zero, the fit is extrapolated to the budget where the difference
would be 0 and where it would equal the half-width of its largest-budget interval (i.e. exclude
zero if the width stayed the same), and converted to the hours of one DrasCLR pretraining run at the
fastest measured seconds per DrasCLR step over the budgets (``paper.json``'s ``pretrain_runs``, else the runs'
``history.csv``; only where no budget has either, the pretraining stage's average over all methods; the
least disturbed by other jobs and by start-up). With two or three budgets this is a rough projection, and it says so:
``learning_curve.json`` keeps every input figure.

Writes ``learning_curve.csv`` (one row per pair, task and budget), ``projection.csv`` (one row per
pair and task), ``learning_curve.png`` and ``learning_curve.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: the pairs the curve follows (a - b)
PAIRS = (("drasclr", "moco"), ("drasclr", "qct"), ("qct+drasclr", "qct"))
PAPER_EPOCHS = 20


def load_budget(folder: Path) -> dict:
    """One results folder of ``bench_paper.py``: its budget and its paired differences.

    Returns:
        dict with ``folder``, ``steps`` (trained: ``paper.json``'s ``pretrain_runs``, else
        ``--max-steps``), ``batch``, ``subjects``, ``locations``, ``seeds``,
        ``epochs`` (steps x batch / (subjects x locations)), ``s_per_step`` (a DrasCLR step:
        :func:`drasclr_seconds_per_step`; else the pretraining stage's seconds over runs x steps; NaN when
        unknown), ``s_per_step_source`` and ``paired`` (the ``paired.csv`` DataFrame).

    Raises:
        FileNotFoundError: naming the folder, when ``paper.json`` or ``paired.csv`` is missing.
    """
    import pandas as pd

    info_path, paired_path = folder / "paper.json", folder / "paired.csv"
    for p in (info_path, paired_path):
        if not p.is_file():
            raise FileNotFoundError(f"{folder}: no {p.name}; is it a bench_paper.py results folder?")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    setting = info["setting"]
    batch = int(setting.get("batch_size_used", setting["batch_size"]))
    # the steps the runs trained (bench_paper stops at one epoch, whatever --max-steps asked)
    trained = [int(r["steps"]) for r in info.get("pretrain_runs", {}).values() if r.get("steps")]
    steps = max(trained) if trained else int(setting["max_steps"])
    subjects, locations = int(info["num_subjects"]), int(info["num_locations"])
    methods = setting.get("methods", ["drasclr", "moco", "drasclr_no_nbr", "random"])
    runs = sum(m != "random" for m in methods) * int(setting["seeds"])
    pretrain_s = info.get("timings_total_s", {}).get("pretrain", float("nan"))
    s_step, source = (pretrain_s / (runs * steps) if runs else float("nan")), "pretrain stage / runs x steps"
    drasclr, where = drasclr_seconds_per_step(info)
    if drasclr == drasclr:
        s_step, source = drasclr, where
    return {"folder": str(folder), "steps": steps, "batch": batch, "subjects": subjects, "locations": locations,
            "seeds": int(setting["seeds"]), "epochs": steps * batch / (subjects * locations),
            "s_per_step": s_step, "s_per_step_source": source, "paired": pd.read_csv(paired_path)}


def drasclr_seconds_per_step(info: dict) -> tuple[float, str]:
    """Median seconds per step of the DrasCLR runs of one ``paper.json``: from its ``pretrain_runs``
    (recorded by ``bench_paper.py``), else from the ``history.csv`` of each run named in its
    ``weights``; ``(NaN, "")`` when neither is readable (an older results folder whose cache moved).

    Returns:
        ``(seconds, source)``, source ``"DrasCLR runs (paper.json)"`` or ``"DrasCLR runs' history.csv"``.
    """
    import numpy as np
    import pandas as pd

    recorded = [r.get("s_per_step") for name, r in info.get("pretrain_runs", {}).items()
                if name.split("@")[0] == "drasclr"]
    recorded = [float(r) for r in recorded if r]
    if recorded:
        return float(np.median(recorded)), "DrasCLR runs (paper.json)"
    rates = []
    for name, where in info.get("weights", {}).items():
        if name.split("@")[0] != "drasclr":
            continue
        history = Path(where.rsplit(" (", 1)[0]).parent / "history.csv"
        try:
            h = pd.read_csv(history)
            rates.append(float(h["seconds"].iloc[-1]) / float(h["step"].iloc[-1]))
        except (OSError, KeyError, IndexError, ValueError, ZeroDivisionError):
            continue
    return (float(np.median(rates)), "DrasCLR runs' history.csv") if rates else (float("nan"), "")


def curve(budgets: list[dict], primary: dict) -> "pd.DataFrame":  # noqa: F821
    """Long table: ``a, b, task, metric, epochs, steps, seeds, diff, ci_low, ci_high, p`` over the budgets."""
    import pandas as pd

    rows = []
    for b in budgets:
        pr = b["paired"]
        for a, c in PAIRS:
            for task, metric in primary.items():
                sel = pr[(pr.a == a) & (pr.b == c) & (pr.task == task) & (pr.metric == metric)]
                if sel.empty:
                    continue
                r = sel.iloc[0]
                rows.append({"a": a, "b": c, "task": task, "metric": metric, "epochs": b["epochs"],
                             "steps": b["steps"], "seeds": b["seeds"], "diff": r["diff"], "ci_low": r["ci_low"],
                             "ci_high": r["ci_high"], "p": r["p"]})
    return pd.DataFrame(rows).sort_values(["a", "b", "task", "epochs"], ignore_index=True)


def project(points: "pd.DataFrame", s_per_step: float, batch: int, subjects: int, locations: int) -> dict:  # noqa: F821
    """Fit ``diff = a + b log10(epochs)`` over one pair and task; where it would reach 0 and significance.

    Args:
        points: rows of :func:`curve` for one pair and task (at least two budgets to fit).
        s_per_step: pretraining seconds per step (of ``batch``) used to turn epochs into hours.
        batch, subjects, locations: of the largest budget.

    Returns:
        dict with ``slope_per_decade``, ``intercept``, ``status`` and, when projected,
        ``epochs_zero`` (NaN when the mean is already above zero), ``epochs_significant``,
        ``hours_zero``, ``hours_significant`` (one run, at ``s_per_step``) and
        ``within_paper_schedule`` (``epochs_significant`` <= the paper's 20 epochs). ``status``:
        ``"already significant"`` (the largest budget's interval is above zero), ``"not improving
        with budget"`` (slope <= 0), ``"above zero, not yet significant"``, ``"fit"`` (below zero
        and improving) or ``"one budget"``.
    """
    import numpy as np

    pts = points.dropna(subset=["diff"])
    last = pts.iloc[-1] if len(pts) else None
    out = {"n_budgets": int(len(pts)), "slope_per_decade": float("nan"), "intercept": float("nan")}
    if len(pts) < 2:
        return {**out, "status": "one budget"}
    x = np.log10(pts["epochs"].to_numpy(float))
    slope, intercept = np.polyfit(x, pts["diff"].to_numpy(float), 1)
    out.update(slope_per_decade=float(slope), intercept=float(intercept))
    if last["ci_low"] > 0:
        return {**out, "status": "already significant"}
    if slope <= 0:
        return {**out, "status": "not improving with budget"}
    half = (last["ci_high"] - last["ci_low"]) / 2
    to_hours = subjects * locations / batch * s_per_step / 3600  # hours per epoch
    above = last["diff"] > 0
    e0 = float("nan") if above else 10 ** (-intercept / slope)
    es = 10 ** ((half - intercept) / slope)
    return {**out, "status": "above zero, not yet significant" if above else "fit",
            "epochs_zero": float(e0), "epochs_significant": float(es), "hours_zero": float(e0 * to_hours),
            "hours_significant": float(es * to_hours), "within_paper_schedule": bool(es <= PAPER_EPOCHS)}


def plot(table, primary: dict, path: Path) -> None:
    """One panel per task: each pair's difference and interval against the budget (log epochs)."""
    import matplotlib.pyplot as plt

    tasks = [t for t in primary if (table.task == t).any()]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(2.8 * max(len(tasks), 1), 3.4), squeeze=False)
    colors = {p: c for p, c in zip(PAIRS, ("tab:blue", "tab:orange", "tab:green"))}
    for ax, task in zip(axes[0], tasks):
        for k, (a, b) in enumerate(PAIRS):
            part = table[(table.task == task) & (table.a == a) & (table.b == b)]
            if part.empty:
                continue
            x = part.epochs.to_numpy(float) * (1 + 0.06 * (k - 1))  # side by side on the log axis
            y = part["diff"].to_numpy(float)
            ax.errorbar(x, y, yerr=[y - part.ci_low.to_numpy(float), part.ci_high.to_numpy(float) - y],
                        marker="o", ms=3, capsize=2, color=colors[(a, b)], label=f"{a} - {b}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{task}\n{primary[task]}", fontsize=8)
        ax.set_xlabel("pretraining epochs", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle("paired difference and 95 % interval against the pretraining budget", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="bench_paper.py results folders, one per budget")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "paper_learning_curve"))
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    from drasclr_lib.utils import atomic_path, save_json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_paper import PRIMARY

    budgets = sorted((load_budget(Path(f)) for f in args.folders), key=lambda b: b["epochs"])
    if len({(b["subjects"], b["locations"]) for b in budgets}) > 1:
        raise SystemExit("paper_learning_curve: the folders come from stores of different sizes: "
                         + ", ".join(f"{b['folder']} ({b['subjects']} subjects)" for b in budgets))
    table = curve(budgets, PRIMARY)
    big = budgets[-1]
    # the fastest measured step: the least disturbed by other jobs and by start-up over few steps
    # (a DrasCLR run's own history first: the stage average mixes in the faster MoCo steps)
    timed = [b for b in budgets if b["s_per_step"] == b["s_per_step"]]
    own = [b for b in timed if b["s_per_step_source"].startswith("DrasCLR")]
    s_step = min((b["s_per_step"] for b in (own or timed)), default=float("nan"))
    rows = []
    for (a, b, task, metric), part in table.groupby(["a", "b", "task", "metric"], sort=False):
        rows.append({"a": a, "b": b, "task": task, "metric": metric,
                     **project(part, s_step, big["batch"], big["subjects"], big["locations"])})
    proj = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in (("learning_curve.csv", table), ("projection.csv", proj)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    plot(table, PRIMARY, out / "learning_curve.png")
    save_json({"budgets": [{k: v for k, v in b.items() if k != "paired"} for b in budgets],
               "paper_epochs": PAPER_EPOCHS, "s_per_step_used": s_step,
               "fit": "diff = a + b log10(epochs), least squares over the budgets; hours for one pretraining run",
               "projection": rows}, out / "learning_curve.json")
    pd.set_option("display.width", 200)
    print(table.round(3).to_string(index=False))
    show = proj[["a", "b", "task", "status", "slope_per_decade", "epochs_zero", "epochs_significant",
                 "hours_significant"]] if "epochs_zero" in proj else proj
    pd.set_option("display.float_format", lambda v: f"{v:.3g}")
    print(show.round(3).to_string(index=False))
    print(f"[paper_learning_curve] budgets (epochs): {[round(b['epochs'], 4) for b in budgets]}; "
          f"{s_step:.2f} s a step; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
