"""N ranks compute the step of one rank on the global batch, as docs/distributed.md describes the scaling out: two
gloo ranks with one image each against one process with both images, same seeds and same random choices; and the
batch-size semantics.

The 2-rank side runs three variants in one spawn (a process group costs seconds): everything on, global BN off,
the MMD all-gather off. The last two must NOT match: that shows the test sees each of the two mechanisms.
"""

from __future__ import annotations

import copy
import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_capture import OpRecorder
from helpers_step import CPU, buffers, fast_context, make_batch, make_cfg, make_choices, to_device_choices

from dsp_fast.config import ConfigError
from dsp_fast.engine.batchnorm import convert_global_bn
from dsp_fast.engine.distributed import DistInfo, per_rank_batch
from dsp_fast.engine.model_setup import apply_ddp, build_models
from dsp_fast.engine.optimizer import scheduled_lr
from dsp_fast.engine.step import read_stats, train_step
from dsp_fast.engine.trainer import step_ranks
from dsp_fast.method import DeviceChoices

STEP = 3
VARIANTS = ("all", "no_global_bn", "no_mmd_gather")


def _cfg():
    # c = 1 instead of 1e-4: the MMD's share of the update is then large enough for the weights to show a missing
    # all-gather, not only the reported MMD term; a low confidence threshold makes q non-zero (and per rank unequal)
    return make_cfg(mmd_weight=1.0, conf_threshold=0.1)


def _inputs(cfg):
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(gen)
    return batch, to_device_choices(make_choices(cfg, batch[3], gen))


def _rank_slice(batch, ch: DeviceChoices, rank: int, n: int):
    """This rank's images and per-image choices: class ranks, augmentation rows and the long-tail crops of its
    template images (image-major, L per image); the long-tail classes are the step's, shared."""
    per = slice(rank * n, (rank + 1) * n)
    n_lt = ch.lt_cls.shape[0]
    per_crop = slice(rank * n * n_lt, (rank + 1) * n * n_lt)
    part = tuple(t[per] for t in batch)
    return part, dataclasses.replace(ch, class_u=ch.class_u[per], aug_src=ch.aug_src[per], aug_tgt=ch.aug_tgt[per],
                                     lt_img=ch.lt_img[per_crop], lt_label=ch.lt_label[per_crop])


def _step(cfg, student, teacher, batch, choices, ranks=None, sync=False, syncs: list | None = None):
    """One fast step; `syncs` collects the host syncs the op recorder sees in it (the collectives included)."""
    ctx = fast_context(cfg, student, teacher, group_size=batch[0].shape[0])
    if ranks is not None:
        ctx.ranks, ctx.sync_flag = ranks, sync
    ctx.set_schedule_(STEP, scheduled_lr(cfg.optim, STEP, cfg.train.max_steps))
    buf = buffers(batch, choices)
    with OpRecorder() as rec:
        train_step(ctx, buf)
    if syncs is not None:
        syncs.extend(str(f) for f in rec.syncs)
    losses, skipped, _ = read_stats(ctx)
    assert skipped == 0
    return losses


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = _cfg()
        batch, choices = _inputs(cfg)
        part, ch = _rank_slice(batch, choices, rank, 1)
        info = DistInfo(rank, 2, rank, CPU)
        for variant in VARIANTS:
            student, teacher = build_models(cfg, CPU)
            if variant != "no_global_bn":
                convert_global_bn(student)
                convert_global_bn(teacher)
            ranks = step_ranks(2)
            if variant == "no_mmd_gather":  # each rank's MMD over its own vectors only
                ranks = dataclasses.replace(ranks, gather_rows=lambda rows: rows)
            ddp = apply_ddp(student, info, find_unused=False)
            syncs: list[str] = []
            losses = _step(cfg, ddp, teacher, part, ch, ranks, sync=True, syncs=syncs)
            del ddp
            if rank == 0:
                out[variant] = (losses, copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict()))
                out[f"{variant}_syncs"] = syncs
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        return dict(out)


@pytest.fixture(scope="module")
def one_process():
    cfg = _cfg()
    batch, choices = _inputs(cfg)
    student, teacher = build_models(cfg, CPU)
    losses = _step(cfg, student, teacher, batch, choices)
    return losses, student.state_dict(), teacher.state_dict()


# fp32: the two sides sum the same numbers in another order (BN statistics combined from two shards, the gradient
# all-reduce), so they agree to a few float32 ulps per op. Measured (torch 2.13 CPU): losses within 1e-7 relative,
# weights and BN buffers within 5e-7 after one SGD step (lr 1e-2); the bounds leave a 4-100x margin.
LOSS_REL, WEIGHT_ATOL = 1e-5, 2e-6


def _gaps(a, b) -> tuple[float, float]:
    loss_gap = max(abs(a[0][k] - b[0][k]) / max(abs(b[0][k]), 1e-12) for k in b[0])
    weight_gap = max((x.float() - y.float()).abs().max().item() for sa, sb in ((a[1], b[1]), (a[2], b[2]))
                     for x, y in zip(sa.values(), sb.values()))
    return loss_gap, weight_gap


def test_two_ranks_compute_the_one_rank_step(two_ranks, one_process):
    losses, _, _ = two_ranks["all"]
    assert set(losses) == set(one_process[0])
    for k, v in one_process[0].items():
        assert losses[k] == pytest.approx(v, rel=LOSS_REL, abs=1e-8), k
    assert two_ranks["all_syncs"] == []  # global BN, q, L_src counts and the MMD gather: no host read
    for sa, sb in ((two_ranks["all"][1], one_process[1]), (two_ranks["all"][2], one_process[2])):
        for (name, a), b in zip(sb.items(), sa.values()):
            torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("variant", ["no_global_bn", "no_mmd_gather"])
def test_without_each_mechanism_the_step_differs(two_ranks, one_process, variant):
    loss_gap, weight_gap = _gaps(two_ranks[variant], one_process)
    # each gap must exceed the equality test's tolerance by a wide margin (x100)
    assert loss_gap > 100 * LOSS_REL and weight_gap > 100 * WEIGHT_ATOL, (loss_gap, weight_gap)


def test_global_batch_splits_over_ranks_or_names_the_field():
    assert per_rank_batch(8, 4) == 2 and per_rank_batch(2, 1) == 2
    with pytest.raises(ConfigError, match="data.batch_size"):
        per_rank_batch(2, 4)


@pytest.mark.parametrize("rule,lr_factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_lr_scaling_keeps_the_number_of_images(rule, lr_factor):
    from dsp_fast.config import load_config

    cfg = load_config(None, ["data.batch_size=8", f"optim.lr_scaling={rule}", "train.max_steps=1000"])
    assert cfg.optim.lr == pytest.approx(2.5e-4 * lr_factor)
    assert cfg.train.max_steps == (1000 if rule == "none" else 250)  # 1000 steps x 2 images = 250 x 8
    assert cfg.optim.lr_scaling == "none"  # applied once: the saved config does not scale again


def test_lr_scaling_rejects_an_unknown_rule():
    from dsp_fast.config import load_config

    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(None, ["optim.lr_scaling=cubic"])
