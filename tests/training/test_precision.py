"""The fast pretraining settings (``precision``, ``memory_format``) do not change what is learned.

* The same short run (3 epochs of a small store, 24 steps) in float32 and in the default precision
  (``"auto"``: bfloat16 autocast on a CPU with native bfloat16) gives the same loss curve: every
  history row within ``LOSS_ATOL`` (0.15) of float32's, and the curves' means within 0.05. Measured
  (2-core AMD EPYC with AVX512-BF16, torch 2.13): largest row difference ~0.03-0.06, losses ~4-5;
  the two runs see the same batches and views, so what differs is bfloat16 rounding in the encoders
  (8-bit mantissa, ~0.4 % per operation) carried through 24 SGD steps. A precision that breaks
  learning (garbage gradients, the loss in bfloat16, ...) moves the curve by far more (the
  tiny-map weight gradient bug in oneDNN turned it into NaN within 2-6 steps).
* ``resolve_speed`` picks bfloat16 only where the CPU has it, float16 only on CUDA, and float32
  with ``amp=False``; ``config.json`` records the settings a run used and the start banner prints them.
* Resuming a run in another precision warns; in the same one it stays exact (``test_train.py``).
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch

from drasclr_lib.testing import make_toy_store
from drasclr_lib.training import PretrainConfig, pretrain
from drasclr_lib.training.config import cpu_has_bf16, resolve_speed

LOSS_ATOL = 0.15  # per history row (mean of 2 steps), losses ~4-5
MEAN_ATOL = 0.05  # mean over the run's rows

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16: 'auto' is float32 here")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("store"), n_subjects=8, grid=(2, 2, 1), patch_size=16)


def _cfg(store, out, **kw):
    base = dict(store=str(store), out_dir=str(out), epochs=3, batch_size=4, queue_size=4, workers=0, log_every=2,
                progress=False, tensorboard=False, save_every_steps=0, lr=0.05, scale_lr=False, device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


@needs_bf16
def test_default_precision_learns_the_float32_loss_curve(small_store, tmp_path):
    fp32 = pd.read_csv(pretrain(_cfg(small_store, tmp_path / "fp32", precision="fp32",
                                     memory_format="contiguous")).parent / "history.csv")
    default_out = tmp_path / "default"
    fast = pd.read_csv(pretrain(_cfg(small_store, default_out)).parent / "history.csv")
    effective = json.loads((default_out / "config.json").read_text(encoding="utf-8"))["effective"]
    assert effective["precision"] == "bf16" and effective["memory_format"] == "channels_last"
    assert len(fp32) == len(fast) == 12 and fp32["step"].tolist() == fast["step"].tolist()
    for col in ("loss", "loss_local", "loss_neighbor"):
        diff = (fast[col] - fp32[col]).abs()
        assert diff.max() <= LOSS_ATOL, f"{col}: largest row difference {diff.max():.3f}\n{fp32[col]}\n{fast[col]}"
        assert abs(fast[col].mean() - fp32[col].mean()) <= MEAN_ATOL, col
    assert fast["loss"].notna().all()


def test_resolve_speed(monkeypatch):
    from drasclr_lib.training import config

    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: True)
    assert resolve_speed(PretrainConfig(), cpu) == {"precision": "bf16", "memory_format": "channels_last"}
    assert resolve_speed(PretrainConfig(amp=False), cpu)["precision"] == "fp32"
    assert resolve_speed(PretrainConfig(precision="fp32", memory_format="contiguous"), cpu) == {
        "precision": "fp32", "memory_format": "contiguous"}
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)
    assert resolve_speed(PretrainConfig(), cpu)["precision"] == "fp32"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_speed(PretrainConfig(precision="fp16"), cpu)
    with pytest.raises(ValueError, match="precision"):
        PretrainConfig(precision="int8")
    with pytest.raises(ValueError, match="memory_format"):
        PretrainConfig(memory_format="nhwc")


def test_settings_printed_recorded_and_a_precision_change_on_resume_warns(small_store, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain(_cfg(small_store, out, precision="fp32", memory_format="channels_last", max_steps=2))
    banner = capsys.readouterr().out
    assert "precision fp32 (asked fp32)" in banner and "channels_last convolutions" in banner
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert saved["precision"] == "fp32" and saved["effective"]["precision"] == "fp32"
    assert saved["effective"]["memory_format"] == "channels_last"
    with warnings.catch_warnings(record=True) as caught:  # same precision: no warning
        warnings.simplefilter("always")
        pretrain(_cfg(small_store, out, precision="fp32", max_steps=3, resume=True))
    assert not [w for w in caught if "resumes in" in str(w.message)]
    if cpu_has_bf16():
        with pytest.warns(UserWarning, match="trained in fp32 and resumes in bf16"):
            pretrain(_cfg(small_store, out, precision="bf16", max_steps=4, resume=True))
