"""A researcher's second hour: errors that say what is wrong in one line, and nothing done without a word (an
evaluation of another architecture, a GPU that is not there, a --resume with nothing to resume, a dataset
generated in the current folder, a finished run resumed, torchrun's warnings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dsp_fast import evaluate, run_io, train
from dsp_fast.data.synthetic import SyntheticSpec, ensure_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(root: str, out: str, steps: int, *extra: str) -> list[str]:
    return ["--config", "synthetic", f"data.synthetic_root={root}", f"train.out_dir={out}",
            f"train.max_steps={steps}", "data.crop_size=[32,32]", "data.eval_size=[64,32]", "data.max_eval_images=2",
            "train.compare_source_only=false", "train.log_every=1", "--image-every", "0", "--no-tensorboard", *extra]


def final_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("final")]


@pytest.fixture(scope="module")
def tiny_run(synthetic_root, tmp_path_factory) -> str:
    """A finished 2-step run of the tiny model (its folder)."""
    out = str(tmp_path_factory.mktemp("second_hour") / "run")
    assert train.main(tiny_args(synthetic_root, out, 2)) == 0
    return out


def test_a_checkpoint_of_another_architecture_is_one_line_naming_both(tiny_run, capsys):
    """It used to print torch's list of every missing and unexpected key (12.5 KB), and never the saved arch."""
    ckpt = os.path.join(tiny_run, "ckpt_00000002.pt")
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", ckpt, "--config", "synthetic_mitb0"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'tiny' model" in err and "model.arch='mit_b0'" in err and len(err.splitlines()) == 1, err
    assert evaluate.main(["--checkpoint", ckpt, "model.mmd_dim=8"]) == 2  # same arch, another shape
    err = capsys.readouterr().err
    assert "of another shape" in err and len(err) < 400 and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_an_error_exit_2(tmp_path, capsys):
    """It was a SystemExit with the bare message: exit code 1, no 'error:' prefix."""
    assert train.main(tiny_args(str(tmp_path / "unused"), str(tmp_path / "run"), 2, "train.device=cuda")) == 2
    assert capsys.readouterr().err.startswith("error: train.device is 'cuda' but torch sees no GPU")
    assert not (tmp_path / "unused").exists()


def test_resume_auto_with_no_earlier_run_says_so_and_a_finished_run_is_not_scored_twice(tiny_run, synthetic_root,
                                                                                        tmp_path, capsys):
    fresh = str(tmp_path / "fresh")
    assert train.main(tiny_args(synthetic_root, fresh, 2, "--resume", "auto")) == 0
    assert f"--resume auto: no earlier run in {fresh}, starting a fresh run" in capsys.readouterr().out
    assert len(final_records(tiny_run)) == 1
    assert train.main(["--resume", tiny_run]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2" in out and "mIoU19" in out, out
    assert len(final_records(tiny_run)) == 1  # resumed, not scored again


def test_the_final_table_names_the_student_and_the_summary_gives_the_teacher(synthetic_root, tmp_path, capsys):
    """The printed mIoU was the student's without saying so, and the teacher's was nowhere (on the synthetic shift
    the teacher scored 40.9 against the student's 29.3 on the same checkpoint)."""
    out = str(tmp_path / "run")
    assert train.main(tiny_args(synthetic_root, out, 2)) == 0
    printed = capsys.readouterr().out
    assert "target IoU of the student after 2 steps" in printed and "teacher (the student's EMA) mIoU19" in printed
    assert "student mIoU (reported)" in printed and "teacher mIoU" in printed
    with open(os.path.join(out, "summary.json")) as f:
        model = json.load(f)["models"]["adapted (DSP)"]
    assert model["scored"] == "student" and set(model["teacher_iou"]) == set(model["iou"])
    assert final_records(out)[-1]["teacher_mIoU"] == model["teacher_mIoU"]
    report = tmp_path / "teacher.json"
    assert evaluate.main(["--checkpoint", os.path.join(out, "ckpt_00000002.pt"), "--which", "teacher",
                          "--json", str(report)]) == 0
    assert json.loads(report.read_text())["mIoU19"] == pytest.approx(model["teacher_mIoU"], abs=1e-12)


def test_every_run_folder_records_its_provenance(tiny_run, tmp_path):
    """git sha and dirty flag (here: a git checkout), torch / triton / DALI versions, device, command line."""
    with open(os.path.join(tiny_run, "provenance.json")) as f:
        prov = json.load(f)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert prov["git"]["sha"] == head and isinstance(prov["git"]["dirty"], bool)
    assert prov["torch"] == torch.__version__ and prov["triton"] and prov["dali"]  # a version or 'not installed'
    assert prov["device"].startswith("cpu") and "pytest" in prov["command"] and prov["world_size"] == 1
    assert run_io.git_state(str(tmp_path)) == "unknown"  # not a git checkout
    run_io.write_provenance(tiny_run, torch.device("cpu"))  # as a resume does: the first start's record is kept
    with open(os.path.join(tiny_run, "provenance.json")) as f:
        again = json.load(f)
    assert again["date"] == prov["date"] and len(again["resumes"]) == len(prov.get("resumes", [])) + 1


def test_generating_the_synthetic_set_says_where(tmp_path, capsys):
    """`evaluate` run from another folder (a checkpoint's relative data.synthetic_root) generated tens of MB in the
    current folder without a word; ensure_synthetic, which every command goes through, now says so, once."""
    spec = SyntheticSpec(source_count=2, target_train_count=1, target_val_count=1)
    root = tmp_path / "syn"
    ensure_synthetic(str(root), spec=spec, workers=1)
    assert f"generating the built-in synthetic domain-shift dataset into {root}" in capsys.readouterr().out
    ensure_synthetic(str(root), spec=spec, workers=1)
    assert "generating" not in capsys.readouterr().out


def test_torchrun_prints_neither_deprecation_nor_find_unused_warnings(synthetic_root, tmp_path):
    """Every 2-rank run printed torch's FutureWarning for torch.distributed.nn.functional.all_gather (global BN's
    and the MMD's gathers) and, training source-only, DDP's find_unused_parameters warning."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dsp_fast.train",
           *tiny_args(synthetic_root, str(tmp_path / "ddp"), 2, "train.compare_source_only=true")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is deprecated" not in proc.stderr and "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    assert "weights identical on the 2 ranks" in proc.stdout
