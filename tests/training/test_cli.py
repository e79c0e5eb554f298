"""``drasclr pretrain``: the options are generated from ``PretrainConfig`` and keep the published flags."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, fields

import pytest

from drasclr_lib.training import PretrainConfig
from drasclr_lib.training.cli import NOT_ON_CLI, build_parser


def _config(argv: list[str], config: type = PretrainConfig):
    a = build_parser(config).parse_args(argv)
    return config(**{f.name: getattr(a, f.name) for f in fields(config) if f.name not in NOT_ON_CLI})


def test_every_config_field_has_an_option():
    names = {f.name for f in fields(PretrainConfig)}
    assert NOT_ON_CLI <= names
    dests = {a.dest for a in build_parser()._actions}
    assert names - NOT_ON_CLI <= dests, sorted(names - NOT_ON_CLI - dests)


def test_a_field_added_to_the_config_gets_an_option():
    @dataclass
    class Extended(PretrainConfig):
        new_knob: float = 0.5
        new_switch: bool = True
        new_option: int | None = None

    assert _config([]) == PretrainConfig()
    cfg = _config(["--new-knob", "2", "--no-new-switch", "--new-option", "3"], Extended)
    assert (cfg.new_knob, cfg.new_switch, cfg.new_option) == (2.0, False, 3)


def test_the_documented_flags_parse_as_before():
    assert _config([]) == PretrainConfig()  # same defaults
    argv = ["--store", "s", "--out", "o", "--epochs", "3", "--batch-size", "16", "--lr", "0.5", "--no-scale-lr",
            "--queue-size", "64", "--neighbors", "1", "--beta", "0.25", "--temperature", "0.1", "--no-conditional",
            "--keep-self-negatives", "--augment", "ag", "--augment-on", "device", "--device", "cpu", "--workers", "0",
            "--no-amp", "--seed", "7", "--max-steps", "9", "--log-every", "2", "--save-every", "5",
            "--no-tensorboard", "--resume"]
    assert _config(argv) == PretrainConfig(
        store="s", out_dir="o", epochs=3, batch_size=16, lr=0.5, scale_lr=False, queue_size=64, num_neighbors=1,
        neighbor_weight=0.25, temperature=0.1, conditional=False, exclude_self_negatives=False, augment="ag",
        augment_on="device", device="cpu", workers=0, amp=False, seed=7, max_steps=9, log_every=2,
        save_every_steps=5, tensorboard=False, resume=True)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--augment-on", "tpu"])
    assert exc.value.code == 2


def test_module_entry_point_runs():
    """``python -m drasclr_lib.training`` (what ``torchrun -m`` starts) is the same command."""
    res = subprocess.run([sys.executable, "-m", "drasclr_lib.training", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--keep-self-negatives" in res.stdout and "--beta BETA" in res.stdout


def test_every_option_has_a_help_text_of_its_own():
    """No option of ``drasclr pretrain`` falls back to the placeholder; a documented field added to the
    config gets the first sentence of its docstring entry (``turn off:`` for a ``--no-`` switch)."""
    from drasclr_lib.training.cli import field_help

    helps = field_help()
    assert set(helps) == {f.name for f in fields(PretrainConfig)}
    assert not [k for k, v in helps.items() if "(no description)" in v or not v.strip()]
    assert all(a.help for a in build_parser()._actions)

    @dataclass
    class Documented(PretrainConfig):
        """More settings.

        Attributes:
            new_knob: strength of the new thing (0.5; 0 turns it off). More text that is not shown.
            new_switch, other: whether to do it.
        """

        new_knob: float = 0.5
        new_switch: bool = True
        undocumented: int = 1

    helps = field_help(Documented)
    assert helps["new_knob"] == "strength of the new thing (0.5; 0 turns it off)"
    assert helps["new_switch"] == "turn off: whether to do it"
    assert helps["undocumented"] == "Documented.undocumented (no description)"
    assert helps["temperature"] == field_help()["temperature"]  # the base's own entries are kept
    text = " ".join(build_parser(Documented).format_help().split())
    assert "--new-knob NEW_KNOB strength of the new thing (0.5; 0 turns it off) (default: 0.5)" in text
