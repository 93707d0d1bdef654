"""A plan to 2 hours on one H200, from the cost model: the predicted fast step before issue 22, then each change
applied on top of the previous ones, with the ms it saves and the hours for 250k steps after it. A prediction:
what the first GPU run should test, change by change, not only the total.

    python -m bench.cost_model --plan [--device h200] [--json OUT]

Changes, in the order applied (each row says what it assumes):
(b) done in issue 22 and on by default (fast.batched_student), so it comes first: the student's three forwards of B
    images as one forward + backward of 3B images, as engine/batchnorm.py runs it (each batch norm split into its
    three groups, one B-image batch norm each, and the outputs concatenated: one more copy per batch norm, forward
    and backward): the same FLOPs, a third of the other kernels and of autocast's weight casts; the convolutions'
    efficiency kept at the model's figure.
(a) inductor fuses batch norm's normalisation with the ReLU and the residual add, forward and backward: every chain
    of batch norm, relu / threshold_backward and add operators joined by a tensor one produces and the next reads
    becomes one fused pass that reads each outside tensor once and writes what is read outside the chain (or never
    read again); batch norm's statistics stay one kernel of their own (a chain pays a launch per batch norm in it).
(e) a per-group batch norm that writes each group's output into its slice of one tensor (and its gradient likewise),
    so no concatenation: priced as one batch norm over 3B images. Alone it is what (b) would save without its
    concatenations; after (a) nearly nothing, since inductor writes the concatenation in place itself.
(c) the weights cast to bf16 once per step per model (a bf16 copy the optimizer and the EMA keep up to date): one
    cast of the student's and one of the teacher's weights, one cast of the student's weight gradients back.
(d) an assumption, not a change: the convolutions at 0.65 of the matrix rate instead of 0.55 (cuDNN on 3B = 6
    images, channels_last bf16), to show what the step's largest remaining part would give.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from bench.cost_model import DEVICES, EFFICIENCY, Op, predict_gpu
from bench.cost_step import record_step
from bench.result_schema import command_line, result_env, write_result

STEPS = 250_000
TARGET_H = 2.0
# cat: the per-group batch norm's concatenation, which inductor writes in place from the fused producers
FUSIBLE = {"relu", "relu_", "threshold_backward", "add", "add_", "cat"}


def fuse(ops: list[Op], member: Callable[[Op], bool], keep: Callable[[list[Op]], bool]) -> list[Op]:
    """Operators joined by producer -> consumer edges (same phase, both members) become one operator when `keep`
    holds for the group: it reads each tensor from outside the group once and writes the tensors read outside it
    (or never read again). The others are left as they are."""
    parent = list(range(len(ops)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # tensors by their storage (key[0]): reading a slice of a tensor (a view) reads what its writer produced
    producer: dict[int, int] = {}
    readers: dict[tuple[int, int], set[int]] = collections.defaultdict(set)  # (storage, producer op) -> readers
    sources: list[list[tuple[tuple, float, int | None]]] = []  # per op: (key, bytes, the op that wrote it)
    for j, op in enumerate(ops):
        sources.append([(key, b, producer.get(key[0])) for key, b in op.ins])
        for key, _ in op.ins:
            i = producer.get(key[0])
            if i is None:
                continue
            readers[(key[0], i)].add(j)
            if member(ops[i]) and member(op) and ops[i].phase == op.phase:
                parent[root(j)] = root(i)
        for key, _ in op.outs:
            producer[key[0]] = j
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for j, op in enumerate(ops):
        if member(op):
            groups[root(j)].append(j)
    fused_at: dict[int, Op] = {}
    dropped: set[int] = set()
    for idx in groups.values():
        members = [ops[j] for j in idx]
        if len(idx) < 2 or not keep(members):
            continue
        inside = set(idx)
        # a version written inside and read only inside never reaches memory; one read outside (or none) is written
        stored = {(key, j): b for j in idx for key, b in ops[j].outs
                  if not readers[(key[0], j)] or readers[(key[0], j)] - inside}
        stored_at = {(key[0], j) for key, j in stored}
        # each slice read once (the three groups' slices of one tensor are three reads of a third each)
        read = {(key, i): b for j in idx for key, b, i in sources[j] if i not in inside or (key[0], i) in stored_at}
        written = stored
        bn = sum("batch_norm" in op.name for op in members)
        cls = "batch norm" if bn else members[0].cls
        fused_at[idx[0]] = Op("fused:" + "+".join(sorted({op.name for op in members})), cls,
                              sum(op.flops for op in members), sum(read.values()) + sum(written.values()),
                              members[0].phase, launches=max(1, bn))
        dropped.update(idx)
    return [fused_at[j] if j in fused_at else op for j, op in enumerate(ops) if j not in dropped or j in fused_at]


def fuse_bn_chains(ops: list[Op]) -> list[Op]:
    """Change (a): batch norm with the ReLUs and residual adds it feeds or is fed by."""
    return fuse(ops, lambda op: "batch_norm" in op.name or (op.name in FUSIBLE and op.cls != "optimizer + EMA"),
                lambda members: any("batch_norm" in op.name for op in members))


def plan(device: str, arch: str, crop: int, batch: int) -> dict:
    dev = DEVICES[device]

    def step(batched: bool = False, cast_once: bool = False, fused: bool = False, matrix: float = 0.0,
             in_place: bool = False) -> dict:
        ops, n = record_step(arch, crop, batch, True, batched=batched, cast_once=cast_once, groups_in_place=in_place)
        saved = EFFICIENCY["matrix"]
        EFFICIENCY["matrix"] = matrix or saved
        try:
            return predict_gpu(fuse_bn_chains(ops) if fused else ops, dev, True, n)
        finally:
            EFFICIENCY["matrix"] = saved

    before = step()
    # (name, the change alone on the step before issue 22, the changes so far together)
    rows = [("three student calls: bf16, channels_last, adjoint MMD, CUDA graph", before, before),
            ("(b) done, the default: one student call of 3B, BN per group", step(batched=True), step(batched=True)),
            ("(a) inductor: batch norm + ReLU + residual add fused", step(fused=True),
             step(batched=True, fused=True)),
            ("(e) per-group batch norm written in place, no concatenation", step(batched=True, in_place=True),
             step(batched=True, fused=True, in_place=True)),
            ("(c) weights cast to bf16 once per step", step(cast_once=True),
             step(batched=True, cast_once=True, fused=True, in_place=True)),
            ("(d) assumption: convolutions at 0.65 of peak, not 0.55", step(matrix=0.65),
             step(batched=True, cast_once=True, fused=True, in_place=True, matrix=0.65))]
    ops, _ = record_step(arch, crop, batch, True)
    floor_ms = 1e3 * sum(op.flops for op in ops) / dev["bf16_flops"]
    out_rows, prev = [], None
    for name, alone, pred in rows:
        ms = pred["compute_ms"]
        out_rows.append({"change": name, "step_ms": ms, "saves_ms": 0.0 if prev is None else prev - ms,
                         "saves_alone_ms": before["compute_ms"] - alone["compute_ms"],
                         "hours_250k": ms * STEPS / 3.6e6,
                         "per_class_ms": {k: v["ms"] for k, v in pred["per_class"].items()},
                         "kernels": sum(v["ops"] for v in pred["per_class"].values())})
        prev = ms
    return {"device": device, "device_figures": dev, "efficiency": dict(EFFICIENCY), "arch": arch, "crop": crop,
            "batch": batch, "steps": STEPS, "target_hours": TARGET_H, "target_ms": TARGET_H * 3.6e6 / STEPS,
            "floor_ms": floor_ms, "rows": out_rows}


def print_plan(r: dict) -> None:
    print(f"plan on {r['device']}: {r['arch']} {r['crop']}x{r['crop']} B={r['batch']}+{r['batch']}, "
          f"{r['steps']} steps; target {r['target_hours']:.0f} h = {r['target_ms']:.1f} ms/step; "
          f"matrix floor {r['floor_ms']:.1f} ms")
    classes = list(r["rows"][0]["per_class_ms"])
    short = {"convolution": "conv", "batch norm": "BN", "matmul": "mm", "elementwise / reduction": "elem",
             "DSP ops": "DSP", "optimizer + EMA": "opt"}
    head = "".join(f"{short.get(c, c):>7}" for c in classes)
    print(f"{'change':<58}{'alone':>7}{'saves':>7}{'step ms':>9}{'hours':>7}{'kernels':>8}{head}")
    for row in r["rows"]:
        cols = "".join(f"{row['per_class_ms'].get(c, 0.0):>7.1f}" for c in classes)
        print(f"{row['change']:<58}{row['saves_alone_ms']:>7.1f}{row['saves_ms']:>7.1f}{row['step_ms']:>9.1f}{row['hours_250k']:>7.2f}"
              f"{row['kernels']:>8d}{cols}")


def plan_main(device: str, arch: str, crop: int, batch: int, json_path: str = "") -> int:
    r = plan(device, arch, crop, batch)
    print_plan(r)
    print(f"after every change: {r['rows'][-2]['step_ms']:.1f} ms ({r['rows'][-2]['hours_250k']:.2f} h) against the "
          f"target {r['target_ms']:.1f} ms; with (d) {r['rows'][-1]['step_ms']:.1f} ms; floor {r['floor_ms']:.1f} ms")
    if json_path:
        r["env"] = result_env(device, command_line("python -m bench.cost_model"))
        write_result(json_path, r)
    return 0
