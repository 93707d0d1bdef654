"""optim.script_param_repeats: the authors' optimizer listed most DeepLabv2 backbone parameters several times and
torch 1.7.1 stepped every entry. The multiplicities (from walking the modules), both trainers' optimizers against
torch's own SGD stepped k times on that parameter, the device skip, the checkpoint round trip and the refusals.

Tolerance: the oracle is torch's single-tensor SGD on the same fp32 numbers. The reference (torch 1.7.1's own
expressions) and foreach SGD gave identical bits on CPU (torch 2.13); fused SGD differed in one value by one ulp
(it may round its multiply-adds otherwise). So 2 ulp: 2.5e-7 relative, 1e-7 absolute near zero.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers_run import REPO, assert_same_state, env, read, tiny_args

from dsp_fast import reference
from dsp_fast.config import Config, ConfigError, FastConfig, ModelConfig, OptimConfig
from dsp_fast.engine.optimizer import RepeatedSGD, build_optimizer
from dsp_fast.models import DeepLabV2, build_model, script_backbone_listing, script_multiplicity

CPU = torch.device("cpu")
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4  # a large lr, so that k updates differ clearly from one


def repeats_cfg(arch: str = "tiny") -> Config:
    return Config(model=ModelConfig(arch=arch), optim=OptimConfig(lr=LR, momentum=MOMENTUM, weight_decay=WD,
                                                                  script_param_repeats=True))


def expected_k(name: str) -> int:
    """The multiplicity worked out by hand from the generator's rule: the stem conv is its own root (1); a
    bottleneck conv is held by its layer, its bottleneck and itself (3); a downsample conv also by the
    downsample Sequential (4). Head and projection are not in the backbone listing: one update, as any group."""
    if name == "conv1.weight" or name.startswith(("layer5.", "c1.")):
        return 1
    return 4 if ".downsample." in name else 3


def test_multiplicities_of_tiny():
    model = build_model(ModelConfig(arch="tiny"))
    listing, counts = script_backbone_listing(model), script_multiplicity(model)
    named = dict(model.named_parameters())
    assert counts[id(named["conv1.weight"])] == 1
    assert counts[id(named["layer2.0.conv2.weight"])] == 3
    assert counts[id(named["layer3.0.downsample.0.weight"])] == 4
    bn = [p for n, p in named.items() if ".bn" in n or n.startswith("bn") or ".downsample.1." in n]
    assert bn and not any(id(p) in counts for p in bn)  # frozen BN: never listed
    assert not any(id(p) in counts for n, p in named.items() if n.startswith(("layer5.", "c1.")))
    assert sum(counts.values()) == len(listing)
    # 1 stem conv, 4 bottlenecks of 3 convs, 4 downsample convs
    assert len(listing) == 1 + 4 * 3 * 3 + 4 * 4
    for n, p in named.items():
        if id(p) in counts:
            assert counts[id(p)] == expected_k(n), n


def test_multiplicities_of_resnet101():
    """The paper's model, built on the meta device (no memory): 33 bottlenecks, a downsample conv in 4 of them."""
    with torch.device("meta"):
        model = DeepLabV2.from_arch("deeplabv2_r101")
    counts = script_multiplicity(model)
    assert sorted(counts.values()).count(4) == 4 and sorted(counts.values()).count(1) == 1
    assert len(counts) == 1 + 33 * 3 + 4 and len(script_backbone_listing(model)) == 1 + 33 * 3 * 3 + 4 * 4


def _grads(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.requires_grad}


def _oracle(model: torch.nn.Module, grads_per_step: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each trainable parameter on its own: torch.optim.SGD([p]) stepped k times per step, the gradient fixed."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        q = torch.nn.Parameter(p.detach().clone())
        mult = 10.0 if name.startswith(("layer5.", "c1.")) else 1.0
        opt = torch.optim.SGD([q], lr=LR * mult, momentum=MOMENTUM, weight_decay=WD)
        for grads in grads_per_step:
            q.grad = grads[name].clone()
            for _ in range(expected_k(name)):
                opt.step()
        out[name] = q.detach()
    return out


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, grads_per_step: list[dict[str, torch.Tensor]]) -> None:
    for grads in grads_per_step:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = grads[n].clone()
        opt.step()


def _fast(cfg: Config, model: torch.nn.Module, optimizer: str = "fused", device_lr: bool = False):
    fast = FastConfig(amp="fp32", optimizer=optimizer, cuda_graphs=False)  # foreach: no graph (refused with one)
    return build_optimizer(cfg, model, fast, CPU, device_lr=device_lr)[0]


@pytest.mark.parametrize("trainer", ["fused", "fused_device_lr", "foreach", "reference"])
def test_updates_equal_torch_sgd_stepped_k_times(trainer):
    """Two steps (the momentum buffer carries over), weight decay and momentum on, fp32."""
    cfg = repeats_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    steps = [_grads(model, 1), _grads(model, 2)]
    want = _oracle(model, steps)
    if trainer == "reference":
        opt = reference.build_optimizer(cfg, model)
    else:
        opt = _fast(cfg, model, trainer.split("_")[0], device_lr=trainer == "fused_device_lr")
        assert isinstance(opt, RepeatedSGD)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(model, opt, steps)
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.detach(), want[n], rtol=2.5e-7, atol=1e-7, msg=n)
        else:
            assert torch.equal(p, before[n]), n  # frozen: untouched
    # not vacuous: a bottleneck conv after 3 updates per step is far from one update per step
    single = torch.nn.Parameter(before["layer1.0.conv2.weight"].clone())
    one = torch.optim.SGD([single], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for grads in steps:
        single.grad = grads["layer1.0.conv2.weight"]
        one.step()
    assert (single - want["layer1.0.conv2.weight"]).abs().max() > 1e-2


def test_groups_split_by_multiplicity():
    """One group per multiplicity class, each at the backbone's lr_mult, with a device lr tensor of its own."""
    cfg = repeats_cfg()
    opt = _fast(cfg, build_model(cfg.model), device_lr=True)
    got = [(g["name"], g["repeats"], g["lr_mult"], len(g["params"])) for g in opt.param_groups]
    assert got == [("backbone_x1", 1, 1.0, 1), ("backbone_x3", 3, 1.0, 12), ("backbone_x4", 4, 1.0, 4),
                   ("classifier", 1, 10.0, 8), ("mmd_projection", 1, 10.0, 1)]
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(t, torch.Tensor) for t in lrs) and len({id(t) for t in lrs}) == len(lrs)


