"""AdamW with Megatron's parameter groups, the LR schedule, and gradient clipping across TP."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .tensor_parallel import tp_partition_dim

_NO_DECAY_NAMES = ("wte.weight", "wpe.weight")  # embeddings


def build_optimizer(model: nn.Module, o, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on LayerNorms, biases and embeddings (GPT-2 / Megatron practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name not in _NO_DECAY_NAMES else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=bool(o.fused and device.type == "cuda"))


def lr_at(step: int, o, total_steps: int) -> float:
    """Linear warmup to optim.lr over warmup_steps, then decay to optim.min_lr at total_steps."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_decay_style == "constant" or total_steps <= o.warmup_steps:
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / (total_steps - o.warmup_steps))
    if o.lr_decay_style == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - progress)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def grad_norm(model: nn.Module, tp_group: dist.ProcessGroup) -> torch.Tensor:
    """The global L2 norm of the full model's gradient.

    A TP-sharded parameter contributes each of its shards once (summed over the TP group); a replicated
    one, whose gradient is the same on every TP rank, once. DP replicas hold equal gradients after DDP."""
    sharded, replicated = [], []
    for p in model.parameters():
        if p.grad is not None:
            (sharded if tp_partition_dim(p) is not None else replicated).append(p.grad)

    def sq(grads):
        if not grads:
            return torch.zeros((), device=next(model.parameters()).device)
        return torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
    sharded_sq = sq(sharded)
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded_sq, group=tp_group)
    return (sharded_sq + sq(replicated)).sqrt()


def clip_grads(model: nn.Module, max_norm: float, norm: torch.Tensor) -> None:
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
