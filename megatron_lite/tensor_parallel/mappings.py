"""The collectives of tensor and sequence parallelism, as autograd functions.

Each function is named after what it does in the forward pass; its docstring says what runs in the
backward pass. Shoeybi et al. 2019 (arXiv 1909.08053), section 3, Fig. 3: `f` is `copy_to_tp` (identity
forward, all-reduce backward) and `g` is `reduce_from_tp` (all-reduce forward, identity backward), so an
MLP or attention block costs two all-reduces per pass. Korthikanti et al. 2022 (arXiv 2205.05198),
section 4.2.2: under sequence parallelism `g` becomes a reduce-scatter along the sequence and `f` an
all-gather along the sequence (`g-bar` and `f-bar`), each the other's conjugate in backward.

Activations are `[s, b, h]`: the sequence is dim 0, so a sequence shard is a contiguous block.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


# ---- raw collectives on contiguous tensors (no autograd) ------------------------------------------
# torch's functional collectives (`_c10d_functional` ops): plain ops that torch.compile traces into its graph
# (the c10d calls with `async_op=True` each break it), asynchronous until `wait` in eager mode.

_c10d = torch.ops._c10d_functional


def wait(x: torch.Tensor) -> torch.Tensor:
    """Wait for the collective that produces `x` (returned by one of the functions below with wait=False)."""
    return _c10d.wait_tensor(x)


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup, op: str = "sum", wait: bool = True) -> torch.Tensor:
    """x reduced over the group (`op`: sum | max). Eagerly in place, so `x` must be a tensor the caller owns (a
    fresh partial product); torch.compile traces the functional, out-of-place op. Use the returned tensor."""
    if group_size(group) == 1:
        return x
    if torch.compiler.is_compiling():
        out = _c10d.all_reduce(x, op, group.group_name)
    else:
        out = _c10d.all_reduce_(x, op, group.group_name)
    return _c10d.wait_tensor(out) if wait else out


def all_gather_dim0(x: torch.Tensor, group: dist.ProcessGroup, wait: bool = True) -> torch.Tensor:
    """Concatenate the ranks' tensors along dim 0 (the sequence, for `[s, b, h]` activations)."""
    out = _c10d.all_gather_into_tensor(x.contiguous(), group_size(group), group.group_name)
    return _c10d.wait_tensor(out) if wait else out


def reduce_scatter_dim0(x: torch.Tensor, group: dist.ProcessGroup, wait: bool = True) -> torch.Tensor:
    """Sum over ranks and keep this rank's block of dim 0."""
    world = group_size(group)
    if x.shape[0] % world:
        raise ValueError(f"cannot reduce-scatter dim 0 of size {x.shape[0]} over {world} ranks")
    out = _c10d.reduce_scatter_tensor(x.contiguous(), "sum", world, group.group_name)
    return _c10d.wait_tensor(out) if wait else out


def split_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's block of `dim` (no communication)."""
    world = group_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {world} ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def all_gather_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate the ranks' tensors along the last dim (gathered along dim 0, then re-laid out)."""
    if group_size(group) == 1:
        return x
    gathered = all_gather_dim0(x.unsqueeze(0), group)  # [T, ...]
    return torch.cat(gathered.unbind(0), dim=-1)


# ---- autograd functions ---------------------------------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return split_dim(grad, -1, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


def copy_to_tp(x, group):
    """Paper's `f`: identity forward; all-reduce of the gradient over TP backward."""
    return _CopyToTP.apply(x, group) if group_size(group) > 1 else x


def reduce_from_tp(x, group):
    """Paper's `g`: all-reduce over TP forward; identity backward."""
    return _ReduceFromTP.apply(x, group) if group_size(group) > 1 else x


def scatter_to_tp(x, group):
    """Keep this rank's block of the last dim forward; all-gather the last dim backward."""
    return _ScatterToTP.apply(x, group) if group_size(group) > 1 else x


def gather_from_tp(x, group):
    """All-gather the last dim forward; keep this rank's block of the gradient backward."""
    return _GatherFromTP.apply(x, group) if group_size(group) > 1 else x


def gather_from_sp(x, group):
    """SP's `f-bar`: all-gather the sequence (dim 0) forward; reduce-scatter it backward."""
    return _GatherFromSP.apply(x, group) if group_size(group) > 1 else x


def reduce_scatter_to_sp(x, group):
    """SP's `g-bar`: reduce-scatter the sequence (dim 0) forward; all-gather it backward."""
    return _ReduceScatterToSP.apply(x, group) if group_size(group) > 1 else x


def scatter_to_sp(x, group):
    """Keep this rank's sequence block forward (no communication); all-gather the gradient backward."""
    return _ScatterToSP.apply(x, group) if group_size(group) > 1 else x
