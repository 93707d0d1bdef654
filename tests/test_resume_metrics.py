"""Metrics continue after a resume instead of repeating: a run killed after its last checkpoint logged steps that
the resumed run trains again; those records are dropped, so metrics.jsonl holds every step once, in order, and
summary.json's total time counts the training seconds of the start before the kill."""

from __future__ import annotations

import json
import os
import signal

from helpers_run import TRAIN, Watched, tiny_args

from dsp_fast.config import load_config
from dsp_fast.run_io import RunLog, recorded_seconds


def records(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sigkill_after_the_checkpoint_then_resume_logs_every_step_once(synthetic_root, tmp_path):
    out, steps = str(tmp_path / "run"), 12
    args = tiny_args(synthetic_root, out, steps, "train.log_every=1", "train.checkpoint_every=4", "train.eval_every=5",
                     "--image-every", "0", "--no-tensorboard")
    run = Watched(TRAIN + args, str(tmp_path / "err1"))
    run.until(lambda step, _: step is not None and step >= 6)  # after the checkpoint of step 4, before step 8's
    run.proc.send_signal(signal.SIGKILL)
    code, _, stderr = run.finish()
    assert code == -signal.SIGKILL, stderr[-2000:]
    first = records(out)
    first_s = max(r.get("elapsed_s", 0) for r in first)
    ckpt = max(int(n[5:13]) for n in os.listdir(out) if n.startswith("ckpt_") and n.endswith(".pt"))
    assert max(r["step"] for r in first) > ckpt  # steps past the checkpoint were logged and will be trained again

    run = Watched(TRAIN + args + ["--resume", "auto"], str(tmp_path / "err2"))
    code, stdout, stderr = run.finish()
    assert code == 0, stderr[-3000:]
    assert f"records after step {ckpt} dropped" in stdout, stdout[-3000:]
    progress = [r["step"] for r in records(out) if "loss" in r]
    assert progress == list(range(1, steps + 1)), progress  # each step once, increasing
    evals = [r["step"] for r in records(out) if "eval/mIoU" in r and not r.get("final")]
    assert evals == sorted(set(evals)) == [5, 10], evals
    elapsed = [r["elapsed_s"] for r in records(out) if "loss" in r]
    assert elapsed == sorted(elapsed), elapsed  # the resumed part counts on from the kept records
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    # the first start's training seconds up to the checkpoint are counted, and the total holds them
    assert 0 < summary["earlier_s"] <= first_s and summary["total_s"] >= summary["earlier_s"], summary
    assert summary["total_s"] >= first_s, (summary, first_s)  # the resumed part trains at least the steps lost


def test_run_log_keeps_records_up_to_the_step_continued_from(tmp_path, capsys):
    """Records after the step (and a line cut by a kill) go; elapsed_s counts on from the last kept record."""
    cfg = load_config("synthetic", ["train.log_every=1"])
    folder = tmp_path / "model"
    folder.mkdir()
    lines = [{"step": 1, "loss": 1.0, "elapsed_s": 2.0}, {"step": 2, "loss": 1.0, "elapsed_s": 4.0},
             {"step": 2, "eval/mIoU": 0.1}, {"step": 3, "loss": 1.0, "elapsed_s": 6.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert recorded_seconds(str(folder), 2) == 4.0 and recorded_seconds(str(folder), 0) == 0.0
    log = RunLog(cfg, str(folder), title="t")
    log.start(total_steps=5, images_per_step=2, start_step=2)
    assert f"[t] {folder / 'metrics.jsonl'}: 2 records after step 2 dropped" in capsys.readouterr().out
    log.step(3, {"loss": 0.5})
    log.close()
    kept = records(str(folder))
    assert [r["step"] for r in kept] == [1, 2, 2, 3] and kept[-1]["loss"] == 0.5
    assert kept[-1]["elapsed_s"] >= 4.0  # 4 s before the resume, plus this start's (tolerance: none, it only adds)
