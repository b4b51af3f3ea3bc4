"""Every tensor-parallel layer against its dense torch counterpart, for T in {1, 2, 4}, SP on and off.

One spawned world of 4 gloo ranks builds the three layouts (T=1: DP4, T=2: DP2xTP2, T=4) in turn; each
rank computes the dense reference itself from the same seed and compares its shards with the matching
slices of the dense outputs and gradients.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distributed import run_distributed
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           all_reduce_coalesced, copy_to_tp, gather_from_sp, gather_from_tp,
                                           reduce_from_tp, reduce_scatter_to_sp, replicated_params, scatter_to_sp,
                                           scatter_to_tp, vocab_parallel_cross_entropy)

S, B, H, O = 8, 3, 16, 24
RTOL = 1e-5


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def check(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got.detach(), want.detach())
    assert err < RTOL, f"{name}: relative error {err:.2e}"


def block(t, r, T, dim):
    """Rank r's block of dim `dim` of a full tensor: the slicing that the layers' layout promises."""
    n = t.shape[dim] // T
    return t.narrow(dim, r * n, n)


def _column(ctx, sp, gather_output):
    T, r, g = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    torch.manual_seed(0)
    dense = nn.Linear(H, O)
    x = torch.randn(S, B, H, requires_grad=True)
    G = torch.randn(S, B, O)
    (dense(x) * G).sum().backward()

    for overlap in (True, False):  # input-grad collective overlapped with dW, or before it: the same math
        layer = ColumnParallelLinear(H, O, tp_group=g, sequence_parallel=sp, gather_output=gather_output,
                                     overlap_grad_reduce=overlap)
        with torch.no_grad():
            layer.weight.copy_(block(dense.weight, r, T, 0))
            layer.bias.copy_(block(dense.bias, r, T, 0))
        x_in = (block(x, r, T, 0) if sp else x).detach().clone().requires_grad_()
        y = layer(x_in)
        want = dense(x) if gather_output else block(dense(x), r, T, 2)
        check(f"column out (overlap={overlap})", y, want)
        (y * (G if gather_output else block(G, r, T, 2))).sum().backward()
        check(f"column dx (overlap={overlap})", x_in.grad, block(x.grad, r, T, 0) if sp else x.grad)
        check(f"column dW (overlap={overlap})", layer.weight.grad, block(dense.weight.grad, r, T, 0))
        check(f"column db (overlap={overlap})", layer.bias.grad, block(dense.bias.grad, r, T, 0))


def _fused_column(ctx, sp):
    """partitions=2 (SwiGLU's gate and up): two dense layers; rank r computes [x gate_r | x up_r] and holds
    the [2, O/T, H] block of the stacked [2, O, H] weight."""
    T, r, g = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    torch.manual_seed(4)
    gate, up = nn.Linear(H, O), nn.Linear(H, O)
    x = torch.randn(S, B, H, requires_grad=True)
    G = torch.randn(S, B, 2 * O)
    (torch.cat([gate(x), up(x)], -1) * G).sum().backward()

    layer = ColumnParallelLinear(H, 2 * O, tp_group=g, sequence_parallel=sp, partitions=2)
    assert layer.weight.shape == (2, O // T, H) and layer.weight.tp_partition_dim == 1
    with torch.no_grad():
        layer.weight.copy_(block(torch.stack([gate.weight, up.weight]), r, T, 1))
        layer.bias.copy_(block(torch.stack([gate.bias, up.bias]), r, T, 1))
    x_in = (block(x, r, T, 0) if sp else x).detach().clone().requires_grad_()
    y = layer(x_in)
    check("fused column out", y, torch.cat([block(gate(x), r, T, 2), block(up(x), r, T, 2)], -1))
    (y * torch.cat([block(G[..., :O], r, T, 2), block(G[..., O:], r, T, 2)], -1)).sum().backward()
    check("fused column dx", x_in.grad, block(x.grad, r, T, 0) if sp else x.grad)
    check("fused column dW", layer.weight.grad, block(torch.stack([gate.weight.grad, up.weight.grad]), r, T, 1))
    check("fused column db", layer.bias.grad, block(torch.stack([gate.bias.grad, up.bias.grad]), r, T, 1))


def _row(ctx, sp, input_is_parallel):
    T, r, g = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    torch.manual_seed(1)
    dense = nn.Linear(O, H)
    x = torch.randn(S, B, O, requires_grad=True)
    G = torch.randn(S, B, H)
    (dense(x) * G).sum().backward()

    layer = RowParallelLinear(O, H, tp_group=g, sequence_parallel=sp, input_is_parallel=input_is_parallel)
    with torch.no_grad():
        layer.weight.copy_(block(dense.weight, r, T, 1))
        layer.bias.copy_(dense.bias)
    x_in = (block(x, r, T, 2) if input_is_parallel else x).detach().clone().requires_grad_()
    y = layer(x_in)
    check("row out", y, block(dense(x), r, T, 0) if sp else dense(x))
    (y * (block(G, r, T, 0) if sp else G)).sum().backward()
    if sp:  # the bias is replicated, and under SP each rank feeds it only S/T tokens (optim.finalize_model_grads)
        all_reduce_coalesced([p.grad for p in replicated_params(layer)], g)
    check("row dx", x_in.grad, block(x.grad, r, T, 2) if input_is_parallel else x.grad)
    check("row dW", layer.weight.grad, block(dense.weight.grad, r, T, 1))
    check("row db", layer.bias.grad, dense.bias.grad)


def _embedding(ctx, sp):
    T, r, g = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    V = 32
    torch.manual_seed(2)
    dense = nn.Embedding(V, H)
    ids = torch.randint(0, V, (S, B))
    G = torch.randn(S, B, H)
    (dense(ids) * G).sum().backward()

    layer = VocabParallelEmbedding(V, H, tp_group=g, sequence_parallel=sp)
    with torch.no_grad():
        layer.weight.copy_(block(dense.weight, r, T, 0))
    y = layer(ids)
    check("embedding out", y, block(dense(ids), r, T, 0) if sp else dense(ids))
    (y * (block(G, r, T, 0) if sp else G)).sum().backward()
    check("embedding dW", layer.weight.grad, block(dense.weight.grad, r, T, 0))


def _cross_entropy(ctx, vocab_size):
    T, r, g = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    V = 32
    torch.manual_seed(3)
    logits = (3 * torch.randn(S, B, V)).requires_grad_()
    targets = torch.randint(0, vocab_size, (S, B))
    targets[0, 0] = targets[3, 2] = targets[5, 1] = -100
    G = torch.rand(S, B)
    want = F.cross_entropy(logits[..., :vocab_size].reshape(-1, vocab_size), targets.reshape(-1),
                           reduction="none", ignore_index=-100).view(S, B)
    (want * G).sum().backward()

    shard = block(logits, r, T, 2).detach().clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, targets, g, vocab_size=vocab_size)
    check("cross-entropy", loss, want)
    assert torch.all(loss[targets == -100] == 0)
    (loss * G).sum().backward()
    check("cross-entropy grad", shard.grad, block(logits.grad, r, T, 2))


def _layers_worker():
    for T in (1, 2, 4):
        ctx = build_parallel_context(T)
        for sp in (False, True):
            _column(ctx, sp, gather_output=False)
            _fused_column(ctx, sp)
            _row(ctx, sp, input_is_parallel=True)
            _embedding(ctx, sp)
        _column(ctx, False, gather_output=True)
        _row(ctx, False, input_is_parallel=False)
        _cross_entropy(ctx, vocab_size=32)
        _cross_entropy(ctx, vocab_size=21)  # padded vocabulary: a whole shard of padding at T=4


def test_layers_match_dense_for_T_1_2_4_with_and_without_sp():
    run_distributed(_layers_worker, 4)


def _mappings_worker():
    for T in (2, 4):
        ctx = build_parallel_context(T)
        g, r = ctx.tp_group, ctx.tp_rank
        torch.manual_seed(10)
        x = torch.randn(T * 2, 3, 4 * T)  # identical on every rank
        grads = torch.randn(T, T * 2, 3, 4 * T)  # grads[i]: what rank i feeds backward

        def run(fn, inp, grad):
            inp = inp.clone().requires_grad_()
            out = fn(inp, g)
            out.backward(grad)
            return out, inp.grad

        out, dx = run(copy_to_tp, x, grads[r])
        check("f fwd", out, x)
        check("f bwd", dx, grads.sum(0))
        out, dx = run(reduce_from_tp, x * (r + 1), grads[r])
        check("g fwd", out, x * sum(range(1, T + 1)))
        check("g bwd", dx, grads[r])
        out, dx = run(scatter_to_tp, x, block(grads[r], r, T, 2))
        check("scatter fwd", out, block(x, r, T, 2))
        check("scatter bwd", dx, torch.cat([block(grads[i], i, T, 2) for i in range(T)], dim=2))
        out, dx = run(gather_from_tp, block(x, r, T, 2), grads[r])
        check("gather fwd", out, x)
        check("gather bwd", dx, block(grads[r], r, T, 2))
        out, dx = run(gather_from_sp, block(x, r, T, 0), grads[r])
        check("sp gather fwd", out, x)
        check("sp gather bwd", dx, block(grads.sum(0), r, T, 0))
        out, dx = run(reduce_scatter_to_sp, x * (r + 1), block(grads[r], r, T, 0))
        check("sp reduce-scatter fwd", out, block(x, r, T, 0) * sum(range(1, T + 1)))
        check("sp reduce-scatter bwd", dx, torch.cat([block(grads[i], i, T, 0) for i in range(T)], dim=0))
        out, dx = run(scatter_to_sp, x, block(grads[r], r, T, 0))
        check("sp scatter fwd", out, block(x, r, T, 0))
        check("sp scatter bwd", dx, torch.cat([block(grads[i], i, T, 0) for i in range(T)], dim=0))


def test_mappings_forward_and_backward_semantics():
    run_distributed(_mappings_worker, 4)


def _uneven_worker():
    ctx = build_parallel_context(2)
    with pytest.raises(ValueError, match="out_features=5 is not divisible"):
        ColumnParallelLinear(4, 5, tp_group=ctx.tp_group)
    with pytest.raises(ValueError, match="in_features=7 is not divisible"):
        RowParallelLinear(7, 4, tp_group=ctx.tp_group)
    dist.barrier()


def test_layers_reject_uneven_split_before_any_collective():
    run_distributed(_uneven_worker, 2)