def test_found_inf_skips_every_pass():
    """found_inf set on the device: no parameter and no momentum buffer moves on any of the k passes."""
    cfg = repeats_cfg()
    model = build_model(cfg.model)
    opt = _fast(cfg, model, device_lr=True)
    opt.found_inf = torch.zeros(())  # as StepContext hands it over
    _run(model, opt, [_grads(model, 1)])  # a good step first: the momentum buffers hold values
    params = [p for g in opt.param_groups for p in g["params"]]

    def snapshot() -> list[torch.Tensor]:
        return [t.detach().clone() for p in params for t in (p, opt.state[p]["momentum_buffer"])]

    before = snapshot()
    opt.found_inf.fill_(1.0)
    _run(model, opt, [_grads(model, 2)])
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    opt.found_inf.zero_()
    _run(model, opt, [_grads(model, 3)])
    assert all(not torch.equal(a, b) for a, b in zip(before[::2], snapshot()[::2]))  # every parameter moved again


def test_fused_sgd_unscales_gradients_in_place():
    """Why fast.amp fp16 is refused: under a GradScaler, fused SGD divides p.grad by the scale in place (torch 2.13,
    CPU), so a second pass over the same parameter would divide it again. If torch stops doing so, this fails and
    the refusal can be reconsidered."""
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    scaler.scale((2.0 * p).sum()).backward()
    assert torch.equal(p.grad, torch.full((3,), 8.0))
    scaler.step(opt)
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_checkpoint_round_trip():
    """The optimizer's state_dict saved and loaded with weights_only (as the fast trainer's checkpoint), into a
    fresh optimizer whose device lr tensors are kept (engine.loop._load_state): the next step is the same bits."""
    cfg = repeats_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = _fast(cfg, model, device_lr=True)
    _run(model, opt, [_grads(model, 1)])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    torch.manual_seed(1)
    resumed = build_model(cfg.model)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _fast(cfg, resumed, device_lr=True)
    lrs = [g["lr"] for g in opt2.param_groups]
    opt2.load_state_dict(ckpt["optimizer"])
    for g, lr in zip(opt2.param_groups, lrs):
        g["lr"] = lr
    assert [g["repeats"] for g in opt2.param_groups] == [g["repeats"] for g in opt.param_groups]
    _run(model, opt, [_grads(model, 2)])
    _run(resumed, opt2, [_grads(model, 2)])
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n

    plain = _fast(Config(model=cfg.model, optim=OptimConfig(lr=LR)), build_model(cfg.model))
    with pytest.raises(ValueError):  # a checkpoint of the other setting does not load silently
        plain.load_state_dict(ckpt["optimizer"])


@pytest.mark.parametrize("make, names", [
    (lambda on: OptimConfig(algorithm="adamw", script_param_repeats=on), "optim.algorithm"),
    (lambda on: Config(model=ModelConfig(arch="mit_b0"), optim=OptimConfig(script_param_repeats=on)), "model.arch"),
    (lambda on: Config(fast=FastConfig(amp="fp16", cuda_graphs=False), optim=OptimConfig(script_param_repeats=on)),
     "fast.amp"),
    (lambda on: Config(fast=FastConfig(optimizer="apex", cuda_graphs=False),
                       optim=OptimConfig(script_param_repeats=on)), "fast.optimizer"),
])
def test_config_refuses(make, names):
    make(False)  # the setting alone is fine
    with pytest.raises(ConfigError, match=r"optim\.script_param_repeats.*" + names.replace(".", r"\.")):
        make(True)


def test_resume_with_repeats_is_bit_for_bit(synthetic_root, tmp_path):
    """The fast trainer end to end with the switch on: a run resumed from its step-4 checkpoint ends at step 8 with
    the weights, teacher and momentum buffers of the uninterrupted run, bit for bit."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cmd = [sys.executable, "-m", "dsp_fast.train"]
    extra = ("optim.script_param_repeats=true", "train.checkpoint_every=4", "--keep-last", "2")
    proc = subprocess.run(cmd + tiny_args(synthetic_root, str(full), 8, *extra), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(full, resumed)
    os.remove(resumed / "ckpt_00000008.pt")  # as if the run had stopped after step 4
    proc = subprocess.run(cmd + tiny_args(synthetic_root, str(resumed), 8, *extra, "--resume", str(resumed)),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 4" in proc.stdout
    a, b = read(str(full / "ckpt_00000008.pt")), read(str(resumed / "ckpt_00000008.pt"))
    assert [g["repeats"] for g in a["optimizer"]["param_groups"]] == [1, 3, 4, 1, 1]
    assert_same_state(a, b)
