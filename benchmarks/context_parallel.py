"""Section 10 workers: context parallelism (ring attention), run on N spawned processes by `launch()`.

- `memory_worker`: bytes saved for backward by one transformer layer on a CP rank at C = 1, 2, 4 (C = 1 is the
  dense model), against the float32-adapted Table 2 of section 3 evaluated at the rank's s/C tokens;
- `comm_worker`: the point-to-point sends of one layer's forward and backward, counted, against
  theory.ring_attention_sends, and the layer's time;
- `long_sequence_worker`: one train step of a long sequence, its peak memory (RSS high-water mark of a fresh
  process) and time, optionally under an address-space cap (RLIMIT_AS) that a step over budget cannot pass.
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import time

import torch
import torch.distributed as dist

from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.context_parallel import RingPlan, shard_sequence
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel.random import checkpoint

from .launch import batch, launch, slowest_rank, timed
from .measure import saved_bytes


def _layer(ctx, cfg_kw: dict, micro_batch: int, recompute: str = "none"):
    """A one-layer model on `ctx`, a layer input of this rank's s/C tokens, and the layer's ring plan."""
    model = GPT(GPTConfig(**{**cfg_kw, "num_layers": 1}, recompute=recompute), ctx).train()
    S = cfg_kw["seq_len"] // ctx.cp_size
    x = torch.randn(S, micro_batch, cfg_kw["hidden_size"], device=ctx.device, requires_grad=True)
    plan = RingPlan.load_balanced(model.cp_ring, S, ctx.device) if model.cp_ring else None
    return model, x, plan


def memory_worker(device, cfg_kw: dict, micro_batch: int, cps: list[int], recomputes: list[str]) -> list[dict]:
    """Saved-for-backward bytes of one layer (measure.saved_bytes: deduplicated by storage, parameters left out)
    on CP rank 0, and of the whole forward (embedding, every layer, logits, loss), for each C and recompute."""
    out = []
    for C in cps:
        ctx = build_parallel_context(1, device, world_size=C, cp_size=C)
        for rc in recomputes:
            if ctx is None:
                continue
            model, x, plan = _layer(ctx, cfg_kw, micro_batch, rc)
            block = model.blocks[0]
            if rc == "full":  # as GPT.forward runs it: what is left is what the checkpoint keeps
                layer, tensors = saved_bytes(model, lambda: checkpoint(block, model.rng, x, model.rng, None, None, None, plan))
            else:
                layer, tensors = saved_bytes(model, lambda: block(x, model.rng, ring=plan))
            whole = GPT(GPTConfig(**cfg_kw, recompute=rc), ctx).train()
            # contiguous: at C=1 a view of the [b, s+1] window would count the window's storage
            tokens, targets = (shard_sequence(t, ctx).contiguous() for t in batch(whole.config, micro_batch, 0, device))
            forward, _ = saved_bytes(whole, lambda: whole(tokens, targets))
            out.append(dict(cp=C, recompute=rc, bytes=layer, forward_bytes=forward, tensors=tensors))
    return out


def comm_worker(device, cfg_kw: dict, micro_batch: int, cps: list[int], steps: int) -> list[dict]:
    """Per C: every send of one layer's forward and backward on each rank (CollectiveCounter), and the median
    time of the layer's forward + backward on the slowest rank (C = 1: the dense layer)."""
    out = []
    for C in cps:
        ctx = build_parallel_context(1, device, world_size=C, cp_size=C)
        sends, step = {}, lambda: None  # ranks outside this layout time nothing, keeping timed()'s barriers
        if ctx is not None:
            model, x, plan = _layer(ctx, cfg_kw, micro_batch)
            block = model.blocks[0]
            with CollectiveCounter() as fwd:
                y = block(x, model.rng, ring=plan)
            with CollectiveCounter() as bwd:
                y.sum().backward()
            sends = {phase: [(c.op, c.bytes) for c in log.calls] for phase, log in (("forward", fwd), ("backward", bwd))}
            step = lambda: block(x, model.rng, ring=plan).sum().backward()  # noqa: E731
        times = slowest_rank([timed(step, device) for _ in range(steps)], device)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, sends)
        out.append(dict(cp=C, per_rank=per_rank[:C], median_s=statistics.median(times)))
    return out


