"""dsp_fast.kernels: Triton kernels of the DSP step, each with a plain-PyTorch twin in `twins`.

A leaf package: torch and (optionally) triton, nothing of dsp_fast; without triton (no `gpu` extra) it still
imports. CUDA tensors run the Triton kernels (torch operators `dsp_fast::*`, with fake implementations for fake
tensors and torch.compile); CPU tensors run the twins, unless TRITON_INTERPRET=1 (the tests). The weighted MMD and
the masked pool never build the upsampled feature map, on any device. `force_twins()` runs every naive twin (the
ablation); `force_kernels()` takes the kernels' path on any device (their operators on fake CPU tensors).

    bn_act                batch norm (per group of images) + residual add + ReLU in one pass each way (norm_act.py)
    dual_soft_paste       fused DSP step 4 (soft_paste.py)
    masked_upsample_pool  mean of mask * bilinear_upsample(feat) without the upsampled tensor (upsample_pool.py)
    mmd_rbf               multi-bandwidth Gaussian MMD (mmd.py)
    upsample_bilinear     F.interpolate's bilinear upsampling; on CPU as two matrix products (upsample_pool.py)
    weighted_mmd          DSP's global + masked MMD of upsampled features (mmd.py)
"""

from . import twins
from ._common import HAS_TRITON, IGNORE_LABEL, force_kernels, force_twins, interpreting, set_value_checks
from .mmd import mmd_rbf, weighted_mmd
from .norm_act import bn_act
from .soft_paste import dual_soft_paste
from .upsample_pool import masked_upsample_pool, upsample_bilinear

__all__ = ["HAS_TRITON", "IGNORE_LABEL", "bn_act", "dual_soft_paste", "force_kernels", "force_twins",
           "interpreting", "masked_upsample_pool", "mmd_rbf", "set_value_checks", "twins", "upsample_bilinear",
           "weighted_mmd"]
