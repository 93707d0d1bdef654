"""Verified checkpoints and safe writes, on the tiny model over the synthetic shift: a torn
or corrupt newest checkpoint makes `--resume auto` continue from the newest good one and end bit for bit on the
uninterrupted run; `evaluate` refuses a corrupt file in one line; pruning never deletes the checkpoint just
written; a full disk during a checkpoint write is one clear line, exit code 4, no temp file, the previous checkpoint
intact; a full disk under metrics.jsonl is said once and the run goes on."""

from __future__ import annotations

import errno
import glob
import os
import shutil

import pytest
import torch
from helpers_run import assert_same_state, read, tiny_args

from dsp_fast import checkpoint_file, evaluate, train
from dsp_fast.config import load_config
from dsp_fast.engine import checkpoint as ckpt_io
from dsp_fast.run_io import RunLog

STEPS = 12
EXTRA = ("train.checkpoint_every=4", "--keep-last", "3", "--image-every", "0", "--no-tensorboard",
         "train.log_every=0")


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory) -> str:
    """One uninterrupted run of 12 steps with checkpoints at 4, 8 and 12 (about 5 s on 2 cores)."""
    out = str(tmp_path_factory.mktemp("full") / "run")
    assert train.main(tiny_args(synthetic_root, out, STEPS, *EXTRA)) == 0
    return out


def _killed_copy(finished_run: str, tmp_path) -> str:
    """The run folder as a kill after step 8's checkpoint leaves it (step 12's checkpoint not yet written)."""
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    checkpoint_file.remove_checkpoint(os.path.join(run, ckpt_io.checkpoint_name(STEPS)))
    return run


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)


def _flip_bytes(path: str) -> None:
    """A storage fault in the middle of the file: inside a tensor's bytes, which torch.load reads without a check."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes], ids=["torn", "flipped"])
def test_resume_auto_passes_over_a_bad_newest_checkpoint_and_ends_bit_for_bit(finished_run, tmp_path, capsys,
                                                                              synthetic_root, damage):
    run = _killed_copy(finished_run, tmp_path)
    newest = os.path.join(run, ckpt_io.checkpoint_name(8))
    damage(newest)
    capsys.readouterr()
    assert train.main(tiny_args(synthetic_root, run, STEPS, *EXTRA, "--resume", "auto")) == 0
    out, err = capsys.readouterr()
    assert newest in err and os.path.join(run, ckpt_io.checkpoint_name(4)) in err and "newest good one" in err, err
    assert "at step 4" in out
    name = ckpt_io.checkpoint_name(STEPS)
    assert_same_state(read(os.path.join(finished_run, name)), read(os.path.join(run, name)))
    assert checkpoint_file.verify_checkpoint_file(os.path.join(run, name))


def test_a_checkpoint_without_checksum_still_resumes(finished_run, tmp_path, capsys, synthetic_root):
    """Checkpoints written before checksums existed: unverified, read as before."""
    run = _killed_copy(finished_run, tmp_path)
    os.remove(os.path.join(run, ckpt_io.checkpoint_name(8)) + checkpoint_file.CHECKSUM_SUFFIX)
    assert train.main(tiny_args(synthetic_root, run, STEPS, *EXTRA, "--resume", "auto")) == 0
    assert "at step 8" in capsys.readouterr().out


def test_evaluate_refuses_a_corrupt_checkpoint_in_one_line(finished_run, tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    src = os.path.join(finished_run, ckpt_io.checkpoint_name(STEPS))
    shutil.copy(src, path)
    shutil.copy(src + checkpoint_file.CHECKSUM_SUFFIX, path + checkpoint_file.CHECKSUM_SUFFIX)
    _flip_bytes(path)
    assert evaluate.main(["--checkpoint", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and path in err and "corrupt" in err and "\n" not in err, err


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A bad ckpt_9 left by an earlier start (a resume fell back from it) sorts after the step-8 checkpoint being
    written: keep-last 1 must not make that new, good one the one deleted."""
    run = str(tmp_path)
    checkpoint_file.atomic_torch_save({"step": 4}, os.path.join(run, ckpt_io.checkpoint_name(4)))
    with open(os.path.join(run, ckpt_io.checkpoint_name(9)), "wb") as f:
        f.write(b"torn")
    path = ckpt_io.save(run, {"step": 8, "w": torch.ones(3)}, keep_last=1)
    assert os.path.exists(path) and checkpoint_file.verify_checkpoint_file(path)
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [8, 9]
    assert not os.path.exists(os.path.join(run, ckpt_io.checkpoint_name(4)) + checkpoint_file.CHECKSUM_SUFFIX)


def test_a_full_disk_during_a_checkpoint_write_is_one_clear_error(synthetic_root, tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    real_write = checkpoint_file._HashingFile.write

    def write(self, data):
        if ckpt_io.checkpoint_name(8) in self.f.name and self.f.tell() > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(checkpoint_file._HashingFile, "write", write)
    assert train.main(tiny_args(synthetic_root, run, STEPS, *EXTRA)) == checkpoint_file.EXIT_WRITE_FAILED == 4
    err = capsys.readouterr().err.strip()
    target, previous = (os.path.join(run, ckpt_io.checkpoint_name(s)) for s in (8, 4))
    assert err.startswith("error: could not write") and target in err and "No space left on device (ENOSPC)" in err
    assert "MiB free" in err and f"previous checkpoint stands: {previous}" in err and "\n" not in err, err
    assert not glob.glob(os.path.join(run, "*.tmp*"))
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [4]
    assert checkpoint_file.verify_checkpoint_file(previous) and read(previous)["step"] == 4


def test_a_failed_metrics_write_is_said_once_and_the_run_goes_on(tmp_path, capsys):
    log = RunLog(load_config("synthetic"), str(tmp_path))

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    log._file = FullDisk()
    log.metrics(1, {"eval/mIoU": 0.5})
    log.metrics(2, {"eval/mIoU": 0.5})
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning: could not write") == 1 and "metrics.jsonl" in err and "training continues" in err


def test_a_full_disk_while_a_run_file_is_written_is_one_clear_error(tmp_path, monkeypatch):
    """summary.json and provenance.json: a failed write raises RunWriteError (exit 4) naming the file and the free
    space, leaves no temporary file and keeps the earlier file as it was."""
    from dsp_fast.run_io import RunWriteError, write_provenance, write_summary

    write_summary(str(tmp_path), {"models": {"a": 1}})
    before = (tmp_path / "summary.json").read_text()
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp." in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    for write in (lambda: write_summary(str(tmp_path), {"models": {"b": 2}}),
                  lambda: write_provenance(str(tmp_path), torch.device("cpu"))):
        with pytest.raises(RunWriteError) as err:
            write()
        assert "ENOSPC" in str(err.value) and "MiB free" in str(err.value) and str(tmp_path) in str(err.value)
    monkeypatch.undo()
    assert (tmp_path / "summary.json").read_text() == before
    assert not glob.glob(str(tmp_path / "*.tmp*")) and not (tmp_path / "provenance.json").exists()
