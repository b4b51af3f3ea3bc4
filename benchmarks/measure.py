"""Measurement workers, run on N spawned processes by `launch()` of benchmarks/launch.py.

Every worker runs on every rank (collectives need them all) and returns rank 0's result. Step times are
the maximum over ranks of each step (the slowest rank sets the pace), summarised by their median after
warm-up; A/B comparisons alternate the two contenders step by step inside the same processes.
"""
from __future__ import annotations

import statistics
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.parallel import ParallelContext, build_parallel_context
from megatron_lite.tensor_parallel.random import checkpoint

from .dtensor_gpt import build_dtensor_gpt
from .launch import adamw, batch, dt_step, ml_step, slowest_rank, timed
from .theory import DP_GRADS, comm_items, theory


# ---- section 1: megatron-lite against DTensor, interleaved -------------------------------------------

def ab_worker(device, shapes: dict[str, dict], micro_batch: int, warmup: int, steps: int, sps: list[bool],
              profile: bool):
    """For each shape and SP setting: megatron-lite and the DTensor peer built from the same weights in the
    same processes, timed step by step in turn. With `profile`, one step of each on the first shape is
    profiled on rank 0 (table and a matmul / attention / total breakdown of self CPU time)."""
    ctx = build_parallel_context(dist.get_world_size(), device)
    out = {}
    for shape_name, cfg_kw in shapes.items():
        for sp in sps:
            cfg = GPTConfig(**cfg_kw, sequence_parallel=sp)
            ml = GPT(cfg, ctx)
            dt = build_dtensor_gpt(cfg, ctx.tp_group, ml.full_state(), sp)
            contenders = {"megatron-lite": (ml_step, ml, adamw(ml)), "dtensor": (dt_step, dt, adamw(dt))}
            times = {k: [] for k in contenders}
            first_loss = {}
            for i in range(warmup + steps):
                tokens, targets = batch(cfg, micro_batch, i, device)
                order = list(contenders) if i % 2 == 0 else list(contenders)[::-1]  # alternate who goes first
                for name in order:
                    step, model, opt = contenders[name]
                    t = timed(lambda: first_loss.setdefault((name, i), step(model, opt, tokens, targets)), device)
                    if i >= warmup:
                        times[name].append(t)
            times = {k: slowest_rank(v, device) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            paired = statistics.median(a / b for a, b in zip(times["megatron-lite"], times["dtensor"]))
            l_ml, l_dt = first_loss[("megatron-lite", 0)], first_loss[("dtensor", 0)]
            r = dict(shape=shape_name, config=cfg_kw, sp=sp, times=times, median=med,
                     ratio=med["megatron-lite"] / med["dtensor"], paired_ratio=paired,
                     loss_step0=dict(megatron_lite=l_ml, dtensor=l_dt), loss_rel_diff=abs(l_ml - l_dt) / abs(l_dt),
                     tokens_per_step=micro_batch * cfg.seq_len)
            if profile and shape_name == next(iter(shapes)):
                r["profile"] = {name: _profile(device, lambda: step(model, opt, *batch(cfg, micro_batch, 0, device)))
                                for name, (step, model, opt) in contenders.items()}
            out[f"{shape_name}, SP {'on' if sp else 'off'}"] = r
            del ml, dt, contenders
    return out


def _profile(device, fn, rows: int = 15) -> dict:
    """torch.profiler of one call on rank 0 (every rank runs fn): the top ops by self CPU time, and the
    self time spent in matmuls and in attention against the total."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    dist.barrier()
    if dist.get_rank() != 0:
        fn()
        return {}
    with profile(activities=acts) as prof:
        fn()
    events = prof.key_averages()
    ms = lambda pred: sum(e.self_cpu_time_total for e in events if pred(e.key)) / 1e3  # noqa: E731
    return dict(table=events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48),
                total_ms=ms(lambda k: True), matmul_ms=ms(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm")),
                attention_ms=ms(lambda k: k.startswith("aten::_scaled_dot_product")))


# ---- section 2: collectives against theory ----------------------------------------------------------

class _DPHookState:
    """Records DDP's buckets and which of the counted collectives the DP hook issued."""

    def __init__(self, group):
        self.group, self.counter, self.buckets, self.dp_calls = group, None, [], set()


def _recording_allreduce_hook(state: _DPHookState, bucket):
    before = len(state.counter.calls) if state.counter else 0
    fut = allreduce_hook(state.group, bucket)  # DDP's default: average by all-reduce
    if state.counter is not None:
        state.buckets.append(bucket.buffer().numel())
        state.dp_calls.update(range(before, len(state.counter.calls)))
    return fut


def comm_worker(device, cfg_kw: dict, micro_batch: int, layouts: list[tuple[int, bool]]):
    """For each (T, sp): count every collective of one train step (fwd + bwd; DDP over the DP group when
    world/T > 1) and compare with theory(). With DDP the first step is a warm-up and the second counts."""
    results = []
    for T, sp in layouts:
        ctx = build_parallel_context(T, device)
        cfg = GPTConfig(**cfg_kw, sequence_parallel=sp)
        model = GPT(cfg, ctx)
        net, state = model, None
        if ctx.dp_size > 1:
            net = DDP(model, process_group=ctx.dp_group)
            state = _DPHookState(ctx.dp_group)
            net.register_comm_hook(state, _recording_allreduce_hook)
        for step in range(2 if state else 1):  # with DDP: a warm-up step first (DDP builds its buckets)
            tokens, targets = batch(cfg, micro_batch, step, device, stream=ctx.dp_rank)
            with CollectiveCounter() as log:
                if state is not None:
                    state.counter = log if step == 1 else None  # count the second step
                net(tokens, targets).backward()
            model.zero_grad(set_to_none=True)
        measured, dp_bytes = Counter(), 0
        dp_calls = state.dp_calls if state else set()
        for i, c in enumerate(log.calls):
            if i in dp_calls:
                dp_bytes += c.bytes
            else:
                measured[(c.op, c.group_size, c.bytes)] += 1
        if dp_calls:
            measured[(DP_GRADS, ctx.dp_size, dp_bytes)] += 1
        expected = theory(cfg, T, sp, micro_batch, ctx.dp_size)
        agree = torch.tensor([int(measured == expected)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # every rank's count must match, not only rank 0's
        results.append(dict(T=T, sp=sp, dp=ctx.dp_size, micro_batch=micro_batch,
                            items=[it.__dict__ for it in comm_items(cfg, T, sp, micro_batch, ctx.dp_size)],
                            measured=_rows(measured), expected=_rows(expected), equal=bool(agree.item()),
                            dp_buckets=list(state.buckets) if state else [],
                            local_params=model.num_parameters()[1]))
    return results


def _rows(c: Counter) -> list[dict]:
    return [dict(op=op, group_size=g, bytes=b, count=n) for (op, g, b), n in sorted(c.items())]


# ---- section 3: activation memory per layer ---------------------------------------------------------

def saved_bytes_per_layer(model: GPT, micro_batch: int) -> tuple[int, list]:
    """Bytes saved for backward by one block's forward (this rank), measured with saved_tensors_hooks.

    Tensors are deduplicated by storage (a storage saved twice, or through several views such as q, k, v
    of the fused QKV output, counts once, at its full size) and parameters are left out. Under full
    recompute the block runs under megatron-lite's checkpoint, as GPT.forward does: what is left is what the
    checkpoint keeps (its inputs)."""
    c, ctx = model.config, model.ctx
    S = c.seq_len // ctx.tp_size if c.sequence_parallel else c.seq_len
    x = torch.randn(S, micro_batch, c.hidden_size, device=ctx.device, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            seen.setdefault(st.data_ptr(), (tuple(t.shape), str(t.dtype), st.nbytes()))
        return t

    block = model.blocks[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if c.recompute == "full":
            y = checkpoint(block, model.rng, x, model.rng)
        else:
            y = block(x, model.rng)
    del y
    return sum(v[2] for v in seen.values()), sorted(seen.values(), key=lambda v: -v[2])


def memory_worker(device, cfg_kw: dict, micro_batch: int, tps: list[int], recomputes: list[str]):
    out = []
    for T in tps:
        ctx = build_parallel_context(T, device)
        for sp in ([False] if T == 1 else [False, True]):
            for rc in recomputes:
                cfg = GPTConfig(**{**cfg_kw, "num_layers": 1}, sequence_parallel=sp, recompute=rc)
                model = GPT(cfg, ctx).train()
                total, tensors = saved_bytes_per_layer(model, micro_batch)
                out.append(dict(T=T, sp=sp, recompute=rc, bytes=total, tensors=tensors))
    return out


# ---- section 4: throughput of DP x TP layouts, interleaved --------------------------------------------

def sub_context(n: int, tp: int, device) -> ParallelContext | None:
    """A DP x TP grid over ranks [0, n) of the world (the other ranks get None and stay idle); every rank
    of the world must call this, in the same order (new_group is collective over the world)."""
    rank = dist.get_rank()
    grid = torch.arange(n).view(n // tp, tp)
    tp_group = dp_group = None
    for row in grid.tolist():
        g = dist.new_group(row)
        tp_group = g if rank in row else tp_group
    for col in grid.t().tolist():
        g = dist.new_group(col)
        dp_group = g if rank in col else dp_group
    if rank >= n:
        return None
    dp_rank, tp_rank = divmod(rank, tp)
    return ParallelContext(tp_group=tp_group, dp_group=dp_group, tp_rank=tp_rank, tp_size=tp, dp_rank=dp_rank,
                           dp_size=n // tp, rank=rank, world_size=n, device=device,
                           grid=tuple(tuple(r) for r in grid.tolist()))


def scaling_worker(device, cfg_kw: dict, global_batch: int, layouts: list[tuple[int, int, bool]], warmup: int,
                   steps: int):
    """tokens/s of megatron-lite for each (processes, TP, SP) layout (DP = processes / TP, DDP over DP) at a
    fixed global batch. All layouts live in the same world and take turns step by step, so a change in the
    machine's load hits them all alike; ranks outside a layout wait at the barrier while it runs."""
    runs = []
    for n, T, sp in layouts:
        ctx = sub_context(n, T, device)
        cfg = GPTConfig(**cfg_kw, sequence_parallel=sp)
        if ctx is None:
            runs.append(None)
            continue
        model = GPT(cfg, ctx)
        net = DDP(model, process_group=ctx.dp_group) if ctx.dp_size > 1 else model
        runs.append((cfg, ctx, net, adamw(model)))
    times = [[] for _ in layouts]
    for i in range(warmup + steps):
        for k, run in enumerate(runs):
            if run is None:
                t = timed(lambda: None, device)
            else:
                cfg, ctx, net, opt = run
                tokens, targets = batch(cfg, global_batch // ctx.dp_size, i, device, stream=ctx.dp_rank)
                t = timed(lambda: ml_step(net, opt, tokens, targets), device)
            if i >= warmup:
                times[k].append(t)
    out = []
    for (n, T, sp), ts in zip(layouts, times):
        ts = slowest_rank(ts, device)
        med = statistics.median(ts)
        out.append(dict(procs=n, dp=n // T, tp=T, sp=sp, micro_batch=global_batch // (n // T),
                        global_batch=global_batch,
                        median_s=med, times=ts, tokens_per_s=global_batch * cfg_kw["seq_len"] / med))
    return out


# ---- section 5: MFU on one GPU ------------------------------------------------------------------------

def mfu_worker(device, cfg_kw: dict, micro_batch: int, warmup: int, steps: int):
    ctx = build_parallel_context(1, device)
    cfg = GPTConfig(**cfg_kw)
    model = GPT(cfg, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(tokens, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        tokens, targets = batch(cfg, micro_batch, i, device)
        t = timed(lambda: step(tokens, targets), device)
        if i >= warmup:
            times.append(t)
    med = statistics.median(times)
    return dict(median_s=med, tokens_per_s=micro_batch * cfg.seq_len / med, micro_batch=micro_batch,
                gpu=torch.cuda.get_device_name(device), max_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30)
