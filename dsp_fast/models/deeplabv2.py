"""DeepLabv2: a dilated bottleneck ResNet (output stride 8), the summed ASPP classifier, and the MMD projection h.

Shapes: x_BCHW input image, logits_BKhw class scores, feat_BDhw MMD features; h, w are the stride-8 sizes
given by `output_size` (DeepLab's ceil rule: a 512x512 crop gives 65x65).

Module names follow the DeepLab-v2 PyTorch port used by AdaptSegNet / DACS / DSP (`Res_Deeplab`): conv1, bn1,
layer1..layer4 (conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/downsample.1), layer5.conv2d_list.{0..3} (ASPP) and
c1 (the DSP authors' name for the 2048 -> 256 projection), so their checkpoints load as they are. The backbone
names are also torchvision's ResNet names.
"""

from __future__ import annotations

from collections import Counter

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dsp_fast.models.wrapper import unwrap

# arch -> (blocks per stage, stem width); stage widths are width, 2x, 4x, 8x and bottlenecks expand them by 4.
ARCHS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "deeplabv2_r101": ((3, 4, 23, 3), 64),
    "tiny": ((1, 1, 1, 1), 8),
}
ASPP_RATES = (6, 12, 18, 24)
BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
CLASSIFIER_ROOT = "layer5"
PROJECTION_ROOT = "c1"


