"""DeepLabv2 model, weight loading, input normalisation and optimizer groups (CPU, small inputs: seconds)."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch import nn

from dsp_fast.config import ModelConfig
from dsp_fast.models import (
    DeepLabV2,
    WeightsError,
    build_model,
    count_parameters,
    load_pretrained,
    normalize_input,
    output_size,
    param_groups,
    set_bn_mode,
)

# torchvision's resnet101 has 44,549,160 parameters; its fc (2048*1000 + 1000) leaves 42,500,160 for the backbone.
TORCHVISION_R101_BACKBONE = 44_549_160 - (2048 * 1000 + 1000)


def _bn(shapes: dict[str, tuple[int, ...]], prefix: str, c: int) -> None:
    for k in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{k}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def torchvision_resnet_shapes(layers=(3, 4, 23, 3), width=64) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a torchvision ResNet backbone (no fc), written out from the architecture, not the model."""
    shapes = {"conv1.weight": (width, 3, 7, 7)}
    _bn(shapes, "bn1", width)
    inplanes = width
    for li, blocks in enumerate(layers, 1):
        planes = width * 2 ** (li - 1)
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes if b == 0 else planes * 4, 1, 1)
            _bn(shapes, f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(shapes, f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            _bn(shapes, f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                _bn(shapes, f"{p}.downsample.1", planes * 4)
        inplanes = planes * 4
    return shapes


@pytest.fixture(scope="module")
def r101() -> DeepLabV2:
    return DeepLabV2.from_arch("deeplabv2_r101", num_classes=19)


def tiny(**kw) -> DeepLabV2:
    return DeepLabV2.from_arch("tiny", **kw)


def _backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    roots = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in roots}


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("hw,expect", [((65, 65), (9, 9)), ((33, 33), (5, 5)), ((17, 33), (3, 5)),
                                       ((128, 128), (17, 17)), ((512, 512), (65, 65)), ((321, 321), (41, 41))])
def test_output_size_known_values(hw, expect):
    # DeepLab's ceil rule: 512 -> 65 and 321 -> 41 are the sizes the DeepLab-v2 / DACS code documents.
    assert output_size(*hw) == expect


def test_output_size_matches_forward_for_every_small_size():
    model = tiny().eval()  # eval: BN on 1x1 maps with batch statistics is undefined
    with torch.no_grad():
        for n in range(1, 42):
            logits, feat = model(torch.rand(1, 3, n, n + 3))
            assert logits.shape[2:] == feat.shape[2:] == output_size(n, n + 3), n


def test_tiny_forward_shapes_and_grad():
    model = tiny(num_classes=7, mmd_dim=16).train()
    logits, feat = model(torch.rand(2, 3, 65, 47))
    assert logits.shape == (2, 7, 9, 7) and feat.shape == (2, 16, 9, 7)  # 47 -> 24 -> 13 -> 7
    (logits.sum() + feat.sum()).backward()
    assert model.conv1.weight.grad is not None and model.c1.weight.grad is not None
    assert torch.equal(model.predict(torch.ones(1, 3, 33, 33)), model(torch.ones(1, 3, 33, 33))[0])


def test_r101_forward_tiny_input(r101):
    with torch.no_grad():
        logits, feat = r101.eval()(torch.rand(1, 3, 33, 33))
    assert logits.shape == (1, 19, 5, 5) and feat.shape == (1, 256, 5, 5)
    assert torch.isfinite(logits).all() and torch.isfinite(feat).all()


def test_r101_parameter_count(r101):
    shapes = torchvision_resnet_shapes()
    backbone_formula = sum(torch.Size(s).numel() for k, s in shapes.items() if k.endswith(("weight", "bias")))
    assert backbone_formula == TORCHVISION_R101_BACKBONE == 42_500_160
    backbone = sum(p.numel() for n, p in r101.named_parameters() if n.split(".")[0] not in ("layer5", "c1"))
    assert backbone == TORCHVISION_R101_BACKBONE
    assert count_parameters(r101.layer5) == 4 * (2048 * 19 * 3 * 3 + 19)  # 1,400,908
    assert count_parameters(r101.c1) == 2048 * 256  # no bias, as the authors' c1
    assert count_parameters(r101) == 42_500_160 + 1_400_908 + 524_288


def test_r101_keys_match_torchvision_and_deeplab(r101):
    expect = torchvision_resnet_shapes()
    state = r101.state_dict()
    backbone = {k: tuple(v.shape) for k, v in state.items() if not k.startswith(("layer5.", "c1."))}
    assert backbone == expect
    head = {k: tuple(v.shape) for k, v in state.items() if k.startswith(("layer5.", "c1."))}
    deeplab_head = {f"layer5.conv2d_list.{i}.weight": (19, 2048, 3, 3) for i in range(4)}
    deeplab_head.update({f"layer5.conv2d_list.{i}.bias": (19,) for i in range(4)})
    deeplab_head["c1.weight"] = (256, 2048, 1, 1)
    assert head == deeplab_head


def test_dilations_and_strides(r101):
    assert r101.layer2[0].conv1.stride == (2, 2) and r101.layer2[0].conv2.stride == (1, 1)  # stride on the 1x1
    assert r101.layer3[5].conv2.dilation == (2, 2) and r101.layer4[2].conv2.dilation == (4, 4)
    assert [c.dilation[0] for c in r101.layer5.conv2d_list] == [6, 12, 18, 24]


def test_aspp_two_branch_bug():
    full = tiny().eval()
    bug = tiny(aspp_two_branch_bug=True).eval()
    bug.load_state_dict(full.state_dict())
    x = torch.rand(1, 3, 49, 49)
    with torch.no_grad():
        f = full.backbone(x)
        branches = [conv(f) for conv in full.layer5.conv2d_list]
        out_full, out_bug = full(x)[0], bug(x)[0]
    # Sums of the same float tensors in the same order: tolerance only for the addition order.
    torch.testing.assert_close(out_full, sum(branches[1:], branches[0]))
    torch.testing.assert_close(out_bug, branches[0] + branches[1])
    assert (out_full - out_bug).abs().max() > 1e-4
    assert [c.weight.requires_grad for c in bug.layer5.conv2d_list] == [True, True, False, False]


def test_init_aspp_normal_001():
    w = DeepLabV2.from_arch("tiny", num_classes=19).layer5.conv2d_list[0].weight
    # 19*256*9 = 43776 samples of N(0, 0.01): the sample std is within a few percent of 0.01.
    assert abs(w.std().item() - 0.01) < 0.0005


def test_init_mmd_projection_and_aspp_biases_as_the_authors():
    model = DeepLabV2.from_arch("deeplabv2_r101", num_classes=19)
    c1 = model.c1.weight
    # 256*2048 samples of N(0, 0.01): the sample std is 0.01 within 0.2%, the mean 0 within 1e-4 (5 sigma = 7e-5)
    assert c1.shape == (256, 2048, 1, 1) and abs(c1.std().item() - 0.01) < 2e-5 and abs(c1.mean().item()) < 1e-4
    # ASPP biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 2048*3*3: not zeros
    bound = 1 / (2048 * 9) ** 0.5
    for conv in model.layer5.conv2d_list:
        assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > bound / 4



# ---------------------------------------------------------------- batch norm


def test_bn_affine_frozen():
    model = tiny().train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 1 + 4 * 4  # stem + (3 per block + downsample) per stage
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    model(torch.rand(2, 3, 33, 33))[0].sum().backward()
    assert all(p.grad is None for m in bns for p in m.parameters())


def test_set_bn_mode():
    model = tiny().train()
    x = torch.rand(2, 3, 33, 33)
    before = model.bn1.running_mean.clone()
    set_bn_mode(model, freeze_bn=True)
    assert model.training and all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model(x)
    assert torch.equal(model.bn1.running_mean, before)  # running statistics used, not updated
    model.train()  # the choice survives a later train()
    assert not model.bn1.training
    set_bn_mode(model, freeze_bn=False)
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model(x)
    assert not torch.equal(model.bn1.running_mean, before)  # batch statistics: buffers move
    model.eval()
    set_bn_mode(model, freeze_bn=False)
    assert not model.bn1.training  # follows the model's mode


def test_build_model_applies_config():
    model = build_model(ModelConfig(arch="tiny", num_classes=5, mmd_dim=8, freeze_bn=True))
    assert model.input_kind == "torchvision" and model.freeze_bn and not model.bn1.training
    logits, feat = model(torch.rand(1, 3, 33, 33))
    assert logits.shape == (1, 5, 5, 5) and feat.shape == (1, 8, 5, 5)


# ---------------------------------------------------------------- weights


def test_load_torchvision_style(tmp_path):
    src = tiny()
    state = _backbone_state(src)
    state["fc.weight"] = torch.randn(1000, 256)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet_tv.pth"
    torch.save(state, path)
    torch.manual_seed(1)
    dst = tiny()
    head_before = dst.layer5.conv2d_list[0].weight.clone()
    assert not torch.equal(dst.layer1[0].conv2.weight, src.layer1[0].conv2.weight)
    assert load_pretrained(dst, str(path)) == "torchvision" == dst.input_kind
    for k, v in _backbone_state(dst).items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(dst.layer5.conv2d_list[0].weight, head_before)
    assert any("fc.*" in n for n in dst.weights_notes)


def test_load_deeplab_style_init(tmp_path):
    # The AdaptSegNet / DACS init file: 'Scale.' prefix, a 21-class ASPP, here also wrapped as DataParallel would.
    src = tiny(num_classes=21)
    state = {f"module.Scale.{k}": v for k, v in src.state_dict().items() if not k.startswith("c1.")}
    path = tmp_path / "DeepLab_init.pth"
    torch.save({"state_dict": state}, path)
    dst = tiny(num_classes=19)
    head_before = dst.layer5.conv2d_list[0].weight.clone()
    assert load_pretrained(dst, str(path)) == "deeplab" == dst.input_kind
    assert torch.equal(dst.layer4[0].conv3.weight, src.layer4[0].conv3.weight)
    assert torch.equal(dst.bn1.running_var, src.bn1.running_var)
    assert torch.equal(dst.layer5.conv2d_list[0].weight, head_before)  # 21 != 19 classes: kept
    assert any("the classifier (layer5.*) does not fit" in n and "(21, " in n for n in dst.weights_refit)
    assert dst.weights_refit[0] in dst.weights_notes


def test_load_dacs_checkpoint_copies_head(tmp_path):
    src = tiny(num_classes=19)
    path = tmp_path / "dacs.pth"
    torch.save({"model": src.state_dict(), "iteration": 5}, path)
    dst = build_model(ModelConfig(arch="tiny", num_classes=19, pretrained=str(path)))
    assert dst.input_kind == "deeplab"
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_declared_kind_and_ambiguous(tmp_path):
    src = tiny()
    bare = tmp_path / "backbone_only.pth"
    torch.save(_backbone_state(src), bare)
    with pytest.raises(WeightsError, match="backbone_only.pth.*cannot tell"):
        load_pretrained(tiny(), str(bare))
    assert load_pretrained(tiny(), str(bare), kind="deeplab") == "deeplab"
    # A dsp_fast checkpoint says what it was trained with, even though its keys look like DeepLab's.
    declared = tmp_path / "declared.pth"
    torch.save({"state_dict": src.state_dict(), "input_kind": "torchvision"}, declared)
    assert load_pretrained(tiny(), str(declared)) == "torchvision"


def test_weights_errors_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="nothere.pth"):
        load_pretrained(tiny(), str(tmp_path / "nothere.pth"))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(WeightsError, match="notes.txt.*not a torch checkpoint"):
        load_pretrained(tiny(), str(text))

    state = tiny().state_dict()
    state["layer2.0.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    del state["layer3.0.bn1.running_mean"]
    bad = tmp_path / "bad_shapes.pth"
    torch.save(state, bad)
    model = tiny()
    before = model.conv1.weight.clone()
    with pytest.raises(WeightsError, match="bad_shapes.pth") as info:
        load_pretrained(model, str(bad))
    msg = str(info.value)
    assert "layer2.0.conv2.weight" in msg and "(3, 3, 3, 3)" in msg and "layer3.0.bn1.running_mean" in msg
    assert torch.equal(model.conv1.weight, before)  # nothing half-loaded

    r101_shaped = tmp_path / "wrong_arch.pth"
    torch.save({k: torch.zeros(s) for k, s in torchvision_resnet_shapes((1, 1, 1, 1), 16).items()}, r101_shaped)
    with pytest.raises(WeightsError, match="wrong_arch.pth.*wrong shapes"):
        load_pretrained(tiny(), str(r101_shaped))


_EXECUTED: list[int] = []


def _side_effect() -> dict:
    _EXECUTED.append(1)
    return {}


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


def test_weights_only_rejects_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny().state_dict(), "extra": _Payload()}, path)
    _EXECUTED.clear()
    with pytest.raises(WeightsError, match="evil.pth.*weights_only"):
        load_pretrained(tiny(), str(path))
    assert not _EXECUTED  # the pickle's code never ran
    # The file itself is a valid checkpoint: only weights_only=True stood between it and running its code.
    torch.load(path, map_location="cpu", weights_only=False)
    assert _EXECUTED


