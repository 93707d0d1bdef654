"""The fast trainer's own settings: everything `dsp_fast.config.Config` does not (yet) hold.

They come from command-line flags (`add_cli_args` / `options_from_args`) so that presets stay readable by the
reference trainer, whose `load_config` rejects unknown sections. Each field is a candidate for a `fast:` section
of `dsp_fast/config.py`; the validation below names the flag, the way config fields name themselves.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DATA_BACKENDS = ("auto", "dali", "torch")
OPTIMIZERS = ("auto", "fused", "foreach", "apex")


class OptionsError(ValueError):
    """A flag with a bad value or a bad combination of flags."""


@dataclasses.dataclass
class FastOptions:
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
    resume: str = ""
    """'' (fresh start), 'auto' (newest checkpoint of the run folder, if any) or a checkpoint file / run folder."""
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
    prepared_source: str = ""
    """Prepared source folder (python -m dsp_fast.prepare); '' with data.source 'synthetic': prepared here, cached."""
    prepared_target: str = ""
    """Prepared Cityscapes train split folder; '' with data.source 'synthetic': prepared here, cached."""

    def __post_init__(self) -> None:
        if self.amp not in ("auto", *AMP_DTYPES):
            raise OptionsError(f"--amp must be auto, bf16, fp16 or fp32, got {self.amp!r}")
        if self.data_backend not in DATA_BACKENDS:
            raise OptionsError(f"--data-backend must be one of {DATA_BACKENDS}, got {self.data_backend!r}")
        if self.optimizer not in OPTIMIZERS:
            raise OptionsError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise OptionsError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.image_every < 0 or self.graph_warmup < 1:
            raise OptionsError("--image-every must be >= 0 and the graph warm-up >= 1")

    def amp_dtype(self, device: torch.device) -> torch.dtype:
        if self.amp == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return AMP_DTYPES[self.amp]

    def graphs_on(self, device: torch.device) -> bool:
        """Graphs need CUDA; fp16's GradScaler keeps Python-side state per step, so fp16 runs eagerly."""
        return self.cuda_graphs and device.type == "cuda" and self.amp_dtype(device) != torch.float16


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    d = FastOptions()
    parser.add_argument("--amp", choices=("auto", *AMP_DTYPES), default=d.amp,
                        help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep the model and inputs in NCHW")
    parser.add_argument("--no-graphs", dest="cuda_graphs", action="store_false", help="never capture CUDA graphs")
    parser.add_argument("--data-backend", choices=DATA_BACKENDS, default=d.data_backend)
    parser.add_argument("--data-threads", type=int, default=d.data_threads,
                        help="DALI threads / DataLoader workers per stream (default: data.num_workers)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    parser.add_argument("--resume", nargs="?", const="auto", default=d.resume, metavar="PATH|auto",
                        help="continue from a checkpoint file, a run folder, or 'auto' (the newest in train.out_dir)")
    parser.add_argument("--keep-last", type=int, default=d.keep_last, help="periodic checkpoints kept")
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    parser.add_argument("--image-every", type=int, default=d.image_every, help="image grid every N steps (0: off)")
    parser.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                        help="consecutive non-finite steps that stop the run")
    parser.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on CUDA)")
    parser.add_argument("--prepared-source", default="", help="prepared source folder (real datasets)")
    parser.add_argument("--prepared-target", default="", help="prepared Cityscapes train folder (real datasets)")


def options_from_args(args: argparse.Namespace) -> FastOptions:
    names = {f.name for f in dataclasses.fields(FastOptions)}
    return FastOptions(**{k: v for k, v in vars(args).items() if k in names})
