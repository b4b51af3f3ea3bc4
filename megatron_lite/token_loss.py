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
    """The mean of a scalar over the DP x CP ranks (each holds the losses of its own tokens); a loss computed on
    the last pipeline stage (zero on the others) is first summed over the PP group."""
    value = value.detach().float().clone()
    if ctx.pp_size > 1:
        dist.all_reduce(value, group=ctx.pp_group)
    if ctx.dp_cp_size > 1:
        dist.all_reduce(value, group=ctx.dp_cp_group)
    return value.item() / ctx.dp_cp_size


def forward_backward(pipeline, opt, batches: list, ctx, autocast) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of one step through the pipeline schedule
    (pipeline_parallel.PipelineExecutor: at PP = 1 each micro-batch in turn), each loss scaled by w_m / M; the
    gradients are reduced over DP x CP once, at the end. Returns sum_m l_m w_m on the last stage, 0 on the
    others (the step's loss is its mean over the DP x CP ranks, divided by M)."""
    accum = len(batches)
    weights, _ = token_weights([count_targets(b.targets) for b in batches], ctx)  # counted before the forward
    losses = pipeline.forward_backward([b.to(ctx.device) for b in batches], [w / accum for w in weights],
                                       opt.no_sync, autocast)
    return sum((loss * w for loss, w in zip(losses, weights)), torch.zeros((), device=ctx.device))


@torch.no_grad()
def mean_loss(pipeline, batches: list, ctx, autocast) -> tuple[float, int]:
    """(the mean loss over the counted targets of this rank's `batches` and those of every other DP x CP rank,
    how many targets that is): evaluation through the pipeline's forwards, weighted as a training step is."""
    weights, count = token_weights([count_targets(b.targets) for b in batches], ctx)
    losses = pipeline.forward_only([b.to(ctx.device) for b in batches], autocast)
    total = sum((loss * w for loss, w in zip(losses, weights)), torch.zeros((), device=ctx.device))
    return dp_cp_mean(total / len(batches), ctx), count
