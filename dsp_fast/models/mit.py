"""SegFormer's Mix Transformer (MiT) encoder: overlapping patch embeddings, efficient self-attention with sequence
reduction, and Mix-FFN (an MLP with a 3x3 depth-wise convolution), in four stages at strides 4, 8, 16 and 32.

Shapes: x_BCHW input image; x_BNC tokens of one stage (N = h * w, row-major, as a channels_last map's memory);
f_BChw stage feature maps. Module and parameter names are those of the released SegFormer / DAFormer
`mit_b*.pth` files (patch_embed{1-4}, block{1-4}.{j}.{norm1, attn.{q, kv, proj, sr, norm}, norm2,
mlp.{fc1, dwconv.dwconv, fc2}}, norm{1-4}), so those files load as they are (`weights.load_mit_pretrained`).
Attention: `F.scaled_dot_product_attention` (its softmax accumulates in fp32: bf16-safe); tokens and maps are views
of each other in channels_last, so the token and convolution parts never copy.
"""

from __future__ import annotations

import dataclasses
import math

import torch.nn.functional as F
from torch import Tensor, nn

NUM_HEADS = (1, 2, 5, 8)  # per stage, every MiT size (SegFormer Tab. 6): head width 32 (b0) or 64 (b1-b5)
SR_RATIOS = (8, 4, 2, 1)  # keys/values of stage i come from an (sr x sr)-strided conv of its map
MLP_RATIO = 4
# LayerNorm eps as NVlabs' and DAFormer's mix_transformer.py, with which the released weights were trained: the
# blocks' norm1/norm2 and the stage norms are built with eps 1e-6, while the patch embeddings' norm and the
# attention's sequence-reduction norm are plain nn.LayerNorm(dim), torch's default 1e-5 (mmseg's later
# re-implementation uses 1e-6 everywhere; that is not what the weights saw).
LN_EPS = 1e-6  # Block.norm1, Block.norm2, MixVisionTransformer.norm{1-4}
LN_EPS_TORCH = 1e-5  # OverlapPatchEmbed.norm, EfficientSelfAttention.norm (the sr path)
# Stage 1's keys come from an 8x8 stride-8 conv of its stride-4 map, so that map needs 8 pixels a side.
MIN_INPUT_SIDE = 29


@dataclasses.dataclass(frozen=True)
class MiTSpec:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]


MIT_SPECS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSpec((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": MiTSpec((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": MiTSpec((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": MiTSpec((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": MiTSpec((64, 128, 320, 512), (3, 6, 40, 3)),
}


def tokens_to_map(x_BNC: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w): a channels_last view of the same memory (no copy)."""
    b, _, c = x_BNC.shape
    return x_BNC.reshape(b, h, w, c).permute(0, 3, 1, 2)


def map_to_tokens(f_BChw: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C): a view when the map is channels_last, a copy otherwise."""
    b, c, h, w = f_BChw.shape
    return f_BChw.permute(0, 2, 3, 1).reshape(b, h * w, c)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample with probability p (scaled by 1/(1-p)).
    `enabled` False turns it off in training mode too: the mean teacher predicts deterministically (as DAFormer's
    EMA teacher, whose DropPath and Dropout modules are switched to eval), while its BN layers keep batch statistics."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not (self.training and self.enabled):
            return x
        keep = 1.0 - self.p
        # drawn on the device from the default generator: no host sync, replayable inside a CUDA graph
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
        return x * mask


class OverlapPatchEmbed(nn.Module):
    """A strided conv with overlapping windows (7x7 stride 4, then 3x3 stride 2) and a LayerNorm over channels."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS_TORCH)

    def forward(self, x_BCHW: Tensor) -> tuple[Tensor, int, int]:
        f = self.proj(x_BCHW)
        return self.norm(map_to_tokens(f)), f.shape[2], f.shape[3]


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys and values come from the map shrunk by sr x sr (a strided conv + LayerNorm):
    N x N/sr^2 scores instead of N x N."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=LN_EPS_TORCH)

    def forward(self, x_BNC: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x_BNC.shape
        d = c // self.num_heads
        q = self.q(x_BNC).view(b, n, self.num_heads, d).transpose(1, 2)  # (B, heads, N, d)
        src = x_BNC
        if self.sr_ratio > 1:
            src = self.norm(map_to_tokens(self.sr(tokens_to_map(x_BNC, h, w))))
        k, v = self.kv(src).view(b, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        # scale 1/sqrt(d): SegFormer's qk_scale default, and SDPA's; no attention dropout (SegFormer's 0.0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """The 3x3 depth-wise conv of Mix-FFN (it gives the encoder its positional information); named as SegFormer's."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x_BNC: Tensor, h: int, w: int) -> Tensor:
        return map_to_tokens(self.dwconv(tokens_to_map(x_BNC, h, w)))


class MixFFN(nn.Module):  # fc1, depth-wise conv, GELU, fc2 (SegFormer's dropout here is 0.0: none)
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BNC: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x_BNC), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch under stochastic depth."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = MixFFN(dim, dim * MLP_RATIO)

    def forward(self, x_BNC: Tensor, h: int, w: int) -> Tensor:
        x = x_BNC + self.drop_path(self.attn(self.norm1(x_BNC), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """The MiT encoder: `forward(x_BCHW)` -> four maps at strides 4, 8, 16, 32 (ceil sizes: a 512 crop gives 128,
    64, 32, 16), with `embed_dims` channels."""

    def __init__(self, spec: MiTSpec, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        in_dims = (3, *spec.embed_dims[:3])
        # stochastic depth grows linearly from 0 to drop_path_rate over all blocks (SegFormer's decay rule)
        n = sum(spec.depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        start = 0
        for i in range(4):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(in_dims[i], spec.embed_dims[i], patch, stride))
            blocks = [Block(spec.embed_dims[i], NUM_HEADS[i], SR_RATIOS[i], rates[start + j])
                      for j in range(spec.depths[i])]
            setattr(self, f"block{i + 1}", nn.ModuleList(blocks))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(spec.embed_dims[i], eps=LN_EPS))
            start += spec.depths[i]
        self.apply(_init_weights)

    def forward(self, x_BCHW: Tensor) -> list[Tensor]:
        if min(x_BCHW.shape[-2:]) < MIN_INPUT_SIDE:  # shapes are static: no device read
            raise ValueError(f"MiT needs inputs of at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} pixels (stage 1's 8x8 "
                             f"sequence reduction), got {tuple(x_BCHW.shape[-2:])}")
        outs = []
        x = x_BCHW
        for i in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                tokens = blk(tokens, h, w)
            x = tokens_to_map(getattr(self, f"norm{i}")(tokens), h, w)
            outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    # SegFormer's initialisation from scratch: truncated normal (std 0.02) linears, identity LayerNorms, and
    # He-normal convs by fan-out per group.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def stage_size(n: int, stage: int) -> int:
    """Side of stage `stage`'s map (0..3) for an input side n: ceil(n/4), then ceil halvings."""
    n = (n - 1) // 4 + 1
    for _ in range(stage):
        n = (n - 1) // 2 + 1
    return n
