"""Process-group setup and teardown for torchrun (gloo on CPU, NCCL on CUDA), the per-rank batch, and the
collectives: the loop's host-side agreements and the device-side ones the DSP losses call (docs/distributed.md; no
host read, so the step still captures).

Teardown as measured on the CPU machines: every DDP wrapper must be gone (`del`, `gc.collect()`) before
`destroy_process_group()`, or gloo aborts at exit in about 5% of runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from dsp_fast.config import ConfigError


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    host_group: Any = dataclasses.field(default=None, repr=False)
    """A gloo group for small host-side agreements (distributed.agree_max) under NCCL; None: the default group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this rank's GPU (LOCAL_RANK) on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        # device_id binds NCCL to this rank's GPU (eager init, no first-collective guessing).
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        store = attempt_store(rank, world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    # a host-side agreement over NCCL would copy to the GPU and wait for it: gloo keeps it on the CPUs
    host = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() == "nccl" else None
    return DistInfo(rank, world, local, device, host)


def attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun's shared store, this restart attempt's own key space; None: init_process_group's env://.

    Why (docs/distributed.md, "A rank that dies"): torchrun (torch >= 2.4) hands one TCPStore to every attempt and
    env:// adds no per-attempt prefix, so a restarted rank can read the dead attempt's keys (pytorch/pytorch#135712
    for NCCL). TORCHELASTIC_RESTART_COUNT agrees between the workers of one node only: across nodes the store is left
    as torchrun makes it, with a warning (restarts there need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world:
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            print("warning: torchrun --max-restarts across nodes with its shared TCPStore: a restart can read the "
                  "previous attempt's keys and fail to connect; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for "
                  "torchrun on every node", flush=True)
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return dist.PrefixStore(f"dsp_fast/attempt_{attempt}", store)


def teardown(info: DistInfo) -> None:
    """Destroy the process group; the caller has already dropped every DDP wrapper."""
    if info.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (identity without a process group)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def agree_max(values: list[int], info: DistInfo) -> list[int]:
    """The element-wise maximum of `values` over the ranks, on every rank (a CPU all-reduce; no device sync)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.host_group)
    return [int(v) for v in t.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """data.batch_size is the global batch per domain per step: each of the N ranks takes batch_size / N."""
    if batch_size % world_size:
        raise ConfigError(f"config field 'data.batch_size': the global batch {batch_size} does not split evenly over "
                          f"{world_size} ranks; use a multiple of {world_size}")
    return batch_size // world_size


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor that needs no gradient (pixel counts): one all-reduce, on the device."""
    out = t.clone()
    dist.all_reduce(out)
    return out


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated along dim 0 in rank order, differentiable: the backward hands each rank the
    sum over ranks of the gradients of its own rows (a reduce-scatter), as torch.distributed.nn.functional's
    all_gather did; torch 2.13 deprecates that one (a FutureWarning on every rank) for this functional collective."""
    return funcol.all_gather_single_autograd(t.contiguous(), 0, dist.group.WORLD)
