"""Typed configuration: dataclasses with one docstring per field, validation in `__post_init__`, YAML presets.

Every deviation from the authors' script listed in docs/method.md is a field here, so both behaviours stay
reproducible. `load_config(spec, overrides)` rejects unknown keys and bad values with the dotted field name.
The presets ship inside the package (`dsp_fast/configs/*.yaml`): `--config synthetic` names one, `--config
my.yaml` reads a file, so the trainers run from any folder.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
DATA_BACKENDS = ("auto", "dali", "torch")
COMPILE_MODES = ("off", "model", "step")
OPTIMIZERS = ("auto", "fused", "foreach", "apex")
MIT_ARCHS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
MODEL_ARCHS = ("deeplabv2_r101", "tiny", *MIT_ARCHS)
OPTIM_ALGORITHMS = ("sgd", "adamw")
LR_SCALINGS = ("none", "linear", "sqrt")
PAPER_BATCH = 2  # images per domain per step in the paper: the batch optim.lr_scaling scales from


class ConfigError(ValueError):
    """A config file or override that names an unknown field or gives a bad value."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _pair(value: Any, name: str) -> tuple[int, int]:
    _check(isinstance(value, (list, tuple)) and len(value) == 2, name, f"expected [width, height], got {value!r}")
    _check(all(isinstance(v, int) and v > 0 for v in value), name, f"expected two positive integers, got {value!r}")
    return (int(value[0]), int(value[1]))


@dataclass
class DataConfig:
    source: str = "synthetic"
    """Labelled source domain: 'gta5', 'synthia' or 'synthetic' (the built-in generated scenes)."""
    source_root: str = ""
    """Folder of the source dataset in its official layout ('' with source 'synthetic', which does not read it)."""
    target: str = "cityscapes"
    """Unlabelled target domain: always 'cityscapes' (the synthetic target is written in the Cityscapes layout)."""
    target_root: str = ""
    """Folder of Cityscapes (leftImg8bit/, gtFine/); '' with source 'synthetic': generated under synthetic_root."""
    synthetic_root: str = "data/synthetic"
    """Where the built-in synthetic domain-shift dataset lives; generated there when absent."""
    synthetic_seed: int = 0
    """Seed of the synthetic generator (same seed, same images)."""
    source_size: tuple[int, int] = (1280, 720)
    """[width, height] every source image is resized to before cropping (GTA5 1280x720, SYNTHIA 1280x760)."""
    target_size: tuple[int, int] = (1024, 512)
    """[width, height] every target image is resized to before cropping (Cityscapes 1024x512)."""
    crop_size: tuple[int, int] = (512, 512)
    """[width, height] of the random training crops."""
    eval_size: tuple[int, int] = (1024, 512)
    """[width, height] target validation images are evaluated at (single scale)."""
    batch_size: int = 2
    """Images per domain per step over all ranks (the global batch: source, template and target batches each hold
    this many; the paper: 2). With N ranks each takes batch_size / N, so it must divide by N."""
    num_workers: int = 4
    """DataLoader worker processes per loader (0: load in the training process)."""
    eval_split: str = "val"
    """Cityscapes split used for evaluation."""
    max_eval_images: int = 0
    """Evaluate on at most this many target images (0: all)."""

    def __post_init__(self) -> None:
        _check(self.source in ("gta5", "synthia", "synthetic"), "data.source", f"unknown dataset {self.source!r}")
        _check(self.target == "cityscapes", "data.target", f"only 'cityscapes' is supported, got {self.target!r}")
        if self.source != "synthetic":
            _check(bool(self.source_root), "data.source_root", f"required for source {self.source!r}")
            _check(bool(self.target_root), "data.target_root", "required for a real source dataset")
        for name in ("source_size", "target_size", "crop_size", "eval_size"):
            setattr(self, name, _pair(getattr(self, name), f"data.{name}"))
        cw, ch = self.crop_size
        for name in ("source_size", "target_size"):
            w, h = getattr(self, name)
            _check(w >= cw and h >= ch, f"data.{name}", f"{w}x{h} is smaller than data.crop_size {cw}x{ch}")
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.max_eval_images >= 0, "data.max_eval_images", f"must be >= 0, got {self.max_eval_images}")


