"""docs/extending.md's worked example, applied as a researcher would: its code block pasted into `dsp_losses` of a
copy of the package, then a short fast run on the synthetic shift. The new term must reach the logs under its name
and join the loss; if the step or the logger named the terms anywhere else, it would not."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import dsp_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR = '    # a new term: terms["name"] = value'


def example_block() -> str:
    with open(os.path.join(REPO, "docs", "extending.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert blocks, "docs/extending.md has no python block"
    return blocks[0]


def test_the_documented_loss_term_reaches_the_loss_and_the_logs(synthetic_root, tmp_path):
    package = os.path.dirname(os.path.abspath(dsp_fast.__file__))
    copy = tmp_path / "src" / "dsp_fast"
    # kernels/ and pipelines/ are not copied: they resolve to the installed ones (setup.py's package_dir mapping)
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "kernels", "pipelines"))
    method = copy / "method.py"
    source = method.read_text()
    assert source.count(ANCHOR) == 1, "the anchor line named by docs/extending.md is gone from dsp_losses"
    method.write_text(source.replace(ANCHOR, example_block() + ANCHOR))

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsp_fast.train", "--config", "synthetic", f"data.synthetic_root={synthetic_root}",
           f"train.out_dir={out}", "train.max_steps=3", "train.log_every=1", "data.crop_size=[32,32]",
           "data.eval_size=[64,32]", "data.max_eval_images=2", "train.compare_source_only=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the kernels' twins: the same results, without the interpreter's cost
    proc = subprocess.run(cmd, cwd=tmp_path / "src", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " ent " in proc.stdout  # the progress line
    with open(out / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["ent"] > 0  # an entropy of a softmax over 19 classes
        parts = r["src"] + r["srcmix"] + r["tgtmix"] + r["mmd"] + r["ent"]
        assert abs(r["loss"] - parts) < 1e-4 * r["loss"], r
