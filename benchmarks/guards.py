"""Section 7: what the run guards of megatron_lite/resilience.py cost per train step.

Per step the training loop arms the hang watchdog (`HangWatchdog.arm`: two attribute writes) and runs the
stop agreement (`Agreement.sum`: one all-reduce of four int64 over all ranks); PyTorch's flight recorder
(`TORCH_FR_BUFFER_SIZE`) records every collective of the step, for the hang report.

- `step_worker` (4 processes, DP2 x TP2 + SP, flight recorder on as in training): the megatron-lite train
  step bare and guarded (arm + agreement), taking turns step by step in the same processes; the agreement
  alone; the collectives of one step, counted by the flight recorder itself (DDP's included).
- `call_worker` (1 process, no network): the CPU time of one small collective and of `arm()`. The flight
  recorder is switched when a process group is created, so its cost per collective is this time with the
  recorder on minus off, in alternating jobs (best of several: the least disturbed run).
Theory: collectives per step x recorder cost + arm + agreement, against the measured guarded/bare step.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from megatron_lite.hang import _recorded
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.parallel import build_parallel_context
from megatron_lite.resilience import Agreement, HangWatchdog

from .launch import slowest_rank, timed
from .measure import _ml_step_fn, _summary, interleaved


def step_worker(device, cfg_kw: dict, tp: int, micro_batch: int, warmup: int, steps: int) -> dict:
    ctx = build_parallel_context(tp, device)
    cfg = GPTConfig(**cfg_kw, sequence_parallel=tp > 1)
    model = GPT(cfg, ctx)
    net = DDP(model, process_group=ctx.dp_group) if ctx.dp_size > 1 else model
    step = _ml_step_fn(net, model, cfg, micro_batch, device, stream=ctx.dp_rank)
    agreement = Agreement(ctx.world_size, device)
    watchdog = HangWatchdog(600.0, lambda *_: None)  # armed per step as in the loop; never fires here

    def guarded(i):
        watchdog.arm(f"step {i}")
        loss = step(i)
        agreement.sum([0, 0, 0, 0])
        return loss

    res = _summary(*interleaved({"bare": step, "guarded": guarded}, warmup, steps, device), baseline="bare")
    before = _recorded()[1]
    step(warmup + steps)
    res["collectives_per_step"] = _recorded()[1] - before

    def agree_20():
        for _ in range(20):
            agreement.sum([0, 0, 0, 0])
    res["agreement_s"] = statistics.median(slowest_rank([timed(agree_20, device) / 20 for _ in range(5)], device))
    watchdog.close()
    return dict(res, dp=ctx.dp_size, tp=tp)


def call_worker(device, calls: int, rounds: int) -> dict:
    """Best-of-`rounds` seconds per call: a 1-element all-reduce on a world of one, and HangWatchdog.arm."""
    x = torch.zeros(1, device=device)
    watchdog = HangWatchdog(600.0, lambda *_: None)

    def best(fn):
        out = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            out = min(out, (time.perf_counter() - t0) / calls)
        return out

    res = dict(allreduce_s=best(lambda: dist.all_reduce(x)), arm_s=best(lambda: watchdog.arm("step")),
               recorded=_recorded()[1] > 0)
    watchdog.close()
    return res