@dataclass
class ModelConfig:
    arch: str = "deeplabv2_r101"
    """'deeplabv2_r101' (the paper's model), 'tiny' (same structure, narrow and shallow: CPU runs and tests), or
    'mit_b0'..'mit_b5': SegFormer's Mix Transformer encoder with a DAFormer decoder (mit_b0 serves CPU runs)."""
    num_classes: int = 19
    """Output classes: 19 for GTA5 -> Cityscapes, 16 for SYNTHIA -> Cityscapes."""
    pretrained: str = ""
    """Local file of initial weights; '' = random init. DeepLab archs: ResNet-101 (torchvision- or DeepLab-style
    keys); MiT archs: a SegFormer `mit_b*.pth` (ImageNet) or an mmseg segmentor state dict (`backbone.*` keys)."""
    pretrained_kind: str = "auto"
    """'auto' (from the file's keys), 'deeplab' or 'torchvision': the weights' kind, which sets input normalisation.
    MiT weights are always 'torchvision' (ImageNet mean/std): 'auto' or 'torchvision' only."""
    freeze_bn: bool = False
    """False (authors): BN uses batch statistics in every forward. True: running statistics (frozen BN)."""
    aspp_two_branch_bug: bool = False
    """True restores the authors' ASPP that sums only the rates 6 and 12 (an early return in their code)."""
    mmd_dim: int = 256
    """Channels of the MMD feature projection h (a 1x1 conv on layer4, or on the DAFormer decoder's fused features)."""
    decoder_dim: int = 256
    """MiT archs: channels of the DAFormer decoder's embeddings and fused features (DAFormer: 256)."""
    drop_path_rate: float = 0.1
    """MiT archs: stochastic depth of the last encoder block, growing linearly from 0 (SegFormer/DAFormer: 0.1).
    The mean teacher never drops a path."""

    def __post_init__(self) -> None:
        _check(self.arch in MODEL_ARCHS, "model.arch",
               f"unknown architecture {self.arch!r} (known: {', '.join(MODEL_ARCHS)})")
        _check(self.decoder_dim >= 1, "model.decoder_dim", f"must be >= 1, got {self.decoder_dim}")
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate",
               f"must be in [0, 1), got {self.drop_path_rate}")
        if self.arch in MIT_ARCHS:
            _check(self.pretrained_kind in ("auto", "torchvision"), "model.pretrained_kind",
                   f"MiT weights expect ImageNet normalisation: 'auto' or 'torchvision', got {self.pretrained_kind!r}")
        _check(self.num_classes >= 2, "model.num_classes", f"must be >= 2, got {self.num_classes}")
        _check(self.pretrained_kind in ("auto", "deeplab", "torchvision"), "model.pretrained_kind",
               f"must be auto, deeplab or torchvision, got {self.pretrained_kind!r}")
        _check(self.mmd_dim >= 1, "model.mmd_dim", f"must be >= 1, got {self.mmd_dim}")
        if self.pretrained:
            _check(os.path.isfile(self.pretrained), "model.pretrained", f"no such file: {self.pretrained}")


