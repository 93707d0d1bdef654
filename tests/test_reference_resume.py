"""The reference trainer resumes from its own last.pt: a short run stopped after its step-3
checkpoint and continued with `--resume auto` ends bit for bit on the uninterrupted run's weights, momentum buffers
and generator states (the tiny model on the synthetic shift, 32x32 crops, 6 steps, CPU); a full disk while last.pt
is written stops it with exit code 4 and the previous last.pt intact."""

from __future__ import annotations

import errno
import glob
import os

import pytest
import torch
from helpers_run import read

from dsp_fast import checkpoint_file, reference
from dsp_fast.reference import job

STEPS = 6


def ref_args(root: str, out: str, *extra: str) -> list[str]:
    return ["--config", "synthetic", f"data.synthetic_root={root}", f"train.out_dir={out}",
            f"train.max_steps={STEPS}", "train.checkpoint_every=3", "data.crop_size=[32,32]", "data.eval_size=[64,32]",
            "data.max_eval_images=1", "train.compare_source_only=false", "train.log_every=0", *extra]


class Killed(Exception):
    """Stands in for a kill after step 3's checkpoint."""


def test_reference_resume_auto_ends_bit_for_bit(synthetic_root, tmp_path, monkeypatch, capsys):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert reference.main(ref_args(synthetic_root, full)) == 0

    real_step = job.train_step

    def step_then_die(cfg, student, teacher, optimizer, step, batch, choices):
        if step == 3:
            raise Killed
        return real_step(cfg, student, teacher, optimizer, step, batch, choices)

    monkeypatch.setattr(job, "train_step", step_then_die)
    with pytest.raises(Killed):
        reference.main(ref_args(synthetic_root, killed))
    last = os.path.join(killed, "reference", "last.pt")
    assert read(last)["step"] == 3
    monkeypatch.setattr(job, "train_step", real_step)
    capsys.readouterr()
    assert reference.main(ref_args(synthetic_root, killed, "--resume", "auto")) == 0
    assert f"resumed from {last} at step 3" in capsys.readouterr().out

    a, b = read(os.path.join(full, "reference", "last.pt")), read(last)
    assert a["step"] == b["step"] == STEPS
    for key in ("student", "teacher"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs"
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), f"momentum {i}"
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"]) and torch.equal(a["rng"]["choices"], b["rng"]["choices"])


def test_a_reference_checkpoint_of_another_run_is_refused(synthetic_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert reference.main(ref_args(synthetic_root, out)) == 0
    assert reference.main([*ref_args(synthetic_root, out), "train.max_steps=8", "--resume", "auto"]) == 2
    assert "was trained with train.max_steps=6" in capsys.readouterr().err


def test_a_full_disk_stops_the_reference_with_exit_4_and_keeps_last_pt(synthetic_root, tmp_path, monkeypatch,
                                                                      capsys):
    out = str(tmp_path / "run")
    real_write, starts = checkpoint_file._HashingFile.write, []

    def write(self, data):
        if "last.pt" in self.f.name and self.f.tell() == 0:
            starts.append(self.f.name)
        if len(starts) == 2 and self.f.tell() > 1000:  # the second checkpoint (step 6) runs out of space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(checkpoint_file._HashingFile, "write", write)
    assert reference.main(ref_args(synthetic_root, out)) == 4
    err = capsys.readouterr().err.strip()
    last = os.path.join(out, "reference", "last.pt")
    assert err.startswith(f"error: could not write {last}: No space left on device (ENOSPC)") and "\n" not in err
    assert not glob.glob(os.path.join(out, "reference", "*.tmp*"))
    assert checkpoint_file.verify_checkpoint_file(last) and read(last)["step"] == 3


def test_the_reference_follows_the_same_resume_rules(synthetic_root, tmp_path, capsys):
    """One set of rules (dsp_fast.resume) for both trainers: a seed override is refused naming train.seed, exit 2,
    as in the fast trainer; the run folder alone resumes, with its saved config (the command's --config and
    overrides are not needed)."""
    out = str(tmp_path / "run")
    assert reference.main(ref_args(synthetic_root, out)) == 0
    capsys.readouterr()
    assert reference.main([*ref_args(synthetic_root, out), "train.seed=1", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "trained with train.seed=0; the override train.seed=1 would make it 1" in err, err
    folder = os.path.join(out, "reference")
    assert reference.main(["--resume", folder]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert f"with its saved config {os.path.join(folder, 'config.yaml')} (in place of --config)" in stdout, stdout
    assert f"resumed from {os.path.join(folder, 'last.pt')} at step {STEPS}" in stdout, stdout
