"""Fused dual soft paste: one pass reads the template image and labels once and writes both mixed images, both
mixed label maps and the mask (DSP step 4). Twin: `twins.dual_soft_paste`.

Shapes: B batch, C channels, H x W crop, P = H*W pixels, K number of classes.
Grid: (pixel blocks, B). Each program handles BLOCK_P pixels of one image and loops over channel blocks, so the
class lookup and the label selects are done once per pixel, not once per channel.

Bytes per pixel (what the benchmark assumes): read 3*C image values + 3 labels (+ 1 pasted-flag byte when given),
write 2*C image values + 2 labels + 1 mask byte; the template's image values are read only where the mask is set
(a masked load), so the count is an upper bound. No host sync and fixed shapes: a CUDA graph can capture it (the
label value check's sync is skipped there, `_common.set_value_checks`).
"""

from __future__ import annotations

import torch

from . import twins
from ._common import (
    IGNORE_LABEL,
    bad_label_message,
    check_label_values,
    check_soft_paste,
    interpreting,
    next_pow2,
    tl,
    triton,
    use_triton,
    value_checks_active,
)


@triton.jit
def _dual_soft_paste_kernel(
    tmpl_img, src_img, tgt_img, src_out, tgt_out,
    tmpl_lbl, src_lbl, tgt_lbl, src_lbl_out, tgt_lbl_out, mask_out,
    sel_ptr, pasted_ptr, err_ptr, lam,
    C, H, W, K,
    s_ti_b, s_ti_c, s_ti_h, s_ti_w,
    s_si_b, s_si_c, s_si_h, s_si_w,
    s_gi_b, s_gi_c, s_gi_h, s_gi_w,
    s_so_b, s_so_c, s_so_h, s_so_w,
    s_go_b, s_go_c, s_go_h, s_go_w,
    s_tl_b, s_tl_h, s_tl_w,
    s_sl_b, s_sl_h, s_sl_w,
    s_gl_b, s_gl_h, s_gl_w,
    s_sel_b, s_sel_k,
    s_pa_b, s_pa_h, s_pa_w,
    IGNORE: tl.constexpr, HAS_PASTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    # the batch offset in int64, once per program on the base pointers (a whole batch may pass 2**31 elements);
    # offsets inside one image in int32 (the launcher checks they fit): int64 offsets per pixel and channel doubled
    # the registers and made the kernel spill on sm_90
    b = tl.program_id(1).to(tl.int64)
    tmpl_img += b * s_ti_b
    src_img += b * s_si_b
    tgt_img += b * s_gi_b
    src_out += b * s_so_b
    tgt_out += b * s_go_b
    tmpl_lbl += b * s_tl_b
    src_lbl += b * s_sl_b
    tgt_lbl += b * s_gl_b
    sel_ptr += b * s_sel_b
    pasted_ptr += b * s_pa_b
    out_base = b * H * W
    src_lbl_out += out_base
    tgt_lbl_out += out_base
    mask_out += out_base
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    inb = p < H * W
    y = p // W
    x = p % W

    # labels stay in their own dtype for the checks: an int64 label is not truncated before it is judged
    lbl_t = tl.load(tmpl_lbl + y * s_tl_h + x * s_tl_w, mask=inb, other=IGNORE)
    lbl_s = tl.load(src_lbl + y * s_sl_h + x * s_sl_w, mask=inb, other=IGNORE)
    lbl_g = tl.load(tgt_lbl + y * s_gl_h + x * s_gl_w, mask=inb, other=IGNORE)
    valid_t = (lbl_t >= 0) & (lbl_t < K)
    # the gather is masked by valid_t, so a bad label can never read outside class_sel
    cls = tl.where(valid_t, lbl_t, 0).to(tl.int32)
    sel = tl.load(sel_ptr + cls * s_sel_k, mask=inb & valid_t, other=0)
    m = sel != 0
    if HAS_PASTED:  # long-tail pixels pasted onto the template join M whatever their class (step 3)
        pa = tl.load(pasted_ptr + y * s_pa_h + x * s_pa_w, mask=inb, other=0)
        m = m | (pa != 0)

    # bad labels are counted, not trusted: the launcher turns a nonzero count into a ValueError
    bad = (~valid_t & (lbl_t != IGNORE)).to(tl.int32)
    bad += (((lbl_s < 0) | (lbl_s >= K)) & (lbl_s != IGNORE)).to(tl.int32)
    bad += (((lbl_g < 0) | (lbl_g >= K)) & (lbl_g != IGNORE)).to(tl.int32)
    tl.atomic_add(err_ptr, tl.sum(tl.where(inb, bad, 0), axis=0))

    tl.store(mask_out + p, m.to(tl.uint8), mask=inb)
    tl.store(src_lbl_out + p, tl.where(m, lbl_t, lbl_s).to(src_lbl_out.dtype.element_ty), mask=inb)
    tl.store(tgt_lbl_out + p, tl.where(m, lbl_t, lbl_g).to(tgt_lbl_out.dtype.element_ty), mask=inb)

    # same operation order as the twin: lam*m*a + (1 - lam*m)*d, in float32
    lm = (lam * m.to(tl.float32))[:, None]
    pix_ti = (y * s_ti_h + x * s_ti_w)[:, None]
    pix_si = (y * s_si_h + x * s_si_w)[:, None]
    pix_gi = (y * s_gi_h + x * s_gi_w)[:, None]
    pix_so = (y * s_so_h + x * s_so_w)[:, None]
    pix_go = (y * s_go_h + x * s_go_w)[:, None]
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C))[None, :]
        io = inb[:, None] & (c < C)
        # the template is read only where it is pasted: about half the template bytes on a typical mask
        a = tl.load(tmpl_img + pix_ti + c * s_ti_c, mask=io & m[:, None], other=0.0).to(tl.float32)
        s = tl.load(src_img + pix_si + c * s_si_c, mask=io, other=0.0).to(tl.float32)
        g = tl.load(tgt_img + pix_gi + c * s_gi_c, mask=io, other=0.0).to(tl.float32)
        pasted = lm * a
        tl.store(src_out + pix_so + c * s_so_c, (pasted + (1.0 - lm) * s).to(src_out.dtype.element_ty), mask=io)
        tl.store(tgt_out + pix_go + c * s_go_c, (pasted + (1.0 - lm) * g).to(tgt_out.dtype.element_ty), mask=io)


