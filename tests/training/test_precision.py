"""The fast pretraining settings (``precision``, ``memory_format``) do not change what is learned.

* The same short run (32³ patches, 20 subjects, 4 locations, batch 8, 1 neighbour, 3 epochs = 24
  steps) in float32 and in bfloat16 (the default, ``"auto"``, on a CPU with bfloat16 instructions;
  run on any CPU where oneDNN computes bfloat16, emulated or not) gives the same loss curve within what the seed alone changes: every epoch's
  mean loss within ``EPOCH_ATOL`` (0.75) of float32's. Measured (2-core AMD EPYC with
  AVX512-BF16, torch 2.13), epoch means [e0, e1, e2]: float32 seed 0 [3.05, 4.59, 4.79], float32
  seed 1 [2.89, 4.41, 4.23], bfloat16 seed 0 [3.13, 4.39, 4.18]: bfloat16 moves the curve by
  0.08 / 0.20 / 0.61, the seed by 0.16 / 0.18 / 0.56. (With the same seed, the float32 run in the
  channels-last layout stays within 0.04 of the contiguous one: that is rounding-order noise;
  bfloat16's ~2 % error on the embeddings, divided by the temperature 0.2, moves the logits
  enough that the trajectories part like two seeds do.) A broken precision fails this: the
  oneDNN tiny-map gradient bug made the loss NaN within 2-6 steps; a loss computed in bfloat16
  is caught by ``test_losses_stay_float32_under_autocast``.
* ``resolve_speed`` picks bfloat16 only where the CPU has bfloat16 instructions (emulated bfloat16
  was 0.68x float32's speed), float16 only on CUDA, and float32 with ``amp=False``; ``config.json`` records the settings a run used and the start banner prints them.
* Resuming a run in another precision warns; in the same one it stays exact (``test_train.py``).
"""

from __future__ import annotations

import json
import locale
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from drasclr_lib.testing import make_toy_store
from drasclr_lib.training import PretrainConfig, pretrain, pretrain_model
from drasclr_lib.training.config import cpu_has_bf16, resolve_speed

EPOCH_ATOL = 0.75  # per epoch mean loss (losses 3-5); the seed-to-seed spread measured up to 0.56

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="oneDNN computes no bfloat16 on this CPU")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("store"), n_subjects=8, grid=(2, 2, 1), patch_size=16)


def _cfg(store, out, **kw):
    base = dict(store=str(store), out_dir=str(out), epochs=3, batch_size=4, queue_size=4, workers=0, log_every=2,
                progress=False, tensorboard=False, save_every_steps=0, lr=0.05, scale_lr=False, device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def store32(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("store32"), n_subjects=20, grid=(2, 2, 1), patch_size=32)


@needs_bf16
@pytest.mark.slow
def test_bf16_learns_the_float32_loss_curve(store32, tmp_path):
    kw = dict(batch_size=8, queue_size=8, lr=0.01, num_neighbors=1)
    fp32 = pd.read_csv(pretrain(_cfg(store32, tmp_path / "fp32", precision="fp32", memory_format="contiguous",
                                     **kw)).parent / "history.csv")
    default_out = tmp_path / "bf16"
    fast = pd.read_csv(pretrain(_cfg(store32, default_out, precision="bf16", **kw)).parent / "history.csv")
    effective = json.loads((default_out / "config.json").read_text(encoding="utf-8"))["effective"]
    assert effective["precision"] == "bf16" and effective["memory_format"] == "contiguous"
    assert len(fp32) == len(fast) == 12 and fp32["step"].tolist() == fast["step"].tolist()
    assert fast["loss"].notna().all() and (fast["loss"] < 20).all()
    a, b = fp32.groupby("epoch")["loss"].mean(), fast.groupby("epoch")["loss"].mean()
    assert ((a - b).abs() <= EPOCH_ATOL).all(), f"epoch means float32 {a.round(3).tolist()} vs bf16 {b.round(3).tolist()}"
    # what the neighbour loss and accuracy learn stays close too
    assert abs(fast["loss_neighbor"].mean() - fp32["loss_neighbor"].mean()) <= EPOCH_ATOL
    assert abs(fast["acc1"].mean() - fp32["acc1"].mean()) <= 25  # percent, batch 8 + queue 8: 9 classes


def test_losses_stay_float32_under_autocast():
    from drasclr_lib.models import DrasCLR, DrasEncoder

    torch.manual_seed(0)
    model = DrasCLR(DrasEncoder(), num_locations=2, queue_size=8).train()
    x = torch.rand(4, 1, 32, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x, 0, torch.zeros(4, 3), x_nbr=x[:, None], nbr_locs=torch.zeros(4, 1, 3),
                    subjects=torch.arange(4))
    assert out["logits"].dtype == out["loss"].dtype == out["logits_neighbor"].dtype == torch.float32
    assert model.queue.dtype == torch.float32


def test_resolve_speed(monkeypatch):
    from drasclr_lib.training import config

    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "cpu_bf16_fast", lambda: True)
    speed = resolve_speed(PretrainConfig(), cpu)
    assert speed["precision"] == "bf16" and speed["memory_format"] == "contiguous"
    assert speed["host_memory"] in ("keep", "system")  # keep with glibc (tests/training/test_host_memory.py)
    assert resolve_speed(PretrainConfig(amp=False), cpu)["precision"] == "fp32"
    assert resolve_speed(PretrainConfig(precision="fp32", memory_format="contiguous", host_memory="system"), cpu) == {
        "precision": "fp32", "memory_format": "contiguous", "host_memory": "system"}
    monkeypatch.setattr(config, "cpu_bf16_fast", lambda: False)
    assert resolve_speed(PretrainConfig(), cpu)["precision"] == "fp32"
    assert resolve_speed(PretrainConfig(precision="bf16"), cpu)["precision"] == "bf16"  # asked for: allowed


