"""Tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Legend: S sequence (St = S/T under sequence parallelism), B batch, I in-features, O out-features,
T tensor-parallel size; a trailing `t` marks a dimension split over T. Activations are `[s, b, h]`.

Sharding matches torch's dense layers exactly, so a dense weight splits into these by plain slicing:
rank r of a ColumnParallelLinear holds rows [r*O/T, (r+1)*O/T) of the `nn.Linear` weight (and bias); a
RowParallelLinear holds columns [r*I/T, (r+1)*I/T); a VocabParallelEmbedding holds rows [r*V/T, (r+1)*V/T).
Each sharded parameter records its split dimension (`tp_partition_dim`); every other parameter of a
model is replicated over TP, which is what `replicated_params` relies on.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .mappings import (all_gather_dim0, all_reduce, gather_from_tp, reduce_from_tp, reduce_scatter_dim0,
                       reduce_scatter_to_sp, scatter_to_tp, wait)

InitMethod = Callable[[torch.Tensor], None]


def tp_partition_dim(param: torch.Tensor) -> int | None:
    """The dimension along which `param` is split over TP, or None when it is replicated."""
    return getattr(param, "tp_partition_dim", None)


def gather_tp_shards(local: torch.Tensor, dim: int | None, group: dist.ProcessGroup) -> torch.Tensor:
    """The full tensor whose block of `dim` this rank holds (collective over `group`); a replicated one
    (`dim` None) as it is. Each rank gets a detached copy."""
    if dim is None or dist.get_world_size(group) == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def skip_init(w: torch.Tensor) -> None:
    """The init method of a model about to load its weights (a resumed or converted checkpoint): no draw."""


def _sharded_parameter(full_shape, dim, group, init_method: InitMethod, device) -> nn.Parameter:
    """Draw the full tensor on `device`, keep this rank's block of `dim`.

    Every rank draws the same full tensor (Megatron's CPU initialization, here on the device, where drawing
    8B parameters takes a second instead of a minute), so a model built from one seed holds the same full
    weights whatever T is. With `skip_init` only this rank's block is allocated, and nothing drawn."""
    T, r = dist.get_world_size(group), dist.get_rank(group)
    if init_method is skip_init:
        local = list(full_shape)
        local[dim] //= T
        param = nn.Parameter(torch.empty(local, device=device))
    else:
        full = torch.empty(full_shape, device=device)
        init_method(full)
        param = nn.Parameter(full.chunk(T, dim=dim)[r].clone())
    param.tp_partition_dim = dim
    return param


def _check_divisible(n: int, T: int, what: str) -> int:
    if n % T:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {T}")
    return n // T


