"""Running one step of the schedule on this rank: its program of passes and exchanges (schedules.py).

`PipelineExecutor.forward_backward(batches, loss_scales, no_sync)` is the training loop's micro-batch loop at
every pipeline size -- at P = 1 the program is forward then backward of each micro-batch in turn (the
no-pipelining schedule) and has no exchanges, so PP = 1 and PP > 1 run the same code. `forward_only` is the
same for evaluation.

- Forward of (micro-batch i, chunk v): `forward(tokens, targets, hidden_SBH=x, chunk=v)` where x is the
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

import torch

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

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_scales: list[float],
                         no_sync=contextlib.nullcontext, autocast=contextlib.nullcontext()) -> list[torch.Tensor]:
        """One training step's forwards and backwards; the m unscaled, detached losses (last stage; [] on the
        others). The gradients are accumulated in the parameters' .grad."""
        return self._run(self.train_program, batches, loss_scales, no_sync, autocast)

    @torch.no_grad()
    def forward_only(self, batches, autocast=contextlib.nullcontext()) -> list[torch.Tensor]:
        """The forwards of m micro-batches (evaluation); their losses on the last stage, [] on the others."""
        return self._run(self.eval_program, batches, None, contextlib.nullcontext, autocast)

    def _is_last(self, chunk: int) -> bool:
        return chunk * self.P + self.ctx.pp_rank == self.P * self.V - 1

    def _run(self, program, batches, loss_scales, no_sync, autocast) -> list[torch.Tensor]:
        if len(batches) != self.m:
            raise ValueError(f"the pipeline was built for {self.m} micro-batches per step, got {len(batches)}")
        training = loss_scales is not None
        received: dict[tuple[str, int, int], torch.Tensor] = {}  # (kind, micro-batch, virtual stage) -> tensor
        alive: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}  # (i, v) -> (input, output)
        outbox: dict[tuple[str, int, int], torch.Tensor] = {}  # (kind, micro-batch, virtual stage) -> to send
        losses = {}
        for action in program:
            if isinstance(action, Exchange):
                self._exchange(action, batches, outbox, received, training)
                continue
            i, v = action.microbatch, action.chunk
            k = v * self.P + self.ctx.pp_rank
            sync = contextlib.nullcontext() if i == self.m - 1 else no_sync()
            t0 = time.perf_counter()
            if action.op == "F":
                tokens, targets = batches[i]
                x_in = received.pop(("act", i, k), None)
                with sync, autocast:
                    out = self.forward(tokens, targets, hidden_SBH=x_in, chunk=v)
                if self._is_last(v):
                    losses[i] = out.detach()
                    if training:
                        alive[(i, v)] = (x_in, out * loss_scales[i])
                else:
                    outbox[("act", i, k)] = out.detach().to(self.dtype)
                    if training:
                        alive[(i, v)] = (x_in, out)
            else:
                x_in, out = alive.pop((i, v))
                grad = None if self._is_last(v) else received.pop(("grad", i, k)).to(out.dtype)
                with sync:
                    torch.autograd.backward(out, grad)
                if k > 0:
                    outbox[("grad", i, k)] = x_in.grad
            if self.trace is not None:
                self.trace.append((action, t0, time.perf_counter()))
        return [losses[i] for i in sorted(losses)]

    def _exchange(self, ex: Exchange, batches, outbox, received, training: bool) -> None:
        sends = [(msg, outbox.pop((msg.kind, msg.microbatch, msg.src))) for msg in ex.sends]
        recvs = []
        for msg in ex.recvs:
            buf = torch.empty(self._shape(batches[msg.microbatch][0]), dtype=self.dtype, device=self.ctx.device)
            recvs.append((msg, buf))
        self.p2p.exchange(sends, recvs)
        for msg, buf in recvs:
            if msg.kind == "act" and training:
                buf.requires_grad_()  # a leaf: its .grad is what goes back to the previous stage
            received[(msg.kind, msg.microbatch, msg.dst)] = buf

    def _shape(self, tokens: torch.Tensor) -> tuple[int, int, int]:
        """The activation between stages, [S, B, H]; under SP the sequence shard [S/T, B, H]."""
        B, S = tokens.shape
        if self.config.sequence_parallel:
            S //= self.ctx.tp_size
        return S, B, self.config.hidden_size


def in_flight_max(trace: list) -> int:
    """The most micro-batches whose activations this rank held at once (forwards run, backwards not yet)."""
    held = peak = 0
    for action, *_ in trace:
        held += 1 if action.op == "F" else -1
        peak = max(peak, held)
    return peak


__all__ = ["PipelineExecutor", "Compute", "in_flight_max"]
