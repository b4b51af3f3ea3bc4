"""Measurement worker of section 11, pipeline parallelism, run by `launch()` on 4 processes, and the timeline
replay that turns a recorded schedule into its bubble.

`pipeline_worker` trains each layout (P, V, T, SP) for a few steps with the trainer's pieces (the stage's model,
AdamW, the PipelineExecutor) and returns, per layout: the step times (median of the slowest rank), the passes
every rank ran in the last step with their start and end times, the p2p bytes per step summed over the ranks,
and stage 0's bytes saved for backward per micro-batch (saved_tensors_hooks, as section 3 measures them).

`replay` is the op-timeline: each rank runs its recorded passes in their recorded order, each pass starting
once its rank is free and its input exists (the previous virtual stage's forward, the next one's backward),
communication free. With the measured durations it gives the bubble of the schedule as executed; with
uniform ones (t_b = 2 t_f) the schedule's own, which the paper's (P - 1) / (V m) describes (Narayanan et al.
2021, section 2.2). On a CPU with fewer cores than processes the stages' compute is serialized, so wall time
shows the contention more than the bubble: it is given as context.
"""
from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from megatron_lite.data.packing import Batch
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel import build_parallel_context
from megatron_lite.pipeline_parallel import PipelineExecutor, in_flight_max, stage_chunks

from .launch import batch, slowest_rank, timed
from .measure import saved_bytes

OPTIM = dict(lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, fused=True)


def pipeline_worker(device, cfg_kw: dict, micro_batch: int, m: int, layouts: list[tuple[int, int, int, bool]],
                    warmup: int, steps: int) -> list[dict]:
    """Each layout (P, V, T, SP) on the first P x T ranks (DP = 1), m micro-batches per step."""
    from types import SimpleNamespace
    out = []
    for P, V, T, sp in layouts:
        n = P * T
        group = dist.new_group(list(range(n)))
        ctx = build_parallel_context(T, device, world_size=n, pp_size=P)
        if ctx is None:
            for _ in range(warmup + steps):
                timed(lambda: None, device)
            slowest_rank([0.0] * steps, device)
            continue
        cfg = GPTConfig(**cfg_kw, sequence_parallel=sp)
        model = GPT(cfg, ctx, chunks=stage_chunks(cfg.num_layers, P, ctx.pp_rank, V))
        opt = build_optimizer(model, SimpleNamespace(**OPTIM), ctx)
        saved_per_mb: list[int] = []
        forward = _measuring(model, saved_per_mb) if ctx.pp_rank == 0 else model
        executor = PipelineExecutor(forward, model.config, ctx, m, "interleaved" if V > 1 else "1f1b", V)
        batches = [Batch(*batch(cfg, micro_batch, i, device)) for i in range(m)]
        times = []
        for i in range(warmup + steps):
            executor.trace, saved_per_mb[:] = [], []
            sent = executor.p2p.bytes_sent

            def step():
                executor.forward_backward(batches, [1 / m] * m, opt.no_sync)
                opt.step()
                opt.zero_grad()
            t = timed(step, device)
            if i >= warmup:
                times.append(t)
        times = slowest_rank(times, device)
        facts = dict(stage=ctx.pp_rank, tp_rank=ctx.tp_rank, bytes=executor.p2p.bytes_sent - sent,
                     trace=[(a.op, a.microbatch, a.chunk, t0, t1) for a, t0, t1 in executor.trace],
                     in_flight=in_flight_max(executor.trace), saved_per_mb=list(saved_per_mb),
                     layers=len(model.blocks))
        per_rank = [None] * n
        dist.all_gather_object(per_rank, facts, group=group)
        if ctx.rank == 0:
            out.append(dict(P=P, V=V, T=T, sp=sp, m=m, micro_batch=micro_batch, times=times,
                            median_s=statistics.median(times), per_rank=per_rank))
    return out


def _measuring(model, saved: list[int]):
    """The model's forward, recording the bytes each call saves for backward (stage 0: one per micro-batch)."""
    def forward(*args, **kwargs):
        holder = {}

        def run():
            holder["out"] = model(*args, **kwargs)
            return holder["out"]
        total, _ = saved_bytes(model, run) if torch.is_grad_enabled() else (0, None)
        saved.append(total)
        return holder["out"]
    return forward


def replay(per_rank: list[dict], P: int, V: int, durations: dict | None = None) -> dict:
    """The timeline of the recorded orders (see the module docstring). `durations`: {"F": t, "B": t} for
    uniform passes; None: each rank's measured median F and B. Returns the makespan, the busiest rank's
    busy time and the bubble (makespan - busy) / busy."""
    orders, dur = {}, {}
    for r in per_rank:
        if r["tp_rank"] != 0:
            continue  # the TP ranks of a stage run the same passes
        s = r["stage"]
        orders[s] = [(op, i, v) for op, i, v, _, _ in r["trace"]]
        for op in "FB":
            ts = [t1 - t0 for o, _, _, t0, t1 in r["trace"] if o == op]
            dur[(s, op)] = durations[op] if durations else statistics.median(ts)
    done: dict[tuple[str, int, int], float] = {}  # (op, micro-batch, virtual stage) -> end time
    free = {s: 0.0 for s in orders}
    pos = {s: 0 for s in orders}
    last = P * V - 1
    while any(pos[s] < len(orders[s]) for s in orders):
        progressed = False
        for s in orders:
            if pos[s] == len(orders[s]):
                continue
            op, i, v = orders[s][pos[s]]
            k = v * P + s
            need = [("F", i, k - 1)] if op == "F" and k > 0 else []
            if op == "B":
                need = [("F", i, k)] + ([("B", i, k + 1)] if k < last else [])
            if all(n in done for n in need):
                start = max([free[s]] + [done[n] for n in need])
                done[(op, i, k)] = free[s] = start + dur[(s, op)]
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("the recorded orders cannot run: a pass waits for one that never runs")
    makespan = max(free.values())
    busy = max(sum(dur[(s, op)] for op, _, _ in orders[s]) for s in orders)
    return dict(makespan=makespan, busy=busy, bubble=(makespan - busy) / busy)


def stage0_peak(r: dict) -> int:
    """The most bytes stage 0 held for backward at once: its passes in order, each forward adding what it
    saved (measured), each backward releasing that micro-batch's."""
    saved = iter(r["saved_per_mb"])
    alive, held, peak = {}, 0, 0
    for op, i, v, *_ in r["trace"]:
        if op == "F":
            alive[(i, v)] = next(saved)
            held += alive[(i, v)]
        else:
            held -= alive.pop((i, v))
        peak = max(peak, held)
    return peak


def measured_idle(per_rank: list[dict]) -> float:
    """From the recorded wall-clock times: the mean over ranks of the step's span not spent in a pass, over
    the time spent in passes (CPU contention included)."""
    start = min(t0 for r in per_rank for *_, t0, _ in r["trace"])
    end = max(t1 for r in per_rank for *_, t1 in r["trace"])
    fractions = []
    for r in per_rank:
        busy = sum(t1 - t0 for *_, t0, t1 in r["trace"])
        fractions.append((end - start - busy) / busy)
    return statistics.mean(fractions)
