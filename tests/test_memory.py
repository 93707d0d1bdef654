"""The memory prediction (`python -m bench.memory`, dsp_fast/engine/memory_model.py) on a CPU: each trainer's step
predicted on fake tensors against the same step on real CPU tensors (`tiny`, 48x48 crops), and the two CUDA-only
paths (the trainer's one-time line beside torch.cuda.max_memory_allocated, the bench's measurement on the GPU) run
on a CPU with the CUDA memory queries stood in for."""

from __future__ import annotations

import types

import torch

from bench.memory import measure_on_device
from bench.memory_steps import check_on_cpu
from dsp_fast.config import load_config
from dsp_fast.engine import memory_model as mm
from dsp_fast.engine.distributed import DistInfo
from dsp_fast.kernels import force_twins
from dsp_fast.models import build_student_teacher

SMALL = ["data.crop_size=[48,48]"]


def test_prediction_matches_real_cpu_step():
    """Tolerances. Live tensor bytes of the real step: within 0.5% of the fake prediction (the same bookkeeping on
    both; a larger gap means fake and real steps allocate differently). The CPU allocator's own peak: 1.0 to 1.3
    times the prediction, because it also counts buffers that kernels allocate inside one operator (oneDNN's,
    which no dispatch-level count sees, as cuDNN's workspaces on a GPU); measured x1.12 (fast) and x1.07
    (reference) here. A missed category would show: the weights alone are 20% of the fast step's peak, and they
    are checked against the models' own parameter count."""
    cfg = load_config("synthetic", SMALL)
    result = check_on_cpu(cfg)
    student, teacher = build_student_teacher(cfg.model, torch.device("cpu"))
    weights = sum(t.numel() * t.element_size() for m in (student, teacher) for t in [*m.parameters(), *m.buffers()])
    momentum = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    for name in ("fast", "reference"):
        r = result[name]
        assert abs(r["live_tensors_mib"] - r["predicted_mib"]) <= 0.005 * r["predicted_mib"], (name, r)
        assert 1.0 <= r["allocator_mib"] / r["predicted_mib"] <= 1.3, (name, r)
        by_cat = r["predicted_by_category_mib"]
        assert by_cat["weights"] * 2**20 == weights and by_cat["optimizer"] * 2**20 == momentum, (name, by_cat)
        assert by_cat["activations"] > by_cat["weights"]  # a training step's peak is its activations
    # the fused MMD never builds the upsampled features: the fast step's peak is well below the reference's
    assert result["fast"]["predicted_mib"] < 0.5 * result["reference"]["predicted_mib"]


class _Run:
    """What report_peak_once reads of a Trainer: a CUDA device (a torch.device object: no GPU needed), the
    config, the warm-up length, say and the metrics log."""

    def __init__(self, cfg, device: str = "cuda", rank: int = 0) -> None:
        self.cfg, self.warmup_steps, self.step_fn = cfg, 12, None
        self.info = DistInfo(rank=rank, world_size=1, device=torch.device(device))
        self.lines: list[str] = []
        self.recorded: list[tuple[int, dict]] = []
        self.log = self  # RunLog.metrics(step, values)

    def say(self, msg: str) -> None:
        self.lines.append(msg)

    def metrics(self, step: int, values: dict) -> None:
        self.recorded.append((step, values))


def test_trainer_line_beside_cuda_peak(monkeypatch):
    """The trainer's hook on a stand-in CUDA run: nothing before the warm-up and capture are done, then one line
    with the prediction beside max_memory_allocated (and both in metrics.jsonl), once; never on CPU or rank > 0."""
    cfg = load_config("synthetic", SMALL)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    run = _Run(cfg)
    mm.report_peak_once(run, 12)  # the capture step itself: not yet
    run.step_fn = types.SimpleNamespace(calls=12)  # a resumed run at step 5000: 12 calls of its graphed step
    mm.report_peak_once(run, 5000)
    assert run.lines == []
    run.step_fn = None
    mm.report_peak_once(run, 50)
    mm.report_peak_once(run, 100)
    [line] = run.lines
    predicted = mm.predict_fast_step(cfg)
    assert f"predicted {predicted.gib():.2f} GiB" in line and "max_memory_allocated 3.00 GiB" in line
    assert f"(x{3 * 2**30 / predicted.peak:.2f}" in line
    [(step, values)] = run.recorded
    assert step == 50 and values["memory/max_allocated_gib"] == 3.0
    assert abs(values["memory/predicted_peak_gib"] - predicted.gib()) < 1e-9
    for other in (_Run(cfg, device="cpu"), _Run(cfg, rank=1)):
        mm.report_peak_once(other, 50)
        assert other.lines == []


def test_measure_on_device_runs_both_trainers_on_cpu():
    """The bench's GPU measurement, on the CPU with the CUDA allocator queries stood in for: each trainer from a
    reset peak, the fast one stepped through Trainer.step, the reference's step twice; peak minus the bytes
    allocated before."""
    calls = []

    class Stub:
        def reset(self) -> int:
            calls.append("reset")
            return 100

        def peak(self) -> int:
            calls.append("peak")
            return 1000 * calls.count("peak")

    with force_twins():  # the control flow is under test, not the kernels: no interpreter
        measured = measure_on_device(load_config("synthetic", ["data.crop_size=[32,32]"]), torch.device("cpu"),
                                     Stub())
    assert calls == ["reset", "peak", "reset", "peak"]
    assert measured == {"fast": 900, "reference": 1900}
