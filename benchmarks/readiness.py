"""Section 12: ready for GPUs, measured on the CPU (issue 19). Workers run by `launch()`; tests/test_gpu_ready.py
calls the same functions.

- start-up: building the model with its draw (a fresh run) and without (a resume: the checkpoint's weights
  replace it), time and peak bytes;
- the vocab-parallel cross-entropy's peak bytes on bf16 and float32 logits against one float32 copy;
- DDP's bytes per parameter once backward is done (weights, gradients in its buckets, AdamW's moments);
- a zero=1 checkpoint at DP=4: what building its state dict adds, the largest tensor a save and a load allocate,
  against what gathering the full moments (the former save) adds;
- torch.compile: dynamo's graphs and breaks for a whole model and one block, T=2 with SP.
"""
from __future__ import annotations

import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from megatron_lite.checkpoint import _full_state, load_state
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel import vocab_parallel_cross_entropy

from .host_memory import AllocationPeak, LargestFloatTensor

OPTIM = types.SimpleNamespace(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, fused=True)


def tokens(kw: dict, b: int = 2, seed: int = 0):
    t = torch.randint(0, kw["vocab_size"], (b, kw["seq_len"] + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def model_build(ctx, kw: dict) -> dict:
    """Build time and peak bytes of GPT(kw) on ctx with its draw and without; its local and largest full tensor."""
    out = {}
    for name, init in (("drawn", True), ("skipped", False)):
        t0 = time.perf_counter()
        model = GPT(GPTConfig(**kw), ctx, init_weights=init)
        out[f"{name}_s"] = time.perf_counter() - t0
        with AllocationPeak() as peak:  # again, profiled (the profiler slows it down)
            model = GPT(GPTConfig(**kw), ctx, init_weights=init)
        out[f"{name}_peak"] = peak.peak
    T = ctx.tp_size
    out.update(local=sum(p.nbytes for p in model.parameters()),
               largest_full=max(p.nbytes * (T if getattr(p, "tp_partition_dim", None) is not None else 1)
                                for p in model.parameters()), params=model.num_parameters()[0])
    return out


def cross_entropy_memory(ctx, S: int, B: int, Vt: int, V: int, dtype: torch.dtype) -> dict:
    """Peak bytes of the loss's forward on logits [S, B, Vt] of `dtype` (the last rank's columns partly padding),
    and its loss and gradient against the dense float32 cross-entropy of the gathered logits."""
    g = torch.Generator().manual_seed(ctx.tp_rank)
    logits = torch.randn(S, B, Vt, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(9))
    with AllocationPeak() as fwd:
        losses = vocab_parallel_cross_entropy(logits, targets, ctx.tp_group, vocab_size=V)
    losses.sum().backward()
    parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, logits.detach(), group=ctx.tp_group)
    dense = torch.cat(parts, -1)[..., :V].float().requires_grad_()
    want = torch.nn.functional.cross_entropy(dense.flatten(0, 1), targets.flatten(), reduction="none")
    want.sum().backward()
    mine = dense.grad[..., ctx.tp_rank * Vt:(ctx.tp_rank + 1) * Vt]  # padding columns: no gradient
    return dict(dtype=str(dtype).removeprefix("torch."), peak=fwd.peak, one_copy=4 * logits.numel(), per_token=S * B,
                loss_err=(losses.float() - want.view(S, B)).abs().max().item(),
                grad_err=(logits.grad.float()[..., :mine.shape[-1]] - mine).abs().max().item(),
                padding_grad=logits.grad[..., mine.shape[-1]:].abs().max().item() if mine.shape[-1] < Vt else 0.0)


def ddp_bytes(ctx, kw: dict) -> dict:
    """Bytes held once backward is done (activations freed), model and optimizer built inside: weights,
    gradients, DDP's buckets, AdamW's moments; per parameter. zero=0 with DP > 1 (DDP). DDP's first buckets,
    replaced after the first backward, are often freed by gloo's worker thread: AllocationPeak counts that."""
    with AllocationPeak() as held:
        model = GPT(GPTConfig(**kw), ctx)
        opt = build_optimizer(model, OPTIM, ctx)
        for step in range(3):  # DDP rebuilds its buckets after the first backward: the third is the steady state
            opt.module(*tokens(kw, seed=ctx.dp_rank + 2 * step)).backward()
            if step < 2:
                opt.step()
                opt.zero_grad()
    net = torch.tensor([held.net], dtype=torch.float64)
    dist.all_reduce(net, op=dist.ReduceOp.MAX, group=ctx.dp_group)  # the rank that holds the most
    params = sum(p.numel() for p in model.parameters())
    return dict(params=params, held=int(net.item()), per_param=net.item() / params)


def zero_checkpoint_memory(ctx, kw: dict, root: Path, group, bucket_bytes: int) -> dict:
    """zero=1: bytes the state dict adds, the largest float tensor a save and a load create, and what gathering
    the full moments adds; the loaded state equal to the saved one. `group`: DCP's ranks (ctx's)."""
    model = GPT(GPTConfig(**kw), ctx)
    opt = build_optimizer(model, OPTIM, ctx, zero=1, bucket_bytes=bucket_bytes)
    opt.module(*tokens(kw, seed=ctx.dp_rank)).backward()
    opt.step()
    path = root / "step_0000001"
    with AllocationPeak() as state_dict:
        sd = _full_state(model, opt, ctx)
    with LargestFloatTensor() as save:
        dcp.save(sd, checkpoint_id=str(path), process_group=group)
    if ctx.rank == 0:
        (path / "meta.json").write_text('{"step": 1}')
    dist.barrier(group=group)
    fresh = GPT(GPTConfig(**kw), ctx, init_weights=False)
    fresh_opt = build_optimizer(fresh, OPTIM, ctx, zero=1, bucket_bytes=bucket_bytes)
    with LargestFloatTensor() as load:
        load_state(path, fresh, fresh_opt, ctx, process_group=group)
    with AllocationPeak() as gathered:
        opt.full_state()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters())) and \
        torch.equal(opt.exp_avg, fresh_opt.exp_avg) and torch.equal(opt.exp_avg_sq, fresh_opt.exp_avg_sq)
    sizes = torch.tensor([state_dict.peak, save.bytes, load.bytes, gathered.peak], dtype=torch.float64)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(["state_dict", "save_largest", "load_largest", "gathered"], sizes.long().tolist()), same=same,
                bucket_bytes=4 * max(b.numel for b in opt.buckets), local=sum(p.numel() for p in model.parameters()),
                moments=opt.state_bytes(), dp=ctx.dp_cp_size)


