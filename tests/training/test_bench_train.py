"""``benchmarks/bench_train.py --quick`` runs end to end on a toy store and writes its JSON.

About 40 s on 2 free cores (five configurations, each in its own process: the whole ``pretrain``
step in float32 and in the default settings, the model step in both, the published step).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_train_quick(tmp_path):
    out = tmp_path / "train_quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text(encoding="utf-8"))
    kinds = {(r["kind"], r["path"]) for r in res["rows"]}
    assert {("whole", "baseline"), ("whole", "new"), ("model", "baseline"), ("model", "new")} <= kinds
    published = (ROOT.parent / "shared" / "reference" / "published_code").is_dir()
    assert (("published", "published") in kinds) == published
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["anchors_per_s"] > 0 and r["peak_rss_mib"] > 100 and r["gflops"] > 0
    base = next(r for r in res["rows"] if r["kind"] == "whole" and r["path"] == "baseline")
    assert base["precision"] == "fp32" and base["memory_format"] == "contiguous" and base["host_memory"] == "system"
    # ~1.9 GFLOP per anchor at batch >= 16 (q fwd+bwd, k fwd, 2 neighbours fwd+bwd); at --quick's batch 4 torch's
    # FLOP counter also counts a near-constant ~13 GFLOP of convolution_backward per step, so only a floor here
    assert res["gflop_per_anchor"] > 1.5
    assert res["machine"]["peak_gflops"]["fp32"] > 0 and "cores" in res["machine"]["peak_gflops"]["formula"]
    assert "| batch | step |" in proc.stdout
