"""The decisions the fast trainer takes from its `fast:` settings (`dsp_fast.config.FastConfig`, whose flags are
made in `dsp_fast.config.cli`): the autocast dtype and whether CUDA graphs are on."""

from __future__ import annotations

import torch

from dsp_fast.config import FastConfig

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