@dataclass
class DSPConfig:
    enabled: bool = True
    """False trains source-only (L_src alone): the baseline adaptation is compared against."""
    lam: float = 0.9
    """Fusion weight of the soft paste (0.9 for GTA5, 0.8 for SYNTHIA)."""
    conf_threshold: float = 0.968
    """Pseudo-label confidence threshold for the target pixel weight q."""
    long_tail_classes: list[int] = field(default_factory=lambda: [12, 15, 16, 17, 18])
    """Train ids of the long-tail classes (GTA5: rider, bus, train, motorcycle, bicycle)."""
    num_long_tail: int = 2
    """Long-tail classes hard-pasted onto the template per step."""
    drop_target_soft_term: bool = False
    """True restores the authors' script, which computes the (1-lam) target term and throws it away."""
    train_mmd_projection: bool = True
    """False restores the authors' script, where the MMD projection is never given to the optimizer."""
    mmd_weight: float = 1e-4
    """Weight c of the MMD loss."""
    mmd_kernel_mul: float = 2.0
    """Ratio between successive Gaussian bandwidths of the MMD."""
    mmd_kernel_num: int = 5
    """Number of Gaussian kernels of the MMD."""
    ema_max: float = 0.99
    """Cap of the teacher's EMA coefficient alpha_t = min(1 - 1/(t+1), ema_max)."""
    long_tail_size: tuple[int, int] = (1920, 1080)
    """[width, height] a source image is resized to (bicubic) before a long-tail crop is cut from it (the authors'
    1920x1080, larger than data.source_size: pasted objects are 1.5 times the size of the source crops')."""
    jitter_p: float = 0.8
    """Probability of colour jitter, one coin per step shared by every mixed image (kornia 0.2.0 semantics)."""
    jitter_strength: float = 0.25
    """Jitter amplitude s: brightness adds U(-s, s), contrast and saturation multiply by U(1-s, 1+s), hue adds
    U(-s, s) radians."""
    blur_p: float = 0.5
    """Probability of Gaussian blur, one coin per step shared by every mixed image."""
    share_first_mask: bool = False
    """True restores the authors' indexing bug: image 1 pasted with image 0's mask, image 1's pixel weights from its
    own chosen classes, image 0's mask collecting every image's long-tail pixels."""
    paste_ignore_label: bool = False
    """True restores the authors' script, where the ignore label can be drawn as a pasted class."""
    long_tail_search: str = "counts"
    """'counts': (image, window) drawn from per-image counts of the windows that hold the class (the retry loop's
    distribution, no loop); 'retry': the authors' loop literally, up to 1000 redraws (reference trainer only)."""
    long_tail_paste: str = "class"
    """'class': a long-tail crop's class pixels are pasted (the paper); 'columns': the authors' script, whose oneMix
    reads the first row of the (H, W) mask: the crop's image and label are pasted in the full columns where the
    crop's first row holds the class (M still gets the class's pixels only)."""
    kornia_hsv_quirk: bool = False
    """True restores kornia 0.2.0's hsv_to_rgb in the saturation and hue jitter: a sector-0 red value of exactly 1.0
    is overwritten by the sector-1 formula (saturated reds of full brightness come out darker)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.lam <= 1.0, "dsp.lam", f"must be in [0, 1], got {self.lam}")
        _check(0.0 <= self.conf_threshold <= 1.0, "dsp.conf_threshold", f"must be in [0, 1], got {self.conf_threshold}")
        _check(all(isinstance(c, int) and 0 <= c < 255 for c in self.long_tail_classes), "dsp.long_tail_classes",
               f"must be train ids in [0, 255), got {self.long_tail_classes!r}")
        _check(0 <= self.num_long_tail <= len(self.long_tail_classes), "dsp.num_long_tail",
               f"must be in [0, {len(self.long_tail_classes)}] (the long-tail list's length), got {self.num_long_tail}")
        _check(self.mmd_weight >= 0, "dsp.mmd_weight", f"must be >= 0, got {self.mmd_weight}")
        _check(self.mmd_kernel_num >= 1, "dsp.mmd_kernel_num", f"must be >= 1, got {self.mmd_kernel_num}")
        _check(0.0 <= self.ema_max < 1.0, "dsp.ema_max", f"must be in [0, 1), got {self.ema_max}")
        for name in ("jitter_p", "blur_p"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"dsp.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        _check(0.0 <= self.jitter_strength <= 0.5, "dsp.jitter_strength",
               f"must be in [0, 0.5], got {self.jitter_strength}")
        _check(self.long_tail_search in ("counts", "retry"), "dsp.long_tail_search",
               f"must be 'counts' or 'retry', got {self.long_tail_search!r}")
        _check(self.long_tail_paste in ("class", "columns"), "dsp.long_tail_paste",
               f"must be 'class' or 'columns', got {self.long_tail_paste!r}")
        self.long_tail_size = _pair(self.long_tail_size, "dsp.long_tail_size")


@dataclass
class OptimConfig:
    algorithm: str = "sgd"
    """'sgd' (DeepLab / DSP: momentum SGD) or 'adamw' (DAFormer's recipe for MiT)."""
    lr: float = 2.5e-4
    """Base learning rate of the backbone (DSP's SGD: 2.5e-4; DAFormer's AdamW: 6e-5)."""
    head_lr_mult: float = 10.0
    """Learning-rate multiplier of the classifier head (ASPP, or the DAFormer decoder) and the MMD projection."""
    momentum: float = 0.9
    """SGD momentum (unused by AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's (beta1, beta2) (unused by SGD)."""
    weight_decay: float = 5e-4
    """Weight decay: L2 in SGD (DSP: 5e-4), decoupled in AdamW (DAFormer: 0.01)."""
    norm_decay_mult: float = 1.0
    """Weight-decay multiplier of parameters whose name contains 'norm' (DAFormer: 0.0 for the LayerNorms)."""
    poly_power: float = 0.9
    """Poly decay: lr * (1 - step / max_steps) ** poly_power (DSP: 0.9; DAFormer: 1.0)."""
    warmup_steps: int = 0
    """Linear warm-up steps (DAFormer: 1500); 0: none. During warm-up the poly lr is scaled by
    1 - (1 - step / warmup_steps) * (1 - warmup_ratio), as mmcv's linear warm-up."""
    warmup_ratio: float = 1e-6
    """Fraction of the poly lr at step 0 of the warm-up (DAFormer: 1e-6)."""
    lr_scaling: str = "none"
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
        _check(self.algorithm in OPTIM_ALGORITHMS, "optim.algorithm",
               f"must be one of {', '.join(OPTIM_ALGORITHMS)}, got {self.algorithm!r}")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.head_lr_mult > 0, "optim.head_lr_mult", f"must be > 0, got {self.head_lr_mult}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        self.betas = _betas(self.betas)
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.norm_decay_mult >= 0, "optim.norm_decay_mult", f"must be >= 0, got {self.norm_decay_mult}")
        _check(self.poly_power >= 0, "optim.poly_power", f"must be >= 0, got {self.poly_power}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0.0 < self.warmup_ratio <= 1.0, "optim.warmup_ratio", f"must be in (0, 1], got {self.warmup_ratio}")
        _check(self.lr_scaling in LR_SCALINGS, "optim.lr_scaling",
               f"must be one of {', '.join(LR_SCALINGS)}, got {self.lr_scaling!r}")
        _check(not (self.script_param_repeats and self.algorithm != "sgd"), "optim.script_param_repeats",
               f"repeats the authors' SGD updates: needs optim.algorithm sgd, got {self.algorithm!r}")


def _betas(value: Any) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0 for v in value)
    _check(ok, "optim.betas", f"expected [beta1, beta2], each in [0, 1), got {value!r}")
    return (float(value[0]), float(value[1]))


