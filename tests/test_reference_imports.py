"""The reference trainer is the independent oracle: every module of dsp_fast/reference/ imports, of dsp_fast, only
config, data, models, evaluate, run_io, resume (the run-folder and --resume rules both trainers follow), the
kernels' plain-PyTorch twins and its own modules (docs/layout.md).
If it shared a piece with the fast path (augment, method, engine, pipelines), the equivalence tests could not
catch a bug in that piece."""

import ast
import os
import pathlib
import subprocess
import sys

import dsp_fast.reference

PACKAGE = pathlib.Path(dsp_fast.reference.__file__).parent
ALLOWED = ("dsp_fast.config", "dsp_fast.data", "dsp_fast.models", "dsp_fast.evaluate", "dsp_fast.run_io",
           "dsp_fast.kernels.twins", "dsp_fast.reference", "dsp_fast.resume")
FAST_PATH = ("dsp_fast.augment", "dsp_fast.method", "dsp_fast.engine", "dsp_fast.pipelines", "dsp_fast.train")


def imported_modules(path: pathlib.Path) -> list[str]:
    """Every dsp_fast module a file imports, absolute or relative; `from dsp_fast import x` counts as dsp_fast.x."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this package
                base = ".".join(["dsp_fast", "reference"][: 3 - node.level] + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names] if base in ("dsp_fast", "dsp_fast.kernels") else [base]
    return [n for n in names if n == "dsp_fast" or n.startswith("dsp_fast.")]


def test_reference_imports_only_what_it_may():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) > 1, files  # the package, not one file
    for path in files:
        for name in imported_modules(path):
            assert any(name == a or name.startswith(a + ".") for a in ALLOWED), f"{path.name} imports {name}"


def test_importing_the_reference_loads_no_fast_path_module():
    """The allowed modules themselves pull in nothing of the fast path either (checked in a fresh interpreter)."""
    probe = ("import sys, dsp_fast.reference\n"
             f"print([m for m in sys.modules if m.startswith({FAST_PATH!r})])\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
