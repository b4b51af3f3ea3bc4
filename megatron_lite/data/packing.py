"""Training windows with per-token metadata: packed conversations (chat formats) and document masks (text).

A window is a `Batch` row: tokens, targets (-100: not counted), and, where documents share it, `positions` and
`document_ids`, which the model turns into per-document positions and a block-diagonal causal mask.

- Chat formats, data.packing=true: whole conversations are packed into windows of model.seq_len tokens by
  best-fit decreasing (TRL's default strategy), the rest of a window padded. A conversation keeps its own
  positions 0..n-1 and attends only to itself, so a packed window computes for each conversation what the
  conversation alone computes (Hugging Face's packed-SFT convention: position ids restart per sequence). The
  target of a token is the next token of its conversation when the flags count it, else -100; a
  conversation's last token and the padding have none. A conversation longer than the window fills one alone,
  cut to its first seq_len + 1 tokens (the log says how many were cut; one left with no counted target is left out).
- Chat formats, data.packing=false: one conversation per window, padded after it: positions 0..S-1 and SDPA's
  own causal mask suffice (padding comes after the conversation), so no metadata.
- Text, data.document_mask=true: the usual windows (data/sampler.py), a document starting after every EOS;
  positions restart there and attention stays within each document. The targets are unchanged.

Sample i is window k(i): drawn at random with replacement (seeded by (seed, i)) or, with data.sampling=epoch,
the i-th of a permutation per epoch (seeded by (seed, epoch)); so the data position is the number of samples
consumed, as for text, and a resumed run reads the same windows.
"""
from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .chat_prepare import LOSS, START
from .config import DataConfig, DataError
from .sampler import WindowSampler, make_sampler
from .split import hold_out


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S], -100 where the loss does not count
    positions: torch.Tensor | None = None  # [B, S] each token's position in its document; None: 0..S-1
    document_ids: torch.Tensor | None = None  # [B, S] attention stays within a document; None: causal only

    def to(self, device) -> "Batch":
        return replace(self, **{k: None if v is None else v.to(device) for k, v in vars(self).items()})

    def metadata(self) -> dict:
        """The model's keyword arguments beyond tokens and targets."""
        return dict(positions=self.positions, document_ids=self.document_ids)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total size <= capacity: items in decreasing size (ties in index order),
    each into the fullest bin it fits (the oldest of equals), a new bin when none. Deterministic; O(n log n)."""
    bins: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room left -> heap of the bins with exactly that room
    rooms: list[int] = []  # the distinct rooms left, sorted
    for item in np.argsort(-np.asarray(sizes), kind="stable").tolist():
        size = int(sizes[item])
        k = bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            b = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room], rooms[k]
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(item)
        if room - size > 0:
            if room - size not in by_room:
                by_room[room - size] = []
                insort(rooms, room - size)
            heapq.heappush(by_room[room - size], b)
    return bins


class _Order:
    """k(i): which of n windows sample i reads (random with replacement, or a permutation per epoch)."""

    def __init__(self, n: int, seed: int, sampling: str):
        self.n, self.seed, self.sampling = n, seed, sampling
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs' (a batch may straddle two)

    def epoch(self, i: int) -> int | None:
        return i // self.n if self.sampling == "epoch" else None

    def __call__(self, i: int) -> int:
        if self.sampling != "epoch":
            return int(np.random.default_rng([self.seed, i]).integers(self.n))
        e, k = divmod(i, self.n)
        if e not in self._perms:
            self._perms = {**{k2: v for k2, v in self._perms.items() if k2 == e - 1},
                           e: np.random.default_rng([self.seed, e]).permutation(self.n)}
        return int(self._perms[e][k])


class PackedWindows:
    """Windows of whole conversations from a chat cache's tokens and flags (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, flags: np.ndarray, seq_len: int, seed: int, *, sampling: str,
                 packing: bool, pad_id: int, name: str = "train"):
        starts = np.flatnonzero(flags & START)
        if len(starts) == 0:
            raise DataError(f"the {name} split holds no conversation: give more conversations (data.paths) or a "
                            f"larger data.val_fraction")
        lengths = np.diff(starts, append=len(tokens))
        cut = np.flatnonzero(lengths > seq_len + 1)
        keep = np.ones(len(starts), dtype=bool)
        for d in cut.tolist():  # nothing counted in what fits: nothing to learn from it
            keep[d] = np.any(flags[starts[d] + 1:starts[d] + seq_len + 1] & LOSS)
        useless = len(starts) - int(keep.sum())
        if not keep.any():
            raise DataError(f"no conversation of the {name} split has a counted token in its first model.seq_len + 1 "
                            f"= {seq_len + 1} tokens (the longest has {lengths.max():,}): raise model.seq_len")
        self.tokens, self.flags, self.seq_len, self.pad_id = tokens, flags, seq_len, pad_id
        self.starts, self.lengths = starts[keep], lengths[keep]
        sizes = np.minimum(self.lengths, seq_len)
        self.bins = best_fit_decreasing(sizes, seq_len) if packing else [[d] for d in range(len(self.starts))]
        self.packing, self.windows = packing, len(self.bins)
        self.order = _Order(self.windows, seed, sampling)
        self.stats = dict(name=name, conversations=int(keep.sum()), cut=len(cut) - useless, left_out=useless,
                          fill=float(sizes.sum()) / (self.windows * seq_len))

    def describe(self) -> str:
        s = self.stats
        how = "packed into" if self.packing else "one per window (data.packing=false):"
        cut = f"; {s['cut']:,} longer than {self.seq_len + 1} tokens cut" if s["cut"] else ""
        out = f"; {s['left_out']:,} left out (nothing counted in their first {self.seq_len + 1} tokens)" \
            if s["left_out"] else ""
        return (f"{s['name']} data: {_n(s['conversations'], 'conversation')} {how} {_n(self.windows, 'window')} of "
                f"{self.seq_len} tokens, {100 * s['fill']:.1f}% tokens, the rest padding{cut}{out}")

    def epoch(self, i: int) -> int | None:
        return self.order.epoch(i)

    def window(self, k: int) -> tuple[np.ndarray, ...]:
        """(tokens, targets, positions, document ids) of window k, each [seq_len] int64."""
        L, docs = self.seq_len, self.bins[k]
        x = np.full(L, self.pad_id, np.int64)
        y = np.full(L, -100, np.int64)
        pos = np.zeros(L, np.int64)
        ids = np.full(L, len(docs), np.int64)  # the padding is a document of its own
        w = 0
        for j, d in enumerate(docs):
            s, n = int(self.starts[d]), int(self.lengths[d])
            m = min(n, L)  # positions taken; targets for those whose next token is in the conversation
            v = min(m, n - 1)
            x[w:w + m] = self.tokens[s:s + m]
            y[w:w + v] = np.where(self.flags[s + 1:s + 1 + v] & LOSS, self.tokens[s + 1:s + 1 + v].astype(np.int64), -100)
            pos[w:w + m] = np.arange(m)
            ids[w:w + m] = j
            w += m
        pos[w:] = np.arange(L - w)
        return x, y, pos, ids

    def sample(self, indices: Sequence[int]) -> Batch:
        x, y, pos, ids = (torch.from_numpy(np.stack(a)) for a in zip(*(self.window(self.order(i)) for i in indices)))
        return Batch(x, y, pos, ids) if self.packing else Batch(x, y)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


