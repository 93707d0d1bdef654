"""The kernel cases: the inputs of each kernel and the bytes each case assumes, shared by the kernel tests and the
microbenchmarks (bench/bench_kernels.py), so that a speed or memory figure is measured on the inputs the tests check.
Shapes: B batch, C channels, H x W crop, h x w stride-8 features, K classes; the paper's are the benchmarks' (and
the GPU tests' largest), the odd ones (1x1, 17x33, channel counts that are not powers of two) the tests'.
"""

from __future__ import annotations

import torch

# the paper's step: 2 images per domain, 3x512x512 crops, 256x65x65 stride-8 features, 19 classes
B, C_IMG, H, W = 2, 3, 512, 512
C_FEAT, H_FEAT, W_FEAT = 256, 65, 65
NUM_CLASSES, LAM = 19, 0.9
PAPER_PASTE = (B, C_IMG, H, W)
PAPER_FEATURES = (B, C_FEAT, (H_FEAT, W_FEAT), (H, W))  # (b, c, feature hw, crop size)

# the tests' odd shapes
PASTE_SHAPES = [(1, 3, 1, 1), (3, 3, 17, 33), (1, 5, 17, 33)]  # (b, c, h, w)
PASTE_GPU_SHAPES = [(1, 3, 1, 1), (3, 3, 17, 33), PAPER_PASTE]
ADJOINT_SIZES = [((1, 1), (1, 1)), ((1, 1), (7, 9)), ((3, 5), (17, 33)), ((2, 2), (2, 2)), ((5, 7), (6, 8)),
                 ((65, 65), (512, 512)), ((65, 65), (513, 511))]  # (feature hw, crop size)
POOL_SHAPES = [((1, 4, 1, 1), (1, 1)), ((1, 4, 1, 1), (7, 9)), ((3, 5, 3, 5), (17, 33))]  # (feature BCHW, crop)
MMD_ROWS = [(1, 1), (2, 2), (3, 2)]  # rows of x and y

MASK_KINDS = ("none", "bool", "float", "all_false", "all_true")


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def paste_inputs(b: int, c: int, h: int, w: int, k: int = NUM_CLASSES, dtype: torch.dtype = torch.float32,
                 label_dtype: torch.dtype = torch.int64, channels_last: bool = False, device: str = "cpu",
                 sel: str = "random") -> tuple:
    """dual_soft_paste's inputs without lam: (template image, template label, class_sel (b, k) bool, source image,
    source label, target image, target pseudo-label). Images in [0, 1), the range the trainers paste in; some
    ignore pixels in the template and source labels; `sel` random, none or all classes chosen."""
    imgs = [torch.rand(b, c, h, w, device=device).to(dtype) for _ in range(3)]
    if channels_last:
        imgs = [i.to(memory_format=torch.channels_last) for i in imgs]
    labels = [torch.randint(0, k, (b, h, w), device=device) for _ in range(3)]
    labels[0][:, ::5] = 255  # some ignore pixels in the template
    labels[1][:, 1::7] = 255
    labels = [lbl.to(label_dtype) for lbl in labels]
    drawn = torch.rand(b, k, device=device) < 0.5  # drawn for every `sel`, so later draws do not depend on it
    class_sel = {"random": drawn, "none": torch.zeros_like(drawn), "all": torch.ones_like(drawn)}[sel]
    return imgs[0], labels[0], class_sel, imgs[1], labels[1], imgs[2], labels[2]


def paste_bytes(b: int, c: int, h: int, w: int, dtype: torch.dtype, label_bytes: int = 8) -> int:
    """Read 3 images + 3 labels, write 2 images + 2 labels + the bool mask. The template is counted in full: an upper
    bound, the kernel skips the template pixels it does not paste."""
    return b * h * w * (5 * c * element_size(dtype) + 5 * label_bytes + 1)


def make_mask(kind: str, b: int, h: int, w: int, device: str = "cpu", density: float = 0.4,
              gen: torch.Generator | None = None) -> torch.Tensor | None:
    """A crop-sized (b, h, w) mask of `kind` (MASK_KINDS): none, bool (True with probability `density`), float in
    [0, 1), all false or all true."""
    if kind == "none":
        return None
    if kind in ("all_false", "all_true"):
        return torch.full((b, h, w), kind == "all_true", dtype=torch.bool, device=device)
    u = torch.rand(b, h, w, generator=gen).to(device) if gen is not None else torch.rand(b, h, w, device=device)
    return u if kind == "float" else u < density


