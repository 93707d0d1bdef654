"""Pixel weights of the target mixed loss (DSP step 6): W = 1 on the pasted pixels, q elsewhere, where q is the
fraction of target pixels whose teacher confidence reaches the threshold. Twin: `reference.pixel_weight`.

Shapes: B batch, H x W crop, P = B*H*W pixels.

Why two launches and not one, and why not inside dual_soft_paste: W needs q, and q is a reduction over every pixel
of the batch, so no pixel of W can be written before the last block of conf has been counted. One kernel would need
a grid-wide barrier (Triton has none) or a single program looping over the whole batch (serial, ~100x slower than
one launch per phase). Fusing the count into the paste kernel saves no bytes either: the paste kernel does not read
conf, W still needs a second pass over the mask after q is known, and the only saving is one launch (a few us, and
nothing inside a CUDA graph). At the paper's shapes the paste moves ~53 MB (fp32 images, int64 labels) and these two
launches ~4.7 MB (conf read 2.1 MB, mask read 0.5 MB, W written 2.1 MB): see bench/bench_kernels.py.
The bigger saving is not to build W at all: a loss kernel can read the mask and the scalar q directly.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import check_pixel_weight, interpreting, next_pow2, tl, triton, use_triton


@triton.jit
def _confident_count_kernel(conf_ptr, count_ptr, threshold, H, W, s_b, s_h, s_w, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = p < H * W
    conf = tl.load(conf_ptr + b * s_b + (p // W) * s_h + (p % W) * s_w, mask=inb, other=0.0).to(tl.float32)
    # an integer count: the atomics then commute exactly, so q is deterministic run to run
    tl.atomic_add(count_ptr, tl.sum((inb & (conf >= threshold)).to(tl.int32), axis=0))


@triton.jit
def _weight_kernel(mask_ptr, count_ptr, weight_ptr, q_ptr, n_total, H, W, s_b, s_h, s_w, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    inb = p < H * W
    q = tl.load(count_ptr).to(tl.float32) / n_total
    m = tl.load(mask_ptr + b * s_b + (p // W) * s_h + (p % W) * s_w, mask=inb, other=0)
    tl.store(weight_ptr + b * H * W + p, tl.where(m != 0, 1.0, q), mask=inb)
    tl.store(q_ptr, q, mask=(pid == 0) & (b == 0))


def _pixel_weight_triton(mask: torch.Tensor, conf: torch.Tensor, threshold: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    n_b, n_h, n_w = conf.shape
    count = torch.zeros((1,), dtype=torch.int32, device=conf.device)
    weight_BHW = torch.empty((n_b, n_h, n_w), dtype=torch.float32, device=conf.device)
    q = torch.empty((), dtype=torch.float32, device=conf.device)
    n_pix = n_h * n_w
    block = min(next_pow2(n_pix), 65536) if interpreting() else 2048  # interpreter: ~1 ms per program
    grid = (triton.cdiv(n_pix, block), n_b)
    # torch compares a half tensor with a Python float in half precision: round the threshold the same way
    thr = float(torch.tensor(threshold, dtype=conf.dtype))
    _confident_count_kernel[grid](conf, count, thr, n_h, n_w, *conf.stride(), BLOCK=block)
    _weight_kernel[grid](mask.view(torch.uint8), count, weight_BHW, q, float(conf.numel()), n_h, n_w,
                         *mask.stride(), BLOCK=block)
    return weight_BHW, q


def pixel_weight(mask: torch.Tensor, conf: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_BHW float32, q): W = 1 where mask, q elsewhere; q = mean(conf >= threshold) as a 0-d device tensor
    (no host sync, so the step can be captured in a CUDA graph)."""
    check_pixel_weight(mask, conf, threshold)
    if not use_triton(conf):
        return reference.pixel_weight(mask, conf, threshold)
    return tuple(torch.ops.dsp_fast.pixel_weight(mask, conf, float(threshold)))


# The two launches as one torch operator (fake tensors, torch.compile, op recordings see one node).
@torch.library.custom_op("dsp_fast::pixel_weight", mutates_args=())
def _pixel_weight_op(mask: torch.Tensor, conf: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _pixel_weight_triton(mask, conf, threshold)


@_pixel_weight_op.register_fake
def _(mask, conf, threshold):
    return torch.empty(conf.shape, dtype=torch.float32, device=conf.device), conf.new_empty((), dtype=torch.float32)
