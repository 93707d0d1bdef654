"""What a newcomer meets on the command line: --print-config (the resolved config, nothing created), --help naming
every shipped preset, config.yaml recording what the run resolved (and --resume still reading it), the lr in every
metrics record, and TensorBoard silent unless asked for."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from helpers_run import tiny_args

from dsp_fast import reference, train
from dsp_fast.config import RESOLVED, FastConfig, load_config, presets
from dsp_fast.engine import monitor


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_print_config_prints_yaml_that_loads_back_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the relative defaults (runs/, data/) would land here
    overrides = ["train.max_steps=7", "optim.lr=1e-3"]
    assert train.main(["--print-config", "--config", "synthetic", "--image-every", "3", *overrides]) == 0
    printed = capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # no run folder, no data
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert load_config(str(saved)) == load_config("synthetic", [*overrides, "fast.image_every=3"])
    raw = yaml.safe_load(printed)
    assert raw["fast"]["amp"] == "auto"  # asked: kept as the field, so another machine resolves it again
    assert raw[RESOLVED] == {"device": "cpu", "amp": "fp32", "data_backend": "torch", "cuda_graphs": False,
                             "tensorboard": monitor.tensorboard_on(None)}
    assert reference.main(["--print-config", "--config", "synthetic", *overrides]) == 0
    printed = capsys.readouterr().out
    saved.write_text(printed)
    assert load_config(str(saved)) == load_config("synthetic", overrides)
    assert yaml.safe_load(printed)[RESOLVED] == {"device": "cpu"}
    assert sorted(os.listdir(tmp_path)) == ["printed.yaml"]


@pytest.mark.parametrize("main", [train.main, reference.main], ids=["fast", "reference"])
def test_help_lists_every_preset_from_the_configs_folder(main, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    shipped = [n[:-5] for n in os.listdir(presets.PRESET_DIR) if n.endswith(".yaml")]
    assert len(shipped) >= 7
    for name in shipped:
        assert f"  {name} " in text and presets.preset_summary(name) in text, name
    # the list follows the folder: a preset added there is listed with its first comment line
    (tmp_path / "zz_added.yaml").write_text("# A preset added later.\ntrain:\n  max_steps: 3\n")
    monkeypatch.setattr(presets, "PRESET_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "  zz_added  A preset added later" in capsys.readouterr().out


def test_preset_summary_cuts_a_clause_running_on_to_the_next_line(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESET_DIR", str(tmp_path))
    (tmp_path / "a.yaml").write_text("# Source -> target as run (v1): every switch of\n# the table.\n")
    (tmp_path / "b.yaml").write_text("data:\n  batch_size: 2\n")
    assert presets.preset_summary("a") == "Source -> target as run (v1)"
    assert presets.preset_summary("b") == ""


def _lr(step: int, base: float, max_steps: int, power: float = 0.9) -> float:
    """The poly schedule by hand: the lr of 0-based step `step`."""
    return base * (1 - step / max_steps) ** power


def test_run_records_what_it_resolved_and_the_lr_and_resumes(synthetic_root, tmp_path, capsys):
    out, steps = str(tmp_path / "run"), 4
    args = tiny_args(synthetic_root, out, steps, "train.log_every=1", "train.checkpoint_every=2", "--image-every", "0",
                     "optim.lr=1e-3", "optim.head_lr_mult=10", "optim.warmup_steps=0")
    assert train.main(args) == 0
    printed = capsys.readouterr()
    assert "TensorBoard" not in printed.out + printed.err  # the default: silent whether installed or not
    with open(os.path.join(out, "config.yaml")) as f:
        raw = yaml.safe_load(f)
    assert raw["fast"]["amp"] == "auto" and raw["fast"]["data_backend"] == "auto" and raw["train"]["device"] == "auto"
    assert raw[RESOLVED] == {"device": "cpu", "amp": "fp32", "data_backend": "torch", "cuda_graphs": False,
                             "tensorboard": monitor.tensorboard_on(None)}
    records = _records(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # record `step` holds the steps done: the last one, 0-based step - 1, ran with this lr
        # 1e-12: the trainer and this line compute the same float64 expression, up to the order of the multiplies
        assert r["lr"] == pytest.approx(_lr(r["step"] - 1, 1e-3, steps), rel=1e-12)
        assert r["lr_head"] == pytest.approx(10 * r["lr"], rel=1e-12)
    assert records[-1]["lr"] < records[0]["lr"]  # the schedule decays: a constant would not pass

    # --resume reads config.yaml, resolved block and all: continue from step 2 once the last checkpoint is gone
    for name in ("ckpt_00000004.pt", "ckpt_00000004.pt.sha256"):
        os.remove(os.path.join(out, name))
    assert train.main(["--resume", out]) == 0
    assert "at step 2" in capsys.readouterr().out
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)[RESOLVED]["amp"] == "fp32"
    resumed = [r for r in _records(os.path.join(out, "metrics.jsonl")) if r["step"] > 2][-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    assert all(r["lr"] == pytest.approx(_lr(r["step"] - 1, 1e-3, steps), rel=1e-12) for r in resumed)


def test_reference_records_the_lr_and_its_device(synthetic_root, tmp_path, capsys):
    out, steps = str(tmp_path / "run"), 2
    assert reference.main(tiny_args(synthetic_root, out, steps, "train.log_every=1", "optim.lr=1e-3",
                                    "optim.head_lr_mult=1", "optim.warmup_steps=0")) == 0
    folder = os.path.join(out, "reference")
    records = _records(os.path.join(folder, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2]
    # head_lr_mult 1: one lr, no lr_head; 1e-12 as above
    assert all(r["lr"] == pytest.approx(_lr(r["step"] - 1, 1e-3, steps), rel=1e-12) and "lr_head" not in r
               for r in records)
    with open(os.path.join(folder, "config.yaml")) as f:
        assert yaml.safe_load(f)[RESOLVED] == {"device": "cpu"}


def test_tensorboard_missing_is_said_once_and_only_when_asked(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the package not installed
    monitor._say_tensorboard_missing.cache_clear()
    assert monitor.tensorboard_on(None) is False and monitor.tensorboard_on(False) is False
    assert capsys.readouterr().err == ""  # unset (the default) or off: silent
    assert monitor.tensorboard_on(True) is False and monitor.tensorboard_on(True) is False
    err = capsys.readouterr().err
    assert err.count("TensorBoard off") == 1 and ".[tensorboard]" in err, err
    monitor._say_tensorboard_missing.cache_clear()


def test_tensorboard_setting_spellings():
    assert FastConfig().tensorboard is None and FastConfig(tensorboard="auto").tensorboard is None
    assert load_config(None, ["fast.tensorboard=true"]).fast.tensorboard is True
    assert train.parse_args(["--no-tensorboard"]).tensorboard is False
    assert train.parse_args([]).tensorboard is None  # not given: the config's value stands
    with pytest.raises(ValueError, match="fast.tensorboard"):
        load_config(None, ["fast.tensorboard=sometimes"])