def _alloc_outputs(tmpl_img: torch.Tensor, tmpl_label: torch.Tensor, src_img: torch.Tensor,
                   src_label: torch.Tensor, tgt_img: torch.Tensor, tgt_pseudo: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five outputs, shared by the launcher and the operator's fake implementation (same shapes, dtypes and
    strides). Images keep the memory format of their destination; a mixed label map takes the promoted dtype."""
    n_b, _, n_h, n_w = tmpl_img.shape
    src_out = torch.empty_like(src_img)  # preserve_format: channels_last in, channels_last out
    tgt_out = torch.empty_like(tgt_img)
    src_lbl_out = torch.empty((n_b, n_h, n_w), dtype=torch.promote_types(tmpl_label.dtype, src_label.dtype),
                              device=src_label.device)
    tgt_lbl_out = torch.empty((n_b, n_h, n_w), dtype=torch.promote_types(tmpl_label.dtype, tgt_pseudo.dtype),
                              device=tgt_pseudo.device)
    mask_BHW = torch.empty((n_b, n_h, n_w), dtype=torch.bool, device=tmpl_label.device)
    return src_out, src_lbl_out, tgt_out, tgt_lbl_out, mask_BHW


def _dual_soft_paste_triton(tmpl_img: torch.Tensor, tmpl_label: torch.Tensor, class_sel: torch.Tensor,
                            src_img: torch.Tensor, src_label: torch.Tensor, tgt_img: torch.Tensor,
                            tgt_pseudo: torch.Tensor, lam: float, pasted: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernel (inputs already checked)."""
    n_b, n_c, n_h, n_w = tmpl_img.shape
    src_out, src_lbl_out, tgt_out, tgt_lbl_out, mask_BHW = _alloc_outputs(tmpl_img, tmpl_label, src_img,
                                                                          src_label, tgt_img, tgt_pseudo)
    err = torch.zeros((1,), dtype=torch.int32, device=tmpl_label.device)
    for t in (tmpl_img, src_img, tgt_img, src_out, tgt_out, tmpl_label, src_label, tgt_pseudo,
              *([] if pasted is None else [pasted])):
        # the kernel offsets inside one image in int32 (the batch offset is int64)
        if sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            raise ValueError(f"dual_soft_paste: one image spans more than 2**31 elements, shape {tuple(t.shape)}")
    if mask_BHW.numel() == 0:
        return src_out, src_lbl_out, tgt_out, tgt_lbl_out, mask_BHW
    n_pix = n_h * n_w
    # the interpreter pays ~1 ms per program: one program per image there
    # 256 pixels x 4 channel slots on 4 warps: no register spills on sm_80/sm_90 (python -m bench.compile_kernels)
    block_p = min(next_pow2(n_pix), 65536) if interpreting() else 256
    block_c = min(next_pow2(n_c), 4)
    grid = (triton.cdiv(n_pix, block_p), n_b)
    _dual_soft_paste_kernel[grid](
        tmpl_img, src_img, tgt_img, src_out, tgt_out,
        tmpl_label, src_label, tgt_pseudo, src_lbl_out, tgt_lbl_out, mask_BHW.view(torch.uint8),
        class_sel.view(torch.uint8), mask_BHW if pasted is None else pasted.view(torch.uint8), err, float(lam),
        n_c, n_h, n_w, class_sel.shape[1],
        *tmpl_img.stride(), *src_img.stride(), *tgt_img.stride(), *src_out.stride(), *tgt_out.stride(),
        *tmpl_label.stride(), *src_label.stride(), *tgt_pseudo.stride(),
        *class_sel.stride(), *(mask_BHW if pasted is None else pasted).stride(),
        IGNORE=IGNORE_LABEL, HAS_PASTED=pasted is not None, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    if value_checks_active(tmpl_label) and int(err.item()) > 0:
        # name the offending tensor: the kernel only counted; finding which one costs nothing on this error path
        check_label_values({"tmpl_label": tmpl_label, "src_label": src_label, "tgt_pseudo": tgt_pseudo},
                           class_sel.shape[1])
        raise ValueError(bad_label_message("a label map", class_sel.shape[1]))
    return src_out, src_lbl_out, tgt_out, tgt_lbl_out, mask_BHW


def dual_soft_paste(tmpl_img: torch.Tensor, tmpl_label: torch.Tensor, class_sel: torch.Tensor,
                    src_img: torch.Tensor, src_label: torch.Tensor, tgt_img: torch.Tensor,
                    tgt_pseudo: torch.Tensor, lam: float, pasted: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DSP step 4 in one pass. Returns (src_mix_img, src_mix_label, tgt_mix_img, tgt_mix_label, mask_BHW).

    mask[b,h,w] = class_sel[b, tmpl_label[b,h,w]] (False for 255) or pasted[b,h,w];
    mix_img = lam*mask*tmpl + (1 - lam*mask)*dst; mix_label = where(mask, tmpl_label, dst_label).
    Images float32/float16/bfloat16, NCHW or channels_last; labels int64 or uint8 (a mixed label map takes the
    promoted dtype of its two sources, as torch.where).
    pasted (B, H, W) bool, optional: pixels the long-tail paste wrote onto the template; they join the mask
    whatever their class (DSP step 3). Not differentiable: the images come from the data pipeline."""
    check_soft_paste(tmpl_img, tmpl_label, class_sel, src_img, src_label, tgt_img, tgt_pseudo, lam, pasted)
    if not use_triton(tmpl_img):
        return twins.dual_soft_paste(tmpl_img, tmpl_label, class_sel, src_img, src_label, tgt_img,
                                         tgt_pseudo, lam, pasted)
    return tuple(torch.ops.dsp_fast.dual_soft_paste(tmpl_img, tmpl_label, class_sel, src_img, src_label, tgt_img,
                                                    tgt_pseudo, float(lam), pasted))


# The launch as a torch operator: fake tensors (shape propagation with no device), torch.compile and an op
# recording see one `dsp_fast::dual_soft_paste` node instead of Python around a launch. Not differentiable.
@torch.library.custom_op("dsp_fast::dual_soft_paste", mutates_args=())
def _dual_soft_paste_op(tmpl_img: torch.Tensor, tmpl_label: torch.Tensor, class_sel: torch.Tensor,
                        src_img: torch.Tensor, src_label: torch.Tensor, tgt_img: torch.Tensor,
                        tgt_pseudo: torch.Tensor, lam: float, pasted: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _dual_soft_paste_triton(tmpl_img, tmpl_label, class_sel, src_img, src_label, tgt_img, tgt_pseudo, lam,
                                   pasted)


@_dual_soft_paste_op.register_fake
def _(tmpl_img, tmpl_label, class_sel, src_img, src_label, tgt_img, tgt_pseudo, lam, pasted):
    return _alloc_outputs(tmpl_img, tmpl_label, src_img, src_label, tgt_img, tgt_pseudo)
