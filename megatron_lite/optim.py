"""AdamW with Megatron's parameter groups, the LR schedule, gradient finalization, norm and clipping.

`build_optimizer` returns one of two optimizers with the same interface, so the training loop is the same:

- `parallel.zero=0`, `Optimizer`: torch's AdamW over the whole local model (every DP rank keeps all of its
  state); DDP averages the gradients over DP during the last micro-batch's backward.
- `parallel.zero=1`, `distributed_optimizer.DistributedOptimizer`: each DP rank keeps and updates 1/DP of it.

The interface (Megatron-Core's `MegatronOptimizer`): `module` (what the loop calls forward on), `no_sync()`
(around every micro-batch but the last), `prepare_grads()` (finalize the gradients, return the global norm),
`step()` (prepare_grads if the loop has not, clip, update; returns the norm), `zero_grad()`, `param_groups`
(the loop sets each group's "lr"), `state_bytes()`, and `full_state()` (AdamW's state per parameter, whole;
checkpoint.py saves zero=0's live tensors, and zero=1's owned ranges in place: checkpoint_shards.py).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .tensor_parallel import all_reduce_coalesced, replicated_params, tp_partition_dim

_NO_DECAY_NAMES = ("wte.weight", "wpe.weight")  # embeddings


def param_groups(model: nn.Module, o) -> list[dict]:
    """No weight decay on norms, biases and embeddings (GPT-2 / Megatron practice): by name for biases, whatever
    their shape (SwiGLU's fused gate/up bias is 2-D), and the embeddings; by shape (1-D) for the norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exempt = p.dim() < 2 or name.endswith("bias") or name in _NO_DECAY_NAMES
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, o, ctx, zero: int = 0, **kwargs):
    """AdamW for `model` on the grid `ctx`: replicated over DP (zero=0) or distributed over DP (zero=1).
    `kwargs` go to DistributedOptimizer (bucket size, overlap switches)."""
    if zero == 1:
        from .distributed_optimizer import DistributedOptimizer
        return DistributedOptimizer(model, o, ctx, **kwargs)
    return Optimizer(model, o, ctx)


def warmup_steps(o, total_steps: int) -> int:
    """optim.warmup_fraction of the run when it is set, else optim.warmup_steps."""
    return o.warmup_steps if o.warmup_fraction is None else round(o.warmup_fraction * total_steps)


def lr_at(step: int, o, total_steps: int) -> float:
    """Linear warmup to optim.lr over the warmup steps, then decay to optim.min_lr at total_steps."""
    warmup = warmup_steps(o, total_steps)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    if o.lr_decay_style == "constant" or total_steps <= warmup:
        return o.lr
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    if o.lr_decay_style == "linear":
        return o.min_lr + (o.lr - o.min_lr) * (1 - progress)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def finalize_model_grads(model: nn.Module, replicated_grads: list[torch.Tensor] | None = None,
                         embedding_grads: list[torch.Tensor] | None = None) -> None:
    """The TP and PP parts of Megatron-Core's `finalize_model_grads`, run once per optimizer step after the
    last backward (the optimizers call it from `prepare_grads`, after their DP reduction).

    Under sequence parallelism each TP rank's gradient of a replicated parameter (LayerNorm weights and
    biases, row-parallel biases, position embeddings) covers only its own tokens: they are summed over TP,
    all of them in one all-reduce. Summing after gradient accumulation and after the DP average gives the
    same sum as summing each micro-batch's. `replicated_grads`: the gradients to sum (default: every
    replicated parameter's .grad; the distributed optimizer passes the parts of them this rank owns).

    Under pipeline parallelism a tied word embedding has a copy on the first stage (the input embedding)
    and one on the last (the output layer): their gradients are summed over the embedding group, so both
    copies take the same update (Megatron's `_allreduce_word_embedding_grads`). `embedding_grads`: the parts
    of it to sum (default: the whole .grad; the distributed optimizer passes the part this rank owns, the same
    range on both stages)."""
    if model.config.sequence_parallel and model.ctx.tp_size > 1:
        if replicated_grads is None:
            replicated_grads = [p.grad for p in replicated_params(model) if p.grad is not None]
        all_reduce_coalesced(replicated_grads, model.ctx.tp_group)
    tied = model.tied_embedding()
    if tied is not None:
        all_reduce_coalesced([tied.grad] if embedding_grads is None else embedding_grads, model.ctx.embedding_group)