def output_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the stride-8 outputs for an input of height x width (DeepLab's ceil rule).

    conv1 (7x7, stride 2, pad 3) gives ceil(n/2); the ceil-mode max pool (3x3, stride 2, pad 1) gives n//2 + 1;
    the stride-2 1x1 conv of layer2 gives ceil(n/2). layer3/layer4 are dilated and keep the size."""

    def one(n: int) -> int:
        n = (n + 1) // 2
        n = n // 2 + 1
        return (n + 1) // 2

    return one(height), one(width)


def _frozen_bn(channels: int) -> nn.BatchNorm2d:
    # DeepLab never trains the BN affine parameters (batches of 1-2 images are too small); the statistics
    # still come from the batch in training mode unless set_bn_mode freezes them.
    bn = nn.BatchNorm2d(channels)
    for p in bn.parameters():
        p.requires_grad_(False)
    return bn


class Bottleneck(nn.Module):
    """ResNet bottleneck with the stride on the first 1x1 conv (the original Caffe ResNet, as DeepLab-v2)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = _frozen_bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _frozen_bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = _frozen_bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ASPPClassifier(nn.Module):
    """DeepLabv2 ASPP: parallel dilated 3x3 convs (with bias) straight to class scores, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = ASPP_RATES,
                 two_branch_bug: bool = False) -> None:
        super().__init__()
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=r, dilation=r, bias=True) for r in rates
        )
        # The authors' Classifier_Module returns inside its loop, after the second branch.
        self.num_used = 2 if two_branch_bug else len(rates)
        for i, conv in enumerate(self.conv2d_list):
            # As the authors: weights N(0, 0.01), biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            nn.init.normal_(conv.weight, 0.0, 0.01)
            if i >= self.num_used:
                # Unused branches never receive a gradient; marking them frozen keeps them out of the optimizer
                # and lets DDP run without find_unused_parameters. Their weights stay in the state dict.
                conv.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:self.num_used]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabv2 for DSP: `forward(x) -> (logits_BKhw, feat_BDhw)`, both at stride 8 (the caller upsamples).

    `input_kind` ('torchvision' or 'deeplab') names the input normalisation the weights expect; see
    `weights.normalize_input`. `freeze_bn` True keeps every BN on running statistics across `train()` calls.
    `logits_align_corners` is how every caller resizes the logits to the image or label size (losses, inference)."""

    # The DSP script (and DeepLab's Caffe interp layer before it) upsamples the logits with align_corners=True.
    logits_align_corners = True

    def __init__(self, num_classes: int = 19, layers: tuple[int, int, int, int] = (3, 4, 23, 3), width: int = 64,
                 mmd_dim: int = 256, aspp_two_branch_bug: bool = False, freeze_bn: bool = False) -> None:
        super().__init__()
        self.arch = "custom"
        self.num_classes = num_classes
        self.input_kind = "torchvision"
        self.weights_notes: list[str] = []  # what load_pretrained skipped
        self.freeze_bn = freeze_bn
        self._inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _frozen_bn(width)
        self.relu = nn.ReLU(inplace=True)
        # ceil_mode as in the Caffe model: it sets the output size rule (512 -> 65, not 64).
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], dilation=2)
        self.layer4 = self._make_layer(width * 8, layers[3], dilation=4)
        self.feat_channels = width * 8 * Bottleneck.expansion
        self.layer5 = ASPPClassifier(self.feat_channels, num_classes, two_branch_bug=aspp_two_branch_bug)
        # No bias, as the authors' c1: the MMD compares features, a constant offset would cancel anyway.
        self.c1 = nn.Conv2d(self.feat_channels, mmd_dim, kernel_size=1, bias=False)
        self._init_weights()

    @classmethod
    def from_arch(cls, arch: str, num_classes: int = 19, mmd_dim: int = 256, aspp_two_branch_bug: bool = False,
                  freeze_bn: bool = False) -> DeepLabV2:
        """Build one of `ARCHS` ('deeplabv2_r101' or 'tiny')."""
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
        layers, width = ARCHS[arch]
        model = cls(num_classes, layers, width, mmd_dim, aspp_two_branch_bug, freeze_bn)
        model.arch = arch
        return model

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        out_planes = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out_planes, kernel_size=1, stride=stride, bias=False), _frozen_bn(out_planes)
            )
        layers = [Bottleneck(self._inplanes, planes, stride, dilation, downsample)]
        self._inplanes = out_planes
        layers += [Bottleneck(out_planes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # Kaiming for the backbone (torchvision's choice for ReLU nets; pretrained weights replace it anyway); the
        # ASPP keeps DeepLab's N(0, 0.01), set in ASPPClassifier, and the MMD projection N(0, 0.01) as the authors'
        # c1 (no checkpoint holds it, so this init is what every run starts from). BN starts as the identity.
        for name, m in self.named_modules():
            if m is self.c1:
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.Conv2d) and not name.startswith(CLASSIFIER_ROOT):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def backbone(self, x_BCHW: Tensor) -> Tensor:
        """layer4 features, stride 8."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x_BCHW))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        f = self.backbone(x_BCHW)
        return self.layer5(f), self.c1(f)

    def predict(self, x_BCHW: Tensor) -> Tensor:
        """Logits only, skipping the projection (teacher pseudo-labels, evaluation)."""
        return self.layer5(self.backbone(x_BCHW))

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.freeze_bn:
            # Re-applied on every train() so a frozen-BN model cannot silently return to batch statistics.
            _set_bn_training(self, False)
        return self


def _set_bn_training(model: nn.Module, training: bool) -> None:
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.train(training)


def set_bn_mode(model: nn.Module, freeze_bn: bool) -> None:
    """`dsp_fast.models.set_bn_mode` for a DeepLabV2, which remembers the choice so later `train()` calls keep it."""
    inner = unwrap(model)
    if isinstance(inner, DeepLabV2):
        inner.freeze_bn = freeze_bn
    _set_bn_training(model, model.training and not freeze_bn)


def script_backbone_listing(model: nn.Module) -> list[nn.Parameter]:
    """The backbone's trainable parameters as the authors' `get_1x_lr_params_NOscale` lists them, repeats included.

    Their generator visits every module j under conv1, bn1, layer1..layer4 (`modules()`: the root and all below)
    and yields `j.parameters()`, which recurses: a parameter is listed once by each module that holds it, however
    deep. Their SGD (torch 1.7.1) stepped every entry, so the length of a parameter's run here is the number of
    updates it took per step. Frozen parameters (DeepLab's BN) are left out, as theirs."""
    inner = unwrap(model)
    if not isinstance(inner, DeepLabV2):
        raise TypeError(f"script_backbone_listing: the authors' listing is DeepLabv2's, got {type(inner).__name__}")
    return [p for root in BACKBONE_ROOTS for j in inner.get_submodule(root).modules()
            for p in j.parameters() if p.requires_grad]


def script_multiplicity(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many times `script_backbone_listing` holds it (backbone parameters only)."""
    return dict(Counter(id(p) for p in script_backbone_listing(model)))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters, frozen ones included."""
    return sum(p.numel() for p in module.parameters())
