"""Measurement workers of sections 1-6, run on N spawned processes by `launch()` of benchmarks/launch.py.

Every worker runs on every rank (collectives need them all) and returns rank 0's result. Step times are
the maximum over ranks of each step (the slowest rank sets the pace), summarised by their median after
warm-up; A/B comparisons alternate the two contenders step by step inside the same processes.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import finalize_model_grads
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel import mappings
from megatron_lite.tensor_parallel.mappings import reduce_scatter_dim0
from megatron_lite.tensor_parallel.random import checkpoint

from .dtensor_gpt import build_dtensor_gpt
from .launch import adamw, batch, dt_step, ml_step, slowest_rank, timed
from .theory import DP_GRADS, comm_items, theory


# ---- section 1: megatron-lite against DTensor, interleaved -------------------------------------------

def ab_worker(device, shapes: dict[str, dict], micro_batch: int, warmup: int, steps: int, sps: list[bool],
              profile: bool):
    """For each shape and SP setting: megatron-lite and the DTensor peer built from the same weights in the
    same processes, timed step by step in turn. Then one step of each is profiled on rank 0: the matmul and
    attention self CPU time (`vs_arithmetic`: the median step time over it), and with `profile` the table."""
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
            # one profiled step each: the time of its matmuls and attention, against which the measured step
            # time gives the overhead (everything else: copies, collectives, Python, per-parameter work)
            r["profile"] = {name: _profile(device, lambda: step(model, opt, *batch(cfg, micro_batch, 0, device)),
                                           table=profile)
                            for name, (step, model, opt) in contenders.items()}
            arith = {name: (p["matmul_ms"] + p["attention_ms"]) / 1e3 for name, p in r["profile"].items() if p}
            r["vs_arithmetic"] = {name: med[name] / a for name, a in arith.items()}
            r["decomposition"] = _decompose(device, ml, contenders["megatron-lite"][2], cfg, micro_batch, min(steps, 8))
            out[f"{shape_name}, SP {'on' if sp else 'off'}"] = r
            del ml, dt, contenders
    return out


class _NoCollectives:
    """Stand-ins for torch's functional collectives that move nothing and wait for no one: all-reduce keeps this
    rank's tensor, all-gather repeats it, reduce-scatter keeps its first block. Wrong numbers on purpose: a step
    run with them costs its arithmetic and its local overhead, without the communication and the waits."""

    def all_reduce_(self, x, op, group_name):
        return x

    all_reduce = all_reduce_

    def all_gather_into_tensor(self, x, world, group_name):
        return x.repeat(world, *[1] * (x.dim() - 1))

    def reduce_scatter_tensor(self, x, op, world, group_name):
        return x.chunk(world)[0]

    def wait_tensor(self, x):
        return x


@contextlib.contextmanager
def no_tp_collectives():
    """Every TP/SP collective of megatron-lite's layers, embedding and loss replaced by `_NoCollectives`."""
    saved, mappings._c10d = mappings._c10d, _NoCollectives()
    try:
        yield
    finally:
        mappings._c10d = saved


