"""The fast trainer end to end on the synthetic shift (tiny model, 32x32 crops, a few steps, CPU): two gloo ranks
stay identical and exit cleanly, a run killed with SIGKILL and resumed ends bit for bit where an uninterrupted
run ends, checkpoints are pruned to the last K, a bad --resume is a clear error, and a run of non-finite steps
stops the run with a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch
from helpers_run import REPO, assert_same_state, env, read, tiny_args

from dsp_fast import train
from dsp_fast.engine.checkpoint import list_checkpoints


def test_two_gloo_ranks_keep_identical_weights_and_exit_cleanly(synthetic_root, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsp_fast.train",
           *tiny_args(synthetic_root, out, 4)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    with open(os.path.join(out, "rank_weights.json")) as f:
        digests = json.load(f)
    assert digests["identical"] and len(digests["sha256"]) == 2
    ckpt = read(os.path.join(out, "ckpt_00000004.pt"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["choices"], ckpt["rng"][1]["choices"])  # each rank its own choices


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(synthetic_root, tmp_path):
    steps, extra = 40, ("train.checkpoint_every=4", "--keep-last", "2")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "dsp_fast.train"]
    proc = subprocess.run(cmd + tiny_args(synthetic_root, full, steps, *extra), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(full)] == [36, 40]  # keep-last-K

    victim = subprocess.Popen(cmd + tiny_args(synthetic_root, killed, steps, *extra), cwd=REPO, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not list_checkpoints(killed) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    written = [s for s, _ in list_checkpoints(killed)]
    assert written and written[-1] < steps, f"the run was not killed mid-training (checkpoints {written})"

    proc = subprocess.run(cmd + tiny_args(synthetic_root, killed, steps, *extra, "--resume", "auto"), cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {written[-1]}" in proc.stdout
    assert_same_state(read(os.path.join(full, "ckpt_00000040.pt")), read(os.path.join(killed, "ckpt_00000040.pt")))


def test_bad_resume_target_is_a_clear_error(tmp_path, capsys):
    args = tiny_args(str(tmp_path / "unused"), str(tmp_path / "run"), 2)
    assert train.main(args + ["--resume", str(tmp_path / "missing.pt")]) == 2
    assert "no such checkpoint file or run folder" in capsys.readouterr().err
    foreign = tmp_path / "reference_last.pt"
    torch.save({"student": {}, "step": 3}, foreign)
    assert train.main(args + ["--resume", str(foreign)]) == 2
    assert "was not written by dsp_fast.train" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main(args + ["--resume", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()  # rejected before any data was generated


def test_non_finite_streak_stops_with_a_checkpoint(synthetic_root, tmp_path, capsys):
    out = str(tmp_path / "nan")
    # lr 1e30: the first update overflows the weights, every later loss is NaN and every step is skipped
    code = train.main(tiny_args(synthetic_root, out, 30, "optim.lr=1.0e+30", "train.log_every=0",
                                "--max-bad-steps", "3"))
    assert code == 3
    assert "consecutive steps had a non-finite loss" in capsys.readouterr().err
    (step, path), = list_checkpoints(out)
    ckpt = read(path)
    assert step < 30 and 3 <= ckpt["consecutive_skipped"] <= ckpt["skipped_steps"]


def test_resume_continues_with_the_run_folders_config_and_overrides_on_top(synthetic_root, tmp_path, capsys):
    """--resume used to start from --config (the synthetic preset by default) and blame its values ("was trained
    with train.max_steps=4, this run has 600"); it now starts from the run folder's config.yaml."""
    out = str(tmp_path / "run")
    assert train.main(tiny_args(synthetic_root, out, 4, "dsp.enabled=false", "train.checkpoint_every=2",
                                "--image-every", "0", "--no-tensorboard")) == 0
    os.remove(os.path.join(out, "ckpt_00000004.pt"))  # as if killed after step 2
    capsys.readouterr()
    assert train.main(["--resume", out, "data.max_eval_images=1"]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert f"with its saved config {os.path.join(out, 'config.yaml')} (in place of --config); overrides applied on " \
           "top: data.max_eval_images=1" in stdout, stdout
    assert "at step 2" in stdout and "step 4/4" in stdout
    saved = read(os.path.join(out, "ckpt_00000004.pt"))["config"]
    assert saved["dsp"]["enabled"] is False and saved["data"]["max_eval_images"] == 1
    assert train.main(["--resume", out, "dsp.enabled=true"]) == 2
    err = capsys.readouterr().err
    assert "trained with dsp.enabled=False; the override dsp.enabled=true would make it True" in err, err


def test_a_seed_override_on_resume_is_refused_naming_train_seed(synthetic_root, tmp_path, capsys):
    """The seed fixes the step-indexed loader's and the choices' streams: `--resume auto train.seed=1` would continue
    the run on other data than it was trained on (the fields a checkpoint fixes: dsp_fast.resume.FIXED)."""
    out = str(tmp_path / "run")
    args = tiny_args(synthetic_root, out, 2, "train.checkpoint_every=2", "--image-every", "0", "--no-tensorboard")
    assert train.main(args) == 0
    capsys.readouterr()
    assert train.main([*args, "--resume", "auto", "train.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "trained with train.seed=0; the override train.seed=1 would make it 1" in err, err
    assert [s for s, _ in list_checkpoints(out)] == [2]  # nothing written


def test_a_folder_resume_starts_a_model_without_checkpoint_at_step_0(synthetic_root, tmp_path, capsys):
    """A compare run stopped before its adapted model's first checkpoint (dsp/ not yet made) continues from the
    run folder, the printed resume command: the source-only model from its checkpoint, the adapted one at step 0."""
    out = str(tmp_path / "run")
    args = tiny_args(synthetic_root, out, 2, "train.compare_source_only=true", "train.checkpoint_every=2",
                     "--image-every", "0", "--no-tensorboard", "train.log_every=0")
    assert train.main(args) == 0
    shutil.rmtree(os.path.join(out, "dsp"))
    capsys.readouterr()
    assert train.main(["--resume", out]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "[source-only] already finished at step 2" in stdout, stdout
    assert [s for s, _ in list_checkpoints(os.path.join(out, "dsp"))] == [2]
