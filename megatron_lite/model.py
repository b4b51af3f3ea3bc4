"""GPT-2 and the Llama family with Megatron tensor parallelism (and sequence parallelism), in one file.

One model built from small modules, one per idea (as in HF's modeling_llama.py); a variant is another
module, picked once in the constructor from GPTConfig:
- norm: LayerNorm (GPT-2) | RMSNorm (Llama), `norm`, `norm_eps`
- positions: learned embeddings added to the input (GPT-2) | rotary embeddings on q and k (Llama), with
  Llama-3 frequency scaling, `position_embedding`, `rope_theta`, `rope_scaling`
- MLP: tanh-GELU (GPT-2) | SwiGLU (Llama), `mlp`
- attention: multi-head, or grouped-query with `num_kv_heads` < `num_heads`; biases on QKV and the output
  projection (GPT-2), on QKV only (Qwen2, `qkv_bias`) or none (Llama); an RMSNorm on each head of q and k
  (Qwen3, `qk_norm`: `HeadRMSNorm`)
The defaults are GPT-2.

Conventions that make Hugging Face conversion a rename, not a permutation (megatron_lite/hf.py):
- RoPE in HF's `rotate_half` form (pairs i and i + D/2), applied to the whole sequence (positions 0..S-1, or
  each token's given position) after the sequence-parallel all-gather inside the QKV layer.
- The fused QKV weight in Megatron's grouped layout: per KV group, its Q = N/G query heads, then its k,
  then its v (`[G, Q + 2, D]` output features). TP splits whole groups, so rank r holds exactly the q, k, v
  of its heads; with G == N it is the head-major `[N, 3, D]` layout of GPT-2.
- The SwiGLU gate and up projections are one `[2, F, H]` weight split along F (ColumnParallelLinear with
  `partitions=2`): the saved global tensor is `[gate; up]` whatever T is.

Legend: S sequence, B micro-batch, H hidden, T tensor-parallel size, N query heads, G KV heads (groups),
Q = N/G query heads per group, D head dim, F ffn hidden, V vocab; a trailing `t` marks a TP shard
(Nt = N/T, Gt = G/T, Ft = F/T, Vt = V/T), and under SP `St` = S/T.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .context_parallel import Ring, RingPlan, load_balanced_positions, ring_attention
from .pipeline_parallel.layout import stage_chunks
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linear,
                              copy_to_tp, gather_tp_shards, tp_partition_dim, vocab_parallel_cross_entropy)
from .tensor_parallel.layers import skip_init
from .tensor_parallel.random import SHARED, TP, RNGTracker, checkpoint
from .rope_scaling import RopeScaling  # noqa: F401 (its own module: the config schema needs it without torch)

if TYPE_CHECKING:
    from .generate import KVCache  # inference only: the keys and values of the tokens so far


class ModelConfigError(ValueError):
    """A model shape that cannot be built or split over the requested TP size."""


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    seq_len: int = 256  # the training window (every sequence it trains on)
    max_seq_len: int | None = None  # the context: learned-position rows, generation's window; None: seq_len
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: num_heads (multi-head); fewer: grouped-query attention
    head_dim: int | None = None  # None: hidden_size / num_heads
    ffn_hidden_size: int | None = None  # None: 4 * hidden_size
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position_embedding: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    mlp: str = "gelu"  # gelu (tanh approximation, GPT-2) | swiglu
    attention_bias: bool = True  # biases of the attention output projection (and of QKV, unless qkv_bias says)
    qkv_bias: bool | None = None  # biases of the QKV projection; None: attention_bias (Qwen2: QKV only)
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3)
    mlp_bias: bool = True  # biases of the MLP projections
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
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.max_seq_len is None:
            self.max_seq_len = self.seq_len
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.head_dim is None and self.num_heads and self.hidden_size % self.num_heads == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if isinstance(self.rope_scaling, dict):  # from a checkpoint's meta.json or a Hydra config
            self.rope_scaling = RopeScaling(**self.rope_scaling)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    def validate(self, tp_size: int) -> None:
        """Raise ModelConfigError naming the value and the fix; runs before any collective."""
        def need(ok: bool, msg: str):
            if not ok:
                raise ModelConfigError(msg)
        for key in ("vocab_size", "seq_len", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                    "ffn_hidden_size"):
            need(getattr(self, key) >= 1, f"model.{key}={getattr(self, key)} must be >= 1")
        for key, choices in (("norm", ("layernorm", "rmsnorm")), ("position_embedding", ("learned", "rope")),
                             ("mlp", ("gelu", "swiglu")), ("recompute", ("none", "selective", "full"))):
            need(getattr(self, key) in choices, f"model.{key}={getattr(self, key)!r} must be one of {', '.join(choices)}")
        need(self.seq_len <= self.max_seq_len,
             f"model.seq_len={self.seq_len} exceeds the model's context of {self.max_seq_len} positions "
             f"(max_seq_len): use model.seq_len<={self.max_seq_len}")
        need(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        need(self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be > 0")
        need(self.head_dim is not None,
             f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}: "
             f"pick a num_heads that divides {self.hidden_size} (or set model.head_dim)")
        need(self.num_heads % self.num_kv_heads == 0,
             f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}: each KV "
             f"head serves the same number of query heads; pick a divisor of {self.num_heads}")
        if self.position_embedding == "rope":
            need(self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even for rotary embeddings")
            need(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0")
            s = self.rope_scaling
            need(s is None or s.rope_type == "llama3",
                 f"model.rope_scaling.rope_type={s and s.rope_type!r} is not supported: use llama3 or null")
            need(s is None or s.high_freq_factor > s.low_freq_factor,
                 f"model.rope_scaling: high_freq_factor={s and s.high_freq_factor} must exceed "
                 f"low_freq_factor={s and s.low_freq_factor}")
        valid_tp = [t for t in range(1, self.num_kv_heads + 1) if self.num_kv_heads % t == 0]
        need(self.num_heads % tp_size == 0 and self.num_kv_heads % tp_size == 0,
             f"model.num_heads={self.num_heads} and model.num_kv_heads={self.num_kv_heads} must both be divisible "
             f"by parallel.tp={tp_size}: attention heads and KV groups are split across TP ranks; valid tp: "
             f"{', '.join(map(str, valid_tp))}")
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
    """A GPT (GPT-2 or Llama family) whose weights are split over the TP group of `ctx` (`ParallelContext`).

    forward(tokens [B, S], targets [B, S] or None, cache=None, *, positions=None, document_ids=None): the mean
    loss over non-ignored targets, or this rank's vocab shard of the logits `[B, S, Vt]` (Vt = padded vocab / T)
    when no targets are given. With a `KVCache` (inference, SP off) the tokens continue the cached sequence.
    Per-token metadata (packed sequences): `positions` (`[S]` or `[B, S]`), each token's true position (default:
    0..S-1 after the cache); `document_ids` `[B, S]`, a token attends only to earlier tokens of its own document
    (`document_causal_mask`).

    Under context parallelism (ctx.cp_size = C > 1) tokens, targets and metadata are this CP rank's S/C tokens of
    each window (context_parallel.shard_batch; positions default to their places in the window) and attention is
    ring attention over the CP group, its masks computed from the positions and documents of each K/V block;
    `context_parallel_off()` runs whole sequences on one rank (generation)."""

    def __init__(self, config: GPTConfig, ctx, init_weights: bool = True, chunks: list[list[int]] | None = None):
        super().__init__()
        config.validate(ctx.tp_size)
        self.config, self.ctx = config, ctx
        c, group, sp = config, ctx.tp_group, config.sequence_parallel
        # Pipeline stage (Megatron's pre_process / post_process): this rank holds the layers of `chunks`
        # (chunks[v]: the global indices of its model chunk v; default an even split over ctx.pp_size), the
        # embedding on the first stage, the final norm and the output layer on the last.
        self.chunks = chunks if chunks is not None else stage_chunks(c.num_layers, ctx.pp_size, ctx.pp_rank)
        first, last = ctx.pp_rank == 0, ctx.pp_rank == ctx.pp_size - 1
        # Every full tensor is drawn on the device, identically on every rank, from a generator of its own slot (the
        # embedding, the position embedding, the output layer, layer i), and each rank keeps its slice: the same
        # seed gives the same model at every TP and PP size (on one kind of device: CPU and CUDA generators
        # differ), and a stage draws only what it holds. init_weights=False, for a model about to load a
        # checkpoint, draws nothing and allocates only this rank's slices.
        def normal(slot: int):
            return _normal_init(c.init_std, _generator(c.seed, slot, ctx.device)) if init_weights else skip_init
        kw = dict(tp_group=group, sequence_parallel=sp, device=ctx.device)

        if first or (last and c.tie_embeddings):  # the last stage's is a copy: the tied output layer's weight
            self.wte = VocabParallelEmbedding(c.padded_vocab_size, c.hidden_size, init_method=normal(_EMBEDDING), **kw)
        if c.position_embedding == "learned" and first:
            self.wpe = nn.Embedding(c.max_seq_len, c.hidden_size, _weight=torch.empty(c.max_seq_len, c.hidden_size,
                                                                                    device=ctx.device))
            normal(_POSITIONS)(self.wpe.weight.data)
        if c.position_embedding == "rope":
            self.rotary = RotaryEmbedding(c)
        self.blocks = Layers({i: Block(c, i, kw, *_layer_init(c, i, init_weights, ctx.device))
                              for chunk in self.chunks for i in chunk})
        if last:
            self.ln_f = make_norm(c)
        self.lm_head = None if c.tie_embeddings or not last else ColumnParallelLinear(
            c.hidden_size, c.padded_vocab_size, bias=False, overlap_grad_reduce=c.tp_comm_overlap,
            init_method=normal(_OUTPUT), **kw)
        self.to(ctx.device)
        self.rng = RNGTracker(c.seed + _PP_SEED_OFFSET * ctx.pp_rank, ctx.tp_rank, ctx.device)
        self.cp_ring = Ring(ctx.cp_group) if ctx.cp_size > 1 else None  # None: attention sees whole sequences
        # Under SP the replicated parameters (norms, row-parallel biases, position embeddings) see only this
        # rank's tokens: optim.finalize_model_grads sums their gradients over TP once per optimizer step.

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None, *,
                positions: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                hidden_SBH: torch.Tensor | None = None, chunk: int = 0):
        """The loss (or logits) of `tokens`; under pipeline parallelism, model chunk `chunk` of this stage only:
        from the embedding of `tokens` (first stage) or `hidden_SBH`, the previous stage's output, to the
        loss (last stage) or the output activations `[S, B, H]` (`[S/T, B, H]` under SP) for the next stage."""
        c, ctx = self.config, self.ctx
        S = tokens.shape[1]
        if cache is not None and (positions is not None or document_ids is not None):
            raise ValueError("a KV cache continues one sequence: positions and document_ids are for training windows")
        start = cache.length if cache is not None else 0
        ring = None  # context parallelism: which K/V blocks each ring step attends to, from every token's position
        if self.cp_ring is not None:
            if cache is not None or S % 2:
                raise ValueError(f"context parallelism needs this rank's two chunks of a window (got {S} tokens"
                                 f"{' and a KV cache' if cache is not None else ''}): use model.context_parallel_off()")
            if positions is None and document_ids is None:
                ring = RingPlan.load_balanced(self.cp_ring, S, tokens.device)
            else:  # packed documents: every K/V block travels with its positions and document ids
                if positions is None:
                    positions = load_balanced_positions(S * ctx.cp_size, ctx.cp_size, ctx.cp_rank, tokens.device)
                ring = RingPlan.gathered(self.cp_ring, positions, document_ids)
            positions = ring.positions
        elif positions is None:
            positions = torch.arange(start, start + S, device=tokens.device)
        if c.position_embedding == "learned" and start + S > c.max_seq_len:
            raise ValueError(f"position {start + S - 1} is past the learned positions (max_seq_len={c.max_seq_len})")
        sp, group, T = c.sequence_parallel, ctx.tp_group, ctx.tp_size
        if sp and (S % T or cache is not None):
            raise ValueError(f"sequence parallelism needs a whole sequence divisible by TP={T} (got {S} tokens"
                             f"{' and a KV cache' if cache is not None else ''}): run inference with it off")
        x_SBH = self._embed(tokens, positions) if self.is_first_chunk(chunk) else hidden_SBH
        rope = self.rotary(positions) if c.position_embedding == "rope" else None  # after the QKV's SP all-gather
        # packed documents without CP: one block-diagonal causal mask for every layer (under CP the ring's plan)
        mask = document_causal_mask(document_ids) if document_ids is not None and ring is None else None
        for i in self.chunks[chunk]:
            if c.recompute == "full" and self.training:
                x_SBH = checkpoint(self.blocks[i], self.rng, x_SBH, self.rng, rope, None, mask, ring)
            else:
                x_SBH = self.blocks[i](x_SBH, self.rng, rope, cache, mask, ring)
        if not self.is_last_chunk(chunk):
            return x_SBH
        if cache is not None:
            cache.length += S
        x_SBH = self.ln_f(x_SBH)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits_SBVt = column_parallel_linear(x_SBH, weight, None, group, sp, c.tp_comm_overlap)
        if targets is None:
            return logits_SBVt.transpose(0, 1)
        losses_SB = vocab_parallel_cross_entropy(logits_SBVt, targets.t(), group, vocab_size=c.vocab_size)
        return losses_SB.sum() / (targets != -100).sum().clamp(min=1)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c, ctx = self.config, self.ctx
        x_SBH = self.wte(tokens.t())
        if c.position_embedding == "learned":
            # Under SP each rank holds the sequence block [r*S/T, (r+1)*S/T) from the embedding to the head.
            S, T = tokens.shape[1], ctx.tp_size
            mine = positions.narrow(-1, ctx.tp_rank * (S // T), S // T) if c.sequence_parallel else positions
            x_SBH = x_SBH + (self.wpe(mine).unsqueeze(1) if mine.dim() == 1 else self.wpe(mine.t()))
        return _residual_dropout(x_SBH, c, self.rng, self.training)

    def is_first_chunk(self, chunk: int) -> bool:
        """Whether model chunk `chunk` of this rank is the first virtual stage (it embeds the tokens)."""
        return self.ctx.pp_rank == 0 and chunk == 0

    def is_last_chunk(self, chunk: int) -> bool:
        """Whether model chunk `chunk` of this rank is the last virtual stage (it computes the loss)."""
        return self.ctx.pp_rank == self.ctx.pp_size - 1 and chunk == len(self.chunks) - 1

    def tied_embedding(self) -> nn.Parameter | None:
        """The word embedding when it is tied to the output layer across stages (PP > 1, first or last stage):
        its two copies' gradients are summed over ctx.embedding_group (optim.finalize_model_grads)."""
        if self.config.tie_embeddings and self.ctx.pp_size > 1 and hasattr(self, "wte"):
            return self.wte.weight
        return None

    def tied_copies(self) -> list[str]:
        """Parameters that are copies of another stage's: the last stage's tied embedding. A checkpoint saves
        the first stage's (and loads both from it); the gradient norm counts it once."""
        return ["wte.weight"] if self.tied_embedding() is not None and self.ctx.pp_rank > 0 else []

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (or its gradient) as the full, unsharded tensor: collective over the TP group."""
        return {n: gather_tp_shards(p.grad if grads else p, tp_partition_dim(p), self.ctx.tp_group)
                for n, p in self.named_parameters()}

    def num_parameters(self) -> tuple[int, int]:
        """(full model, this rank), counting a tied embedding once (collective over the PP group at PP > 1)."""
        T, copies = self.ctx.tp_size, self.tied_copies()
        local = sum(p.numel() for p in self.parameters())
        full = torch.tensor(sum(p.numel() * (T if tp_partition_dim(p) is not None else 1)
                                for n, p in self.named_parameters() if n not in copies), dtype=torch.int64)
        if self.ctx.pp_size > 1:  # every stage's own parameters
            full = full.to(self.ctx.device)
            dist.all_reduce(full, group=self.ctx.pp_group)
        return int(full), local

    @contextlib.contextmanager
    def context_parallel_off(self):
        """Run the block on whole sequences, attention on this rank alone (generation); the weights, the same on
        every CP rank, are untouched."""
        ring, self.cp_ring = self.cp_ring, None
        try:
            yield self
        finally:
            self.cp_ring = ring

    @contextlib.contextmanager
    def sequence_parallel_off(self):
        """Run the block with sequence parallelism off (inference on short or growing sequences); the
        weights are the same, only where the sequence is split changes."""
        layers = [m for m in self.modules() if hasattr(m, "sequence_parallel")]
        saved = self.config.sequence_parallel, [m.sequence_parallel for m in layers]
        self.config.sequence_parallel = False
        for m in layers:
            m.sequence_parallel = False
        try:
            yield self
        finally:
            self.config.sequence_parallel = saved[0]
            for m, on in zip(layers, saved[1]):
                m.sequence_parallel = on


class Layers(nn.Module):
    """The transformer layers a stage holds, named by their global index (`blocks.17.*` on whatever stage
    holds layer 17, so checkpoints and the HF mapping need no pipeline awareness); iterated in order,
    indexed by global index."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i, layer in layers.items():
            self.add_module(str(i), layer)

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class Block(nn.Module):
    """Pre-norm transformer block; norms, dropout and residuals run on sequence shards under SP."""

    def __init__(self, c: GPTConfig, layer: int, kw: dict, normal, residual_out):
        super().__init__()
        self.config = c
        self.ln_1 = make_norm(c)
        self.attn = Attention(c, layer, kw, normal, residual_out)
        self.ln_2 = make_norm(c)
        self.mlp = (SwiGLUMLP if c.mlp == "swiglu" else GeluMLP)(c, kw, normal, residual_out)

    def forward(self, x_SBH, rng: RNGTracker, rope=None, cache: KVCache | None = None, mask=None,
                ring: RingPlan | None = None):
        c = self.config
        x_SBH = x_SBH + _residual_dropout(self.attn(self.ln_1(x_SBH), rng, rope, cache, mask, ring), c, rng,
                                          self.training)
        return x_SBH + _residual_dropout(self.mlp(self.ln_2(x_SBH)), c, rng, self.training)