def feature_inputs(b: int, c: int, hw: tuple[int, int], size: tuple[int, int], dtype: torch.dtype = torch.float32,
                   device: str = "cpu", mask: str = "bool", density: float = 0.4, target_scale: float = 1.0,
                   target_shift: float = 0.1, channels_last: bool = False, grad: bool = False,
                   gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(feat_s, feat_t, mask) of weighted_mmd: two (b, c, *hw) feature maps, the target's scaled and shifted so that
    the MMD is well away from 0, and a mask of the crop `size`. With `gen` every value is drawn on the CPU from it
    (reproducible figures), else on `device` from the default generator."""
    def randn() -> torch.Tensor:
        return torch.randn(b, c, *hw, generator=gen) if gen is not None else torch.randn(b, c, *hw, device=device)

    feat_s = randn().to(device=device, dtype=dtype)
    feat_t = (randn() * target_scale + target_shift).to(device=device, dtype=dtype)
    if channels_last:
        feat_s, feat_t = feat_s.to(memory_format=torch.channels_last), feat_t.to(memory_format=torch.channels_last)
    m = make_mask(mask, b, *size, device=device, density=density, gen=gen)
    return feat_s.requires_grad_(grad), feat_t.requires_grad_(grad), m


def pool_bytes(feat: torch.Tensor, mask: torch.Tensor | None) -> int:
    """masked_upsample_pool's floor: read the features and the mask once."""
    return feat.numel() * feat.element_size() + (0 if mask is None else mask.numel() * mask.element_size())


def weighted_mmd_bytes(feat: torch.Tensor, mask: torch.Tensor) -> int:
    """weighted_mmd forward + backward's floor: read both feature maps and the mask, write both gradients."""
    return 4 * feat.numel() * feat.element_size() + mask.numel() * mask.element_size()


def mmd_rbf_bytes(x: torch.Tensor) -> int:
    """mmd_rbf forward + backward of two samples shaped like x: read both, write both gradients."""
    return 2 * 2 * x.numel() * x.element_size()


def upsampled_bytes(b: int, c: int, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """One feature map upsampled to the crop: what the naive weighted MMD builds (several times) and the fused never."""
    return b * c * size[0] * size[1] * element_size(dtype)


# batch norm + residual + ReLU: (n, c, h, w, group_size); odd channel counts, 1x1 maps, per-group statistics
BN_SHAPES = [(3, 17, 5, 7, 0), (3, 17, 5, 7, 1), (4, 5, 1, 1, 2), (2, 70, 9, 13, 0)]
BN_VARIANTS = [(False, True), (True, True), (True, False), (False, False)]  # (residual, relu)
# the largest bottleneck BN of DeepLabv2 at the paper's step: 3 groups of 2 images, 256 x 129 x 129 (layer1)
PAPER_BN = (6, 256, 129, 129, 2)


def bn_inputs(n: int, c: int, h: int, w: int, dtype: torch.dtype = torch.float32, channels_last: bool = False,
              residual: bool = True, device: str = "cpu", gen: torch.Generator | None = None) -> dict:
    """bn_act's tensors: x with a mean and spread per channel far from 0 and 1 (so that a wrong statistic shows),
    affine weight and bias, running statistics, a residual (or None). fp32 drawn, then cast."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    x = (randn(n, c, h, w) * (randn(c).abs() + 0.5).view(1, c, 1, 1) + randn(c).view(1, c, 1, 1) * 3).to(dtype)
    res = randn(n, c, h, w).to(dtype) if residual else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return {"x": x, "weight": randn(c).abs() + 0.5, "bias": randn(c), "running_mean": randn(c) * 0.1,
            "running_var": randn(c).abs() + 0.5, "residual": res}


def bn_act_bytes(x: torch.Tensor, residual: bool) -> int:
    """bn_act forward + backward as the kernels move them: statistics read x; forward reads x (+ residual), writes
    y; backward reads dy, y, x and writes dy', then reads dy', x and writes dx (dy' is the residual's gradient)."""
    return x.numel() * x.element_size() * (3 + residual + 7)
