"""GPT-2 with Megatron tensor parallelism (and sequence parallelism), in one file.

Legend: S sequence, B micro-batch, H hidden, T tensor-parallel size, N heads, D head dim, V vocab;
a trailing `t` marks a TP shard (Ht = H/T, Nt = N/T, Vt = V/T), and under SP `St` = S/T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linear,
                              gather_tp_shards, tp_partition_dim, vocab_parallel_cross_entropy)
from .tensor_parallel.random import SHARED, TP, RNGTracker, checkpoint


class ModelConfigError(ValueError):
    """A model shape that cannot be split over the requested TP size."""


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    seq_len: int = 256
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    dropout: float = 0.0
    tie_embeddings: bool = True
    sequence_parallel: bool = False
    vocab_pad_multiple: int = 128  # independent of T, so the model is the same at every TP size
    recompute: str = "none"  # none | selective (attention core) | full (whole layer)
    tp_comm_overlap: bool = True  # column-parallel backward: overlap the input-grad collective with dL/dW
    init_std: float = 0.02
    seed: int = 0  # weights and dropout streams

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, tp_size: int) -> None:
        """Raise ModelConfigError naming the value and the fix; runs before any collective."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ModelConfigError(msg)
        for key in ("vocab_size", "seq_len", "num_layers", "hidden_size", "num_heads", "ffn_hidden_size"):
            need(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be >= 1")
        need(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        need(self.recompute in ("none", "selective", "full"),
             f"model.recompute={self.recompute!r} must be one of none, selective, full")
        need(self.hidden_size % self.num_heads == 0,
             f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}: "
             f"pick a num_heads that divides {self.hidden_size}")
        need(self.num_heads % tp_size == 0,
             f"model.num_heads={self.num_heads} is not divisible by parallel.tp={tp_size}: attention heads "
             f"are split across TP ranks; pick a tp that divides {self.num_heads}")
        need(self.ffn_hidden_size % tp_size == 0,
             f"model.ffn_hidden_size={self.ffn_hidden_size} is not divisible by parallel.tp={tp_size}: "
             f"pick an ffn_hidden_size that is a multiple of {tp_size}")
        need(self.padded_vocab_size % tp_size == 0,
             f"padded vocabulary {self.padded_vocab_size} (model.vocab_pad_multiple="
             f"{self.vocab_pad_multiple}) is not divisible by parallel.tp={tp_size}: raise "
             f"vocab_pad_multiple to a multiple of {tp_size}")
        if self.sequence_parallel:
            need(self.seq_len % tp_size == 0,
                 f"model.seq_len={self.seq_len} is not divisible by parallel.tp={tp_size}, which sequence "
                 f"parallelism requires: pick a seq_len that is a multiple of {tp_size} or set parallel.sp=false")


class GPT(nn.Module):
    """GPT-2 whose weights are split over the TP group of `ctx` (a `parallel.ParallelContext`).

    forward(tokens [B, S], targets [B, S] or None): the mean loss over non-ignored targets, or this rank's
    vocab shard of the logits `[B, S, Vt]` (Vt = padded vocab / T) when no targets are given."""

    def __init__(self, config: GPTConfig, ctx):
        super().__init__()
        config.validate(ctx.tp_size)
        self.config, self.ctx = config, ctx
        c, group, sp = config, ctx.tp_group, config.sequence_parallel
        # Every full tensor is drawn from one generator in construction order, identically on every rank,
        # and each rank keeps its slice: the same seed gives the same model at every TP size.
        gen = torch.Generator().manual_seed(c.seed)
        normal = _normal_init(c.init_std, gen)
        residual_out = _normal_init(c.init_std / math.sqrt(2 * c.num_layers), gen)  # GPT-2's scaled init
        kw = dict(tp_group=group, sequence_parallel=sp)

        self.wte = VocabParallelEmbedding(c.padded_vocab_size, c.hidden_size, init_method=normal, **kw)
        self.wpe = nn.Embedding(c.seq_len, c.hidden_size)
        normal(self.wpe.weight.data)
        self.blocks = nn.ModuleList(Block(c, kw, normal, residual_out) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size)
        self.lm_head = None if c.tie_embeddings else ColumnParallelLinear(
            c.hidden_size, c.padded_vocab_size, bias=False, overlap_grad_reduce=c.tp_comm_overlap,
            init_method=normal, **kw)
        self.to(ctx.device)
        self.rng = RNGTracker(c.seed, ctx.tp_rank, ctx.device)
        # Under SP the replicated parameters (LayerNorms, row-parallel biases, position embeddings) see only
        # this rank's tokens: optim.finalize_model_grads sums their gradients over TP once per optimizer step.

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        c, ctx = self.config, self.ctx
        S = tokens.shape[1]
        if S > c.seq_len:
            raise ValueError(f"sequence of {S} tokens is longer than model.seq_len={c.seq_len}")
        sp, group, T = c.sequence_parallel, ctx.tp_group, ctx.tp_size
        if sp and S % T:
            raise ValueError(f"sequence of {S} tokens is not divisible by TP={T} under sequence parallelism")
        # Under SP each rank holds the sequence block [r*S/T, (r+1)*S/T) from the embedding to the head.
        first = ctx.tp_rank * (S // T) if sp else 0
        positions = torch.arange(first, first + (S // T if sp else S), device=tokens.device)
        x_SBH = self.wte(tokens.t()) + self.wpe(positions).unsqueeze(1)
        x_SBH = self._dropout(x_SBH)
        for block in self.blocks:
            if c.recompute == "full" and self.training:
                x_SBH = checkpoint(block, self.rng, x_SBH, self.rng)
            else:
                x_SBH = block(x_SBH, self.rng)
        x_SBH = self.ln_f(x_SBH)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits_SBVt = column_parallel_linear(x_SBH, weight, None, group, sp, c.tp_comm_overlap)
        if targets is None:
            return logits_SBVt.transpose(0, 1)
        losses_SB = vocab_parallel_cross_entropy(logits_SBVt, targets.t(), group, vocab_size=c.vocab_size)
        return losses_SB.sum() / (targets != -100).sum().clamp(min=1)

    def _dropout(self, x):
        return _residual_dropout(x, self.config, self.rng, self.training)

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or its gradient) as the full, unsharded tensor: collective over the TP group."""
        return {n: gather_tp_shards(p.grad if grads else p, tp_partition_dim(p), self.ctx.tp_group)
                for n, p in self.named_parameters()}

    def num_parameters(self) -> tuple[int, int]:
        """(full model, this rank), counting a tied embedding once."""
        T = self.ctx.tp_size
        local = sum(p.numel() for p in self.parameters())
        full = sum(p.numel() * (T if tp_partition_dim(p) is not None else 1) for p in self.parameters())
        return full, local


class Block(nn.Module):
    """Pre-LayerNorm transformer block; LayerNorm, dropout and residual run on sequence shards under SP."""

    def __init__(self, c: GPTConfig, kw: dict, normal, residual_out):
        super().__init__()
        self.config = c
        self.ln_1 = nn.LayerNorm(c.hidden_size)
        self.attn = Attention(c, kw, normal, residual_out)
        self.ln_2 = nn.LayerNorm(c.hidden_size)
        self.fc = ColumnParallelLinear(c.hidden_size, c.ffn_hidden_size, overlap_grad_reduce=c.tp_comm_overlap,
                                       init_method=normal, **kw)
        self.proj = RowParallelLinear(c.ffn_hidden_size, c.hidden_size, init_method=residual_out, **kw)

    def forward(self, x_SBH, rng: RNGTracker):
        c = self.config
        x_SBH = x_SBH + _residual_dropout(self.attn(self.ln_1(x_SBH), rng), c, rng, self.training)
        h_SBFt = F.gelu(self.fc(self.ln_2(x_SBH)), approximate="tanh")
        return x_SBH + _residual_dropout(self.proj(h_SBFt), c, rng, self.training)


class Attention(nn.Module):
    """Causal self-attention with this rank's N/T heads: fused QKV column-parallel, output row-parallel.

    The QKV output features are laid out head-major, `[N, 3, D]`, so that rank r's rows of the fused
    weight are exactly the q, k and v of heads [r*N/T, (r+1)*N/T)."""

    def __init__(self, c: GPTConfig, kw: dict, normal, residual_out):
        super().__init__()
        self.config = c
        self.qkv = ColumnParallelLinear(c.hidden_size, 3 * c.hidden_size, overlap_grad_reduce=c.tp_comm_overlap,
                                        init_method=normal, **kw)
        self.proj = RowParallelLinear(c.hidden_size, c.hidden_size, init_method=residual_out, **kw)

    def forward(self, x_SBH, rng: RNGTracker):
        c = self.config
        qkv_SB3Ht = self.qkv(x_SBH)
        S, B, _ = qkv_SB3Ht.shape
        q, k, v = qkv_SB3Ht.view(S, B, -1, 3, c.head_dim).permute(3, 1, 2, 0, 4).unbind(0)  # [B, Nt, S, D]
        if c.recompute == "selective" and self.training:
            y_BNtSD = checkpoint(self._core, rng, q, k, v, rng)
        else:
            y_BNtSD = self._core(q, k, v, rng)
        y_SBHt = y_BNtSD.permute(2, 0, 1, 3).reshape(S, B, -1)
        return self.proj(y_SBHt)

    def _core(self, q, k, v, rng: RNGTracker):
        p = self.config.dropout if self.training else 0.0
        with rng.fork(TP):  # each rank's heads are different heads: distinct masks
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


def _residual_dropout(x, c: GPTConfig, rng: RNGTracker, training: bool):
    if not training or c.dropout == 0.0:
        return x
    with rng.fork(TP if c.sequence_parallel else SHARED):  # sequence shards differ; replicas agree
        return F.dropout(x, c.dropout, training=True)


def _normal_init(std: float, gen: torch.Generator):
    return lambda w: w.normal_(0.0, std, generator=gen)