def grad_norm(grads: list[tuple[torch.Tensor, bool]], tp_group: dist.ProcessGroup,
              dp_group: dist.ProcessGroup | None = None, pp_group: dist.ProcessGroup | None = None, *,
              device: torch.device) -> torch.Tensor:
    """The global L2 norm of the full model's gradient, from (gradient, is TP-sharded) pairs.

    A TP-sharded gradient contributes each of its shards once (summed over the TP group); a replicated one,
    the same on every TP rank, once. `dp_group`: the gradients are DP shards (the distributed optimizer's),
    summed over DP too; without it they are equal on every DP rank (DDP's average). `pp_group`: each stage
    holds its own layers, summed over the stages (the caller leaves out copies of another stage's parameters,
    such as the last stage's tied embedding). `device`: where the sums live, also on a rank with no gradient to
    contribute (its zeros go through NCCL on a GPU)."""

    def sq(gs):
        if not gs:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm(gs)).float().pow(2).sum()
    sharded_sq = sq([g for g, sharded in grads if sharded])
    if dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded_sq, group=tp_group)
    total = sharded_sq + sq([g for g, sharded in grads if not sharded])
    for group in (dp_group, pp_group):
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_coefficient(max_norm: float, norm: torch.Tensor) -> torch.Tensor:
    """torch.nn.utils.clip_grads_with_norm_'s scale: max_norm / (norm + 1e-6), at most 1."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def init_adam_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's (lazily created) state now, as its first step would: its bytes are known from the start,
    and DCP can load a checkpoint into it in place."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                on_device = group.get("fused") or group.get("capturable")
                opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


class Optimizer:
    """parallel.zero=0: torch's AdamW over the whole local model, its state replicated over DP; DDP averages
    the gradients over the DP group during the last micro-batch's backward (in buckets, overlapped).

    Under pipeline parallelism (PP > 1) there is no DDP: DDP decides in forward whether the next backward
    reduces, and in 1F1B the last micro-batch's forward is followed by other micro-batches' backwards. The
    gradients are averaged over DP in `prepare_grads`, in one all-reduce after the schedule (Megatron-Core
    has its own DDP for this reason; parallel.zero=1, whose hooks decide in backward, overlaps)."""

    def __init__(self, model: nn.Module, o, ctx):
        self.model, self.ctx, self.grad_clip = model, ctx, o.grad_clip
        # the DP x CP group: every CP rank holds the same weights, and its gradient covers its own tokens
        # gradient_as_bucket_view: the gradients are views of DDP's buckets, not a second copy (4 B/param);
        # no buffer broadcast before every forward: the model's buffers (RoPE frequencies) are computed, equal
        # on every rank (torch 2.13's name for broadcast_buffers=False)
        self.ddp = ctx.dp_cp_size > 1 and ctx.pp_size == 1
        self.module = DDP(model, process_group=ctx.dp_cp_group, gradient_as_bucket_view=True,
                          forward_sync_buffers=False) if self.ddp else model
        self.adamw = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                       fused=bool(o.fused and ctx.device.type == "cuda"))
        init_adam_state(self.adamw)
        self.param_groups = self.adamw.param_groups
        self._norm = None  # the norm of the finalized gradients of this step

    def no_sync(self):
        return self.module.no_sync() if self.ddp else contextlib.nullcontext()

    def prepare_grads(self) -> torch.Tensor:
        """Finalize the gradients (DDP has averaged them over DP by the end of backward; sum the SP-replicated
        ones over TP) and return their global norm. Once per step; `step()` calls it if the loop did not."""
        if self._norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if not self.ddp and self.ctx.dp_cp_size > 1:  # PP > 1: DDP's average, after the schedule
                self._dp_average(grads)
            finalize_model_grads(self.model)
            copies = self.model.tied_copies()
            self._norm = grad_norm([(p.grad, tp_partition_dim(p) is not None) for n, p in self.model.named_parameters()
                                    if p.grad is not None and n not in copies], self.ctx.tp_group,
                                   pp_group=self.ctx.pp_group, device=self.ctx.device)
        return self._norm

    def _dp_average(self, grads: list[torch.Tensor], bucket_bytes: int = 25 * 2**20) -> None:
        """Average over DP x CP in buckets of about DDP's size (one flat copy of a bucket at a time)."""
        torch._foreach_div_(grads, self.ctx.dp_cp_size)  # before the sum, as DDP does
        bucket, size = [], 0
        for k, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes or k == len(grads) - 1:
                all_reduce_coalesced(bucket, self.ctx.dp_cp_group)
                bucket, size = [], 0

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        norm = self.prepare_grads()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, norm)
        self.adamw.step()
        self._norm = None
        return norm

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)
        self._norm = None

    def state_bytes(self) -> int:
        """Bytes of AdamW's moments on this rank."""
        return sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in self.adamw.state.values())

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {exp_avg, exp_avg_sq, step}: the live state tensors (a checkpoint loads into them in place)."""
        return {n: self.adamw.state[p] for n, p in self.model.named_parameters()}
