"""Training windows: sample i is a pure function of (seed, i), so the data order does not depend on the
data-parallel size, and a resumed run needs only the number of samples consumed.

- random (data.sampling=random): window i starts at an offset drawn from a generator seeded by (seed, i);
  windows are drawn with replacement, so an epoch's worth of samples covers about 63% of the tokens.
- epoch (data.sampling=epoch): the non-overlapping windows [k L, k L + L + 1), k < n = (N - 1) // L, in a
  permutation seeded by (seed, epoch): sample i is window perm_e[i mod n] of epoch e = i // n, so every
  window is visited exactly once per epoch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .config import DataError


class WindowSampler:
    """Sample i is the window starting at an offset drawn from a generator seeded by (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, *, name: str = "token"):
        if len(tokens) < seq_len + 1:
            more = "a larger data.val_fraction, " if name == "val" else ""
            raise DataError(f"the {name} data has {len(tokens)} tokens, fewer than model.seq_len + 1 = "
                            f"{seq_len + 1}: give more text (data.paths), {more}or a shorter model.seq_len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def offset(self, i: int) -> int:
        """Uniform over [0, len(tokens) - seq_len - 1], so the target y never runs past the end."""
        return int(np.random.default_rng([self.seed, i]).integers(len(self.tokens) - self.seq_len))

    def epoch(self, i: int) -> int | None:
        """The epoch sample i belongs to (None: windows are drawn with replacement, there are no epochs)."""
        return None

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.offset(i)
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.window(i) for i in indices))
        return torch.stack(xs), torch.stack(ys)


class EpochSampler(WindowSampler):
    """Sample i is window perm_e[i mod n] of epoch e = i // n; perm_e is seeded by (seed, e)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, *, name: str = "token"):
        super().__init__(tokens, seq_len, seed, name=name)
        self.windows = (len(tokens) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' (a batch may straddle two)

    def epoch(self, i: int) -> int:
        return i // self.windows

    def offset(self, i: int) -> int:
        e, k = divmod(i, self.windows)
        if e not in self._perms:
            perm = np.random.default_rng([self.seed, e]).permutation(self.windows)
            self._perms = {**{k2: v for k2, v in self._perms.items() if k2 == e - 1},
                           e: perm.astype(np.min_scalar_type(self.windows))}
        return int(self._perms[e][k]) * self.seq_len


def make_sampler(sampling: str, tokens: np.ndarray, seq_len: int, seed: int, *, name: str) -> WindowSampler:
    return (EpochSampler if sampling == "epoch" else WindowSampler)(tokens, seq_len, seed, name=name)


def dp_sample_indices(consumed: int, micro_step: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[int]:
    """Global sample indices of one DP rank's micro-batch: a step's micro-batches over all ranks tile
    [consumed, consumed + global_batch) exactly, whatever dp_size is."""
    start = consumed + (micro_step * dp_size + dp_rank) * micro_batch
    return list(range(start, start + micro_batch))
