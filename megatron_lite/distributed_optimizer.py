"""The distributed optimizer: AdamW's state sharded over the DP group (ZeRO stage 1), as Megatron-Core lays it out.

Rajbhandari et al. 2020 (ZeRO, arXiv 1910.02054), stage 1 (P_os, optimizer-state partitioning): each DP rank
keeps and updates the AdamW moments of 1/DP of the parameters, so fp32 training holds 4 (weights) + 4 (grads)
+ 8/DP (moments) bytes per local parameter instead of 16. The layout is Megatron-Core's distributed optimizer
(`megatron/core/distributed/param_and_grad_buffer.py`, `megatron/core/optimizer/distrib_optimizer.py`):

- Every parameter this rank holds (its TP shard, of any shape) is a view into one flat fp32 parameter buffer,
  and its gradient a view into a flat fp32 gradient buffer of the same layout: autograd accumulates into it
  in place, micro-batch after micro-batch.
- The buffers are cut into buckets of about `bucket_bytes`, parameters taken in reverse order (roughly the
  order backward produces their gradients). Each bucket is padded to a multiple of DP and split into DP equal
  contiguous shards: DP rank d owns shard d of every bucket. A parameter may straddle shards, and a small one
  may have no element on some rank. The TP ranks of one DP rank hold same-shaped shards of the model, so
  they have the same layout and own the same ranges.
- On the last micro-batch, once every gradient of a bucket has been accumulated, the bucket is divided by DP
  and reduce-scattered (SUM) over DP, asynchronously, while backward goes on (as DDP does with its
  all-reduce): each rank receives the DP average of its shard. `prepare_grads` waits for them, sums the
  SP-replicated gradients of its shard over TP (`optim.finalize_model_grads`: one all-reduce) and takes the
  global norm, each element counted once across DP and TP.
- `step()` clips the shard, runs torch's own functional AdamW (the implementation torch.optim.AdamW would
  pick) on views of the owned parts of each parameter, weight-decay groups kept -- AdamW is elementwise, so
  the numbers are torch.optim.AdamW's -- and all-gathers each bucket's updated shards over DP into the
  parameter buffer, i.e. into the model's weights (overlapping the next bucket's update).

A reduce-scatter plus an all-gather of the P/T local elements move the same logical bytes as DDP's one
all-reduce (ZeRO section 7); on gloo a reduce-scatter runs a whole all-reduce underneath, so on CPU the
gain is memory only.

Checkpoints stay layout-free: `full_state()` all-gathers the moments over DP into full per-parameter tensors
laid out like the parameters, what zero=0 holds, so DCP writes the same global tensors whatever `zero` and
the layout; `load_full_state()` keeps this rank's ranges of what was loaded. (While a checkpoint is saved or
loaded this rank holds the full moments, 8 bytes per local parameter, as zero=0 does all the time.)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.adamw import adamw

from .optim import clip_coefficient, finalize_model_grads, grad_norm, param_groups
from .tensor_parallel import tp_partition_dim

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb, so zero=0 and zero=1 overlap alike


@dataclass
class Segment:
    """The part of one parameter that lies in this rank's shard of a bucket: elements [start, end) of the
    flattened parameter, with views of it in the parameter, gradient and AdamW state buffers."""
    name: str
    param: nn.Parameter
    start: int
    end: int
    data: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # AdamW's step count, one tensor per segment as torch keeps one per parameter


class Bucket:
    """Parameters [offset, offset + numel) of the flat buffers (numel a multiple of DP), and their collectives."""

    def __init__(self, params: list[tuple[str, nn.Parameter, int]], offset: int, numel: int, dp: int, dp_rank: int):
        self.params = params  # (name, parameter, offset in the flat buffers)
        self.offset, self.numel = offset, numel
        self.shard_numel = numel // dp
        self.shard_offset = offset + dp_rank * self.shard_numel  # this rank's shard in the flat buffers
        self.ready: set[int] = set()  # ids of the parameters whose gradient is complete (last micro-batch)
        self.launched = False  # its reduce-scatter has been issued (this step)
        self.work = None  # the reduce-scatter in flight (None at DP=1: nothing to reduce)


class DistributedOptimizer:
    """AdamW whose state is split over the DP group of `ctx` (ZeRO-1); see the module docstring.

    `overlap_grad_reduce`: reduce-scatter each bucket as soon as its gradients are ready during the last
    backward (else all of them after backward). `overlap_param_gather`: all-gather each bucket while the next
    one is updated (else after the whole update)."""

    def __init__(self, model: nn.Module, o, ctx, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = True):
        self.model, self.ctx, self.grad_clip = model, ctx, o.grad_clip
        self.module = model  # no DDP wrapper: this optimizer's hooks reduce the gradients
        self.dp_group, self.dp = ctx.dp_cp_group, ctx.dp_cp_size  # every CP rank holds the same weights
        self.overlap_grad_reduce, self.overlap_param_gather = overlap_grad_reduce, overlap_param_gather
        self.fused = bool(o.fused and ctx.device.type == "cuda")
        self.betas, self.eps = (o.beta1, o.beta2), o.eps
        self.param_groups = [{**g, "lr": o.lr} for g in param_groups(model, o)]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for n, p in named:
            if p.dtype != torch.float32:
                raise TypeError(f"parallel.zero=1 keeps fp32 parameters (bf16 runs under autocast); {n} is {p.dtype}")
        # PP > 1 with a tied embedding: its two copies (first and last stage) each in a bucket of their own, so
        # that the same DP rank owns the same range of both and their gradient shards can be summed
        tied = model.tied_embedding()
        self.buckets = self._make_buckets(named[::-1], bucket_bytes, alone={id(tied)} if tied is not None else set())
        total = sum(b.numel for b in self.buckets)
        self.param_buffer = torch.zeros(total, dtype=torch.float32, device=ctx.device)
        self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=ctx.device)
        self.exp_avg = torch.zeros(total // self.dp, dtype=torch.float32, device=ctx.device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.num_steps = 0
        self.segments: list[list[Segment]] = []  # per bucket: the owned parts of its parameters
        self._grad_views: dict[nn.Parameter, torch.Tensor] = {}  # the gradient buffer views, per parameter
        group_of = {id(p): k for k, g in enumerate(self.param_groups) for p in g["params"]}
        state_offset = 0
        for b in self.buckets:
            for name, p, offset in b.params:
                data = self.param_buffer[offset:offset + p.numel()].view_as(p)
                data.copy_(p.data)
                p.data = data  # the model's weights live in the buffer from now on
                p.grad = self._grad_views[p] = self.grad_buffer[offset:offset + p.numel()].view_as(p)
                p.register_post_accumulate_grad_hook(lambda param, b=b: self._grad_ready(b, param))
            self.segments.append(self._owned_segments(b, state_offset))
            state_offset += b.shard_numel
        self._segments_by_group = [[[s for s in segs if group_of[id(s.param)] == k]
                                    for k in range(len(self.param_groups))] for segs in self.segments]
        # the parts of the TP-replicated parameters' gradients this rank owns: finalize sums them over TP
        self.replicated_grad_shards = [s.grad for segs in self.segments for s in segs
                                       if tp_partition_dim(s.param) is None]
        # the part of a tied embedding's gradient this rank owns (the same range on the first and last stage)
        self.embedding_grad_shards = [s.grad for segs in self.segments for s in segs if s.param is tied]
        self.copies = set(model.tied_copies())  # left out of the norm: counted once, on the first stage
        self._sync, self._next_bucket, self._norm = True, 0, None

    def _make_buckets(self, named: list[tuple[str, nn.Parameter]], bucket_bytes: int, alone: set[int]) -> list[Bucket]:
        """Buckets of about `bucket_bytes`, in the given order; the parameters in `alone` (ids) get their own."""
        buckets, current, offset, size = [], [], 0, 0
        for k, (name, p) in enumerate(named):
            current.append((name, p, offset + size))
            size += p.numel()
            nxt = named[k + 1][1] if k + 1 < len(named) else None
            if size * 4 >= bucket_bytes or nxt is None or id(p) in alone or id(nxt) in alone:
                numel = math.ceil(size / self.dp) * self.dp  # padded: DP equal shards
                buckets.append(Bucket(current, offset, numel, self.dp, self.ctx.dp_cp_rank))
                current, offset, size = [], offset + numel, 0
        return buckets

    def _owned_segments(self, b: Bucket, state_offset: int) -> list[Segment]:
        """The parts of b's parameters inside this rank's shard, with views into the buffers and the state."""
        lo, hi = b.shard_offset, b.shard_offset + b.shard_numel
        out = []
        for name, p, offset in b.params:
            start, end = max(lo, offset), min(hi, offset + p.numel())
            if start >= end:
                continue  # none of this parameter is ours
            state = slice(state_offset + start - lo, state_offset + end - lo)
            step_device = self.ctx.device if self.fused else "cpu"  # where torch.optim.AdamW keeps it
            out.append(Segment(name, p, start - offset, end - offset, self.param_buffer[start:end],
                               self.grad_buffer[start:end], self.exp_avg[state], self.exp_avg_sq[state],
                               torch.zeros((), dtype=torch.float32, device=step_device)))
        return out

    # ---- gradients: bucketed reduce-scatter over DP during the last backward --------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without reducing them (every micro-batch but the last)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _grad_ready(self, b: Bucket, param: nn.Parameter) -> None:
        if param.grad is not self._grad_views[param]:  # something replaced .grad: move it into the buffer
            self._grad_views[param].copy_(param.grad)
            param.grad = self._grad_views[param]
        if not self._sync:
            return
        if b.launched:
            raise RuntimeError("a gradient was accumulated after its bucket was reduce-scattered: call "
                               "zero_grad() after each step, and no_sync() around all but the last micro-batch")
        b.ready.add(id(param))
        if self.overlap_grad_reduce:
            self._launch_grad_reduce(only_ready=True)

    def _launch_grad_reduce(self, only_ready: bool) -> None:
        """Reduce-scatter the buckets in order (the same order on every DP rank), from the first not yet
        launched: only the complete ones, or all of them."""
        while self._next_bucket < len(self.buckets):
            b = self.buckets[self._next_bucket]
            if only_ready and len(b.ready) < len(b.params):
                return
            if self.dp > 1:
                grads = self.grad_buffer[b.offset:b.offset + b.numel]
                grads.div_(self.dp)  # DDP's average (before the SUM, as DDP does; gloo has no ReduceOp.AVG)
                shard = self.grad_buffer[b.shard_offset:b.shard_offset + b.shard_numel]
                b.work = dist.reduce_scatter_single(shard, grads, group=self.dp_group, async_op=True)
            b.launched = True
            self._next_bucket += 1

    def prepare_grads(self) -> torch.Tensor:
        """Megatron-Core's finalize_model_grads, then the global norm: wait for every bucket's reduce-scatter
        (launching those backward did not complete), sum the SP-replicated gradients of this rank's shard over
        TP in one all-reduce, and return the norm of the full gradient. Once per step; `step()` calls it if
        the loop did not."""
        if self._norm is None:
            self._launch_grad_reduce(only_ready=False)
            for b in self.buckets:
                if b.work is not None:
                    b.work.wait()
                    b.work = None
            finalize_model_grads(self.model, self.replicated_grad_shards, self.embedding_grad_shards)
            grads = [(s.grad, tp_partition_dim(s.param) is not None) for segs in self.segments for s in segs
                     if s.name not in self.copies]
            self._norm = grad_norm(grads, self.ctx.tp_group, self.dp_group, self.ctx.pp_group)
        return self._norm

    # ---- the update: AdamW on the owned shard, then all-gather of the parameters ----------------------------

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Clip this rank's gradient shards to the global norm, update its parameter shards with AdamW, and
        all-gather every bucket's parameters over DP. Returns the norm (before clipping)."""
        norm = self.prepare_grads()
        shards = [self.grad_buffer[b.shard_offset:b.shard_offset + b.shard_numel] for b in self.buckets]
        if self.grad_clip > 0:
            torch._foreach_mul_(shards, clip_coefficient(self.grad_clip, norm))
        works = []
        for b, by_group in zip(self.buckets, self._segments_by_group):
            for group, segs in zip(self.param_groups, by_group):
                if segs:
                    adamw([s.data for s in segs], [s.grad for s in segs], [s.exp_avg for s in segs],
                          [s.exp_avg_sq for s in segs], [], [s.step for s in segs], fused=self.fused,
                          amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=group["lr"],
                          weight_decay=group["weight_decay"], eps=self.eps, maximize=False)
            if self.dp > 1:
                params = self.param_buffer[b.offset:b.offset + b.numel]
                mine = self.param_buffer[b.shard_offset:b.shard_offset + b.shard_numel]
                works.append(dist.all_gather_single(params, mine, group=self.dp_group,
                                                    async_op=self.overlap_param_gather))
        for work in works:
            if work is not None:
                work.wait()
        self.num_steps += 1
        self._norm = None
        return norm

    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        for p, view in self._grad_views.items():
            p.grad = view
        for b in self.buckets:
            b.ready.clear()
            b.launched = False
        self._next_bucket, self._norm = 0, None

    # ---- state: its size, and checkpoints in the layout-free format ------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of AdamW's moments on this rank: 8 x (local parameters + padding) / DP."""
        return self.exp_avg.nbytes + self.exp_avg_sq.nbytes

    def full_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """name -> {exp_avg, exp_avg_sq, step}: the moments of every local parameter, whole and laid out like
        it, all-gathered over DP (collective); what zero=0 keeps, so the checkpoint is the same."""
        full = {}
        for key, state in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat = torch.empty_like(self.param_buffer)
            state_offset = 0
            for b in self.buckets:
                mine = state[state_offset:state_offset + b.shard_numel]
                bucket = flat[b.offset:b.offset + b.numel]
                if self.dp > 1:
                    dist.all_gather_single(bucket, mine, group=self.dp_group)
                else:
                    bucket.copy_(mine)
                state_offset += b.shard_numel
            full[key] = flat
        out = {}
        for b in self.buckets:
            for name, p, offset in b.params:
                out[name] = {key: full[key][offset:offset + p.numel()].view_as(p) for key in full}
                out[name]["step"] = torch.tensor(float(self.num_steps),
                                                 device=self.ctx.device if self.fused else "cpu")
        return out

    def load_full_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Keep this rank's ranges of the full moments (as `full_state()` lays them out) and the step count."""
        steps = {float(s["step"]) for s in state.values()}
        if len(steps) != 1:
            raise ValueError(f"the AdamW step counts of the parameters differ ({sorted(steps)}): not one optimizer's")
        self.num_steps = int(steps.pop())
        for segs in self.segments:
            for s in segs:
                s.exp_avg.copy_(state[s.name]["exp_avg"].reshape(-1)[s.start:s.end])
                s.exp_avg_sq.copy_(state[s.name]["exp_avg_sq"].reshape(-1)[s.start:s.end])
                s.step.fill_(self.num_steps)
