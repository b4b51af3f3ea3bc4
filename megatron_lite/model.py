"""GPT-2 with Megatron tensor parallelism (and sequence parallelism), in one file.

Legend: S sequence, B micro-batch, H hidden, T tensor-parallel size, N heads, D head dim, V vocab;
a trailing `t` marks a TP shard (Ht = H/T, Nt = N/T, Vt = V/T), and under SP `St` = S/T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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