def _local_step(model, opt, tokens, targets) -> float:
    """`ml_step` without `finalize_model_grads` (its only work is SP's all-reduce of the replicated grads)."""
    loss = model(tokens, targets)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _decompose(device, model, opt, cfg, micro_batch: int, steps: int) -> dict:
    """megatron-lite's step = arithmetic + local overhead + communication. The real step and the step without
    collectives (`no_tp_collectives`) alternate, so both are timed in the same minutes: their difference is the
    communication, with each synchronous collective's wait for the slower rank. Then three steps without
    collectives are profiled: the matmuls' and attention's self time over the profiled step's wall time is the
    arithmetic's share of it (a share, as a step's speed moves by 10-15% from minute to minute on a shared CPU
    and the profile is not taken in the same minute), the rest is the local overhead (norms, GELU, the loss,
    AdamW, copies, Python; the profiler's own cost counts there). Run last: the steps without collectives train
    the model on wrong numbers."""
    times = {"step": [], "without collectives": []}
    for i in range(steps + 1):  # the first pair is a warm-up
        args = batch(cfg, micro_batch, i, device)
        for name in (list(times) if i % 2 == 0 else list(times)[::-1]):
            with no_tp_collectives() if name == "without collectives" else contextlib.nullcontext():
                fn = ml_step if name == "step" else _local_step
                t = timed(lambda: fn(model, opt, *args), device)
            if i:
                times[name].append(t)
    step_s, local_s = (statistics.median(slowest_rank(times[k], device)) for k in times)
    with no_tp_collectives():
        prof = _profile(device, lambda: _local_step(model, opt, *batch(cfg, micro_batch, 0, device)), table=False)
    out = dict(step_s=step_s, without_collectives_s=local_s, communication_s=step_s - local_s)
    if prof:  # rank 0
        arithmetic_s = local_s * prof["arithmetic_share"]
        out.update(arithmetic_s=arithmetic_s, local_overhead_s=local_s - arithmetic_s,
                   without_collectives_vs_arithmetic=local_s / arithmetic_s)
    return out


