"""Per-token loss normalization (Megatron-Core's `calculate_per_token_loss`).

The step's gradient is the gradient of the mean loss over every counted target of the step -- all micro-batches,
all DP and CP ranks -- not the mean of the micro-batches' means, which weighs a token by one over the count of
its micro-batch and so changes with the layout when masks make the counts differ (chat data: only the
assistant's tokens count).

The model returns a micro-batch's mean over its own counted targets, l_m = S_m / n_m. The trainer counts the
targets n_m of each of its M micro-batches before the forward, sums them over the G = DP x CP ranks that reduce
the gradients (one small all-reduce per step) into N, and back-propagates l_m * w_m / M with

    w_m = n_m * M * G / N.

DDP (or the distributed optimizer) averages the gradients over the G ranks, so the step's gradient is
sum over ranks and micro-batches of n_m grad(l_m) / N = grad(sum of S / N), and the logged loss, the mean over
ranks of sum_m l_m w_m / M, is sum S / N. With the same count everywhere, n_m M G = N in integers and w_m = 1.0
exactly: the plain-text path computes what it computed before, bit for bit. `forward_backward` is the step's
micro-batch loop that applies it, `mean_loss` the same mean for evaluation.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def count_targets(targets: torch.Tensor) -> int:
    """The targets the loss counts (not -100); on the host tensor, before it goes to the device."""
    return int((targets != -100).sum())


def token_weights(counts: list[int], ctx) -> tuple[list[float], int]:
    """(w_m of each of this rank's micro-batches, N) from their target counts n_m (collective over the DP x CP
    group)."""
    total = torch.tensor([sum(counts)], dtype=torch.int64, device=ctx.device)
    if ctx.dp_cp_size > 1:
        dist.all_reduce(total, group=ctx.dp_cp_group)
    N, MG = int(total.item()), len(counts) * ctx.dp_cp_size
    return [n * MG / N if N else 0.0 for n in counts], N


def dp_cp_mean(value: torch.Tensor, ctx) -> float:
    """The mean of a scalar over the DP x CP ranks (each holds the losses of its own tokens)."""
    value = value.detach().float().clone()
    if ctx.dp_cp_size > 1:
        dist.all_reduce(value, group=ctx.dp_cp_group)
    return value.item() / ctx.dp_cp_size


def forward_backward(forward, opt, batches: list, ctx, autocast) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of one step (the trainer's loop), each loss scaled by
    w_m / M; the gradients are reduced over DP once, during the last backward. Returns sum_m l_m w_m (the step's
    loss is its mean over the DP x CP ranks, divided by M)."""
    accum = len(batches)
    loss_sum = torch.zeros((), device=ctx.device)
    weights, _ = token_weights([count_targets(b.targets) for b in batches], ctx)  # counted before the forward
    for micro, (batch, weight) in enumerate(zip(batches, weights)):
        b = batch.to(ctx.device)
        sync = micro == accum - 1  # reduce over DP once, on the last micro-batch
        with (contextlib.nullcontext() if sync else opt.no_sync()), autocast:
            loss = forward(b.tokens, b.targets, **b.metadata())
            (loss * weight / accum).backward()
        loss_sum += loss.detach() * weight
    return loss_sum


@torch.no_grad()
def mean_loss(model, batches: list, ctx, autocast) -> tuple[float, int]:
    """(the mean loss over the counted targets of this rank's `batches` and those of every other DP x CP rank,
    how many targets that is): evaluation, weighted as a training step is."""
    total = torch.zeros((), device=ctx.device)
    weights, count = token_weights([count_targets(b.targets) for b in batches], ctx)
    for batch, weight in zip(batches, weights):
        b = batch.to(ctx.device)
        with autocast:
            total += model(b.tokens, b.targets, **b.metadata()) * weight
    return dp_cp_mean(total / len(batches), ctx), count
