"""The fast trainer under torchrun prints no warning of torch's own: neither the FutureWarning of
torch.distributed.nn.functional.all_gather (global BN's and the MMD's gathers) nor, training source-only, DDP's
find_unused_parameters warning."""

from __future__ import annotations

import subprocess
import sys

from helpers_run import REPO, env, quiet_args


def test_torchrun_prints_neither_deprecation_nor_find_unused_warnings(synthetic_root, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsp_fast.train",
           *quiet_args(synthetic_root, str(tmp_path / "ddp"), 2, "train.compare_source_only=true")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is deprecated" not in proc.stderr and "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    assert "weights identical on the 2 ranks" in proc.stdout