@dataclass
class TrainConfig:
    max_steps: int = 250_000
    """Training steps (also the length of the poly schedule)."""
    seed: int = 0
    """Seed of every random choice (data order, crops, class selection, augmentation, init)."""
    device: str = "auto"
    """'auto' (cuda when available, else cpu), 'cpu' or 'cuda'."""
    out_dir: str = "runs/default"
    """Run folder: resolved config, metrics JSONL, checkpoints."""
    log_every: int = 50
    """Print a progress line and write metrics every this many steps."""
    eval_every: int = 0
    """Evaluate on the target every this many steps (0: only at the end)."""
    checkpoint_every: int = 5000
    """Write a checkpoint every this many steps (0: only at the end)."""
    compare_source_only: bool = False
    """Also train a source-only model with the same steps and print its target mIoU beside the adapted one."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "train.max_steps", f"must be >= 1, got {self.max_steps}")
        _check(self.device in ("auto", "cpu", "cuda"), "train.device",
               f"must be auto, cpu or cuda, got {self.device!r}")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class FastConfig:
    """Settings of the fast trainer only (`python -m dsp_fast.train`); the reference trainer ignores them.
    Each also has a command-line flag (`--amp`, `--no-graphs`, ...) that overrides the preset."""

    amp: str = "auto"
    """'auto' (bf16 on CUDA, fp32 on CPU), 'bf16', 'fp16' (with a GradScaler) or 'fp32' (equivalence checks)."""
    channels_last: bool = True
    """Model weights and input buffers in channels_last memory format."""
    cuda_graphs: bool = True
    """Capture the step in a CUDA graph after a few eager warm-up steps (CUDA only, ignored elsewhere)."""
    graph_warmup: int = 11
    """Eager steps before the capture (DDP needs about 11: its buckets are rebuilt after the first iteration)."""
    data_backend: str = "auto"
    """'dali', 'torch', or 'auto': DALI on CUDA when it imports, the torch backend otherwise."""
    data_threads: int = -1
    """DALI threads or DataLoader workers per stream; -1 takes data.num_workers."""
    optimizer: str = "auto"
    """'fused' torch SGD (device-side lr and skip flag; 'auto'), 'foreach', or 'apex' FusedSGD (if importable)."""
    keep_last: int = 3
    """Periodic checkpoints kept (the newest K); best.pt is kept apart."""
    tensorboard: bool = True
    """Also write TensorBoard scalars when `torch.utils.tensorboard` imports (needs the tensorboard package)."""
    image_every: int = 500
    """Write an image grid PNG (template, mask, both mixed images, pseudo-label, prediction) every N steps; 0: never."""
    max_bad_steps: int = 20
    """Stop (with a checkpoint) after this many consecutive steps skipped for a non-finite loss or gradient."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms and no cuDNN autotuning (CPU runs are deterministic without it)."""
    compile: str = "off"
    """torch.compile (inductor): 'off', 'model' (the student's and the teacher's forward) or 'step' (steps 1-6:
    teacher, mixing, three student forwards and the losses as one graph; backward compiled with it). Inductor's own
    CUDA graphs stay off: the engine captures the whole step (with SGD and the EMA) itself."""
    prepared_source: str = ""
    """A prepared source folder (python -m dsp_fast.prepare) to train from instead of data.source_root; '': the
    trainer prepares data.source_root itself, once, into the cache (see prepared_dir)."""
    prepared_target: str = ""
    """A prepared Cityscapes train split (or its parent folder) instead of data.target_root's; '': prepared, cached."""
    prepared_dir: str = ""
    """Where the trainer's own preparations are cached: '' puts them beside the data (<parent of the root>/prepared/
    <root name>_<W>x<H>_<format>); re-used while the root, size and format match."""
    prepared_format: str = "auto"
    """Image format of the trainer's own preparations: 'jpeg' (GPU-decodable), 'png' (lossless), or 'auto' (png for
    the synthetic shift, so both trainers see the same pixels; jpeg for real datasets)."""

    def __post_init__(self) -> None:
        choices = {"amp": AMP_CHOICES, "data_backend": DATA_BACKENDS, "optimizer": OPTIMIZERS,
                   "compile": COMPILE_MODES}
        for name, allowed in choices.items():
            _check(getattr(self, name) in allowed, f"fast.{name}",
                   f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("keep_last", "max_bad_steps", "graph_warmup"):
            _check(getattr(self, name) >= 1, f"fast.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.image_every >= 0, "fast.image_every", f"must be >= 0, got {self.image_every}")
        _check(self.data_threads >= -1, "fast.data_threads", f"must be >= -1, got {self.data_threads}")
        _check(self.prepared_format in ("auto", "jpeg", "png"), "fast.prepared_format",
               f"must be auto, jpeg or png, got {self.prepared_format!r}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dsp: DSPConfig = field(default_factory=DSPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fast: FastConfig = field(default_factory=FastConfig)

    def __post_init__(self) -> None:
        bad = [c for c in self.dsp.long_tail_classes if c >= self.model.num_classes]
        _check(not bad, "dsp.long_tail_classes", f"{bad} not below model.num_classes={self.model.num_classes}")
        (w, h), (cw, ch) = self.dsp.long_tail_size, self.data.crop_size
        _check(w >= cw and h >= ch, "dsp.long_tail_size", f"{w}x{h} is smaller than data.crop_size {cw}x{ch}")
        if self.optim.script_param_repeats:
            _check(self.model.arch not in MIT_ARCHS, "optim.script_param_repeats",
                   f"the authors' parameter listing is DeepLabv2's: not with model.arch {self.model.arch!r}")
            _check(self.fast.amp != "fp16", "optim.script_param_repeats",
                   "not with fast.amp fp16: fused SGD unscales the gradients in place, so a repeated update would "
                   "unscale them again (use bf16 or fp32)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "dsp": DSPConfig, "optim": OptimConfig,
                  "train": TrainConfig, "fast": FastConfig}


def _as_float(value: Any, name: str) -> float:
    """A number as typed: ints, floats, and every string Python's float() reads. PyYAML follows YAML 1.1, where
    `1e-3` and `1e9` (no dot, or no sign in the exponent) are strings while `2.5e-3` is a float; a user who typed
    either means the number, on the command line and in a YAML file alike."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"config field '{name}': expected a number, got {value!r}")


def _coerce(value: Any, default: Any, name: str) -> Any:
    """Type-check one value against the field's default; ints, and strings float() reads, are accepted where
    floats are expected (in lists of floats too)."""
    if isinstance(default, bool):
        _check(isinstance(value, bool), name, f"expected true/false, got {value!r}")
    elif isinstance(default, float):
        return _as_float(value, name)
    elif isinstance(default, int):
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
    elif isinstance(default, str):
        _check(isinstance(value, str), name, f"expected a string, got {value!r}")
    elif isinstance(default, (list, tuple)):
        _check(isinstance(value, (list, tuple)), name, f"expected a list, got {value!r}")
        if default and all(isinstance(v, float) for v in default):  # e.g. optim.betas: [0.9, 1e-3]
            value = [_as_float(v, name) for v in value]
        return list(value) if isinstance(default, list) else tuple(value)
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested dicts, naming any unknown section or field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    sections: dict[str, Any] = {}
    for section, values in raw.items():
        _check(section in _SECTION_TYPES, section, f"unknown section (known: {', '.join(_SECTION_TYPES)})")
        _check(isinstance(values, dict), section, "expected a mapping of fields")
        cls = _SECTION_TYPES[section]
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            _check(key in known, f"{section}.{key}", f"unknown field (known: {', '.join(sorted(known))})")
            kwargs[key] = _coerce(value, getattr(defaults, key), f"{section}.{key}")
        sections[section] = cls(**kwargs)
    cfg = Config(**sections)
    check_fields_read(cfg)
    return cfg


def _presets_for_source(source: str) -> list[str]:
    """The shipped presets whose data.source is `source` (read from their YAML, so the list follows the files)."""
    names = []
    for name in preset_names():
        with open(os.path.join(PRESET_DIR, f"{name}.yaml")) as f:
            raw = yaml.safe_load(f) or {}
        if (raw.get("data") or {}).get("source", DataConfig.source) == source:
            names.append(name)
    return names


def check_fields_read(cfg: Config) -> None:
    """A field set to something the chosen data source never reads is an error naming the field and the presets
    that read it: a real data root under the synthetic source would otherwise train on generated scenes and exit
    0. Only fields that are unread whatever else is set count (a preset's own defaults never trip it)."""
    d, default = cfg.data, DataConfig()

    def presets(source: str) -> str:
        found = _presets_for_source(source)
        return f"--config {' or --config '.join(found)}" if found else f"data.source={source}"

    # the messages (which read the preset files) are built only for a field that is set
    if d.source == "synthetic":
        for name in ("source_root", "target_root"):
            if getattr(d, name):
                raise ConfigError(f"config field 'data.{name}': {getattr(d, name)!r} is not read with data.source "
                                  "'synthetic' (the built-in generated scenes under data.synthetic_root); for GTA5 "
                                  f"use {presets('gta5')}, for SYNTHIA {presets('synthia')} (or set data.source)")
    else:
        for name in ("synthetic_root", "synthetic_seed"):
            value = getattr(d, name)
            if value != getattr(default, name):
                raise ConfigError(f"config field 'data.{name}': {value!r} is read only with data.source 'synthetic' "
                                  f"({presets('synthetic')}); this config trains on {d.source!r} from "
                                  "data.source_root")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.max_steps=100' -> (['train', 'max_steps'], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    return parts, yaml.safe_load(value)


PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
"""The presets shipped with the package (installed with it as package data)."""

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def preset_names() -> list[str]:
    """Names of the shipped presets ('synthetic', 'gta2cs', ...)."""
    return sorted(n[:-5] for n in os.listdir(PRESET_DIR) if n.endswith(".yaml"))


def resolve_config(spec: str) -> str:
    """The YAML file `spec` names: an existing file, else a shipped preset by name ('gta2cs', 'gta2cs.yaml', or
    'configs/gta2cs.yaml' as the presets were spelled before they moved into the package)."""
    if os.path.isfile(spec):
        return spec
    folder, base = os.path.split(spec)
    name = base[:-5] if base.endswith(".yaml") else base
    preset = os.path.join(PRESET_DIR, f"{name}.yaml")
    if folder.rstrip("/") in ("", "configs") and os.path.isfile(preset):
        return preset
    raise ConfigError(f"config file not found: {spec} (not a file, nor a preset name: {', '.join(preset_names())})")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags, overrides): every `section.field=value` word is an override wherever it stands, so flags and
    overrides mix in any order (and `--resume` without a PATH never swallows an override)."""
    flags = [a for a in argv if not _OVERRIDE.match(a)]
    return flags, [a for a in argv if _OVERRIDE.match(a)]


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (a file, or a shipped preset's name; the defaults when None) and apply
    `section.field=value` overrides."""
    raw: dict[str, Any] = {}
    if path:
        path = resolve_config(path)
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        _check(isinstance(raw[section], dict), section, "expected a mapping of fields")
        raw[section][key] = value
    try:
        return apply_lr_scaling(config_from_dict(raw))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def apply_lr_scaling(cfg: Config) -> Config:
    """optim.lr_scaling resolved: lr x k (linear) or x sqrt(k), train.max_steps and optim.warmup_steps / k, with
    k = data.batch_size / 2; the result says 'none' so that loading it again does not scale twice."""
    o = cfg.optim
    if o.lr_scaling == "none":
        return cfg
    k = cfg.data.batch_size / PAPER_BATCH
    lr = o.lr * (k if o.lr_scaling == "linear" else k ** 0.5)
    optim = dataclasses.replace(o, lr=lr, lr_scaling="none", warmup_steps=round(o.warmup_steps / k))
    train = dataclasses.replace(cfg.train, max_steps=max(1, round(cfg.train.max_steps / k)))
    return dataclasses.replace(cfg, optim=optim, train=train)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (tuples as lists) so a run folder says exactly what ran."""
    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    with open(path, "w") as f:
        yaml.safe_dump(plain(cfg.to_dict()), f, sort_keys=False)
