"""What the CUDA-graph capture tests share: a recorder of the aten operators a piece of code issues, to find on a
CPU what would break a CUDA graph on a GPU, and the step's context as the CUDA path builds it.

A captured step must never read a device value on the host (a sync: `aten::_local_scalar_dense`, behind `.item()`,
`bool(t)`, `if t:`, a Python float from a tensor) and must not create tensors whose shape depends on the data
(`nonzero`, `masked_select`, boolean indexing, `unique`, ...): their output size is read back from the device.
Both show up, on any device, as the operators below, so recording the step's operators on a CPU finds them before
a GPU ever runs it. The custom operators of `dsp_fast.kernels` are recorded as one node each (what runs inside
them is the launcher's business, checked by the sm_90 compile test and on a GPU).
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsp_fast.config import Config, FastConfig
from dsp_fast.engine.batchnorm import apply_group_bn
from dsp_fast.engine.model_setup import make_normalize
from dsp_fast.engine.optimizer import build_grad_scaler, build_optimizer
from dsp_fast.engine.step import StepBuffers, StepContext, train_step

# operators that read the device on the host or whose output shape depends on tensor values
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "unique",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "repeat_interleave",
    "bincount", "histc", "masked_scatter", "argwhere", "_assert_scalar",
})
# indexing with a boolean mask: CUDA turns the mask into indices with nonzero (a sync), even where a CPU does not
INDEX_OPS = ("aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Finding:
    op: str
    where: str  # the innermost line of the project that issued it

    def __str__(self) -> str:
        return f"{self.op} issued at {self.where}"


def _bool_index(name: str, args: tuple) -> bool:
    if name not in INDEX_OPS or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])


def _project_line() -> str:
    """The innermost stack frame in the repository (not this file, not a test), as 'path:line: code'."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(REPO) and path != here:
            return f"{os.path.relpath(path, REPO)}:{frame.lineno}: {(frame.line or '').strip()}"
    return "outside the repository"


class OpRecorder(TorchDispatchMode):
    """`with OpRecorder() as rec: fn()`, then `rec.syncs` lists every host sync or data-dependent shape,
    `rec.mixes` every operator given tensors of two devices, and `rec.ops` every operator (with its overload)
    and its output dtypes (for dtype checks under autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[Finding] = []
        self.mixes: list[Finding] = []  # operators given tensors on more than one device
        self.ops: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name.split("::")[-1] in SYNC_OPS or _bool_index(name, args):
            self.syncs.append(Finding(name, _project_line()))
        devices = {t.device for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:  # a CPU scalar beside cuda tensors, or a host copy: either is baked into a graph
            self.mixes.append(Finding(f"{name} on {sorted(map(str, devices))}", _project_line()))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((func.name(), tuple(t.dtype for t in flat if isinstance(t, torch.Tensor))))
        return out


def cuda_like_context(cfg: Config, student: torch.nn.Module, teacher: torch.nn.Module, amp: torch.dtype,
                      device: torch.device) -> StepContext:
    """The step's context as the CUDA path builds it: fused SGD with a device-tensor lr that reads found_inf on
    the device, autocast's weight cache off (as under graph capture), and the student's three forwards as one
    call with per-group BN statistics (fast.batched_student, the default)."""
    if cfg.fast.batched_student:
        apply_group_bn(student, cfg.data.batch_size)
    opt, device_skip = build_optimizer(cfg, student, FastConfig(amp="fp32", optimizer="fused"), device,
                                       device_lr=True)
    assert device_skip and all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    return StepContext(cfg, student, teacher, opt, make_normalize("torchvision", device), amp,
                       build_grad_scaler(amp, device), device_skip, sync_flag=False,
                       autocast_cache=False)


def record_next_step(ctx: StepContext, make_buffers: Callable[[], StepBuffers]) -> OpRecorder:
    """One eager train_step (as the graph is captured after warm-up), then the operators of the next one; asserts
    that none syncs with the host or has a data-dependent shape."""
    train_step(ctx, make_buffers())
    buf = make_buffers()
    with OpRecorder() as rec:
        train_step(ctx, buf)
    assert not rec.syncs, "host syncs / data-dependent shapes in the step:\n" + "\n".join(map(str, rec.syncs))
    return rec
