"""The fast trainer's command-line flags, which override the config's `fast:` section (`dsp_fast.config.FastConfig`,
the one home of these settings), `--resume` (which belongs to one invocation rather than to a preset, and travels
apart from the config), and the decisions taken from those settings: the autocast dtype and whether CUDA graphs are on.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dsp_fast.config import AMP_CHOICES, COMPILE_MODES, DATA_BACKENDS, OPTIMIZERS, Config, FastConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class OptionsError(ValueError):
    """A setting the fast trainer cannot honour (e.g. an authors'-script switch only the reference implements)."""


def amp_dtype(fast: FastConfig, device: torch.device) -> torch.dtype:
    """fast.amp as a dtype: 'auto' is bf16 on CUDA, fp32 (autocast off) elsewhere."""
    if fast.amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return AMP_DTYPES[fast.amp]


def graphs_on(fast: FastConfig, device: torch.device) -> bool:
    """Whether the step is captured in a CUDA graph: the one place this is decided. Graphs need CUDA; what a graph
    cannot capture (fp16's GradScaler, the foreach and apex optimizers) FastConfig refuses with cuda_graphs on, so
    every FastConfig that asks for graphs can have them."""
    return fast.cuda_graphs and device.type == "cuda"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Flags that override the preset's `fast:` section (None: not given, the preset's value stands)."""
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False, default=None,
                        help="keep the model and inputs in NCHW")
    parser.add_argument("--no-batched-student", dest="batched_student", action="store_const", const=False,
                        default=None, help="the student's three forwards as three calls (fast.batched_student)")
    parser.add_argument("--no-graphs", dest="cuda_graphs", action="store_const", const=False, default=None,
                        help="never capture CUDA graphs")
    parser.add_argument("--data-backend", choices=DATA_BACKENDS, default=None)
    parser.add_argument("--data-threads", type=int, default=None,
                        help="DALI threads / DataLoader workers per stream (default: data.num_workers)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None)
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None,
                        help="torch.compile the model's forward or steps 1-6 (fast.compile)")
    parser.add_argument("--resume", nargs="?", const="auto", default="", metavar="PATH|auto",
                        help="continue from a checkpoint file, a run folder, or 'auto' (the newest in train.out_dir)")
    parser.add_argument("--keep-last", type=int, default=None, help="periodic checkpoints kept")
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_const", const=False, default=None)
    parser.add_argument("--image-every", type=int, default=None, help="image grid every N steps (0: off)")
    parser.add_argument("--max-bad-steps", type=int, default=None,
                        help="consecutive non-finite steps that stop the run")
    parser.add_argument("--deterministic", action="store_const", const=True, default=None,
                        help="deterministic kernels (slower on CUDA)")
    parser.add_argument("--prepared-source", default=None, help="prepared source folder (real datasets)")
    parser.add_argument("--prepared-target", default=None, help="prepared Cityscapes train folder (real datasets)")


def apply_cli_args(cfg: Config, args: argparse.Namespace) -> Config:
    """The config with the given flags written into its `fast:` section (so the saved config says what ran); the
    invocation's --resume stays in `args.resume`."""
    names = {f.name for f in dataclasses.fields(FastConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, **given))
