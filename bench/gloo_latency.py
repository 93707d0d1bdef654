"""Latency of one small collective between processes on this machine: what each global-BN layer of the multi-rank
step pays per forward and per backward (docs/performance.md, "Several processes").

    torchrun --standalone --nproc_per_node=2 -m bench.gloo_latency [--floats 128] [--iters 2000] [--out DIR]

gloo on CPU, NCCL on CUDA; one thread per process. Prints the median over 5 blocks of the mean time per call and
writes it, with the device, date, git sha and command, to bench/results/gloo_latency_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from bench.result_schema import command_line, result_env, write_result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--floats", type=int, default=128, help="elements per collective (a BN layer's mean and var: 2C)")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    x = torch.zeros(args.floats, device=device)
    out = [torch.empty_like(x) for _ in range(world)]
    results = {}
    for name, call in (("all_reduce", lambda: dist.all_reduce(x)), ("all_gather", lambda: dist.all_gather(out, x))):
        for _ in range(50):
            call()
        blocks = []
        for _ in range(5):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.iters // 5):
                call()
            if cuda:
                torch.cuda.synchronize(device)
            blocks.append((time.perf_counter() - t0) / (args.iters // 5))
        results[name] = statistics.median(blocks)
    if rank == 0:
        backend = dist.get_backend()
        for name, s in results.items():
            print(f"{backend} {name} of {args.floats} floats, {world} processes: {1e6 * s:.0f} us per call")
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"gloo_latency_{datetime.datetime.now():%Y%m%d_%H%M%S}.json")
        command = command_line(f"torchrun --nproc_per_node={world} -m bench.gloo_latency")
        write_result(path, {"env": result_env(str(device), command), "backend": backend, "processes": world,
                            "floats": args.floats, "iters": args.iters,
                            "us_per_call": {k: round(1e6 * v, 1) for k, v in results.items()}})
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
