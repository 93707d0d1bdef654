"""A full disk while the data is generated or prepared is the run's write error, as during training: one line naming
the file and the free space, exit code 4, no run folder (not `[Errno 28]` with no file, exit 2). The disk is made
full by a write that raises ENOSPC, as the kernel does."""

from __future__ import annotations

import errno
import os
import re

import pytest
from helpers_run import tiny_args
from PIL import Image

from dsp_fast import prepare, reference, train
from dsp_fast.atomic_io import atomic_write
from dsp_fast.data import synthetic

FULL = re.compile(r"^error: could not write (\S+): No space left on device \(ENOSPC\); [\d.]+ MiB free in ")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_line(err: str) -> str:
    """The file the one error line names."""
    lines = err.strip().splitlines()
    m = FULL.match(lines[-1])
    assert m and len([line for line in lines if line.startswith("error:")]) == 1, err
    return m.group(1)


def test_a_full_disk_while_preparing_exits_4_naming_the_file(synthetic_root, tmp_path, monkeypatch, capsys):
    # the write fails inside the real atomic write, as a full disk makes it (forked preparation workers inherit it)
    monkeypatch.setattr(prepare, "atomic_write", lambda path, content, durable=True: atomic_write(path, _no_space))
    prepared = tmp_path / "prepared"
    code = train.main(tiny_args(synthetic_root, str(tmp_path / "runs"), 2, f"fast.prepared_dir={prepared}"))
    named = _full_disk_line(capsys.readouterr().err)
    assert code == 4 and named.startswith(str(prepared)) and named.endswith((".png", ".json")), named
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("trainer", [train.main, reference.main])
def test_a_full_disk_while_generating_the_synthetic_data_exits_4_naming_the_file(trainer, tmp_path, monkeypatch,
                                                                               capsys):
    real = synthetic._generate_into
    # in this process (the generator's pool would not see the full disk made here)
    monkeypatch.setattr(synthetic, "_generate_into", lambda out, spec, workers: real(out, spec, 1))
    monkeypatch.setattr(Image.Image, "save", _no_space)
    code = trainer(tiny_args(str(tmp_path / "syn"), str(tmp_path / "runs"), 2))
    named = _full_disk_line(capsys.readouterr().err)
    assert code == 4 and named.startswith(str(tmp_path / ".syn.tmp-")) and named.endswith(".png"), named
    assert not (tmp_path / "runs").exists() and not (tmp_path / "syn").exists()


def test_the_prepare_command_exits_4_on_a_full_disk(synthetic_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "atomic_write", lambda path, content, durable=True: atomic_write(path, _no_space))
    out = tmp_path / "out"
    code = prepare.main(["--dataset", "gta5", "--root", os.path.join(synthetic_root, "gta5"), "--out", str(out),
                         "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 4 and f"could not write {out}" in err and "the images done so far are kept" in err, err
