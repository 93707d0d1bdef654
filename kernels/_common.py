"""What every kernel file shares: the optional Triton import, the dispatch rule, and input validation.

Shapes: B batch, C channels, H x W full crop size, h x w feature size (stride 8), K number of classes.
Validation lives here so that a kernel and its twin reject exactly the same inputs with the same messages.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the `gpu` extra is optional: without it every call goes to the twin
    HAS_TRITON = False

    def _missing_jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_missing_jit, cdiv=lambda a, b: -(-a // b), next_power_of_2=None)
    # the annotations `tl.constexpr` of the kernel signatures are evaluated at import time
    tl = SimpleNamespace(constexpr=object)

IGNORE_LABEL = 255
IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.uint8)

_value_checks = True
_force_twins = False
_force_kernels = False


def interpreting() -> bool:
    """True when the Triton interpreter is asked for: the only way to run the kernels without a GPU (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule: CUDA tensors go to the kernels; CPU tensors go to the twin unless the interpreter is on or
    `force_kernels()` asks for the kernels; everything goes to the twins inside `force_twins()`."""
    if _force_twins:
        return False
    return HAS_TRITON and (t.is_cuda or _force_kernels or (t.device.type == "cpu" and interpreting()))


def twins_forced() -> bool:
    """Inside `force_twins()`: the naive twins run even where a plain-PyTorch fast formulation exists (the weighted
    MMD's adjoint), so that the ablation turns off every fast formulation, not only the Triton launches."""
    return _force_twins


@contextlib.contextmanager
def force_twins(enabled: bool = True) -> Iterator[None]:
    """Run every kernel call as its plain-PyTorch twin (the "fused kernels off" ablation), restored on exit."""
    global _force_twins
    saved, _force_twins = _force_twins, bool(enabled) or _force_twins
    try:
        yield
    finally:
        _force_twins = saved


@contextlib.contextmanager
def force_kernels(enabled: bool = True) -> Iterator[None]:
    """Every kernel call takes the Triton kernels' path whatever its tensors' device, as a CUDA tensor's call does
    (where triton imports; `force_twins()` still wins): their operators, whose fake implementations a CPU uses to
    predict the CUDA step, or a compile without a launch. Restored on exit."""
    global _force_kernels
    saved, _force_kernels = _force_kernels, bool(enabled) or _force_kernels
    try:
        yield
    finally:
        _force_kernels = saved


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent checks (label values) on or off. They cost one host sync per call; they are skipped
    automatically while a CUDA graph is being captured, where a sync is impossible."""
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_active(t: torch.Tensor) -> bool:
    if not _value_checks:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _same_device(named: dict[str, torch.Tensor]) -> None:
    devices = {str(t.device) for t in named.values()}
    _need(len(devices) == 1, f"all tensors must be on one device, got {({k: str(t.device) for k, t in named.items()})}")


# ------------------------------------------------------------------------------------------- dual soft paste
def check_soft_paste(tmpl_img: torch.Tensor, tmpl_label: torch.Tensor, class_sel: torch.Tensor,
                     src_img: torch.Tensor, src_label: torch.Tensor, tgt_img: torch.Tensor,
                     tgt_pseudo: torch.Tensor, lam: float, pasted: torch.Tensor | None = None) -> None:
    """Shape, dtype and device checks of dual_soft_paste (no host sync)."""
    imgs = {"tmpl_img": tmpl_img, "src_img": src_img, "tgt_img": tgt_img}
    labels = {"tmpl_label": tmpl_label, "src_label": src_label, "tgt_pseudo": tgt_pseudo}
    for name, t in {**imgs, **labels, "class_sel": class_sel}.items():
        _need(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    for name, t in imgs.items():
        _need(t.dim() == 4, f"{name} must be (B, C, H, W), got shape {tuple(t.shape)}")
        _need(t.dtype in IMAGE_DTYPES, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        _need(t.shape == tmpl_img.shape, f"{name} has shape {tuple(t.shape)}, tmpl_img {tuple(tmpl_img.shape)}")
        _need(t.dtype == tmpl_img.dtype, f"{name} is {t.dtype} but tmpl_img is {tmpl_img.dtype}")
    b, _, h, w = tmpl_img.shape
    for name, t in labels.items():
        _need(t.dtype in LABEL_DTYPES, f"{name} must be int64 or uint8, got {t.dtype}")
        _need(tuple(t.shape) == (b, h, w), f"{name} must be (B, H, W) = {(b, h, w)}, got {tuple(t.shape)}")
    _need(class_sel.dtype == torch.bool, f"class_sel must be bool, got {class_sel.dtype}")
    _need(class_sel.dim() == 2 and class_sel.shape[0] == b,
          f"class_sel must be (B, num_classes) with B = {b}, got {tuple(class_sel.shape)}")
    k = class_sel.shape[1]
    _need(1 <= k <= IGNORE_LABEL, f"num_classes (class_sel.shape[1]) must be in [1, 255], got {k}")
    _need(isinstance(lam, (int, float)) and not isinstance(lam, bool), f"lam must be a number, got {type(lam)}")
    _need(0.0 <= lam <= 1.0, f"lam must be in [0, 1], got {lam}")
    _same_device({**imgs, **labels, "class_sel": class_sel})
    if pasted is not None:
        _need(isinstance(pasted, torch.Tensor) and pasted.dtype == torch.bool,
              f"pasted must be a bool tensor, got {getattr(pasted, 'dtype', type(pasted))}")
        _need(tuple(pasted.shape) == (b, h, w), f"pasted must be (B, H, W) = {(b, h, w)}, got {tuple(pasted.shape)}")
        _same_device({"tmpl_img": tmpl_img, "pasted": pasted})


def bad_label_message(name: str, num_classes: int) -> str:
    return f"{name} holds values outside [0, {num_classes}) other than the ignore label {IGNORE_LABEL}"


def check_label_values(labels: dict[str, torch.Tensor], num_classes: int) -> None:
    """The data-dependent check, for the twins (one host sync per label tensor); skipped like the kernels' check
    when value checks are off, so that the twins too run without a host sync (the "fused kernels off" ablation)."""
    for name, t in labels.items():
        if not value_checks_active(t):
            return
        bad = (t >= num_classes) & (t != IGNORE_LABEL)
        if t.dtype != torch.uint8:
            bad |= t < 0
        _need(not bool(bad.any()), bad_label_message(name, num_classes))


# ------------------------------------------------------------------------------------------------------ MMD
def check_upsample_pool(feat: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]) -> tuple[int, int]:
    """Checks of masked_upsample_pool; returns size as a tuple of ints."""
    _need(isinstance(feat, torch.Tensor) and feat.dim() == 4,
          f"feat must be a (B, C, h, w) tensor, got {tuple(getattr(feat, 'shape', ()))}")
    _need(feat.dtype in IMAGE_DTYPES, f"feat must be float32, float16 or bfloat16, got {feat.dtype}")
    _need(feat.numel() > 0, f"feat must not be empty, got shape {tuple(feat.shape)}")
    _need(isinstance(size, (tuple, list, torch.Size)) and len(size) == 2
          and all(isinstance(s, int) and not isinstance(s, bool) for s in size),
          f"size must be a pair of ints (H, W), got {size!r}")
    big_h, big_w = int(size[0]), int(size[1])
    h, w = feat.shape[-2:]
    _need(big_h >= h and big_w >= w,
          f"size {(big_h, big_w)} is smaller than the feature map {(h, w)}: only upsampling is supported")
    if mask is not None:
        _need(isinstance(mask, torch.Tensor), f"mask must be a tensor or None, got {type(mask).__name__}")
        _need(mask.dtype == torch.bool or mask.dtype.is_floating_point, f"mask must be bool or float, got {mask.dtype}")
        # the fused path treats the mask as data (no gradient); refusing is better than a silently missing gradient
        _need(not mask.requires_grad, "mask must not require grad: the paste mask gets no gradient")
        _need(tuple(mask.shape) == (feat.shape[0], big_h, big_w),
              f"mask must be (B, H, W) = {(feat.shape[0], big_h, big_w)}, got {tuple(mask.shape)}")
        _same_device({"feat": feat, "mask": mask})
    return big_h, big_w


def check_mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float, kernel_num: int) -> None:
    for name, t in (("x", x), ("y", y)):
        _need(isinstance(t, torch.Tensor) and t.dim() == 2,
              f"{name} must be (N, C), got {tuple(getattr(t, 'shape', ()))}")
        _need(t.dtype in IMAGE_DTYPES, f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    _need(x.shape[1] == y.shape[1], f"x and y must have the same feature size, got {x.shape[1]} and {y.shape[1]}")
    _need(x.shape[0] >= 1 and y.shape[0] >= 1, "x and y need at least one row each")
    _need(x.dtype == y.dtype, f"x is {x.dtype} but y is {y.dtype}")
    _need(isinstance(kernel_num, int) and kernel_num >= 1, f"kernel_num must be an int >= 1, got {kernel_num!r}")
    _need(kernel_mul > 0, f"kernel_mul must be > 0, got {kernel_mul}")
    _same_device({"x": x, "y": y})


def check_weighted_mmd(feat_s: torch.Tensor, feat_t: torch.Tensor, mask: torch.Tensor,
                       size: tuple[int, int]) -> tuple[int, int]:
    _need(isinstance(feat_s, torch.Tensor) and isinstance(feat_t, torch.Tensor), "feat_s and feat_t must be tensors")
    _need(feat_s.shape == feat_t.shape, f"feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} differ")
    _need(feat_s.dtype == feat_t.dtype, f"feat_s is {feat_s.dtype} but feat_t is {feat_t.dtype}")
    _need(mask is not None, "weighted_mmd needs the paste mask (B, H, W)")
    size = check_upsample_pool(feat_s, mask, size)
    _same_device({"feat_s": feat_s, "feat_t": feat_t})
    return size


# ------------------------------------------------------------------------------------------ batch norm + act
def check_bn_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                 residual: torch.Tensor | None) -> None:
    """Shape, dtype and device checks of bn_act (no host sync)."""
    _need(isinstance(x, torch.Tensor) and x.dim() == 4, f"x must be (N, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
    _need(x.dtype in IMAGE_DTYPES, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    named = {"x": x}
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _need(tuple(t.shape) == (x.shape[1],), f"{name} must be (C,) = ({x.shape[1]},), got {tuple(t.shape)}")
            named[name] = t
    _need((running_mean is None) == (running_var is None), "running_mean and running_var go together")
    if residual is not None:
        _need(residual.shape == x.shape, f"residual has shape {tuple(residual.shape)}, x {tuple(x.shape)}")
        _need(residual.dtype == x.dtype, f"residual is {residual.dtype} but x is {x.dtype}")
        named["residual"] = residual
    _same_device(named)