class Attention(nn.Module):
    """Causal self-attention with this rank's Nt = N/T query heads and Gt = G/T KV heads: fused QKV
    column-parallel (grouped layout, see the module docstring), output row-parallel."""

    def __init__(self, c: GPTConfig, layer: int, kw: dict, normal, residual_out):
        super().__init__()
        self.config, self.layer = c, layer
        self.q_per_group = c.num_heads // c.num_kv_heads
        qkv_features = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        self.qkv = ColumnParallelLinear(c.hidden_size, qkv_features, bias=c.qkv_bias,
                                        overlap_grad_reduce=c.tp_comm_overlap, init_method=normal, **kw)
        self.q_norm, self.k_norm = (HeadRMSNorm(c, **kw), HeadRMSNorm(c, **kw)) if c.qk_norm else (nn.Identity(),
                                                                                                 nn.Identity())
        self.proj = RowParallelLinear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_bias,
                                      init_method=residual_out, **kw)

    def forward(self, x_SBH, rng: RNGTracker, rope=None, cache: KVCache | None = None, mask=None,
                ring: RingPlan | None = None):
        """`mask`: a boolean attention mask [B, 1, S, S] (packed documents), None for causal; `ring`: the
        context-parallel ring's plan, which carries its own masks."""
        c, Q = self.config, self.q_per_group
        qkv_SBX = self.qkv(x_SBH)
        S, B, _ = qkv_SBX.shape
        # one split of the [S, B, Gt, X, D] view (X: the Q + 2 slots), so backward concatenates the three gradients
        # into the QKV layout at once (three slices would each zero-fill a QKV-sized gradient and add them up)
        q_SBGtQD, k_SBGt1D, v_SBGt1D = qkv_SBX.view(S, B, -1, Q + 2, c.head_dim).split([Q, 1, 1], dim=3)
        q_BNtSD = q_SBGtQD.permute(1, 2, 3, 0, 4).flatten(1, 2)  # query heads g*Q .. g*Q + Q-1
        k_BGtSD, v_BGtSD = k_SBGt1D.squeeze(3).permute(1, 2, 0, 3), v_SBGt1D.squeeze(3).permute(1, 2, 0, 3)
        q_BNtSD, k_BGtSD = self.q_norm(q_BNtSD), self.k_norm(k_BGtSD)  # Qwen3; identities otherwise
        if rope is not None:
            q_BNtSD, k_BGtSD = apply_rotary(q_BNtSD, *rope), apply_rotary(k_BGtSD, *rope)
        if cache is not None:
            mask = cache.mask(S, x_SBH.device)
            k_BGtSD, v_BGtSD = cache.update(self.layer, k_BGtSD, v_BGtSD)
        if c.recompute == "selective" and self.training:
            y_BNtSD = checkpoint(self._core, rng, q_BNtSD, k_BGtSD, v_BGtSD, rng, mask, ring)
        else:
            y_BNtSD = self._core(q_BNtSD, k_BGtSD, v_BGtSD, rng, mask, ring)
        return self.proj(y_BNtSD.permute(2, 0, 1, 3).reshape(S, B, -1))

    def _core(self, q, k, v, rng: RNGTracker, mask=None, ring: RingPlan | None = None):
        """SDPA; a KV head serves the Q query heads of its group (`enable_gqa`, HF's `repeat_kv`). Under context
        parallelism, ring attention over the CP group (no attention dropout: config.validate refuses it)."""
        if ring is not None:
            return ring_attention(q, k, v, ring)
        p = self.config.dropout if self.training else 0.0
        causal = mask is None
        with rng.fork(TP) if p > 0 else contextlib.nullcontext():  # each rank's heads differ: distinct masks
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  enable_gqa=self.q_per_group > 1)


