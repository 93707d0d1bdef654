"""What a run leaves and says: each run its own folder, named at the start and at the end, from any working
directory; the final figures (the student's, named so, and the teacher's) in the table, metrics.jsonl and
summary.json, written once even when a finished run is resumed; the provenance of every run; an ETA smoothed over
the log intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers_run import REPO, env, quiet_args, tiny_args

from dsp_fast import evaluate, run_io, train
from dsp_fast.config import load_config


def final_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("final")]


def test_main_job_runs_from_any_folder_and_each_run_gets_its_own_folder(synthetic_root, tmp_path, monkeypatch,
                                                                         capsys):
    elsewhere = tmp_path / "elsewhere"  # outside the repository: no configs/ folder here
    elsewhere.mkdir()
    args = tiny_args(synthetic_root, "runs/x", 2, "train.log_every=1", "--image-every", "0")
    proc = subprocess.run([sys.executable, "-m", "dsp_fast.train", *args], cwd=elsewhere, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first = elsewhere / "runs" / "x"
    assert proc.stdout.count(f"run folder: {first}") == 2  # at the start and at the end
    summary = json.loads((first / "summary.json").read_text())
    model = summary["models"]["adapted (DSP)"]
    assert model["steps"] == 2 and len(model["iou"]) == 19 and 1 <= model["classes_evaluated"] <= 19
    final = json.loads((first / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["final"] and final["mIoU"] == pytest.approx(model["mIoU"]) and "road" in final["iou"]
    assert f"(over {model['classes_evaluated']} of 19 classes)" in proc.stdout

    kept = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    monkeypatch.chdir(elsewhere)
    assert train.main(args) == 0  # the same out_dir again: a new folder, the first run untouched
    assert f"run folder: {elsewhere / 'runs' / 'x_2'}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == kept
    assert (elsewhere / "runs" / "x_2" / "summary.json").is_file()


def test_resume_auto_with_no_earlier_run_says_so_and_a_finished_run_is_not_scored_twice(tiny_run, synthetic_root,
                                                                                        tmp_path, capsys):
    fresh = str(tmp_path / "fresh")
    assert train.main(quiet_args(synthetic_root, fresh, 2, "--resume", "auto")) == 0
    assert f"--resume auto: no earlier run in {fresh}, starting a fresh run" in capsys.readouterr().out
    assert len(final_records(tiny_run)) == 1
    assert train.main(["--resume", tiny_run]) == 0
    out = capsys.readouterr().out
    assert "already finished at step 2" in out and "mIoU19" in out, out
    assert len(final_records(tiny_run)) == 1  # resumed, not scored again


def test_the_final_table_names_the_student_and_the_summary_gives_the_teacher(synthetic_root, tmp_path, capsys):
    """The table says whose mIoU it prints (the student's) and the summary gives the teacher's as well: the two
    differ (on the synthetic shift the teacher once scored 40.9 against the student's 29.3 on one checkpoint)."""
    out = str(tmp_path / "run")
    assert train.main(quiet_args(synthetic_root, out, 2)) == 0
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


def test_eta_is_smoothed_over_log_intervals(tmp_path, monkeypatch, capsys):
    clock = iter([0.0, 1.0, 2.0, 12.0, 13.0])  # one slow interval of 10 s among 1 s ones
    monkeypatch.setattr(run_io.time, "perf_counter", lambda: next(clock))
    log = run_io.RunLog(load_config(None, ["train.log_every=1"]), str(tmp_path), "t")
    log.start(100, 2)
    for step in range(1, 5):
        log.step(step, {"loss": 1.0})
    log.close()
    etas = []
    for line in capsys.readouterr().out.splitlines():
        h, m, sec = (int(v) for v in line.rsplit("ETA ", 1)[1].split(":"))
        etas.append(3600 * h + 60 * m + sec)
    assert etas[:2] == [99, 98]  # 1 s per step
    # one interval of 10 s per step: unsmoothed, the ETA would jump to 97 x 10 s and straight back down
    assert 98 < etas[2] < 0.3 * 97 * 10 and etas[2] > etas[3] > 98


def test_runs_started_at_once_get_a_folder_each(tmp_path):
    """Eight runs claim a run folder of the same free root at the same moment: eight different folders."""
    import threading

    from dsp_fast.resume import new_run_dir

    root, start, got = str(tmp_path / "runs" / "same"), threading.Barrier(8), []

    def claim() -> None:
        start.wait()
        got.append(new_run_dir(root))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and root in got


def test_resume_auto_passes_over_a_newer_folder_without_a_checkpoint(tmp_path, capsys):
    """A start that failed after its folder was made (rb_2: a config, no checkpoint) must not hide the interrupted
    run (rb, with a checkpoint): --resume auto continues rb and says it passed over rb_2."""
    from dsp_fast.config import save_config
    from dsp_fast.engine.checkpoint import CHECKPOINTS
    from dsp_fast.resume import ResumeError, find_checkpoints, new_run_dir, resume_config

    root = str(tmp_path / "rb")
    interrupted, failed = new_run_dir(root), None
    save_config(load_config("synthetic", [f"train.out_dir={root}", "train.seed=7"]), os.path.join(interrupted,
                                                                                                  "config.yaml"))
    open(os.path.join(interrupted, "ckpt_00000021.pt"), "wb").close()
    failed = new_run_dir(root)
    save_config(load_config("synthetic", [f"train.out_dir={root}"]), os.path.join(failed, "config.yaml"))
    cfg = resume_config("auto", [], lambda: load_config("synthetic", [f"train.out_dir={root}"]), CHECKPOINTS)
    assert cfg.train.seed == 7, "the interrupted run's own config"
    # then the trainer looks for the checkpoint in the same folder (the stand-in file is empty: not loadable)
    with pytest.raises(ResumeError, match=f"no good checkpoint in {interrupted}"):
        find_checkpoints("auto", root, [("", cfg)], CHECKPOINTS)
    out = capsys.readouterr().out
    assert out.count(f"passing over {failed}") == 1 and f"continuing {os.path.abspath(interrupted)}" in out