# ---------------------------------------------------------------- normalisation


def test_normalize_input_hand_values():
    x = torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 3).contiguous()
    tv = normalize_input(x, "torchvision")
    expect_tv = torch.tensor([(0.5 - 0.485) / 0.229, (0.25 - 0.456) / 0.224, (1.0 - 0.406) / 0.225])
    torch.testing.assert_close(tv[0, :, 1, 2], expect_tv)  # float32 defaults: rtol 1.3e-6
    dl = normalize_input(x, "deeplab")
    # BGR order: channel 0 is blue (input 1.0), channel 2 is red (input 0.5); 0..255, mean subtracted, no division.
    expect_dl = torch.tensor([255.0 - 104.00698793, 63.75 - 116.66876762, 127.5 - 122.67891434])
    torch.testing.assert_close(dl[1, :, 0, 0], expect_dl, rtol=0, atol=1e-4)  # float32 at magnitude ~150
    assert tv.shape == dl.shape == x.shape
    with pytest.raises(ValueError, match="caffe"):
        normalize_input(x, "caffe")


# ---------------------------------------------------------------- optimizer groups


def _check_groups(model: nn.Module, groups: list[dict], lr: float) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    for g in groups:
        assert g["lr"] == pytest.approx(lr * g["lr_mult"])


