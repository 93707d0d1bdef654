"""torchrun's elastic restart continues a killed rank's run: `--max-restarts 1` with `--resume auto` ends with the
weights of an uninterrupted run. And the per-attempt store that makes the restart reliable: torchrun keeps one
TCPStore for all attempts, so without a prefix a restarted rank reads the previous attempt's keys."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch.distributed as dist
from helpers_run import REPO, assert_same_state, env, read, tiny_args

from dsp_fast.engine.checkpoint import list_checkpoints
from dsp_fast.engine.distributed import attempt_store

TIMEOUT = datetime.timedelta(seconds=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def agent_store(monkeypatch):
    """A TCPStore standing in for torchrun's agent store, and the environment torchrun gives its workers."""
    port = _free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"), ("WORLD_SIZE", "2"),
                       ("LOCAL_WORLD_SIZE", "2"), ("TORCHELASTIC_USE_AGENT_STORE", "True"),
                       ("TORCHELASTIC_MAX_RESTARTS", "1")):
        monkeypatch.setenv(key, value)
    yield server


def test_each_restart_attempt_has_its_own_keys(agent_store, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_store(0, 2, TIMEOUT)
    first.set("rank_1_address", "a dead worker's port")
    assert first.check(["rank_1_address"])
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = attempt_store(0, 2, TIMEOUT)
    assert not second.check(["rank_1_address"])  # the restarted attempt does not see the dead attempt's key
    assert agent_store.check(["dsp_fast/attempt_0/rank_1_address"])


def test_outside_torchrun_or_across_nodes_the_store_is_left_to_env(agent_store, monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: fresh stores
    assert attempt_store(0, 2, TIMEOUT) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes: restart counts are per node, a prefix would not meet
    assert attempt_store(0, 2, TIMEOUT) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in capsys.readouterr().out
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    assert attempt_store(0, 2, TIMEOUT) is None


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _local_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env_vars = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    rank = env_vars.get(b"LOCAL_RANK")
    return int(rank) if rank is not None else None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's worker processes through /proc (Linux)")
def test_torchrun_restart_after_a_killed_rank_resumes_to_the_same_weights(synthetic_root, tmp_path):
    """rank 1 is SIGKILLed after the first checkpoint; torchrun restarts both ranks, which continue from that
    checkpoint and end with the uninterrupted run's weights, bit for bit (CPU, gloo: the step and the
    step-indexed loader are deterministic)."""
    steps, extra = 8, ("train.checkpoint_every=4", "--resume", "auto")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
            "-m", "dsp_fast.train"]
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    proc = subprocess.run(base + tiny_args(synthetic_root, full, steps, *extra), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = subprocess.Popen(base + tiny_args(synthetic_root, killed, steps, *extra), cwd=REPO, env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, victim = time.time() + 200, None
        while victim is None and run.poll() is None and time.time() < deadline:
            if list_checkpoints(killed):
                victim = next((p for p in _children(run.pid) if _local_rank(p) == 1), None)
            time.sleep(0.005)
        assert victim is not None, "no checkpoint or no rank-1 worker seen"
        os.kill(victim, signal.SIGKILL)
        out = run.communicate(timeout=240)[0]
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-3000:]
    assert "resumed from" in out, out[-3000:]  # the restarted workers continued the checkpoint, not step 0
    last = f"ckpt_{steps:08d}.pt"
    assert_same_state(read(os.path.join(killed, last)), read(os.path.join(full, last)))
