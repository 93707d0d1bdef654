"""Process-group setup and teardown for torchrun (gloo on CPU, NCCL on CUDA), and a few collectives.

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


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

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
        # NOT YET RUN ON A GPU: device_id binds NCCL to this rank's GPU (eager init, no first-collective guessing).
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistInfo(rank, world, local, device)


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


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
