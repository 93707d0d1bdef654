"""`pip install .` (not only -e) puts kernels/ and pipelines/ under dsp_fast, as docs/layout.md describes the layout."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_regular_install_maps_kernels_and_pipelines(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                            "--target", str(target), ROOT], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.fail(f"pip install . failed:\n{build.stderr[-2000:]}")
    for sub in ("kernels", "pipelines", "data", "models", "reference"):
        assert (target / "dsp_fast" / sub / "__init__.py").is_file(), sub
    assert (target / "dsp_fast" / "configs" / "synthetic.yaml").is_file()  # presets ship with the package
    assert not (target / "kernels").exists() and not (target / "pipelines").exists()  # no bare top-level names
    probe = "import dsp_fast.kernels, dsp_fast.pipelines, dsp_fast.config; print(dsp_fast.kernels.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))
