"""The training recipe's sections: `dsp:` (the method, with the authors'-script switches) and `optim:` (the
optimizer and its schedule)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsp_fast.config.errors import _check, _check_fields, _field

TEMPLATES = ("separate", "source")
OPTIM_ALGORITHMS = ("sgd", "adamw")
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class DSPConfig:
    enabled: bool = True
    """False trains source-only (L_src alone): the baseline adaptation is compared against."""
    lam: float = _field(0.9, within="[0, 1]")
    """Fusion weight of the soft paste (0.9 for GTA5, 0.8 for SYNTHIA); 1.0: a hard paste (DACS's ClassMix)."""
    template: str = _field("separate", choices=TEMPLATES)
    """Whose pixels are pasted: 'separate' (DSP) a second source batch x_m, y_m; 'source' (DACS) the source batch
    x_s, y_s itself, half of y_s[i]'s classes pasted onto x_t[i], and no second source batch loaded or forwarded."""
    source_mix: bool = True
    """The dual part of the paste: the template also pasted onto x_s (xs_mix) and trained on (L_srcmix). False: no
    xs_mix, no L_srcmix, no student forward on it (DACS); required with dsp.template 'source'."""
    conf_threshold: float = _field(0.968, within="[0, 1]")
    """Pseudo-label confidence threshold for the target pixel weight q."""
    long_tail_classes: list[int] = field(default_factory=lambda: [12, 15, 16, 17, 18])
    """Train ids of the long-tail classes (GTA5: rider, bus, train, motorcycle, bicycle)."""
    num_long_tail: int = 2
    """Long-tail classes hard-pasted onto the template per step; 0: no long-tail paste (no class index, no crops)."""
    drop_target_soft_term: bool = False
    """True restores the authors' script, which computes the (1-lam) target term and throws it away."""
    train_mmd_projection: bool = True
    """False restores the authors' script, where the MMD projection is never given to the optimizer."""
    mmd_weight: float = _field(1e-4, within="[0, inf)")
    """Weight c of the MMD loss; 0: no MMD computed (the MMD projection then takes no gradient). Needs
    dsp.source_mix: the MMD compares the student's features of xs_mix and xt_mix."""
    mmd_kernel_mul: float = 2.0
    """Ratio between successive Gaussian bandwidths of the MMD."""
    mmd_kernel_num: int = _field(5, within="[1, inf)")
    """Number of Gaussian kernels of the MMD."""
    ema_max: float = _field(0.99, within="[0, 1)")
    """Cap of the teacher's EMA coefficient alpha_t = min(1 - 1/(t+1), ema_max)."""
    long_tail_size: tuple[int, int] = (1920, 1080)
    """[width, height] a source image is resized to (bicubic) before a long-tail crop is cut from it (the authors'
    1920x1080, larger than data.source_size: pasted objects are 1.5 times the size of the source crops')."""
    jitter_p: float = _field(0.8, within="[0, 1]")
    """Probability of colour jitter, one coin per step shared by every mixed image (kornia 0.2.0 semantics)."""
    jitter_strength: float = _field(0.25, within="[0, 0.5]")
    """Jitter amplitude s: brightness adds U(-s, s), contrast and saturation multiply by U(1-s, 1+s), hue adds
    U(-s, s) radians."""
    blur_p: float = _field(0.5, within="[0, 1]")
    """Probability of Gaussian blur, one coin per step shared by every mixed image."""
    share_first_mask: bool = False
    """True restores the authors' indexing bug: image 1 pasted with image 0's mask, image 1's pixel weights from its
    own chosen classes, image 0's mask collecting every image's long-tail pixels."""
    paste_ignore_label: bool = False
    """True restores the authors' script, where the ignore label can be drawn as a pasted class."""
    long_tail_search: str = _field("counts", choices=("counts", "retry"))
    """'counts': (image, window) drawn from per-image counts of the windows that hold the class (the retry loop's
    distribution, no loop); 'retry': the authors' loop literally, up to 1000 redraws (reference trainer only)."""
    long_tail_paste: str = _field("class", choices=("class", "columns"))
    """'class': a long-tail crop's class pixels are pasted (the paper); 'columns': the authors' script, whose oneMix
    reads the first row of the (H, W) mask: the crop's image and label are pasted in the full columns where the
    crop's first row holds the class (M still gets the class's pixels only)."""
    kornia_hsv_quirk: bool = False
    """True restores kornia 0.2.0's hsv_to_rgb in the saturation and hue jitter as the script ran it: kornia saw BGR
    tensors, so a sector-0 value of exactly 1.0 in the blue channel is overwritten by the sector-1 formula (saturated
    blues of full brightness come out darker); the jitter then runs on BGR with the script's hue sign."""
    source_ce_mean: str = _field("valid", choices=("valid", "all"))
    """How L_src averages its per-pixel cross-entropy: 'valid' over the labelled pixels (DSP's CrossEntropy2d; 0 when
    none is), 'all' over every pixel of the batch, an ignored one counting 0 (DAFormer's decode head: the mit_*
    presets)."""

    def batches_per_step(self) -> int:
        """Batches of data.batch_size images a step reads: source, template (dsp.template 'separate'), target; the
        source alone when source-only."""
        return 1 if not self.enabled else 2 + (self.template == "separate")

    def __post_init__(self) -> None:
        _check_fields(self, "dsp")
        _check(all(isinstance(c, int) and 0 <= c < 255 for c in self.long_tail_classes), "dsp.long_tail_classes",
               f"must be train ids in [0, 255), got {self.long_tail_classes!r}")
        _check(0 <= self.num_long_tail <= len(self.long_tail_classes), "dsp.num_long_tail",
               f"must be in [0, {len(self.long_tail_classes)}] (the long-tail list's length), got {self.num_long_tail}")
        _check(not (self.template == "source" and self.source_mix), "dsp.source_mix",
               "must be false with dsp.template 'source' (the source batch is the template: a source mix would paste "
               "x_s onto itself)")
        _check(self.source_mix or self.mmd_weight == 0, "dsp.mmd_weight",
               f"must be 0 with dsp.source_mix false (the MMD compares the features of xs_mix and xt_mix), got "
               f"{self.mmd_weight}")


@dataclass
class OptimConfig:
    algorithm: str = _field("sgd", choices=OPTIM_ALGORITHMS)
    """'sgd' (DeepLab / DSP: momentum SGD) or 'adamw' (DAFormer's recipe for MiT)."""
    lr: float = _field(2.5e-4, within="(0, inf)")
    """Base learning rate of the backbone (DSP's SGD: 2.5e-4; DAFormer's AdamW: 6e-5)."""
    head_lr_mult: float = _field(10.0, within="(0, inf)")
    """Learning-rate multiplier of the classifier head (ASPP, or the DAFormer decoder) and the MMD projection."""
    momentum: float = _field(0.9, within="[0, 1)")
    """SGD momentum (unused by AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2) (unused by SGD)."""
    weight_decay: float = _field(5e-4, within="[0, inf)")
    """Weight decay: L2 in SGD (DSP: 5e-4), decoupled in AdamW (DAFormer: 0.01)."""
    norm_decay_mult: float = _field(1.0, within="[0, inf)")
    """Weight-decay multiplier of parameters whose name contains 'norm' (DAFormer: 0.0 for the LayerNorms)."""
    poly_power: float = _field(0.9, within="[0, inf)")
    """Poly decay: lr * (1 - step / max_steps) ** poly_power (DSP: 0.9; DAFormer: 1.0)."""
    warmup_steps: int = _field(0, within="[0, inf)")
    """Linear warm-up steps (DAFormer: 1500); 0: none. During warm-up the poly lr is scaled by
    1 - (1 - step / warmup_steps) * (1 - warmup_ratio), as mmcv's linear warm-up."""
    warmup_ratio: float = _field(1e-6, within="(0, 1]")
    """Fraction of the poly lr at step 0 of the warm-up (DAFormer: 1e-6)."""
    lr_scaling: str = _field("none", choices=LR_SCALINGS)
    """How a global batch other than the paper's 2 changes the schedule: 'none' (lr and steps as written), 'linear'
    (lr x batch/2) or 'sqrt' (lr x sqrt(batch/2)); both also divide train.max_steps (and optim.warmup_steps) by
    batch/2, so the run sees as many images as the paper's. A rule the paper did not test. Applied once when the
    config is loaded: the resolved config in the run folder holds the scaled lr and steps, with 'none' here."""
    script_param_repeats: bool = False
    """True: each DeepLabv2 backbone parameter takes as many SGD updates per step as the authors' optimizer lists
    it (their parameter generator yields a bottleneck conv 3 times, a downsample conv 4 times, the stem conv once;
    torch 1.7.1 stepped every occurrence), its gradient fixed within the step. The head and the projection: once.
    SGD and DeepLabv2 only; not with fast.amp fp16 (fused SGD unscales the gradients in place on its first pass)."""

    def __post_init__(self) -> None:
        _check_fields(self, "optim")
        self.betas = _betas(self.betas)
        _check(not (self.script_param_repeats and self.algorithm != "sgd"), "optim.script_param_repeats",
               f"repeats the authors' SGD updates: needs optim.algorithm sgd, got {self.algorithm!r}")


def _betas(value: Any) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0 for v in value)
    _check(ok, "optim.betas", f"expected [beta1, beta2], each in [0, 1), got {value!r}")
    return (float(value[0]), float(value[1]))