def _default_weight_init(fan_in: int) -> InitMethod:
    return lambda w: nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on x's device, or None when autocast is off there."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _ColumnParallelLinearFn(torch.autograd.Function):
    """y = x W^T + b on this rank's rows of W.

    Forward: under SP, all-gather x along the sequence (Korthikanti et al. 2022, `f-bar`); otherwise x is
    already replicated (paper's `f`, identity). Backward: dL/dx is all-reduced (reduce-scattered under SP)
    asynchronously while dL/dW is computed, Megatron's overlap; with `overlap_grad_reduce=False` it is
    waited for before dL/dW (same math, the un-overlapped baseline). Under SP only the local sequence
    shard of x is saved, and it is gathered again in backward: activation memory stays 1/T.

    Under autocast, x is cast to the autocast dtype before it is saved and gathered (the norm before it
    returns float32), as Megatron gathers bf16: half the bytes saved and moved. The collectives are torch's
    functional ones, so torch.compile traces the whole layer, backward included."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel, overlap_grad_reduce=True):
        ctx.group, ctx.sequence_parallel, ctx.has_bias = group, sequence_parallel, bias is not None
        ctx.overlap_grad_reduce, ctx.autocast = overlap_grad_reduce, autocast_dtype(x)
        if ctx.autocast is not None:
            x = x.to(ctx.autocast)
        ctx.save_for_backward(x, weight)
        x_total = all_gather_dim0(x, group) if sequence_parallel else x
        return F.linear(x_total, weight, bias)  # autocast (when on) casts the weight, from its cache

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        group, sp = ctx.group, ctx.sequence_parallel
        if sp:
            x_total = all_gather_dim0(x, group, wait=False)
        grad_in = grad_out.matmul(weight.to(grad_out.dtype))
        if sp:
            x_total = wait(x_total)
            grad_in = reduce_scatter_dim0(grad_in, group, wait=False)
        else:
            x_total = x
            grad_in = all_reduce(grad_in, group, wait=False)
        if not ctx.overlap_grad_reduce:
            grad_in = wait(grad_in)  # the baseline: the collective alone first, then dL/dW
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_out_2d.t().matmul(x_total.reshape(-1, x_total.shape[-1]).to(grad_out.dtype))
        grad_bias = grad_out_2d.sum(0) if ctx.has_bias else None
        return wait(grad_in), grad_weight, grad_bias, None, None, None


def column_parallel_linear(x, weight, bias, group, sequence_parallel: bool, overlap_grad_reduce: bool = True):
    """The math of ColumnParallelLinear, shared with the tied output layer of the GPT."""
    if dist.get_world_size(group) == 1:
        return F.linear(x, weight, bias)
    return _ColumnParallelLinearFn.apply(x, weight, bias, group, sequence_parallel, overlap_grad_reduce)


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split by columns (Shoeybi et al. 2019, eq. 3): rank r computes Y_r = X A_r.

    The output stays split over the last dim unless `gather_output`. Under sequence parallelism the
    input is this rank's sequence shard `[St, B, I]` and the output covers the whole sequence.
    `overlap_grad_reduce`: overlap the input-gradient all-reduce (reduce-scatter under SP) with the
    weight-gradient matmul in backward (default), or run it before (a baseline to measure against).

    `partitions=k` fuses k column-parallel layers of out_features/k outputs each (SwiGLU's gate and up
    projections) into one matmul. The weight is then `[k, O/k, I]`, split over TP along dim 1, so rank r
    holds `[gate_r; up_r]` and computes `[X gate_r | X up_r]`, while the saved global tensor stays
    `[gate; up]` at every T. (A flat `[O, I]` weight split along dim 0 would give rank r rows of gate only,
    or, stored as `[gate_r; up_r]` per rank, a global tensor that depends on T: Megatron-LM #360.)"""

    def __init__(self, in_features: int, out_features: int, *, tp_group: dist.ProcessGroup, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, overlap_grad_reduce: bool = True,
                 partitions: int = 1, init_method: InitMethod | None = None, device=None):
        super().__init__()
        T = dist.get_world_size(tp_group)
        self.in_features, self.out_features, self.partitions = in_features, out_features, partitions
        per_partition = _check_divisible(out_features, partitions, "out_features / partitions")
        what = "out_features" if partitions == 1 else f"out_features / {partitions} (per partition)"
        self.out_features_per_rank = partitions * _check_divisible(per_partition, T, what)
        self.tp_group, self.gather_output, self.sequence_parallel = tp_group, gather_output, sequence_parallel
        self.overlap_grad_reduce = overlap_grad_reduce
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output is not supported with sequence_parallel")
        if partitions > 1 and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output is not supported with partitions > 1")
        init_method = init_method or _default_weight_init(in_features)
        lead, dim = ((), 0) if partitions == 1 else ((partitions,), 1)
        self.weight = _sharded_parameter((*lead, per_partition, in_features), dim, tp_group, init_method, device)
        self.bias = (_sharded_parameter((*lead, per_partition), dim, tp_group, nn.init.zeros_, device)
                     if bias else None)

    def forward(self, x):  # [S(t), B, I] -> [S, B, Ot] (or [S, B, O] with gather_output)
        weight, bias = self.weight, self.bias
        if self.partitions > 1:
            weight, bias = weight.flatten(0, 1), None if bias is None else bias.flatten()
        y = column_parallel_linear(x, weight, bias, self.tp_group, self.sequence_parallel, self.overlap_grad_reduce)
        return gather_from_tp(y, self.tp_group) if self.gather_output else y

    def extra_repr(self):
        fused = f", partitions={self.partitions}" if self.partitions > 1 else ""
        return (f"in={self.in_features}, out={self.out_features} (per rank {self.out_features_per_rank}){fused}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = X A with A split by rows and X by columns (Shoeybi et al. 2019, eq. 4): Y = sum_r X_r A_r.

    The partial products are all-reduced (paper's `g`), or reduce-scattered along the sequence under SP
    (`g-bar`); the bias is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, *, tp_group: dist.ProcessGroup, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 init_method: InitMethod | None = None, device=None):
        super().__init__()
        T = dist.get_world_size(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = _check_divisible(in_features, T, "in_features")
        self.tp_group, self.input_is_parallel, self.sequence_parallel = tp_group, input_is_parallel, sequence_parallel
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        init_method = init_method or _default_weight_init(in_features)
        self.weight = _sharded_parameter((out_features, in_features), 1, tp_group, init_method, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None  # replicated

    def forward(self, x):  # [S, B, It] -> [S, B, O] (or [St, B, O] under SP)
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp_group)
        partial = F.linear(x, self.weight)
        y = (reduce_scatter_to_sp(partial, self.tp_group) if self.sequence_parallel
             else reduce_from_tp(partial, self.tp_group))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return (f"in={self.in_features} (per rank {self.in_features_per_rank}), out={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over TP: rank r holds rows [r*V/T, (r+1)*V/T).

    Ids outside this rank's rows give zeros; the sum over ranks (all-reduce, or a reduce-scatter along
    the sequence under SP, for ids laid out `[s, b]`) gives every token its row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp_group: dist.ProcessGroup,
                 sequence_parallel: bool = False, init_method: InitMethod | None = None, device=None):
        super().__init__()
        T, r = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = _check_divisible(num_embeddings, T, "num_embeddings")
        self.vocab_start, self.vocab_end = r * per_rank, (r + 1) * per_rank
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0, tp_group,
                                         init_method or nn.init.normal_, device)

    def forward(self, ids):  # [S, B] -> [S, B, H] (or [St, B, H] under SP)
        if dist.get_world_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)  # backward
        # of an embedding needs only the ids, so zeroing its output in place is safe
        # Under autocast the sum travels in bf16 (exact: a token's row is non-zero on one rank only) and comes
        # back in the weight's dtype: the residual stream keeps the dtype it has at T=1.
        low = autocast_dtype(partial)
        if low is not None:
            partial = partial.to(low)
        y = reduce_scatter_to_sp(partial, self.tp_group) if self.sequence_parallel else \
            reduce_from_tp(partial, self.tp_group)
        return y.to(self.weight.dtype)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}), "
                f"sequence_parallel={self.sequence_parallel}")


def replicated_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that are replicated over TP: every one not TP-sharded.

    Under sequence parallelism, LayerNorms, row-parallel biases and position embeddings are replicated over
    TP but each rank feeds them other tokens, so each rank's gradient is a partial sum that must be summed
    over TP (Korthikanti et al. 2022, section 4.2.2; `optim.finalize_model_grads` does it once per optimizer
    step). They are found by exclusion, so a parameter added later cannot be forgotten."""
    return [p for p in module.parameters() if p.requires_grad and tp_partition_dim(p) is None]


def all_reduce_coalesced(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Sum `tensors` over `group` in place with one all-reduce: flatten, all-reduce, copy back."""
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
