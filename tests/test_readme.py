"""The README a newcomer reads top to bottom: the CPU-torch line before the set-up commands (pip would pull a
multi-GB CUDA build first), exactly two set-up commands, and CI running the test one verbatim."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def _setup_section() -> str:
    text = _read("README.md")
    return text.split("## Set up", 1)[1].split("\n## ", 1)[0]


def test_cpu_torch_line_comes_before_the_two_setup_commands():
    section = _setup_section()
    commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(commands) == 2, commands  # the main job, the tests
    assert section.index("pip install torch==2.13.0") < section.index("```bash")


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = re.findall(r"```bash\n(.*?)\n```", _setup_section(), re.S)[1]
    assert "pytest" in test_command
    assert test_command in _read(".ci/run").splitlines()