class TextWindows:
    """The text samplers' windows as Batches; with `eos_id` (data.document_mask=true), document metadata."""

    def __init__(self, sampler: WindowSampler, eos_id: int | None):
        self.sampler, self.eos_id = sampler, eos_id
        self.windows = getattr(sampler, "windows", None)

    def epoch(self, i: int) -> int | None:
        return self.sampler.epoch(i)

    def sample(self, indices: Sequence[int]) -> Batch:
        x, y = self.sampler.batch(indices)
        if self.eos_id is None:
            return Batch(x, y)
        return Batch(x, y, *document_metadata(x, self.eos_id))


def document_metadata(x_BS: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, document ids) [B, S] of windows of a token stream whose documents end with EOS: a document
    starts after every EOS, and a window's first token starts one."""
    B, S = x_BS.shape
    starts_BS = torch.zeros_like(x_BS, dtype=torch.bool)
    starts_BS[:, 1:] = x_BS[:, :-1] == eos_id
    index_BS = torch.arange(S).expand(B, S)
    first_BS = torch.where(starts_BS, index_BS, 0).cummax(dim=1).values
    return index_BS - first_BS, starts_BS.long().cumsum(dim=1)


def make_windows(cfg: DataConfig, corpus, seq_len: int, seed: int, log=lambda line: None):
    """(training windows, validation windows) of a prepared corpus as the run's data settings ask for them (seeds
    `seed` and `seed` + 1): objects with `sample(indices) -> Batch`, `epoch(i)` and `windows` (None for random
    text windows). Text: split.hold_out's streams (a small corpus gets a validation window all the same); chat
    formats: each split's conversations, packed or padded. `log` gets a line on what each holds."""
    eos = corpus.meta["tokenizer"]["eos_id"]
    if corpus.data_format == "text":
        train, val, held_out = hold_out(corpus.train_tokens(), corpus.val_tokens(), seq_len + 1)
        log(f"data: {held_out}")
        return tuple(TextWindows(make_sampler(cfg.sampling, tokens, seq_len, seed + k, name=name),
                                 eos if cfg.document_mask else None)
                     for k, (name, tokens) in enumerate((("train", train), ("val", val))))
    out = []
    for k, split in enumerate(("train", "val")):
        tokens = corpus.train_tokens() if split == "train" else corpus.val_tokens()
        out.append(PackedWindows(tokens, corpus.flags(split), seq_len, seed + k, sampling=cfg.sampling,
                                 packing=cfg.packing, pad_id=eos, name=split))
        log(f"data: {out[-1].describe()}")
    return tuple(out)