def test_auto_bf16_needs_the_cpus_bfloat16_instructions(monkeypatch, tmp_path):
    """oneDNN runs bfloat16 on any AVX-512 CPU; without AVX512-BF16 or AMX it is emulated and slower."""
    from drasclr_lib.training import config

    cpu = torch.device("cpu")
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: True)
    read_flags = config._cpu_flags
    avx512 = "fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512dq avx512_vnni"
    for flags, expect in [(avx512, "fp32"), (avx512 + " avx512_bf16", "bf16"), (avx512 + " amx_bf16 amx_tile", "bf16"),
                          ("", "fp32")]:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbogomips\t: 4600\n", encoding="utf-8")
        monkeypatch.setattr(config, "_cpu_flags", lambda: read_flags(cpuinfo))
        assert resolve_speed(PretrainConfig(), cpu)["precision"] == expect, flags
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: False)  # the flags without oneDNN's bfloat16: fp32
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


def test_loader_workers_leave_the_cpu_cores_to_the_training_threads(monkeypatch):
    import drasclr_lib.training.config as config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(config, "_usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert config.loader_workers(PretrainConfig(workers=2), cpu) == 0  # 2 cores, 2 threads: none to spare
    assert config.loader_workers(PretrainConfig(workers=2), cuda) == 2  # the GPU computes, the cores load
    assert config.loader_workers(PretrainConfig(workers=2), cpu, augment_on_device=True) == 2
    monkeypatch.setattr(config, "_usable_cores", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert config.loader_workers(PretrainConfig(workers=4), cpu) == 4
    assert config.loader_workers(PretrainConfig(workers=12), cpu) == 8
    assert config.loader_workers(PretrainConfig(workers=0), cpu) == 0


@pytest.mark.slow
def test_compiled_encoders_learn_the_eager_loss_curve(small_store, tmp_path, capsys):
    """``compile=True`` (torch.compile of both encoders) changes rounding only: same losses within 1e-3.

    ~1-2 minutes on 2 cores, nearly all of it inductor compiling the query, neighbour and split-key
    graphs. The checkpoint keeps the eager parameter names (``Module.compile`` works in place).
    """
    kw = dict(precision="fp32", epochs=2, log_every=1, num_neighbors=1)
    eager = pd.read_csv(pretrain(_cfg(small_store, tmp_path / "eager", **kw)).parent / "history.csv")
    capsys.readouterr()
    # under the "C" locale (ASCII), as a library can leave a running process (the full suite did once):
    # inductor's import read a template in ASCII and failed before loop._utf8_ctype
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        ckpt, model = pretrain_model(_cfg(small_store, tmp_path / "compiled", compile=True, **kw))
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert "compiled encoders" in capsys.readouterr().out
    assert model.encoder_q._compiled_call_impl is not None and model.encoder_k._compiled_call_impl is not None
    compiled = pd.read_csv(ckpt.parent / "history.csv")
    assert json.loads((ckpt.parent / "config.json").read_text(encoding="utf-8"))["compile"] is True
    assert len(eager) == len(compiled) >= 4
    # float32 in both; fusing BatchNorm and ELU reorders sums, nothing else: the first step agrees to
    # rounding, and the trajectories then part slowly (measured: step 1 within 3e-6, the two epoch
    # means within 0.015, single steps up to 0.19 apart by step 16)
    assert abs(compiled["loss"][0] - eager["loss"][0]) < 1e-4, (eager["loss"][0], compiled["loss"][0])
    means = eager.groupby("epoch")["loss"].mean(), compiled.groupby("epoch")["loss"].mean()
    assert np.allclose(*means, atol=0.05), means
    from drasclr_lib.models import load_encoder

    assert load_encoder(ckpt).conv1.weight.shape == (8, 8, 1, 3, 3, 3)  # names as in an eager checkpoint
