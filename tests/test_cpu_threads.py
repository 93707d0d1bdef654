"""The fast trainer's CPU thread policy for a shared machine: OpenMP threads that spin briefly before they sleep
(set before torch loads libgomp, unless the user chose), and torch's thread count from the CPUs this process may use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dsp_fast.config import FastConfig
from dsp_fast.engine.trainer import configure_backends, cpu_threads

_OURS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT", "OMP_DISPLAY_ENV")


def _libgomp_settings(**env: str) -> str:
    """libgomp's own account of its settings (OMP_DISPLAY_ENV: printed when torch loads it) in a real
    `python -m dsp_fast.train --help`, which imports every module the training run does."""
    base = {k: v for k, v in os.environ.items() if k not in _OURS}
    base["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-m", "dsp_fast.train", "--help"], capture_output=True, text=True,
                         timeout=300, env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert out.returncode == 0, out.stderr
    assert "OPENMP DISPLAY ENVIRONMENT" in out.stderr, "libgomp did not report: not the OpenMP runtime expected"
    return out.stderr


def test_the_trainer_makes_openmp_threads_spin_briefly():
    """Without the setting, libgomp spins 300000 times before it sleeps; the trainer's process must start with 1000
    spins, so the environment was set before torch loaded libgomp."""
    assert "GOMP_SPINCOUNT = '1000'" in _libgomp_settings()


@pytest.mark.parametrize("env, expected", [({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY = 'ACTIVE'"),
                                           ({"OMP_WAIT_POLICY": "PASSIVE"}, "GOMP_SPINCOUNT = '0'"),
                                           ({"GOMP_SPINCOUNT": "300000"}, "GOMP_SPINCOUNT = '300000'")])
def test_a_wait_policy_the_user_set_wins(env, expected):
    settings = _libgomp_settings(**env)
    assert expected in settings and "GOMP_SPINCOUNT = '1000'" not in settings


def test_cpu_threads_count_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # as under `taskset -c 3`
    assert cpu_threads(FastConfig()) == 1
    assert cpu_threads(FastConfig(cpu_threads=5)) == 5  # the config's number wins
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # what torchrun sets per process is kept under 'auto'
    assert cpu_threads(FastConfig()) == 4
    assert cpu_threads(FastConfig(cpu_threads=2)) == 2


def test_configure_backends_sets_torchs_thread_count():
    saved = torch.get_num_threads()
    try:
        configure_backends(FastConfig(cpu_threads=1), torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


def test_cpu_threads_is_checked():
    with pytest.raises(ValueError, match="fast.cpu_threads"):
        FastConfig(cpu_threads=-1)
