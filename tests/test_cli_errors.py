"""The commands' errors: flags and overrides mix in any order, and what is wrong on a command line (a stray word,
a missing folder or checkpoint, a file that is not a checkpoint, a checkpoint of another model, a device that is
not there) is one line naming it, exit code 2, and nothing written."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers_run import quiet_args, tiny_args

from dsp_fast import evaluate, train


def test_flags_and_overrides_mix_in_any_order(synthetic_root, tmp_path, capsys):
    args = train.parse_args(["--prepared-target", "X", "train.max_steps=4", "--resume", "data.batch_size=1", "--amp",
                             "fp32"])
    assert (args.prepared_target, args.resume, args.amp) == ("X", "auto", "fp32")
    assert args.overrides == ["train.max_steps=4", "data.batch_size=1"]
    missing = tmp_path / "no_such_prepared"
    code = train.main(["--prepared-target", str(missing), "train.max_steps=4", f"data.synthetic_root={synthetic_root}",
                       f"train.out_dir={tmp_path / 'run'}", "--prepared-source", str(missing)])
    err = capsys.readouterr().err
    assert code == 2 and f"--prepared-source {missing}: folder not found" in err, err
    assert train.main(["stray_word", f"train.out_dir={tmp_path / 'run'}"]) == 2
    assert "stray_word" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written


def test_missing_or_garbage_checkpoints_exit_2_naming_the_file(synthetic_root, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert f"checkpoint not found: {tmp_path / 'nope.pt'}" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    assert evaluate.main(["--checkpoint", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert str(garbage) in err and "weights_only" not in err, err
    args = tiny_args(synthetic_root, str(tmp_path / "run"), 2, "train.log_every=1")
    assert train.main(["--resume", str(garbage), *args]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {garbage} is not a readable checkpoint" in err and "weights_only" not in err, err
    assert garbage.read_bytes() and not (tmp_path / "run").exists()


def test_a_checkpoint_of_another_architecture_is_one_line_naming_both(tiny_run, capsys):
    """Not torch's list of every missing and unexpected key (12.5 KB) without the saved arch."""
    ckpt = os.path.join(tiny_run, "ckpt_00000002.pt")
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", ckpt, "--config", "synthetic_mitb0"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'tiny' model" in err and "model.arch='mit_b0'" in err and len(err.splitlines()) == 1, err
    assert evaluate.main(["--checkpoint", ckpt, "model.mmd_dim=8"]) == 2  # same arch, another shape
    err = capsys.readouterr().err
    assert "of another shape" in err and len(err) < 400 and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_an_error_exit_2(tmp_path, capsys):
    """An error line with the 'error:' prefix and exit code 2, not a SystemExit with the bare message (code 1)."""
    assert train.main(quiet_args(str(tmp_path / "unused"), str(tmp_path / "run"), 2, "train.device=cuda")) == 2
    assert capsys.readouterr().err.startswith("error: train.device is 'cuda' but torch sees no GPU")
    assert not (tmp_path / "unused").exists()
