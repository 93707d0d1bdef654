"""What a GPU machine must have before `bench/gpu_check.sh` spends its minutes there, checked in seconds.

    python -m bench.gpu_preflight [--no-gpu]       # exit 1 when a blocking check fails

Each line: PASS / FAIL / WARN, the check, what was found. Blocking (FAIL): torch imports, CUDA is visible (unless
--no-gpu), triton imports, a C compiler and Python.h exist (Triton compiles a small C launcher for every kernel
the first time it runs: without them every kernel fails), dsp_fast's sources are here. Not blocking (WARN): an
editable install needs setuptools >= 70.1 or `wheel` (gpu_check.sh falls back to a link farm without one);
torchvision's nvJPEG decode (only the GPU data-path benchmark needs it); DALI (absent on the GPU machine: the
throughput uses the torch data backend). CI runs it with --no-gpu, so the checks themselves are tested.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_python() -> tuple[bool, str]:
    names = {n: shutil.which(n) for n in ("python3", "python")}
    found = ", ".join(f"{n} -> {p}" for n, p in names.items() if p) or "neither on PATH"
    return True, f"{sys.executable} ({sys.version.split()[0]}); {found}"


def check_torch(need_gpu: bool) -> tuple[bool, str]:
    import torch

    if not need_gpu:
        return True, f"torch {torch.__version__} (GPU not required: --no-gpu)"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__}: CUDA not available"
    return True, f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}"


def check_triton() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as e:
        return False, f"triton does not import: {e}"
    return True, f"triton {triton.__version__}"


def check_c_toolchain() -> tuple[bool, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    missing = [what for what, ok in (("a C compiler (cc/gcc/clang or $CC)", cc), ("Python.h", os.path.exists(header)))
               if not ok]
    if missing:
        return False, f"missing {' and '.join(missing)}: Triton cannot build its kernel launchers ({header})"
    return True, f"{cc}; {header}"


def check_sources() -> tuple[bool, str]:
    needed = ("setup.py", "dsp_fast/__init__.py", "kernels/__init__.py", "pipelines/__init__.py")
    missing = [p for p in needed if not os.path.exists(os.path.join(REPO, p))]
    return not missing, f"missing {missing}" if missing else f"sources at {REPO}"


def check_editable_install() -> tuple[bool, str]:
    """PEP 660 editable installs without build isolation need setuptools >= 70.1 (bdist_wheel inside) or wheel."""
    try:
        import setuptools
    except ImportError:
        return False, "setuptools missing: no editable install (gpu_check.sh uses a link farm instead)"
    have_wheel = importlib.util.find_spec("wheel") is not None
    ok = _version_tuple(setuptools.__version__) >= (70, 1) or have_wheel
    return ok, f"setuptools {setuptools.__version__}, wheel {'present' if have_wheel else 'absent'}"


def check_nvjpeg(need_gpu: bool) -> tuple[bool, str]:
    try:
        import torch
        import torchvision
        from torchvision.io import decode_jpeg, encode_jpeg
    except Exception as e:  # noqa: BLE001 - any import failure means: no GPU JPEG decode here
        return False, f"torchvision does not import: {type(e).__name__}: {e}"
    if not need_gpu:
        return True, f"torchvision {torchvision.__version__} imports (decode not tried: --no-gpu)"
    data = encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))
    img = decode_jpeg(data, device="cuda")
    return tuple(img.shape) == (3, 16, 16), f"torchvision {torchvision.__version__}: nvJPEG decoded {tuple(img.shape)}"


def check_dali() -> tuple[bool, str]:
    try:
        import nvidia.dali as dali
    except ImportError:
        return False, "DALI absent: the throughput uses --data-backend torch"
    return True, f"DALI {dali.__version__}"


def run(need_gpu: bool) -> list[tuple[str, str, str]]:
    checks: list[tuple[str, bool, Callable[[], tuple[bool, str]]]] = [
        ("python", True, check_python),
        ("torch + CUDA", True, lambda: check_torch(need_gpu)),
        ("triton", True, check_triton),
        ("C compiler + Python.h", True, check_c_toolchain),
        ("sources", True, check_sources),
        ("editable install", False, check_editable_install),
        ("torchvision nvJPEG", False, lambda: check_nvjpeg(need_gpu)),
        ("DALI", False, check_dali),
    ]
    rows = []
    for name, blocking, fn in checks:
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a check that crashes has failed, with the reason shown
            ok, detail = False, f"{type(e).__name__}: {e}"
        rows.append(("PASS" if ok else ("FAIL" if blocking else "WARN"), name, detail))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-gpu", action="store_true", help="do not require CUDA (CI checks the checks)")
    args = p.parse_args(argv)
    rows = run(need_gpu=not args.no_gpu)
    for status, name, detail in rows:
        print(f"{status:<5}{name:<24}{detail}")
    failed = [name for status, name, _ in rows if status == "FAIL"]
    print(f"preflight: {'FAILED: ' + ', '.join(failed) if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
