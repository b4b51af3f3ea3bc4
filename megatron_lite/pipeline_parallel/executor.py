"""Running one step of the schedule on this rank: its program of passes and exchanges (schedules.py).

`PipelineExecutor.forward_backward(batches, loss_scales, no_sync)` is the training loop's micro-batch loop at
every pipeline size -- at P = 1 the program is forward then backward of each micro-batch in turn (the
no-pipelining schedule) and has no exchanges, so PP = 1 and PP > 1 run the same code. `forward_only` is the
same for evaluation.

- Forward of (micro-batch i, chunk v): `forward(tokens, targets, positions=, document_ids=, hidden_SBH=x,
  chunk=v)` (a `data.packing.Batch`'s tensors) where x is the
  activation received from the previous virtual stage (None on the first); the last virtual stage returns
  the micro-batch's loss (the mean over its tokens), scaled by `loss_scales[i]` before its backward, as the
  trainer asks (per-token normalization lives in the trainer, not here). Every other stage returns its output
  activation, sent on, and keeps it with its graph until the backward.
- Backward of (i, v): `autograd.backward(output, gradient received from the next virtual stage)` (of the
  scaled loss on the last); the gradient of the received input is sent back.
- Gradient reduction over DP happens once: the forward and backward of the last micro-batch run outside
  `no_sync()` (DDP decides in forward, the distributed optimizer's hooks in backward), every other pass inside.

Every pass is recorded in `trace` as (pass, start, end) when `trace` is a list: the tests compare the order
with the papers' tables, and the benchmark replays the timeline.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .p2p import P2P
from .schedules import Compute, Exchange, build_programs


class PipelineExecutor:
    """This rank's part of the pipeline: its training and evaluation programs, and its p2p."""

    def __init__(self, forward, config, ctx, num_microbatches: int, schedule: str = "1f1b", virtual: int = 1,
                 dtype: torch.dtype = torch.float32):
        """`forward`: the model (or DDP around it, or compiled) of this stage; `config`: its GPTConfig (the
        shape of the activations between stages); `dtype`: theirs on the wire (the parameters' dtype)."""
        self.forward, self.config, self.ctx, self.dtype = forward, config, ctx, dtype
        self.m, self.P, self.V = num_microbatches, ctx.pp_size, virtual
        self.train_program = build_programs(schedule, self.P, virtual, num_microbatches)[ctx.pp_rank]
        self.eval_program = build_programs(schedule, self.P, virtual, num_microbatches, forward_only=True)[ctx.pp_rank]
        self.p2p = P2P(ctx)
        self.trace: list | None = None  # a list: every pass run is appended as (Compute, start, end)
        if self.P > 1:  # NCCL: batch_isend_irecv may open a group only if every rank of it takes part (torch's
            # docs); one all-reduce over the PP group (every stage builds its executor) opens it here
            dist.all_reduce(torch.zeros(1, device=ctx.device), group=ctx.pp_group)

    def forward_backward(self, batches: list, loss_scales: list[float],
                         no_sync=contextlib.nullcontext, autocast=contextlib.nullcontext()) -> list[torch.Tensor]:
        """One training step's forwards and backwards; the m unscaled, detached losses (last stage; [] on the
        others). The gradients are accumulated in the parameters' .grad."""
        return self._run(self.train_program, batches, loss_scales, no_sync, autocast)

    @torch.no_grad()
    def forward_only(self, batches, autocast=contextlib.nullcontext()) -> list[torch.Tensor]:
        """The forwards of m micro-batches (evaluation); their losses on the last stage, [] on the others."""
        return self._run(self.eval_program, batches, None, contextlib.nullcontext, autocast)

    def _is_last(self, chunk: int) -> bool:
        return self._virtual_stage(chunk) == self.P * self.V - 1

    def _run(self, program, batches, loss_scales, no_sync, autocast) -> list[torch.Tensor]:
        if len(batches) != self.m:
            raise ValueError(f"the pipeline was built for {self.m} micro-batches per step, got {len(batches)}")
        step = _Step(batches, loss_scales)
        for action in program:
            if isinstance(action, Exchange):
                self._exchange(action, step)
                continue
            t0 = time.perf_counter()
            sync = contextlib.nullcontext() if action.microbatch == self.m - 1 else no_sync()
            if action.op == "F":
                self._forward(action, step, sync, autocast)
            else:
                self._backward(action, step, sync)
            if self.trace is not None:
                self.trace.append((action, t0, time.perf_counter()))
        return [step.losses[i] for i in sorted(step.losses)]

    def _forward(self, a: Compute, step: _Step, sync, autocast) -> None:
        i, v, k = a.microbatch, a.chunk, self._virtual_stage(a.chunk)
        b = step.batches[i]  # a data.packing.Batch on this rank's device
        x_in = step.received.pop(("act", i, k), None)  # None on the first virtual stage
        with sync, autocast:
            out = self.forward(b.tokens, b.targets, **b.metadata(), hidden_SBH=x_in, chunk=v)
        if self._is_last(v):
            step.losses[i] = out.detach()
            out = out * step.loss_scales[i] if step.training else out
        else:
            step.outbox[("act", i, k)] = out.detach().to(self.dtype)
        if step.training:
            step.alive[(i, v)] = (x_in, out)

    def _backward(self, a: Compute, step: _Step, sync) -> None:
        i, v, k = a.microbatch, a.chunk, self._virtual_stage(a.chunk)
        x_in, out = step.alive.pop((i, v))
        grad = None if self._is_last(v) else step.received.pop(("grad", i, k)).to(out.dtype)
        with sync:
            torch.autograd.backward(out, grad)
        if k > 0:
            step.outbox[("grad", i, k)] = x_in.grad

    def _exchange(self, ex: Exchange, step: _Step) -> None:
        sends = [(msg, step.outbox.pop((msg.kind, msg.microbatch, msg.src))) for msg in ex.sends]
        recvs = [(msg, torch.empty(self._shape(step.batches[msg.microbatch].tokens), dtype=self.dtype,
                                   device=self.ctx.device)) for msg in ex.recvs]
        self.p2p.exchange(sends, recvs)
        for msg, buf in recvs:
            if msg.kind == "act" and step.training:
                buf.requires_grad_()  # a leaf: its .grad is what goes back to the previous stage
            step.received[(msg.kind, msg.microbatch, msg.dst)] = buf

    def _virtual_stage(self, chunk: int) -> int:
        return chunk * self.P + self.ctx.pp_rank

    def _shape(self, tokens: torch.Tensor) -> tuple[int, int, int]:
        """The activation between stages, [S, B, H]; under SP the sequence shard [S/T, B, H]."""
        B, S = tokens.shape
        if self.config.sequence_parallel:
            S //= self.ctx.tp_size
        return S, B, self.config.hidden_size


@dataclass
class _Step:
    """One step's micro-batches and what is in flight: keys (kind, micro-batch, virtual stage) for messages,
    (micro-batch, chunk) for the passes whose backward is still to come."""
    batches: list
    loss_scales: list[float] | None  # None: forward only
    received: dict = field(default_factory=dict)  # messages that arrived, until their pass uses them
    outbox: dict = field(default_factory=dict)  # outputs and input gradients, until their exchange
    alive: dict = field(default_factory=dict)  # (input, output) kept for the backward
    losses: dict = field(default_factory=dict)  # micro-batch -> its loss (last stage)

    @property
    def training(self) -> bool:
        return self.loss_scales is not None


def in_flight_max(trace: list) -> int:
    """The most micro-batches whose activations this rank held at once (forwards run, backwards not yet)."""
    held = peak = 0
    for action, *_ in trace:
        held += 1 if action.op == "F" else -1
        peak = max(peak, held)
    return peak