def long_sequence_worker(device, cfg_kw: dict, cap_bytes: int | None) -> dict:
    """One train step (forward, backward) of a batch of one `seq_len` sequence at C = world size, in this fresh
    process: the step's peak RSS above the RSS before it, its time, and -- with `cap_bytes` -- whether it runs
    at all when the address space may grow by only that much (the allocator then fails: out of memory)."""
    C = dist.get_world_size()
    ctx = build_parallel_context(1, device, cp_size=C)
    model = GPT(GPTConfig(**cfg_kw), ctx).train()
    tokens, targets = batch(model.config, 1, 0, device)
    x, y = shard_sequence(tokens, ctx), shard_sequence(targets, ctx)
    rss_before = _rss_bytes()
    if cap_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + cap_bytes, hard))
    error, t0 = None, time.perf_counter()
    try:
        model(x, y).backward()
    except (RuntimeError, MemoryError) as e:  # only a lone process may fail: a CP peer would wait for it
        wanted = re.search(r"tried to allocate (\d+) bytes", str(e))
        error = f"out of memory: {int(wanted[1]) / 2**20:.1f} MiB more refused" if wanted else str(e).splitlines()[0]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    stats = torch.tensor([peak, seconds], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return dict(cp=C, seq_len=cfg_kw["seq_len"], cap_bytes=cap_bytes, error=error, peak_bytes=int(stats[0]),
                seconds=float(stats[1]), tokens_per_rank=cfg_kw["seq_len"] // C)


def _statm(field: int) -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * resource.getpagesize()


def _rss_bytes() -> int:
    return _statm(1)


def _vm_bytes() -> int:
    return _statm(0)


# ---- the section's report ----------------------------------------------------------------------------------

SHAPE = dict(vocab_size=4096, seq_len=1024, num_layers=2, hidden_size=512, num_heads=8, dropout=0.0, seed=0)
LONG = dict(vocab_size=4096, seq_len=8192, num_layers=2, hidden_size=256, num_heads=4, dropout=0.0, seed=0)
QUICK = dict(vocab_size=256, seq_len=64, num_layers=2, hidden_size=64, num_heads=4, dropout=0.0, seed=0)
QUICK_LONG = dict(QUICK, vocab_size=1024, seq_len=2048)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def section(rep, args) -> dict:
    """Section 10 of `make bench` (benchmarks/run.py): `rep` prints a line and `rep.table(header, rows)`."""
    from .theory import adapted_activation_bytes, ring_attention_sends
    kw, long_kw, b = (QUICK, QUICK_LONG, args.micro_batch) if args.quick else (SHAPE, LONG, args.micro_batch)
    s, h, a = kw["seq_len"], kw["hidden_size"], kw["num_heads"]
    shape = f"L={kw['num_layers']} h={h} a={a} s={s} V={kw['vocab_size']} b={b}"
    rep(f"== 10. context parallelism (ring attention, load-balanced chunks), {shape}, float32, device cpu")
    rep("-- a. activation memory per rank: saved_tensors_hooks around one layer's forward (deduplicated by storage, "
        "parameters left out) on CP rank 0; formula: section 3's float32 adaptation of Table 2 at the rank's s/C "
        "tokens; whole forward = embedding, layers, logits and loss")
    mem = launch(memory_worker, 4, kw, b, [1, 2, 4], ["none", "selective", "full"])
    base = {(r["recompute"]): r for r in mem if r["cp"] == 1}
    rows = []
    for r in mem:
        C, rc = r["cp"], r["recompute"]
        r["formula"] = adapted_activation_bytes(s // C, b, h, a, 4 * h, recompute=rc)
        r["vs_C1"], r["forward_vs_C1"] = r["bytes"] / base[rc]["bytes"], r["forward_bytes"] / base[rc]["forward_bytes"]
        rows.append([C, rc, _mib(r["formula"]), _mib(r["bytes"]), f"{r['bytes'] / r['formula']:.4f}",
                     f"{r['vs_C1']:.4f} (1/C = {1 / C:.4f})", _mib(r["forward_bytes"]), f"{r['forward_vs_C1']:.4f}"])
    rep.table(["C", "recompute", "formula MiB", "measured MiB", "measured/formula", "layer / C=1",
               "whole forward MiB", "forward / C=1"], rows)

    gqa = dict(kw, num_kv_heads=2)
    steps = 2 if args.quick else 5
    rep(f"-- b. ring traffic per layer and micro-batch, grouped-query attention ({a} query heads on 2 KV heads: only "
        f"the KV heads travel), counted with CollectiveCounter on every rank; theory.ring_attention_sends; "
        f"layer forward + backward time, median of {steps} on the slowest rank (C=1: the dense layer, SDPA)")
    comm = launch(comm_worker, 4, gqa, b, [1, 2, 4], steps)
    rows = []
    for r in comm:
        C = r["cp"]
        theory = ring_attention_sends(b, s, 2, h // a, C)
        want = {"forward": sorted([("send", theory["forward: K/V blocks"][1])] * (C - 1)),
                "backward": sorted([("send", theory["backward: K/V blocks"][1]),
                                    ("send", theory["backward: dK/dV accumulators (float32)"][1])] * (C - 1))}
        got = [{ph: sorted(c for c in calls if c[0] == "send") for ph, calls in sends.items()} for sends in r["per_rank"]]
        others = sum(c[0] not in ("send", "recv") for sends in r["per_rank"] for calls in sends.values() for c in calls)
        r["equal"] = all(g == want for g in got) and not others
        sent = sum(n * nbytes for n, nbytes in theory.values())
        rows.append([C, sum(len(g["forward"]) for g in got[:1]), sum(len(g["backward"]) for g in got[:1]),
                     f"{sent / 2**20:.3f}", "YES" if r["equal"] else "NO", f"{1e3 * r['median_s']:.1f}"])
        r["theory_bytes"] = sent
    rep.table(["C", "sends fwd (rank 0)", "sends bwd (rank 0)", "MiB sent per rank (theory)", "measured == theory",
               "layer fwd+bwd ms"], rows)

    rep(f"-- c. a sequence over a memory budget: one train step of one sequence, L={long_kw['num_layers']} "
        f"h={long_kw['hidden_size']} a={long_kw['num_heads']} s={long_kw['seq_len']} V={long_kw['vocab_size']}, each "
        f"run in fresh processes; peak = RSS high-water mark minus the RSS before the step (the largest rank)")
    free = {C: launch(long_sequence_worker, C, long_kw, None) for C in (1, 4)}
    budget = int((free[1]["peak_bytes"] * free[4]["peak_bytes"]) ** 0.5) // 2**20 * 2**20
    capped = {C: launch(long_sequence_worker, C, long_kw, budget) for C in (1, 4)}
    rows = [[C, free[C]["tokens_per_rank"], _mib(free[C]["peak_bytes"]), f"{free[C]['seconds']:.2f}",
             capped[C]["error"] or "fits"] for C in (1, 4)]
    rep.table(["C", "tokens per rank", "peak MiB (uncapped)", "step s", f"under a {_mib(budget)} MiB cap (RLIMIT_AS)"],
              rows)
    ratio = free[4]["seconds"] / free[1]["seconds"]
    rep(f"   verdict: C=4 holds {free[4]['peak_bytes'] / free[1]['peak_bytes']:.3f} of C=1's peak per rank; the step "
        f"{'fits the budget only at C=4' if capped[1]['error'] and not capped[4]['error'] else 'did NOT separate'}; "
        f"step time C=4 / C=1 = {ratio:.2f} (4 processes on {os.cpu_count()} cores: context, not a "
        f"speed-up claim)")
    rep()
    return dict(memory=[{k: v for k, v in r.items() if k != "tensors"} for r in mem], comm=comm,
                long=dict(uncapped=free, budget_bytes=budget, capped=capped, time_ratio=ratio))
