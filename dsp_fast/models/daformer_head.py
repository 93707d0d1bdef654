"""A DAFormer-style decoder on the MiT encoder, and the segmentation model DSP trains with it (docs/models.md).

DAFormer's context-aware fusion (Hoyer et al., CVPR 2022, Sec. 3.2, its `daformer_sepaspp` config): each level is
embedded to `channels`, upsampled to stride 4 (bilinear, align_corners=False) and concatenated, fused by an ASPP of a
1x1 conv and depth-wise separable 3x3 convs at dilations 6, 12, 18 and a 3x3 bottleneck (each conv + BN + ReLU);
the class scores are a 1x1 conv after Dropout2d(0.1). The MMD features h are the fused features through the 256-d
projection `c1` (layer4 -> c1's role in DeepLabv2), both at stride 4.

Shapes: x_BCHW input, f_BChw stage maps, fused_BDhw decoder features at stride 4 (h = ceil(H/4)), logits_BKhw.
Parameter names follow DAFormer's mmseg modules (decode_head.embed_layers.{i}.proj, decode_head.fuse_layer.
aspp_modules.{0: conv/bn, 1-3: depthwise_conv/pointwise_conv}, decode_head.fuse_layer.bottleneck, decode_head.
conv_seg), so a DAFormer segmentor's `backbone.*` / `decode_head.*` keys line up with this model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dsp_fast.models.mit import MIT_SPECS, DropPath, MixVisionTransformer, map_to_tokens, tokens_to_map

ASPP_DILATIONS = (1, 6, 12, 18)
BACKBONE_ROOT = "backbone"
HEAD_ROOT = "decode_head"
PROJECTION_ROOT = "c1"


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule with BN and ReLU: the conv has no bias (BN's shift replaces it)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        pad = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=pad, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class SepConvBNReLU(nn.Module):
    """Depth-wise dilated 3x3 (+BN+ReLU), then point-wise 1x1 (+BN+ReLU): mmcv's DepthwiseSeparableConvModule."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(cin, cin, 3, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvBNReLU(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPPFusion(nn.Module):
    """DAFormer's fusion: parallel 1x1 and separable dilated branches, concatenated, then a 3x3 bottleneck."""

    def __init__(self, cin: int, channels: int, dilations: tuple[int, ...] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(cin, channels, 1) if d == 1 else SepConvBNReLU(cin, channels, d) for d in dilations)
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(torch.cat([m(x) for m in self.aspp_modules], dim=1))


class LinearEmbed(nn.Module):
    """A per-pixel linear layer on a map (SegFormer's MLP embedding), computed on its tokens."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, cout)

    def forward(self, f_BChw: Tensor) -> Tensor:
        return tokens_to_map(self.proj(map_to_tokens(f_BChw)), f_BChw.shape[2], f_BChw.shape[3])


class DAFormerHead(nn.Module):
    """`fuse(maps)` -> fused_BDhw at the first map's size; `classify(fused)` -> logits."""

    def __init__(self, in_dims: tuple[int, ...], num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed_layers = nn.ModuleDict({str(i): LinearEmbed(c, channels) for i, c in enumerate(in_dims)})
        self.fuse_layer = SepASPPFusion(len(in_dims) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def fuse(self, maps: list[Tensor]) -> Tensor:
        size = maps[0].shape[2:]
        embedded = []
        for i, f in enumerate(maps):
            e = self.embed_layers[str(i)](f)
            if e.shape[2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        return self.fuse_layer(torch.cat(embedded, dim=1))

    def classify(self, fused_BDhw: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(fused_BDhw))


class MiTDAFormer(nn.Module):
    """MiT encoder + DAFormer decoder for DSP: `forward(x) -> (logits_BKhw, feat_BDhw)`, both at stride 4 (the
    caller upsamples), the same contract as DeepLabV2. Its ImageNet weights expect RGB normalised by the ImageNet
    mean/std (`input_kind` 'torchvision', as mmseg's img_norm_cfg for MiT). `logits_align_corners` is how every
    caller resizes the logits to the image or label size (losses, inference)."""

    # DAFormer's decode head (its losses) and segmentor (inference) resize the logits with mmseg's `resize`,
    # align_corners=False; DSP's own masked-MMD upsampling keeps the DSP script's True whatever the model.
    logits_align_corners = False
    param_roots = ((BACKBONE_ROOT,), HEAD_ROOT, PROJECTION_ROOT)  # (backbone roots, classifier, projection)

    def __init__(self, arch: str = "mit_b0", num_classes: int = 19, mmd_dim: int = 256, decoder_dim: int = 256,
                 drop_path_rate: float = 0.1, freeze_bn: bool = False) -> None:
        super().__init__()
        if arch not in MIT_SPECS:
            raise ValueError(f"unknown MiT architecture {arch!r} (known: {', '.join(MIT_SPECS)})")
        self.arch = arch
        self.num_classes = num_classes
        self.input_kind = "torchvision"
        self.weights_notes: list[str] = []
        self.freeze_bn = freeze_bn
        self._stochastic = True
        self.backbone = MixVisionTransformer(MIT_SPECS[arch], drop_path_rate)
        self.decode_head = DAFormerHead(MIT_SPECS[arch].embed_dims, num_classes, decoder_dim)
        # No bias, as DeepLabV2's c1: the MMD compares feature means, a constant offset cancels.
        self.c1 = nn.Conv2d(decoder_dim, mmd_dim, kernel_size=1, bias=False)
        self._init_head()

    def _init_head(self) -> None:
        # mmcv's ConvModule init (He-normal, fan_out, ReLU), BN as the identity, conv_seg N(0, 0.01) as mmseg's
        # BaseDecodeHead; the MMD projection N(0, 0.01), small like the classifier it sits beside.
        for m in self.decode_head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, _BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.decode_head.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.decode_head.conv_seg.bias)
        nn.init.normal_(self.c1.weight, 0.0, 0.01)

    def forward(self, x_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.decode_head.fuse(self.backbone(x_BCHW))
        return self.decode_head.classify(fused), self.c1(fused)

    def predict(self, x_BCHW: Tensor) -> Tensor:
        """Logits only, skipping the projection (teacher pseudo-labels, evaluation)."""
        return self.decode_head.classify(self.decode_head.fuse(self.backbone(x_BCHW)))

    def set_stochastic(self, enabled: bool) -> None:
        """Stochastic depth and dropout on (the student) or off even in training mode (the mean teacher)."""
        self._stochastic = enabled
        for m in self.modules():
            if isinstance(m, DropPath):
                m.enabled = enabled
        self.train(self.training)

    def train(self, mode: bool = True) -> MiTDAFormer:
        super().train(mode)
        if not self._stochastic:  # dropout modules have no switch of their own: keep them in eval mode
            for m in self.modules():
                if isinstance(m, nn.Dropout | nn.Dropout2d):
                    m.train(False)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.train(False)
        return self
