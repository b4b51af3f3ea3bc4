"""Attention of one block (queries against one K/V block) that also returns the log-sum-exp, its backward given
the *merged* output and log-sum-exp, and the merge itself: the pieces ring attention is built from.

Block attention softmax-normalizes over its own keys only; block i returns O_i and L_i = log sum_k exp(s_qk).
Blocks are merged (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022, section 3.1):

    L = log sum_i exp(L_i),   O = sum_i exp(L_i - L) O_i

which is m = max m_i, l = sum_i exp(m_i - m) l_i, O = sum_i exp(m_i - m) l_i O_i / l written with L_i = m_i + log l_i.
The backward of a block needs no saved probabilities: with the merged O and L of its rows,
P = exp(s - L), dV = P^T dO, dS = P (dO V^T - rowsum(dO * O)), dQ = dS K scale, dK = dS^T Q scale (FlashAttention-2,
Dao 2023, Algorithm 2) -- the block's share of the dense gradient, so the blocks' gradients add up to it.

Three implementations, one interface (`forward(q, k, v, call) -> out, lse, aux`; `backward(...)`):
- CPU: ATen's fused flash kernel for CPU (what SDPA runs on CPU; grouped-query attention native, an additive
  mask for MASKED calls), forward and backward;
- CUDA, 16-bit: ATen's FlashAttention-2 kernels (no mask: FULL and CAUSAL calls; K/V repeated per query head
  for GQA, their gradients summed back);
- anything else (float32 on CUDA, masks on CUDA): `_math`, matmul-softmax in float32.
Shapes: q `[B, N, Sq, D]`, k and v `[B, G, Sk, D]` with G dividing N (query head h uses KV head h // (N/G)),
lse `[B, N, Sq]` float32.
"""
from __future__ import annotations

import math

import torch

from .plan import CAUSAL, Call

aten = torch.ops.aten


def forward(q, k, v, call: Call):
    """(out `[B, N, Sq, D]` in q's dtype, lse `[B, N, Sq]` float32, aux for `backward`) of one call."""
    impl = _implementation(q, call)
    out, lse, aux = impl.forward(q, k, v, call)
    if call.empty_rows is not None:  # queries that see no key here: weight 0 in the merge
        lse = lse.masked_fill(call.empty_rows, float("-inf"))
    return out, lse, aux


def backward(dout, q, k, v, out, lse, call: Call, aux):
    """(dq, dk, dv) of one call, given the merged `out` and `lse` of its query rows."""
    return _implementation(q, call).backward(dout, q, k, v, out, lse.contiguous(), call, aux)


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge a block's (out, lse) into the running float32 (out_acc, lse_acc), in place (views of the rows)."""
    new = torch.logaddexp(lse_acc, lse)
    safe = new.masked_fill(new == float("-inf"), 0.0)  # rows no block has reached yet: both weights 0
    out_acc.mul_(torch.exp(lse_acc - safe).unsqueeze(-1)).add_(torch.exp(lse - safe).unsqueeze(-1) * out.float())
    lse_acc.copy_(new)


def _implementation(q, call: Call):
    if q.device.type == "cpu":
        return _CPUFlash
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and call.mask is None:
        return _CUDAFlash
    return _Math


def _bias(call: Call, dtype) -> torch.Tensor | None:
    """The additive mask of a MASKED call: 0 where attended, -inf elsewhere."""
    if call.mask is None:
        return None
    return torch.zeros(call.mask.shape, dtype=dtype, device=call.mask.device).masked_fill_(~call.mask, float("-inf"))


class _CPUFlash:
    @staticmethod
    def forward(q, k, v, call):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, call.kind == CAUSAL,
                                                                    attn_mask=_bias(call, q.dtype))
        return out, lse, None

    @staticmethod
    def backward(dout, q, k, v, out, lse, call, aux):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, call.kind == CAUSAL, attn_mask=_bias(call, q.dtype))


class _CUDAFlash:
    """FlashAttention-2 through ATen (torch.distributed.tensor.experimental's ring attention calls the same
    ops). Its backward takes the forward's sequence metadata, kept in `aux`."""

    @staticmethod
    def forward(q, k, v, call):
        k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, call.kind == CAUSAL, False)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    @staticmethod
    def backward(dout, q, k, v, out, lse, call, aux):
        G = k.shape[1]
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1]), out, lse, cum_q, cum_k, max_q, max_k,
            0.0, call.kind == CAUSAL, seed, offset)
        return dq, _sum_groups(dk, G), _sum_groups(dv, G)


class _Math:
    """Matmul-softmax in float32 with the query heads of a KV group side by side: q `[B, G, Q, Sq, D]` against
    k `[B, G, 1, Sk, D]`, so no K/V head is repeated."""

    @staticmethod
    def _scores(q, k, call):
        B, N, Sq, D = q.shape
        G = k.shape[1]
        s = q.float().view(B, G, N // G, Sq, D) @ k.float().unsqueeze(2).transpose(-1, -2) / math.sqrt(D)
        if call.kind == CAUSAL:
            s = s.masked_fill(torch.ones(Sq, k.shape[2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        elif call.mask is not None:
            s = s.masked_fill(~call.mask.unsqueeze(1), float("-inf"))
        return s  # [B, G, Q, Sq, Sk]

    @staticmethod
    def forward(q, k, v, call):
        s = _Math._scores(q, k, call)
        lse = s.logsumexp(-1)
        p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
        out = (p @ v.float().unsqueeze(2)).flatten(1, 2)
        return out.to(q.dtype), lse.flatten(1, 2), None

    @staticmethod
    def backward(dout, q, k, v, out, lse, call, aux):
        B, N, Sq, D = q.shape
        G = k.shape[1]
        grouped = lambda t: t.float().view(B, G, N // G, *t.shape[2:])  # noqa: E731
        p = torch.exp(_Math._scores(q, k, call) - grouped(lse).unsqueeze(-1))
        do, v4 = grouped(dout), v.float().unsqueeze(2)
        dv = (p.transpose(-1, -2) @ do).sum(2)
        ds = p * (do @ v4.transpose(-1, -2) - (do * grouped(out)).sum(-1, keepdim=True))
        dq = (ds @ k.float().unsqueeze(2)).flatten(1, 2) / math.sqrt(D)
        dk = (ds.transpose(-1, -2) @ grouped(q)).sum(2) / math.sqrt(D)
        return dq, dk, dv


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _sum_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    B, N, S, D = t.shape
    return t if N == groups else t.view(B, groups, N // groups, S, D).sum(2)