def compile_graphs(ctx, kw: dict, sp: bool) -> dict:
    """torch._dynamo.explain of the whole model's forward and of one block: graphs and breaks."""
    torch._dynamo.reset()
    model = GPT(GPTConfig(**kw, sequence_parallel=sp), ctx)
    whole = torch._dynamo.explain(model)(*tokens(kw))
    x = torch.randn(kw["seq_len"] // (ctx.tp_size if sp else 1), 2, kw["hidden_size"])
    rope = model.rotary(torch.arange(kw["seq_len"])) if kw.get("position_embedding") == "rope" else None
    block = torch._dynamo.explain(model.blocks[0])(x, model.rng, rope)
    return dict(graphs=whole.graph_count, breaks=whole.graph_break_count, block_graphs=block.graph_count,
                block_breaks=block.graph_break_count, reasons=[b.reason[:200] for b in whole.break_reasons])


def train_losses(ctx, kw: dict, sp: bool, steps: int, backend: str | None = None) -> list[float]:
    """The losses of `steps` AdamW steps of GPT(kw) on ctx, eagerly or torch.compile'd with `backend`."""
    model = GPT(GPTConfig(**kw, sequence_parallel=sp), ctx)
    opt = build_optimizer(model, OPTIM, ctx)
    forward = torch.compile(model, backend=backend) if backend else model
    losses = []
    for step in range(steps):
        loss = forward(*tokens(kw, seed=step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def readiness_worker(device, kw: dict, micro_batch: int) -> dict:
    """Section 12 on 4 processes: build at T=1 and T=2, the cross-entropy at T=2, DDP at DP=4, a zero=1 checkpoint
    at DP=4, compile at T=2 + SP."""
    out = {"build": {}}
    for T in (1, 2):
        out["build"][T] = model_build(build_parallel_context(T, device), kw)
    ctx = build_parallel_context(2, device)
    S, B, V = kw["seq_len"], micro_batch, kw["vocab_size"]
    Vt = -(-V // 128 * 128) // 2  # the padded vocabulary's half
    out["cross_entropy"] = [cross_entropy_memory(ctx, S, B, Vt, V, dtype) for dtype in (torch.bfloat16, torch.float32)]
    dp4 = build_parallel_context(1, device)
    out["ddp"] = ddp_bytes(dp4, kw)
    with tempfile.TemporaryDirectory() as d:
        box = [d]
        dist.broadcast_object_list(box, src=0)  # one directory for every rank
        out["zero"] = zero_checkpoint_memory(dp4, kw, Path(box[0]), dist.group.WORLD, 4 * 2**20)
        dist.barrier()
    out["compile"] = compile_graphs(ctx, kw, sp=True)
    return out