def _profile(device, fn, rows: int = 15, table: bool = True, repeats: int = 3) -> dict:
    """torch.profiler of `repeats` calls on rank 0, each on its own (every rank runs fn): the self time spent in
    matmuls and in attention and the total, each the median over the calls (one profiled step moves by 10-15% on
    a shared CPU), and the top ops of the last call by self time (`table`). Times are the CPU's on CPU and the
    kernels' on CUDA (where an op's CPU time is its launch)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    dist.barrier()
    if dist.get_rank() != 0:
        for _ in range(repeats):
            fn()
        return {}
    runs = []
    for _ in range(repeats):
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            wall_ms = (time.perf_counter() - t0) * 1e3
        # on CUDA the ops' self device time is their kernels' (the kernels are listed too: not counted twice)
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
        ms = lambda pred: sum(self_us(e) for e in events if pred(e.key)) / 1e3  # noqa: E731
        run = dict(total_ms=ms(lambda k: True), matmul_ms=ms(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm")),
                   attention_ms=ms(lambda k: k.startswith("aten::_scaled_dot_product")), wall_ms=wall_ms)
        runs.append(dict(run, arithmetic_share=(run["matmul_ms"] + run["attention_ms"]) / wall_ms))
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["table"] = prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=48) if table else ""
    return out


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


def autocast(device, dtype: str):
    """bf16 autocast on `device` for dtype "bfloat16" (as the trainer runs train.dtype=bfloat16), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def comm_worker(device, cfg_kw: dict, micro_batch: int, layouts: list[tuple[int, bool]], dtype: str = "float32"):
    """For each (T, sp): count every collective of one train step (fwd + bwd; DDP over the DP group when
    world/T > 1), with its dtype, and compare with theory(). With DDP the first step is a warm-up and the second
    counts. `dtype` "bfloat16": under bf16 autocast."""
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
                with autocast(device, dtype):
                    loss = net(tokens, targets)
                loss.backward()
                finalize_model_grads(model)
            model.zero_grad(set_to_none=True)
        measured, dp_bytes = Counter(), 0
        dp_calls = state.dp_calls if state else set()
        for i, c in enumerate(log.calls):
            if i in dp_calls:
                dp_bytes += c.bytes
            else:
                measured[(c.op, c.group_size, c.bytes, dtype_name(c.dtype))] += 1
        if dp_calls:
            measured[(DP_GRADS, ctx.dp_size, dp_bytes, "float32")] += 1
        expected = theory(cfg, T, sp, micro_batch, ctx.dp_size, dtype=dtype)
        agree = torch.tensor([int(measured == expected)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # every rank's count must match, not only rank 0's
        results.append(dict(T=T, sp=sp, dp=ctx.dp_size, micro_batch=micro_batch, dtype=dtype,
                            items=[it.__dict__ for it in comm_items(cfg, T, sp, micro_batch, ctx.dp_size,
                                                                    dtype=dtype)],
                            measured=_rows(measured), expected=_rows(expected), equal=bool(agree.item()),
                            dp_buckets=list(state.buckets) if state else [],
                            local_params=model.num_parameters()[1]))
    return results


def _rows(c: Counter) -> list[dict]:
    return [dict(op=op, group_size=g, bytes=b, dtype=dt, count=n) for (op, g, b, dt), n in sorted(c.items())]


# ---- section 3: activation memory per layer ---------------------------------------------------------

def saved_bytes_per_layer(model: GPT, micro_batch: int, dtype: str = "float32") -> tuple[int, list]:
    """Bytes saved for backward by one block's forward (this rank), measured with saved_tensors_hooks.

    Tensors are deduplicated by storage (a storage saved twice, or through several views such as q, k, v
    of the fused QKV output, counts once, at its full size) and parameters are left out. Under full
    recompute the block runs under megatron-lite's checkpoint, as GPT.forward does: what is left is what the
    checkpoint keeps (its inputs). `dtype` "bfloat16": under bf16 autocast, the block's input (the residual
    stream) float32 as the embedding gives it."""
    c, ctx = model.config, model.ctx
    S = c.seq_len // ctx.tp_size if c.sequence_parallel else c.seq_len
    x = torch.randn(S, micro_batch, c.hidden_size, device=ctx.device, requires_grad=True)
    block = model.blocks[0]
    with autocast(ctx.device, dtype):
        if c.recompute == "full":
            return saved_bytes(model, lambda: checkpoint(block, model.rng, x, model.rng))
        return saved_bytes(model, lambda: block(x, model.rng))


def saved_bytes(model, fn, weight_copies: list | None = None) -> tuple[int, list]:
    """Bytes of the tensors that fn() saves for backward (this rank), deduplicated by storage, parameters of
    `model` left out; and the list of (shape, dtype, bytes), largest first. Under autocast, the bf16 copies of
    parameters it saves (autocast's cast cache) are weights, not activations: left out too, and listed in
    `weight_copies` when given."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    by_shape = {}
    for p in model.parameters():
        by_shape.setdefault(tuple(p.shape), []).append(p)
    seen: dict[int, tuple] = {}
    copies = weight_copies if weight_copies is not None else []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() in params or not st.nbytes() or st.data_ptr() in seen:
            return t
        if t.dtype != torch.float32 and _is_param_copy(t, by_shape):
            copies.append((tuple(t.shape), str(t.dtype), st.nbytes()))
            params.add(st.data_ptr())
        else:
            seen[st.data_ptr()] = (tuple(t.shape), str(t.dtype), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    return sum(v[2] for v in seen.values()), sorted(seen.values(), key=lambda v: -v[2])


def _is_param_copy(t: torch.Tensor, by_shape: dict) -> bool:
    """Whether `t` is a parameter cast to t's dtype, or its transpose (what a matmul saves of its weight)."""
    for p in by_shape.get(tuple(t.shape), []):
        if torch.equal(t, p.detach().to(t.dtype)):
            return True
    return t.dim() == 2 and any(torch.equal(t.t(), p.detach().to(t.dtype)) for p in by_shape.get(tuple(t.shape)[::-1], []))


def memory_worker(device, cfg_kw: dict, micro_batch: int, tps: list[int], recomputes: list[str],
                  dtype: str = "float32"):
    out = []
    for T in tps:
        ctx = build_parallel_context(T, device)
        for sp in ([False] if T == 1 else [False, True]):
            for rc in recomputes:
                cfg = GPTConfig(**{**cfg_kw, "num_layers": 1}, sequence_parallel=sp, recompute=rc)
                model = GPT(cfg, ctx).train()
                total, tensors = saved_bytes_per_layer(model, micro_batch, dtype)
                out.append(dict(T=T, sp=sp, recompute=rc, dtype=dtype, bytes=total, tensors=tensors))
    return out


# ---- section 4: throughput of DP x TP layouts, interleaved --------------------------------------------

def scaling_worker(device, cfg_kw: dict, global_batch: int, layouts: list[tuple[int, int, bool]], warmup: int,
                   steps: int):
    """tokens/s of megatron-lite for each (processes, TP, SP) layout (DP = processes / TP, DDP over DP) at a
    fixed global batch. All layouts live in the same world and take turns step by step, so a change in the
    machine's load hits them all alike; ranks outside a layout wait at the barrier while it runs."""
    runs = []
    for n, T, sp in layouts:
        ctx = build_parallel_context(T, device, world_size=n)  # ranks >= n get None
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
    from .gpu_check import measure_model
    return measure_model("gpt2-small", cfg_kw, micro_batch, False, device, warmup, steps)


# ---- section 6: optimizations, before and after, interleaved ------------------------------------------

def interleaved(contenders: dict, warmup: int, steps: int, device) -> tuple[dict, dict]:
    """Run the contenders (name -> step(i) returning the loss) step by step in turn, rotating who goes first.
    Returns ({name: slowest-rank time of each measured step}, {name: loss of every step})."""
    names = list(contenders)
    times = {k: [] for k in names}
    losses = {k: [] for k in names}
    for i in range(warmup + steps):
        k0 = i % len(names)
        for name in names[k0:] + names[:k0]:
            t = timed(lambda: losses[name].append(contenders[name](i)), device)
            if i >= warmup:
                times[name].append(t)
    return {k: slowest_rank(v, device) for k, v in times.items()}, losses


def _summary(times: dict, losses: dict, baseline: str) -> dict:
    """Medians, each contender's ratio to the baseline (of the medians, and the median and quartiles of the
    per-step ratios), and the largest loss difference to the baseline over all steps (same math: ~0)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(times=times, median=med, baseline=baseline, ratio={}, paired={}, loss_max_diff={})
    for k, v in times.items():
        paired = sorted(a / b for a, b in zip(v, times[baseline]))
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        out["ratio"][k] = med[k] / med[baseline]
        out["paired"][k] = dict(median=statistics.median(paired), q1=q[0], q3=q[2])
        out["loss_max_diff"][k] = max(abs(a - b) for a, b in zip(losses[k], losses[baseline]))
    return out


def optimizations_worker(device, cfg_kw: dict, micro_batch: int, warmup: int, steps: int, sps: list[bool],
                         caps: dict[str, float], recomputes: list[str]):
    """Section 6 in one job of 2 processes: (a) column-parallel grad-reduce overlap on/off at T=2 for each SP
    setting, (b) DP gradient reduction overlapped with backward or not at DP=2, (c) recompute at T=2, SP on."""
    return dict(tp_overlap=tp_overlap_ab(device, cfg_kw, micro_batch, warmup, steps, sps),
                dp_overlap=dp_overlap_ab(device, cfg_kw, micro_batch, warmup, steps, caps),
                recompute=recompute_ab(device, cfg_kw, micro_batch, warmup, steps, True, recomputes))


def tp_overlap_ab(device, cfg_kw: dict, micro_batch: int, warmup: int, steps: int, sps: list[bool]):
    """Column-parallel backward with the input-gradient all-reduce (reduce-scatter under SP) overlapped with
    the weight-gradient matmul (GPTConfig.tp_comm_overlap, the default) against the same collective waited
    for before it; T = world size, DP 1, the same weights and batches."""
    ctx = build_parallel_context(dist.get_world_size(), device)
    out = []
    for sp in sps:
        contenders = {}
        for name, overlap in (("overlap", True), ("no overlap", False)):
            cfg = GPTConfig(**cfg_kw, sequence_parallel=sp, tp_comm_overlap=overlap)
            model = GPT(cfg, ctx)
            contenders[name] = _ml_step_fn(model, model, cfg, micro_batch, device)
        res = _summary(*interleaved(contenders, warmup, steps, device), baseline="no overlap")
        # what there is to hide: the step's 2L + 1 column-parallel input-gradient collectives, timed alone
        grad = torch.randn(cfg.seq_len, micro_batch, cfg.hidden_size, device=device)
        g = ctx.tp_group
        one = _alone(lambda: reduce_scatter_dim0(grad, g) if sp else dist.all_reduce(grad, group=g), device)
        out.append(dict(T=ctx.tp_size, sp=sp, collectives=2 * cfg.num_layers + 1, collective_bytes=grad.nbytes,
                        collectives_alone_s=(2 * cfg.num_layers + 1) * one, **res))
    return out


def _alone(fn, device, n: int = 5) -> float:
    """Median time of fn() alone, from a barrier, on the slowest rank (after one untimed call)."""
    fn()
    return statistics.median(slowest_rank([timed(fn, device) for _ in range(n)], device))


def dp_overlap_ab(device, cfg_kw: dict, micro_batch: int, warmup: int, steps: int, caps: dict[str, float]):
    """DDP over all ranks (TP 1) with each bucket cap of `caps` (name -> MiB; the last is the baseline): small
    buckets are all-reduced while backward goes on; one bucket larger than the model fires when the last
    gradient is ready, i.e. the reduction runs after backward, in one go. Records each one's buckets."""
    ctx = build_parallel_context(1, device)
    contenders, buckets = {}, {}
    for name, cap in caps.items():
        cfg = GPTConfig(**cfg_kw)
        model = GPT(cfg, ctx)
        net = DDP(model, process_group=ctx.dp_group, bucket_cap_mb=cap)
        buckets[name] = []  # the bucket sizes of the latest step
        net.register_comm_hook((ctx.dp_group, buckets[name]), _bucket_recording_hook)
        step = _ml_step_fn(net, model, cfg, micro_batch, device, stream=ctx.dp_rank)
        contenders[name] = lambda i, step=step, sizes=buckets[name]: (sizes.clear(), step(i))[1]
    res = _summary(*interleaved(contenders, warmup, steps, device), baseline=list(caps)[-1])
    flat = torch.zeros(model.num_parameters()[1], device=device)  # what there is to hide: one flat all-reduce
    alone = _alone(lambda: dist.all_reduce(flat, group=ctx.dp_group), device)
    return dict(dp=ctx.dp_size, caps=caps, buckets=buckets, local_params=flat.numel(), collective_bytes=flat.nbytes,
                collectives_alone_s=alone, **res)


def _bucket_recording_hook(state, bucket):  # DDP's default allreduce_hook, recording the bucket's size
    group, sizes = state
    sizes.append(bucket.buffer().numel())
    return allreduce_hook(group, bucket)


def recompute_ab(device, cfg_kw: dict, micro_batch: int, warmup: int, steps: int, sp: bool,
                 recomputes: list[str]):
    """Train-step time of recompute none / selective / full at T = world size, with the activation bytes
    each saves for backward on this rank: one layer (section 3's measurement) and the whole forward."""
    ctx = build_parallel_context(dist.get_world_size(), device)
    contenders, memory = {}, {}
    for rc in recomputes:
        cfg = GPTConfig(**cfg_kw, sequence_parallel=sp, recompute=rc)
        model = GPT(cfg, ctx).train()
        tokens, targets = batch(cfg, micro_batch, 0, device)
        memory[rc] = dict(layer_bytes=saved_bytes_per_layer(model, micro_batch)[0],
                          forward_bytes=saved_bytes(model, lambda: model(tokens, targets))[0])
        contenders[rc] = _ml_step_fn(model, model, cfg, micro_batch, device)
    return dict(T=ctx.tp_size, sp=sp, memory=memory,
                **_summary(*interleaved(contenders, warmup, steps, device), baseline=recomputes[0]))


def _ml_step_fn(net, model, cfg, micro_batch, device, stream: int = 0):
    opt = adamw(model)
    return lambda i: ml_step(net, opt, *batch(cfg, micro_batch, i, device, stream=stream))
