"""Measurement workers of section 7, the distributed optimizer (parallel.zero=1), run by `launch()`.

- `zero_static_worker` (4 processes): AdamW state bytes per rank at DP = 1, 2, 4 (and DP2 x TP2) with zero=0
  and zero=1; the collectives of one optimizer step over the DP group and the TP finalize all-reduce, counted.
- `zero_time_worker` (2 processes): step time of zero=0 (DDP) against zero=1 and its overlaps switched off at
  DP=2; and at TP=2 with SP the coalesced finalize_model_grads against the per-parameter hooks it replaced.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import build_optimizer, grad_norm
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel import replicated_params, tp_partition_dim

from .launch import batch
from .measure import _alone, _DPHookState, _recording_allreduce_hook, _summary, interleaved
from .theory import zero_dp_collectives, zero_state_bytes

OPTIM = dict(lr=1e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, fused=True)
CONTENDERS = {  # name -> build_optimizer keywords; the first is the baseline
    "zero=0 (DDP)": dict(zero=0),
    "zero=1": dict(zero=1),
    "zero=1, reduce-scatter after backward": dict(zero=1, overlap_grad_reduce=False),
    "zero=1, all-gather after the update": dict(zero=1, overlap_param_gather=False),
}


def _optim():
    return SimpleNamespace(**OPTIM)


def _step(opt, model, cfg, micro_batch, accum, i, device, stream):
    """One optimizer step of `accum` micro-batches, as the trainer runs it; returns the mean loss."""
    total = 0.0
    for micro in range(accum):
        tokens, targets = batch(cfg, micro_batch, accum * i + micro, device, stream=stream)
        with opt.no_sync() if micro < accum - 1 else contextlib.nullcontext():
            loss = opt.module(tokens, targets)
            (loss / accum).backward()
        total += loss.item()
    opt.step()
    opt.zero_grad()
    return total / accum


# ---- 4 processes: state bytes and collectives ---------------------------------------------------------

def zero_static_worker(device, cfg_kw: dict, micro_batch: int):
    state = []
    for dp, tp in ((1, 1), (2, 1), (4, 1), (2, 2)):
        ctx = build_parallel_context(tp, device, world_size=dp * tp)
        if ctx is None:
            continue
        cfg = GPTConfig(**cfg_kw, sequence_parallel=tp > 1)
        row = dict(dp=dp, tp=tp)
        for zero in (0, 1):
            model = GPT(cfg, ctx)
            opt = build_optimizer(model, _optim(), ctx, zero=zero)
            local = sum(p.numel() for p in model.parameters())
            row[zero] = dict(bytes=opt.state_bytes(), theory=zero_state_bytes(local, dp, zero), local=local)
            if zero == 1:
                row.update(padded=sum(b.numel for b in opt.buckets), buckets=len(opt.buckets))
            del model, opt
        state.append(row)
    return dict(state=state, comm=_count_step(device, cfg_kw, micro_batch))


def _count_step(device, cfg_kw: dict, micro_batch: int) -> list[dict]:
    """DP2 x TP2 with SP: the collectives of one optimizer step (after a warm-up step) over the DP group, and
    the TP all-reduce of the SP-replicated gradients, against theory; checked on every rank."""
    ctx = build_parallel_context(2, device)
    cfg = GPTConfig(**cfg_kw, sequence_parallel=True)
    out = []
    for zero in (0, 1):
        model = GPT(cfg, ctx)
        opt = build_optimizer(model, _optim(), ctx, zero=zero)
        hook = None
        if zero == 0:  # DDP's reducer runs in C++: a comm hook calling its default all-reduce, recorded
            hook = _DPHookState(ctx.dp_group)
            opt.module.register_comm_hook(hook, _recording_allreduce_hook)
        for i in range(2):
            with CollectiveCounter() as log:
                if hook is not None:
                    hook.counter, hook.buckets = log, []
                _step(opt, model, cfg, micro_batch, 1, i, device, ctx.dp_rank)
        dp_calls: dict[str, list[int]] = {}
        for c in log.calls:
            if c.group is ctx.dp_group:
                dp_calls.setdefault(c.op, []).append(c.bytes)
        measured = {op: (len(b), sum(b)) for op, b in dp_calls.items()}
        if zero == 1:
            padded, buckets = sum(b.numel for b in opt.buckets), len(opt.buckets)
        else:
            padded, buckets = sum(p.numel() for p in model.parameters()), len(hook.buckets)
        expected = zero_dp_collectives(padded, buckets, ctx.dp_size, zero, ddp_buckets=buckets)
        replicated = sum(p.numel() for p in replicated_params(model))
        if zero == 1:  # this rank sums the replicated elements it owns
            replicated = sum(g.numel() for g in opt.replicated_grad_shards)
        # over TP: the cross-entropy's MAX (b*s) and SUM (2*b*s), the grad norm's (1), finalize's (the replicated)
        tp_calls = sorted(c.numel for c in log.calls if c.op == "all_reduce" and c.group is ctx.tp_group)
        b_s = micro_batch * cfg.seq_len
        want_tp = sorted([b_s, 2 * b_s, 1] + ([replicated] if replicated else []))
        agree = torch.tensor([int(measured == expected and tp_calls == want_tp)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)
        out.append(dict(zero=zero, dp=ctx.dp_size, tp=ctx.tp_size, measured=measured, expected=expected,
                        equal=bool(agree.item()), finalize_numel=replicated, tp_all_reduces=len(tp_calls),
                        local=sum(p.numel() for p in model.parameters()), buckets=buckets))
        del model, opt
    return out


# ---- 2 processes: step time -----------------------------------------------------------------------------

def zero_time_worker(device, cfg_kw: dict, micro_batch: int, accum: int, warmup: int, steps: int):
    """`accum` micro-batches of micro_batch / accum sequences per step in the finalize comparison (the same
    sequences per step as the DP comparison's one micro-batch)."""
    return dict(dp=_zero_ab(device, cfg_kw, micro_batch, warmup, steps),
                finalize=_finalize_ab(device, cfg_kw, max(1, micro_batch // accum), accum, warmup, steps))


def _zero_ab(device, cfg_kw: dict, micro_batch: int, warmup: int, steps: int) -> dict:
    """DP = world size, TP 1: the contenders of CONTENDERS, each its own model from the same seed, taking turns
    step by step; and what the DP collectives of one step cost alone (an all-reduce of the P local gradients,
    against a reduce-scatter plus an all-gather of them)."""
    ctx = build_parallel_context(1, device)
    cfg = GPTConfig(**cfg_kw)
    contenders, buckets = {}, 0
    for name, kw in CONTENDERS.items():
        model = GPT(cfg, ctx)
        opt = build_optimizer(model, _optim(), ctx, **kw)
        buckets = len(getattr(opt, "buckets", [])) or buckets
        contenders[name] = lambda i, opt=opt, model=model: _step(opt, model, cfg, micro_batch, 1, i, device,
                                                                 ctx.dp_rank)
    res = _summary(*interleaved(contenders, warmup, steps, device), baseline=next(iter(CONTENDERS)))
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    shard = flat[:flat.numel() // ctx.dp_size]
    g = ctx.dp_group
    res["alone"] = dict(all_reduce=_alone(lambda: dist.all_reduce(flat, group=g), device),
                        reduce_scatter=_alone(lambda: dist.reduce_scatter_single(shard, flat, group=g), device),
                        all_gather=_alone(lambda: dist.all_gather_single(flat, shard, group=g), device),
                        bytes=flat.nbytes)
    res.update(dp=ctx.dp_size, buckets=buckets, local=flat.numel())
    return res


def _finalize_ab(device, cfg_kw: dict, micro_batch: int, accum: int, warmup: int, steps: int) -> dict:
    """TP = world size with SP, zero=0, `accum` micro-batches per step: optim.finalize_model_grads (one coalesced
    all-reduce of the replicated gradients per step) against the per-parameter hooks it replaced (one synchronous
    all-reduce per replicated parameter per micro-batch, in backward), with their TP all-reduces counted."""
    ctx = build_parallel_context(dist.get_world_size(), device)
    cfg = GPTConfig(**cfg_kw, sequence_parallel=True)
    coalesced = GPT(cfg, ctx)
    opt = build_optimizer(coalesced, _optim(), ctx)
    hooked = GPT(cfg, ctx)
    _per_parameter_tp_sum_hooks(hooked)
    adamw = torch.optim.AdamW(hooked.parameters(), lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                              betas=(OPTIM["beta1"], OPTIM["beta2"]), eps=OPTIM["eps"])

    def hooked_step(i):  # the loop as it was: backward (the hooks sum over TP), norm, clip, AdamW
        total = 0.0
        for micro in range(accum):
            tokens, targets = batch(cfg, micro_batch, accum * i + micro, device)
            loss = hooked(tokens, targets)
            (loss / accum).backward()
            total += loss.item()
        norm = grad_norm([(p.grad, tp_partition_dim(p) is not None) for p in hooked.parameters()], ctx.tp_group,
                         device=device)
        torch.nn.utils.clip_grads_with_norm_(hooked.parameters(), OPTIM["grad_clip"], norm)
        adamw.step()
        adamw.zero_grad(set_to_none=True)
        return total / accum

    contenders = {"finalize_model_grads (coalesced)": lambda i: _step(opt, coalesced, cfg, micro_batch, accum, i,
                                                                       device, 0),
                  "per-parameter hooks (before)": hooked_step}
    counts = {}
    for name, fn in contenders.items():  # TP all-reduces of one step, less the cross-entropy's (2 per micro-batch)
        with CollectiveCounter() as log:  # and the grad norm's (1)
            fn(0)
        counts[name] = sum(1 for c in log.calls if c.op == "all_reduce") - 2 * accum - 1
    res = _summary(*interleaved(contenders, warmup, steps, device), baseline="per-parameter hooks (before)")
    res.update(tp=ctx.tp_size, accum=accum, micro_batch=micro_batch, replicated_all_reduces=counts,
               replicated_params=len(replicated_params(coalesced)))
    return res


def _per_parameter_tp_sum_hooks(model: GPT) -> None:
    """The SP-replicated gradients' TP sum as it was before finalize_model_grads: a hook on every replicated
    parameter all-reducing its gradient in backward, on every micro-batch."""
    group = model.ctx.tp_group

    def tp_sum(grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=group)
        return grad
    for p in replicated_params(model):
        p.register_hook(tp_sum)