def document_causal_mask(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool for SDPA: query i sees key j when j <= i and both belong to the same document -- a
    block-diagonal causal mask, so packed documents never attend to each other (with per-document positions,
    each document computes what it computes alone). Without document ids the model uses SDPA's own causal
    mask (`is_causal`, the flash kernel on GPUs); a mask selects the memory-efficient or math kernel."""
    S = document_ids_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=document_ids_BS.device).tril()
    return ((document_ids_BS.unsqueeze(2) == document_ids_BS.unsqueeze(1)) & causal_SS).unsqueeze(1)


class GeluMLP(nn.Module):
    """GPT-2's MLP: column-parallel fc, tanh-GELU, row-parallel proj (Shoeybi et al. 2019, eq. 3-4)."""

    def __init__(self, c: GPTConfig, kw: dict, normal, residual_out):
        super().__init__()
        self.fc = ColumnParallelLinear(c.hidden_size, c.ffn_hidden_size, bias=c.mlp_bias,
                                       overlap_grad_reduce=c.tp_comm_overlap, init_method=normal, **kw)
        self.proj = RowParallelLinear(c.ffn_hidden_size, c.hidden_size, bias=c.mlp_bias, init_method=residual_out,
                                      **kw)

    def forward(self, x_SBH):
        return self.proj(F.gelu(self.fc(x_SBH), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama's MLP: proj(silu(x gate) * (x up)). gate and up are one column-parallel matmul whose weight is
    `[2, F, H]` split along F, so each rank's output is `[gate_r | up_r]` and the product needs no collective."""

    def __init__(self, c: GPTConfig, kw: dict, normal, residual_out):
        super().__init__()
        self.gate_up = ColumnParallelLinear(c.hidden_size, 2 * c.ffn_hidden_size, bias=c.mlp_bias, partitions=2,
                                            overlap_grad_reduce=c.tp_comm_overlap, init_method=normal, **kw)
        self.proj = RowParallelLinear(c.ffn_hidden_size, c.hidden_size, bias=c.mlp_bias, init_method=residual_out,
                                      **kw)

    def forward(self, x_SBH):
        gate_SBFt, up_SBFt = self.gate_up(x_SBH).chunk(2, dim=-1)
        return self.proj(F.silu(gate_SBFt) * up_SBFt)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back before the weight (as HF's
    LlamaRMSNorm, so bf16 results match too)."""

    def __init__(self, hidden_size: int, eps: float, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rms_norm(x, weight, eps: float):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class HeadRMSNorm(RMSNorm):
    """Qwen3's q_norm and k_norm: an RMSNorm over each head's D features, one `[D]` weight shared by every head.

    A TP rank normalizes its own heads only, so its gradient of the shared weight is a partial sum over TP. Under
    SP, optim.finalize_model_grads sums it over TP with the other replicated parameters (whose gradients cover a
    rank's own tokens there); without SP, Megatron's `f` on the weight does (identity forward, all-reduce of the
    gradient backward), so the gradient leaves backward whole, like every other replicated one."""

    def __init__(self, c: GPTConfig, tp_group, sequence_parallel: bool, device=None):
        super().__init__(c.head_dim, c.norm_eps, device)
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel

    def forward(self, x_BNtSD):
        weight = self.weight if self.sequence_parallel else copy_to_tp(self.weight, self.tp_group)
        return rms_norm(x_BNtSD, weight, self.eps)


def make_norm(c: GPTConfig) -> nn.Module:
    return RMSNorm(c.hidden_size, c.norm_eps) if c.norm == "rmsnorm" else nn.LayerNorm(c.hidden_size, c.norm_eps)


class RotaryEmbedding(nn.Module):
    """cos and sin of RoPE (Su et al. 2021) for given positions, `[S, D]` each, in float32.

    Frequencies inv_freq_i = 1 / theta^(2i/D) for i < D/2, duplicated to D as HF does (`cat(freqs, freqs)`),
    optionally rescaled for Llama 3's long context; no parameters (a non-persistent buffer)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        D = c.head_dim
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        if c.rope_scaling is not None:
            inv_freq = llama3_scaled_frequencies(inv_freq, c.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[S]` -> cos, sin `[S, D]`; `[B, S]` (per sequence) -> `[B, 1, S, D]` (broadcast over heads)."""
        freqs_SD2 = positions.float().unsqueeze(-1) * self.inv_freq.float()
        emb_SD = torch.cat((freqs_SD2, freqs_SD2), dim=-1)
        if emb_SD.dim() == 3:
            emb_SD = emb_SD.unsqueeze(1)
        return emb_SD.cos(), emb_SD.sin()


def llama3_scaled_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths above original_max / low_freq_factor are slowed by `factor`,
    those below original_max / high_freq_factor are kept, and those between are interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rotary(x_BNSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, where rotate_half(x) = [-x2, x1] for the halves x1, x2 of the head dim."""
    x1, x2 = x_BNSD.chunk(2, dim=-1)
    return x_BNSD * cos_SD.to(x_BNSD.dtype) + torch.cat((-x2, x1), dim=-1) * sin_SD.to(x_BNSD.dtype)


def _residual_dropout(x, c: GPTConfig, rng: RNGTracker, training: bool):
    if not training or c.dropout == 0.0:
        return x
    with rng.fork(TP if c.sequence_parallel else SHARED):  # sequence shards differ; replicas agree
        return F.dropout(x, c.dropout, training=True)


_EMBEDDING, _POSITIONS, _OUTPUT, _FIRST_LAYER = range(4)  # generator slots: one per tensor group, then a layer each
_PP_SEED_OFFSET = 100  # dropout streams differ per stage (Megatron's seed + 100 * pipeline rank)


def _generator(seed: int, slot: int, device) -> torch.Generator:
    """The generator of one slot, on `device`: its tensors come out the same whichever stage builds them."""
    return torch.Generator(device).manual_seed((slot << 32) + seed)


def _normal_init(std: float, gen: torch.Generator):
    return lambda w: w.normal_(0.0, std, generator=gen)


def _layer_init(c: GPTConfig, layer: int, init_weights: bool, device):
    """Layer `layer`'s two init methods (GPT-2's scaled init of the residual output projections), drawing
    from one generator of its own in construction order."""
    if not init_weights:
        return skip_init, skip_init
    gen = _generator(c.seed, _FIRST_LAYER + layer, device)
    return _normal_init(c.init_std, gen), _normal_init(c.init_std / math.sqrt(2 * c.num_layers), gen)
