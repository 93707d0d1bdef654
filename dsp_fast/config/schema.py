"""The sections of a run's config: `data:`, `model:`, `train:`, `fast:` and the whole `Config` (the recipe's
`dsp:` and `optim:` are in recipe.py). Validation is in each `__post_init__` and reads no file: a weights file is
checked where it is loaded (dsp_fast.models.weights), a data root where the data is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dsp_fast.config.errors import _check, _check_fields, _field
from dsp_fast.config.recipe import DSPConfig, OptimConfig

AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
# the step loader's backends (`dsp_fast.pipelines.BACKENDS` is this tuple; docs/data.md, "Loaders")
LOADER_BACKENDS = ("dali", "torch", "torchvision")
# not offered by the trainers: torchvision decodes JPEG only, and the synthetic shift is prepared as PNG
BENCH_ONLY_BACKENDS = ("torchvision",)
DATA_BACKENDS = ("auto", *(b for b in LOADER_BACKENDS if b not in BENCH_ONLY_BACKENDS))
"""fast.data_backend (--data-backend): 'auto' or a loader backend."""
COMPILE_MODES = ("off", "model", "step")
OPTIMIZERS = ("auto", "fused", "foreach", "apex")
UNCAPTURABLE_OPTIMIZERS = ("foreach", "apex")
"""Optimizers that cannot skip a non-finite step on the device (they read no `found_inf`): no CUDA graph."""
MIT_ARCHS = ("mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
MODEL_ARCHS = ("deeplabv2_r101", "tiny", *MIT_ARCHS)


@dataclass
class DataConfig:
    source: str = _field("synthetic", choices=("gta5", "synthia", "synthetic"))
    """Labelled source domain: 'gta5', 'synthia' or 'synthetic' (the built-in generated scenes)."""
    source_root: str = ""
    """Folder of the source dataset in its official layout ('' with source 'synthetic', which does not read it)."""
    target: str = _field("cityscapes", choices=("cityscapes",))
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
    batch_size: int = _field(2, within="[1, inf)")
    """Images per domain per step over all ranks (the global batch: source, template and target batches each hold
    this many; the paper: 2). With N ranks each takes batch_size / N, so it must divide by N."""
    num_workers: int = _field(4, within="[0, inf)")
    """DataLoader worker processes per loader (0: load in the training process)."""
    eval_split: str = "val"
    """Cityscapes split used for evaluation."""
    max_eval_images: int = _field(0, within="[0, inf)")
    """Evaluate on at most this many target images (0: all)."""

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        if self.source != "synthetic":
            _check(bool(self.source_root), "data.source_root", f"required for source {self.source!r}")
            _check(bool(self.target_root), "data.target_root", "required for a real source dataset")
        cw, ch = self.crop_size
        for name in ("source_size", "target_size"):
            w, h = getattr(self, name)
            _check(w >= cw and h >= ch, f"data.{name}", f"{w}x{h} is smaller than data.crop_size {cw}x{ch}")


@dataclass
class ModelConfig:
    arch: str = _field("deeplabv2_r101", choices=MODEL_ARCHS)
    """'deeplabv2_r101' (the paper's model), 'tiny' (same structure, narrow and shallow: CPU runs and tests), or
    'mit_b0'..'mit_b5': SegFormer's Mix Transformer encoder with a DAFormer decoder (mit_b0 serves CPU runs)."""
    num_classes: int = _field(19, within="[2, inf)")
    """Output classes: 19 for GTA5 -> Cityscapes, 16 for SYNTHIA -> Cityscapes."""
    pretrained: str = ""
    """Local file of initial weights; '' = random init. DeepLab archs: ResNet-101 (torchvision- or DeepLab-style
    keys); MiT archs: a SegFormer `mit_b*.pth` (ImageNet) or an mmseg segmentor state dict (`backbone.*` keys).
    Checked when the model is built (a missing or unfitting file is an error naming this field), not here."""
    pretrained_kind: str = _field("auto", choices=("auto", "deeplab", "torchvision"))
    """'auto' (from the file's keys), 'deeplab' or 'torchvision': the weights' kind, which sets input normalisation.
    MiT weights are always 'torchvision' (ImageNet mean/std): 'auto' or 'torchvision' only."""
    freeze_bn: bool = False
    """False (authors): BN uses batch statistics in every forward. True: running statistics (frozen BN)."""
    aspp_two_branch_bug: bool = False
    """True restores the authors' ASPP that sums only the rates 6 and 12 (an early return in their code)."""
    mmd_dim: int = _field(256, within="[1, inf)")
    """Channels of the MMD feature projection h (a 1x1 conv on layer4, or on the DAFormer decoder's fused features)."""
    decoder_dim: int = _field(256, within="[1, inf)")
    """MiT archs: channels of the DAFormer decoder's embeddings and fused features (DAFormer: 256)."""
    drop_path_rate: float = _field(0.1, within="[0, 1)")
    """MiT archs: stochastic depth of the last encoder block, growing linearly from 0 (SegFormer/DAFormer: 0.1).
    The mean teacher never drops a path."""

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        if self.arch in MIT_ARCHS:
            _check(self.pretrained_kind in ("auto", "torchvision"), "model.pretrained_kind",
                   f"MiT weights expect ImageNet normalisation: 'auto' or 'torchvision', got {self.pretrained_kind!r}")


@dataclass
class TrainConfig:
    max_steps: int = _field(250_000, within="[1, inf)")
    """Training steps (also the length of the poly schedule)."""
    seed: int = 0
    """Seed of every random choice (data order, crops, class selection, augmentation, init)."""
    device: str = _field("auto", choices=("auto", "cpu", "cuda"))
    """'auto' (cuda when available, else cpu), 'cpu' or 'cuda'."""
    out_dir: str = "runs/default"
    """Run folder: resolved config, metrics JSONL, checkpoints."""
    log_every: int = _field(50, within="[0, inf)")
    """Print a progress line and write metrics every this many steps."""
    eval_every: int = _field(0, within="[0, inf)")
    """Evaluate on the target every this many steps (0: only at the end)."""
    checkpoint_every: int = _field(5000, within="[0, inf)")
    """Write a checkpoint every this many steps (0: only at the end)."""
    compare_source_only: bool = False
    """Also train a source-only model with the same steps and print its target mIoU beside the adapted one."""

    def __post_init__(self) -> None:
        _check_fields(self, "train")


@dataclass
class FastConfig:
    """Settings of the fast trainer only (`python -m dsp_fast.train`); the reference trainer ignores them.
    Each is also a flag of that trainer, made from the field and its docstring (cli.py: `--amp`, `--no-graphs`)."""

    amp: str = _field("auto", choices=AMP_CHOICES)
    """'auto' (bf16 on CUDA, fp32 on CPU), 'bf16', 'fp16' (with a GradScaler; needs cuda_graphs false) or 'fp32'
    (equivalence checks)."""
    channels_last: bool = True
    """Model weights and input buffers in channels_last memory format."""
    batched_student: bool = True
    """Run the student's three forwards of a DSP step (source, mixed source, mixed target) as one call over 3B
    images, its BN layers taking training statistics per group of B images: the results of three calls (running
    statistics included), with fewer, larger kernels. Off (--no-batched-student): three calls."""
    cuda_graphs: bool = True
    """Capture the step in a CUDA graph after a few eager warm-up steps (CUDA only, ignored elsewhere). Not with
    amp fp16 or optimizer foreach / apex, which cannot be captured: refused on every device (a config means the
    same on a laptop and on a GPU), so turn graphs off for them (--no-graphs)."""
    graph_warmup: int = _field(11, within="[1, inf)")
    """Eager steps before the capture (DDP needs about 11: its buckets are rebuilt after the first iteration)."""
    data_backend: str = _field("auto", choices=DATA_BACKENDS)
    """'dali', 'torch', or 'auto': DALI on CUDA when it imports, the torch backend otherwise."""
    data_threads: int = _field(-1, within="[-1, inf)")
    """DALI threads or DataLoader workers per stream; -1 takes data.num_workers."""
    data_producer: int = _field(2, within="[0, inf)")
    """Steps a background thread of the torch backend keeps ready (decoded, cropped, on the device) while the step
    runs; 0: the step reads its batch when it needs it (from data.num_workers processes, or itself). The same
    batches either way; DALI decodes ahead on its own threads and ignores it."""
    data_cache_mib: int = _field(1024, within="[0, inf)")
    """The torch backend decodes each prepared set (source, target, long-tail) whose pixels fit what is left of this
    many MiB once, at the start, and crops it from memory after: the same batches, without a decode per read (the
    built-in synthetic data: 88 MiB). A larger set is read from its files at each step; 0: no set is held. Per
    process (each DDP rank holds its own); DALI ignores it."""
    cpu_threads: int = _field(0, within="[0, inf)")
    """torch's intra-op CPU threads; 0: one per CPU this process may run on (its affinity mask, as `taskset` or a
    container's cpuset leave it), not the machine's count."""
    optimizer: str = _field("auto", choices=OPTIMIZERS)
    """'fused' torch SGD / AdamW (device-side lr and skip flag; 'auto'), 'foreach', or 'apex' FusedSGD (if
    importable); foreach and apex skip a non-finite step on the host: they need cuda_graphs false."""
    keep_last: int = _field(3, within="[1, inf)")
    """Periodic checkpoints kept (the newest K); best.pt is kept apart."""
    tensorboard: bool | None = None
    """TensorBoard scalars beside metrics.jsonl (the tensorboard package: pip install -e '.[tensorboard]'). Unset
    (null, or 'auto'): written when the package is installed, silently skipped otherwise; true: written, and one line
    says so when the package is missing; false: never."""
    image_every: int = _field(500, within="[0, inf)")
    """Write an image grid PNG (template, mask, both mixed images, pseudo-label, prediction) every N steps; 0: never."""
    max_bad_steps: int = _field(20, within="[1, inf)")
    """Stop (with a checkpoint) after this many consecutive steps skipped for a non-finite loss or gradient."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms and no cuDNN autotuning (CPU runs are deterministic without it)."""
    compile: str = _field("off", choices=COMPILE_MODES)
    """torch.compile (inductor): 'off', 'model' (the student's and the teacher's forward) or 'step' (steps 1-6:
    teacher, mixing, the student forward(s) and the losses as one graph; backward compiled with it). Inductor's own
    CUDA graphs stay off: the engine captures the whole step (with SGD and the EMA) itself."""
    fused_bn: str = _field("auto", choices=("auto", "always", "never"))
    """Batch norm, its ReLU and the bottleneck's residual add as fused kernels (one pass over memory each way; the
    DeepLabv2 models): 'auto' (on for CUDA), 'always' (CPU tensors run their plain-PyTorch twin) or 'never'. Falls
    back to the unfused layers, saying why, with several ranks or when the kernels fail to compile."""
    prepared_source: str = ""
    """A prepared source folder (python -m dsp_fast.prepare) to train from instead of data.source_root; '': the
    trainer prepares data.source_root itself, once, into the cache (see prepared_dir)."""
    prepared_target: str = ""
    """A prepared Cityscapes train split (or its parent folder) instead of data.target_root's; '': prepared, cached."""
    prepared_dir: str = ""
    """Where the trainer's own preparations are cached: '' puts them beside the data
    (<parent of the root>/prepared/<root name>_<W>x<H>_<format>); re-used while the root, size and format match."""
    prepared_format: str = _field("auto", choices=("auto", "jpeg", "png"))
    """Image format of the trainer's own preparations: 'jpeg' (GPU-decodable), 'png' (lossless), or 'auto' (png for
    the synthetic shift, so both trainers see the same pixels; jpeg for real datasets)."""

    def __post_init__(self) -> None:
        _check_fields(self, "fast")
        if self.tensorboard == "auto":  # how the unset value is spelled in an override or a YAML file
            self.tensorboard = None
        _check(self.tensorboard is None or isinstance(self.tensorboard, bool), "fast.tensorboard",
               f"must be true, false or auto, got {self.tensorboard!r}")
        # a step that cannot be captured is refused rather than run eagerly behind the user's back
        off = "pass --no-graphs (fast.cuda_graphs=false) to run the step eagerly"
        _check(not self.cuda_graphs or self.amp != "fp16", "fast.amp",
               "'fp16' with fast.cuda_graphs true: the GradScaler keeps Python-side state every step, which a "
               f"CUDA graph cannot replay; use bf16, or {off}")
        _check(not self.cuda_graphs or self.optimizer not in UNCAPTURABLE_OPTIMIZERS, "fast.optimizer",
               f"{self.optimizer!r} with fast.cuda_graphs true: only the fused optimizer skips a non-finite step on "
               f"the device, as a captured step must; use fused (auto), or {off}")


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
        _check(self.fast.optimizer != "apex" or self.optim.algorithm == "sgd", "fast.optimizer",
               f"'apex' (FusedSGD) needs optim.algorithm sgd, got {self.optim.algorithm!r}; use fused (auto)")
        if self.optim.script_param_repeats:
            _check(self.model.arch not in MIT_ARCHS, "optim.script_param_repeats",
                   f"the authors' parameter listing is DeepLabv2's: not with model.arch {self.model.arch!r}")
            _check(self.fast.amp != "fp16", "optim.script_param_repeats",
                   "not with fast.amp fp16: fused SGD unscales the gradients in place, so a repeated update would "
                   "unscale them again (use bf16 or fp32)")
            _check(self.fast.optimizer != "apex", "optim.script_param_repeats",
                   "not with fast.optimizer apex: its FusedSGD is not the torch SGD the repeated updates subclass "
                   "(use fused)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {f.name: f.default_factory for f in dataclasses.fields(Config)}