def test_param_groups():
    model = tiny()
    groups = param_groups(model, lr=2.5e-4, head_lr_mult=10.0)
    _check_groups(model, groups, 2.5e-4)
    by_name = {g["name"]: g for g in groups}
    assert {n: g["lr_mult"] for n, g in by_name.items()} == {"backbone": 1.0, "classifier": 10.0,
                                                             "mmd_projection": 10.0}
    assert {id(p) for p in by_name["classifier"]["params"]} == {id(p) for p in model.layer5.parameters()}
    assert [id(p) for p in by_name["mmd_projection"]["params"]] == [id(model.c1.weight)]
    assert model.conv1.weight in by_name["backbone"]["params"]
    # the order a checkpoint's optimizer state is saved and restored in
    assert [g["name"] for g in groups] == ["backbone", "classifier", "mmd_projection"]


def test_param_groups_without_projection_and_with_bug():
    model = tiny(aspp_two_branch_bug=True)
    groups = param_groups(model, lr=1e-3, head_lr_mult=10.0, train_mmd_projection=False)
    _check_groups(model, groups, 1e-3)
    assert [g["name"] for g in groups] == ["backbone", "classifier"]
    assert not model.c1.weight.requires_grad
    assert len(groups[1]["params"]) == 4  # two used ASPP branches, weight + bias each
    _, feat = model(torch.rand(2, 3, 33, 33))
    feat.sum().backward()  # the frozen projection still passes gradient to the backbone
    assert model.c1.weight.grad is None and model.layer4[0].conv3.weight.grad is not None


def test_models_package_imports_only_config():
    pkg = pathlib.Path(__file__).resolve().parents[1] / "dsp_fast" / "models"
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsp_fast"):
                assert node.module == "dsp_fast.config" or node.module.startswith("dsp_fast.models"), (f, node.module)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("dsp_fast"), (f, alias.name)
