"""SIGINT, SIGTERM and SIGUSR1 during a fast run (CPU, the tiny model on the synthetic shift): a stop signal is
answered at the next step boundary with a checkpoint, the resume command printed and exit code 128 + signal; the
printed command continues bit for bit; a second signal stops at once; a stop during the source-only run of
train.compare_source_only does not start the DSP run; two gloo ranks under torchrun stop at the same step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers_run import (
    REPO,
    STEPS,
    STOPPED,
    TRAIN,
    Watched,
    assert_same_state,
    env,
    read,
    tiny_args,
    uninterrupted_checkpoint,
    watched_args,
)

from dsp_fast.engine.checkpoint import list_checkpoints
from dsp_fast.engine.signals import StopRequested, StopSignals


@pytest.fixture
def reference(synthetic_root, tmp_path_factory) -> str:
    return uninterrupted_checkpoint(synthetic_root, tmp_path_factory)


def test_sigusr1_checkpoints_then_sigint_stops_cleanly_and_the_printed_command_resumes_bit_for_bit(
        synthetic_root, tmp_path, reference):
    """No periodic checkpoints (as the synthetic preset): Ctrl-C used to lose everything, with a traceback."""
    out = str(tmp_path / "run")
    run = Watched(TRAIN + watched_args(synthetic_root, out, "train.checkpoint_every=0"), str(tmp_path / "err"))
    run.until(lambda step, _: step is not None and step >= 3)
    run.proc.send_signal(signal.SIGUSR1)
    run.until(lambda _, line: "[signal] checkpoint at step" in line)
    asked = int(re.search(r"checkpoint at step (\d+)", run.out[-1]).group(1))
    assert os.path.isfile(os.path.join(out, f"ckpt_{asked:08d}.pt"))
    run.until(lambda step, _: step is not None and step >= asked + 2)
    run.proc.send_signal(signal.SIGINT)
    code, stdout, stderr = run.finish()
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    name, stopped = STOPPED.search(stderr).groups()
    assert name == "SIGINT" and asked < int(stopped) < STEPS
    assert [s for s, _ in list_checkpoints(out)] == [asked, int(stopped)]
    command = re.search(r"resume with: (.+)", stderr).group(1)
    assert command.endswith(f"-m dsp_fast.train --resume {os.path.abspath(out)}"), command
    proc = subprocess.run(["bash", "-c", command], env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped}" in proc.stdout
    assert_same_state(read(reference), read(os.path.join(out, f"ckpt_{STEPS:08d}.pt")))


def test_a_stop_signal_outside_the_steps_stops_at_once_and_a_repeat_is_one_request():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(announce=False):
        with pytest.raises(StopRequested) as stop:
            os.kill(os.getpid(), signal.SIGTERM)  # not armed: nothing to save, stop now (os.kill runs the handler)
        assert stop.value.exit_code == 143
    with StopSignals(announce=False) as signals, pytest.raises(StopRequested):
        with signals.armed():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # within the repeat window: the same request
            os.kill(os.getpid(), signal.SIGUSR1)
            assert signals.stop_signum == signal.SIGINT and signals.take_checkpoint_request()
            assert not signals.take_checkpoint_request()
        # leaving the steps with a stop pending (after the last boundary) stops the run
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_second_stop_signal_kills_at_once():
    script = ("import os, signal, time\n"
              "from dsp_fast.engine.signals import StopSignals\n"
              "with StopSignals(repeat_window_s=0.2) as s, s.armed():\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('asked', s.stop_signum, flush=True)\n"
              "    time.sleep(0.5)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "    print('survived', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=25)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "asked 15\n", (proc.returncode, proc.stdout)
    assert "SIGTERM again: stopping at once" in proc.stderr


def test_a_stop_in_the_source_only_run_does_not_start_the_dsp_run(synthetic_root, tmp_path):
    out = str(tmp_path / "compare")
    args = tiny_args(synthetic_root, out, 6, "train.compare_source_only=true", "train.log_every=1",
                     "--image-every", "0", "--no-tensorboard")
    run = Watched(TRAIN + args, str(tmp_path / "err"))
    run.until(lambda step, line: step is not None and step >= 2 and "[fast source-only]" in line)
    run.proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = run.finish()
    assert code == 143, stderr[-3000:]
    stopped = int(STOPPED.search(stderr).group(2))
    assert f"checkpoint {os.path.join(out, 'source_only', f'ckpt_{stopped:08d}.pt')}" in stderr, stderr
    assert not os.path.exists(os.path.join(out, "dsp"))
    proc = subprocess.run(TRAIN + args + ["--resume", "auto"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"source_only/ckpt_{stopped:08d}.pt at step {stopped}" in proc.stdout
    with open(os.path.join(out, "summary.json")) as f:
        assert set(json.load(f)["models"]) == {"source-only", "adapted (DSP)"}


def test_sigterm_to_the_process_group_stops_with_a_checkpoint_despite_loader_workers(synthetic_root, tmp_path):
    """`timeout` and schedulers signal the whole process group: the DataLoader workers get the SIGTERM too, and must
    leave it to the trainer, which stops at a step boundary with a checkpoint and a resume command."""
    out = str(tmp_path / "group")
    run = Watched(TRAIN + watched_args(synthetic_root, out, "data.num_workers=2", "--data-backend", "torch"),
                  str(tmp_path / "err"), new_session=True)
    run.until(lambda step, line: step is not None and step >= 3)
    os.killpg(run.proc.pid, signal.SIGTERM)
    code, _, stderr = run.finish()
    assert code == 143, stderr[-3000:]
    stopped = int(STOPPED.search(stderr).group(2))
    assert os.path.exists(os.path.join(out, f"ckpt_{stopped:08d}.pt")) and "resume with:" in stderr, stderr[-3000:]
    assert "killed by signal" not in stderr


def test_two_gloo_ranks_stop_at_the_same_step_on_sigterm_to_torchrun_s_process_group(synthetic_root, tmp_path):
    """A scheduler's SIGTERM reaches the whole process group: torchrun's agent, both ranks and their DataLoader
    workers. The workers leave it to the ranks, the agent forwards it (a second time, within the window that makes
    it one request) to its workers: both ranks stop at one step, write one checkpoint with both ranks' RNG states
    and identical weights, and `--resume auto` continues it to the end. torchrun itself then exits 1 with its own
    SignalException (torch 2.13: the agent raises it once its workers have ended), whatever the workers returned."""
    out, steps = str(tmp_path / "ddp"), 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsp_fast.train",
           *tiny_args(synthetic_root, out, steps, "train.log_every=1", "--image-every", "0", "--no-tensorboard",
                      "data.num_workers=1", "--data-backend", "torch")]
    run = Watched(cmd, str(tmp_path / "err"), new_session=True)
    run.until(lambda step, _: step is not None and step >= 2)
    os.killpg(run.proc.pid, signal.SIGTERM)
    code, stdout, stderr = run.finish()
    assert code == 1 and "terminate called" not in stderr and "again: stopping at once" not in stderr, stderr[-3000:]
    stopped = int(STOPPED.search(stderr).group(2))
    assert stopped < steps and f"resume with: cd {REPO} && torchrun --standalone --nproc_per_node=2" in stderr
    with open(os.path.join(out, "rank_weights.json")) as f:
        assert json.load(f)["identical"]
    ckpt = read(os.path.join(out, f"ckpt_{stopped:08d}.pt"))
    assert ckpt["world_size"] == 2 and not torch.equal(ckpt["rng"][0]["choices"], ckpt["rng"][1]["choices"])
    proc = subprocess.run(cmd + ["--resume", "auto"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {stopped}" in proc.stdout
    with open(os.path.join(out, "rank_weights.json")) as f:
        assert json.load(f)["identical"]
    assert read(os.path.join(out, f"ckpt_{steps:08d}.pt"))["step"] == steps
