"""A start that cannot run stops before it prepares data or makes a run folder: one line naming the file or field,
exit code 2, nothing written. Weights of another architecture, a text file as weights, a non-finite number, an
empty config file, train.out_dir under a file; both trainers. Weights of another class count load with a visible
line saying the classifier starts fresh."""

from __future__ import annotations

import os

import pytest
import torch
from helpers_run import tiny_args

from dsp_fast import reference, train
from dsp_fast.config import load_config
from dsp_fast.models import build_model

TRAINERS = {"fast": train.main, "reference": reference.main}


def _weights(tmp_path, name: str, *overrides: str) -> str:
    """A state dict of the synthetic preset's model with `overrides`, saved as `name`."""
    path = str(tmp_path / name)
    torch.save(build_model(load_config("synthetic", list(overrides)).model).state_dict(), path)
    return path


def _start(trainer: str, tmp_path, *extra: str) -> int:
    """A 2-step tiny run on a synthetic root not generated yet; the exit code."""
    return TRAINERS[trainer](tiny_args(str(tmp_path / "syn"), str(tmp_path / "runs"), 2, *extra))


def _nothing_made(tmp_path) -> None:
    """Neither the synthetic data (generated on first use) nor a run folder was made."""
    assert not (tmp_path / "syn").exists() and not (tmp_path / "runs").exists(), os.listdir(tmp_path)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_weights_of_another_arch_exit_2_before_any_data_or_folder(trainer, tmp_path, capsys):
    mit = _weights(tmp_path, "mit_b0.pth", "model.arch=mit_b0")
    assert _start(trainer, tmp_path, f"model.pretrained={mit}") == 2  # MiT weights into `tiny`
    err = capsys.readouterr().err
    assert f"model.pretrained': {mit}: not weights of model.arch='tiny'" in err and "backbone keys missing" in err
    assert len(err.strip().splitlines()) == 1, err
    _nothing_made(tmp_path)
    tiny = _weights(tmp_path, "tiny.pth")
    assert _start(trainer, tmp_path, f"model.pretrained={tiny}", "model.arch=mit_b0") == 2  # `tiny` into mit_b0
    err = capsys.readouterr().err
    assert f"{tiny}: not weights of model.arch='mit_b0'" in err and "encoder keys missing" in err, err
    _nothing_made(tmp_path)


def test_a_text_file_as_weights_exit_2_and_no_run_folder(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    assert _start("fast", tmp_path, f"model.pretrained={notes}") == 2
    assert f"{notes}: not a torch checkpoint" in capsys.readouterr().err
    _nothing_made(tmp_path)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_weights_of_another_class_count_say_the_classifier_starts_fresh(trainer, tmp_path, capsys):
    """Deliberate (the backbone is what matters), but said at the default level, naming the file and the shapes.
    The out_dir under a file stops the start right after the weights check: the line is printed by then."""
    weights = _weights(tmp_path, "sixteen.pth", "model.num_classes=16", "dsp.long_tail_classes=[3, 4]")
    (tmp_path / "file").write_text("")
    assert _start(trainer, tmp_path, f"model.pretrained={weights}", f"train.out_dir={tmp_path / 'file' / 'runs'}") == 2
    out = capsys.readouterr().out
    assert f"note: {weights}: the classifier (layer5.*) does not fit this model" in out, out
    assert "(16, " in out and "(19, " in out and "the classifier starts fresh" in out, out


@pytest.mark.parametrize("trainer", TRAINERS)
def test_out_dir_under_a_file_exit_2_naming_it_before_any_data(trainer, tmp_path, capsys):
    (tmp_path / "somefile").write_text("")
    runs = tmp_path / "somefile" / "runs"
    assert TRAINERS[trainer](tiny_args(str(tmp_path / "syn"), str(runs), 2)) == 2
    err = capsys.readouterr().err
    assert f"error: config field 'train.out_dir': {runs}" in err and f"{tmp_path / 'somefile'} is a file" in err, err
    assert not (tmp_path / "syn").exists()


@pytest.mark.parametrize("value", ["inf", "nan", ".inf", "-.inf"])
def test_non_finite_floats_exit_2_naming_the_field(value, tmp_path, capsys):
    assert _start("fast", tmp_path, f"optim.lr={value}") == 2
    assert "config field 'optim.lr': must be a finite number" in capsys.readouterr().err
    assert _start("reference", tmp_path, f"dsp.mmd_kernel_mul={value}") == 2  # a float field with no range
    assert "config field 'dsp.mmd_kernel_mul': must be a finite number" in capsys.readouterr().err
    _nothing_made(tmp_path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "[1, 2]\n"])
def test_an_empty_or_non_mapping_config_file_exit_2_naming_it(text, tmp_path, capsys):
    """Not the defaults (DeepLabv2 ResNet-101 at 1280x720) trained in silence."""
    path = tmp_path / "my.yaml"
    path.write_text(text)
    assert train.main(["--config", str(path), f"train.out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {path}: ") and "name a preset (" in err and "data:" in err, err
    assert ("empty config file" in err) == (text != "[1, 2]\n") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
