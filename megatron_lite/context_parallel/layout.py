"""Where each token of a window lives under context parallelism: Megatron-Core's load-balanced layout.

Causal attention costs a token work in proportion to its position (it attends to everything before it), so
cutting the window into C contiguous pieces would leave the last CP rank C times the first one's work. The
window of S tokens is instead cut into 2C chunks of S/(2C), and CP rank r holds chunks r and 2C-1-r (one early,
one late): every rank holds S/C tokens and does the same attention work. Example, C = 2, S = 8:

    chunks        [0 1] [2 3] [4 5] [6 7]
    CP rank 0     [0 1]             [6 7]      positions 0 1 6 7
    CP rank 1           [2 3] [4 5]            positions 2 3 4 5

A rank's tokens keep their true positions (RoPE and learned position embeddings use them, and so does the
causal mask of ring attention: megatron_lite/context_parallel/plan.py). The data side needs no collective:
every CP rank reads the same window and keeps its two chunks (`shard_sequence`), inputs and targets alike.
"""
from __future__ import annotations

from dataclasses import replace

import torch


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two chunks (of 2C) that CP rank r holds: r and 2C-1-r."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def load_balanced_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """The true positions of CP rank r's seq_len / C tokens of a window of `seq_len`: `[S/C]` int64."""
    c = seq_len // (2 * cp_size)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in chunk_ids(cp_rank, cp_size)])


def shard_sequence(t_BS: torch.Tensor, ctx) -> torch.Tensor:
    """This CP rank's chunks r and 2C-1-r of each sequence of `t_BS` (`[B, S]` tokens or targets) -> `[B, S/C]`;
    the tensor itself when CP is 1."""
    C = ctx.cp_size
    if C == 1:
        return t_BS
    S = t_BS.shape[1]
    if S % (2 * C):
        raise ValueError(f"a sequence of {S} tokens cannot be cut into 2 x CP = {2 * C} equal chunks")
    c = S // (2 * C)
    return torch.cat([t_BS[:, i * c:(i + 1) * c] for i in chunk_ids(ctx.cp_rank, C)], dim=1)


def shard_batch(batch, ctx):
    """This CP rank's chunks of every per-token tensor of a `data.packing.Batch` (tokens, targets, positions,
    document ids); the batch itself when CP is 1."""
    if ctx.cp_size == 1:
        return batch
    return replace(batch, **{k: None if v is None else shard_sequence(v, ctx) for k, v in vars(batch).items()})
