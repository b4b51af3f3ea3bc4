"""Ring attention (Liu et al. 2023, arXiv 2310.01889; Megatron-Core's context parallelism): causal attention
over a sequence split across the CP ranks, K/V blocks passed around the ring.

Forward, on CP rank r with C ranks: at step i it holds the keys and values of rank (r - i) mod C; it posts the
send of that block to rank r+1 and the receive of the next one from rank r-1 (torch.distributed's
batch_isend_irecv), computes its queries against the block it holds while they travel, merges the partial
output by its log-sum-exp (kernels.merge_), and waits. C-1 K/V blocks go out per layer. With grouped-query
attention only the G/T KV heads of this rank travel, never the repeated ones.

Backward runs the ring again: K/V travel as in forward, each rank adds its share of dK/dV for the block it
holds to an accumulator that travels one step behind the block, so the accumulator for block j starts at rank
j+1, visits every other rank and arrives home at rank j after C-1 hops, where j's own share is added:
C-1 K/V blocks and C-1 dK/dV blocks (float32) go out per layer. dQ stays at home. Saved for backward: the
local q, k, v, the output and the log-sum-exp; no attention matrix, no other rank's K/V.

Which query/key pairs of a block are computed, and with which mask, is the plan's (plan.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..hang import waiting_in_p2p
from . import kernels
from .plan import Ring, RingPlan

_KV_TAG, _DKV_TAG = 0, 1  # K/V blocks and gradient accumulators are separate streams on the same links


class _Exchange:
    """One send to the next rank and one receive from the previous one, in flight."""

    def __init__(self, ring: Ring, send: torch.Tensor, tag: int, what: str):
        self.send, self.recv = send, torch.empty_like(send)
        self.ring, self.what = ring, what
        self.works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, group=ring.group, tag=tag, group_peer=ring.next),
            dist.P2POp(dist.irecv, self.recv, group=ring.group, tag=tag, group_peer=ring.prev)])

    def wait(self) -> torch.Tensor:
        r = self.ring
        with waiting_in_p2p(f"recv of {self.what} ({self.recv.numel() * self.recv.element_size():,} bytes) from rank "
                            f"{r.ranks[r.prev]} over CP ranks {r.ranks} (ring attention)"):
            for w in self.works:
                w.wait()
        return self.recv


def ring_attention(q_BNSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Causal (or document-masked) attention of this rank's queries over every CP rank's keys and values.

    q `[B, Nt, S/C, D]`, k and v `[B, Gt, S/C, D]` (this rank's tokens, this TP rank's heads); returns
    `[B, Nt, S/C, D]`, laid out in memory as `[S/C, B, Nt, D]` so that the output projection's input is a view."""
    return _RingAttention.apply(q_BNSD, k_BGSD, v_BGSD, plan)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        out, lse, aux = _forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.aux = plan, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.plan, ctx.aux)
        return dq, dk, dv, None


def _forward(q, k, v, plan: RingPlan):
    ring, (B, N, S, D) = plan.ring, q.shape
    out_acc = torch.zeros(B, N, S, D, dtype=torch.float32, device=q.device)
    lse_acc = torch.full((B, N, S), float("-inf"), dtype=torch.float32, device=q.device)
    kv, aux = torch.stack([k, v]), []
    for i, calls in enumerate(plan.steps):
        pending = _Exchange(ring, kv, _KV_TAG, "a K/V block") if i < ring.size - 1 else None
        for call in calls:
            o, lse, a = kernels.forward(q[:, :, call.q], kv[0][:, :, call.k], kv[1][:, :, call.k], call)
            kernels.merge_(out_acc[:, :, call.q], lse_acc[:, :, call.q], o, lse)
            aux.append(a)
        if pending is not None:
            kv = pending.wait()
    out = torch.empty(S, B, N, D, dtype=q.dtype, device=q.device).permute(1, 2, 0, 3)
    return out.copy_(out_acc), lse_acc, aux


def _backward(dout, q, k, v, out, lse, plan: RingPlan, aux):
    ring, C = plan.ring, plan.ring.size
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, aux = torch.stack([k, v]), iter(aux)
    own = acc = None  # this rank's share of its own dK/dV; the accumulator in flight
    for i, calls in enumerate(plan.steps):
        pending = _Exchange(ring, kv, _KV_TAG, "a K/V block") if i < C - 1 else None
        share = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # dK/dV of the block held now
        for call in calls:
            rows = (slice(None), slice(None), call.q)
            dq_c, dk_c, dv_c = kernels.backward(dout[rows], q[rows], kv[0][:, :, call.k], kv[1][:, :, call.k],
                                                out[rows], lse[rows], call, next(aux))
            dq[rows] += dq_c
            share[0][:, :, call.k] += dk_c
            share[1][:, :, call.k] += dv_c
        if i == 0:
            own = share
        else:  # add to the accumulator of this block (started by the rank after its owner) and pass it on
            if acc is not None:
                share += acc.wait()
            acc = _Exchange(ring, share, _DKV_TAG, "a dK/dV accumulator")
        if pending is not None:
            kv = pending.wait()
    dkv = own + acc.wait()  # this rank's block, back home with every other rank's share
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
