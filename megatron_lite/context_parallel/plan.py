"""What each step of ring attention computes, decided from the positions of the tokens (and their documents).

At ring step i, CP rank r holds the keys and values of rank (r - i) mod C. Each side is cut into its two pieces
(the two chunks of the load-balanced layout, layout.py), and each (query piece, key piece) pair is classified
from the true positions that belong to the block:

- SKIP: every key lies after every query (q_pos < k_pos throughout): nothing to compute;
- FULL: every key at or before every query (and all in one document): attention without a mask;
- CAUSAL: the same positions on both sides, increasing: the usual lower-triangular mask (the diagonal chunks);
- MASKED: anything else: an explicit mask q_pos >= k_pos (and q_doc == k_doc) for that pair.

With the load-balanced layout and no document ids, a step computes one call (rank j < r: all queries against
chunk j; j > r: the late chunk's queries against both of j's chunks), and the diagonal step three; blocks in
the future are never computed (pytorch PR #132442, maxtext PR #4537: the causal mask must come from the
positions the block carries). Document masks (packed sequences) only add the document ids of every token,
gathered like the positions: `RingPlan.gathered`.

The plan is built once per forward pass (every layer uses it) from CPU copies of the positions, so deciding
costs no device synchronization per layer; masks for MASKED pairs live on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import load_balanced_positions

SKIP, FULL, CAUSAL, MASKED = "skip", "full", "causal", "masked"


@dataclass(frozen=True)
class Call:
    """One attention call of a ring step: queries `q` (a slice of this rank's tokens) against keys `k` (a slice
    of the K/V block held at that step). `mask`: `[B' , 1, Sq, Sk]` bool (True: attend) for MASKED, else None;
    `empty_rows`: `[B', 1, Sq]` bool, the queries that see no key of this call (their log-sum-exp is -inf)."""
    q: slice
    k: slice
    kind: str
    mask: torch.Tensor | None = None
    empty_rows: torch.Tensor | None = None


class Ring:
    """The CP group as a ring: this rank sends to the next rank and receives from the previous one."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.ranks = dist.get_process_group_ranks(group)  # global ranks, for messages and hang reports
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size


class RingPlan:
    """The calls of every ring step, from the positions (and document ids) of every CP rank's tokens.

    `positions[j]`: CP rank j's positions, `[S/C]` or `[B, S/C]` (CPU); `documents[j]`: the same shape, or None.
    `self.positions` is this rank's, on `device` (RoPE and position embeddings use them)."""

    def __init__(self, ring: Ring, positions: list[torch.Tensor], documents: list[torch.Tensor] | None, device):
        self.ring = ring
        self.positions = positions[ring.rank].to(device)
        r, C = ring.rank, ring.size
        docs = documents or [None] * C
        self.steps = [_calls(positions[r], positions[(r - i) % C], docs[r], docs[(r - i) % C], device)
                      for i in range(C)]

    @classmethod
    def load_balanced(cls, ring: Ring, local_len: int, device) -> RingPlan:
        """The default layout (layout.py): every rank's positions are known, nothing is exchanged."""
        S = local_len * ring.size
        return cls(ring, [load_balanced_positions(S, ring.size, j) for j in range(ring.size)], None, device)

    @classmethod
    def gathered(cls, ring: Ring, positions: torch.Tensor, documents: torch.Tensor | None = None) -> RingPlan:
        """Positions (and document ids) given per token by the caller: all-gathered over CP once per forward
        pass (a few bytes per token), so that every rank knows those of every K/V block."""
        def gather(t):
            parts = [torch.empty_like(t) for _ in range(ring.size)]
            dist.all_gather(parts, t.contiguous(), group=ring.group)
            return [p.cpu() for p in parts]
        return cls(ring, gather(positions), None if documents is None else gather(documents), positions.device)


def _pieces(n: int) -> list[slice]:
    """A side's two pieces: the two chunks of the load-balanced layout."""
    return [slice(0, n // 2), slice(n // 2, n)]


def _kind(qp, kp, qd, kd) -> tuple[str, torch.Tensor | None]:
    """Classify one (query piece, key piece) pair from positions `[B', n]` (and documents); MASKED comes with
    its mask `[B', n, m]`. Cheap tests first: min/max, then equality; the mask only when needed."""
    one_doc = qd is None or (bool((qd == qd[:, :1]).all()) and bool((kd == qd[:, :1]).all()))
    if one_doc:
        if qp.max() < kp.min():
            return SKIP, None
        if qp.min() >= kp.max():
            return FULL, None
        if qp.shape == kp.shape and torch.equal(qp, kp) and bool((qp.diff(dim=-1) > 0).all()):
            return CAUSAL, None
    mask = qp[:, :, None] >= kp[:, None, :]
    if qd is not None:  # positions may be shared by the batch ([1, n]) while documents are per sequence
        mask = mask & (qd[:, :, None] == kd[:, None, :])
    if not mask.any():
        return SKIP, None
    if mask.all():
        return FULL, None
    return MASKED, mask


def _calls(q_pos, k_pos, q_doc, k_doc, device) -> list[Call]:
    """The calls of one ring step: each pair of pieces classified, FULL pairs that share a side merged."""
    q_pos, k_pos = q_pos.reshape(-1, q_pos.shape[-1]), k_pos.reshape(-1, k_pos.shape[-1])
    if q_doc is not None:
        q_doc, k_doc = q_doc.reshape(-1, q_doc.shape[-1]), k_doc.reshape(-1, k_doc.shape[-1])
    qs, ks = _pieces(q_pos.shape[-1]), _pieces(k_pos.shape[-1])
    kinds = {(a, b): _kind(q_pos[:, qa], k_pos[:, kb], q_doc if q_doc is None else q_doc[:, qa],
                           k_doc if k_doc is None else k_doc[:, kb])
             for a, qa in enumerate(qs) for b, kb in enumerate(ks)}
    whole_q, whole_k = slice(0, q_pos.shape[-1]), slice(0, k_pos.shape[-1])
    full = {pair for pair, (kind, _) in kinds.items() if kind == FULL}
    calls = []
    if len(full) == len(kinds):
        return [Call(whole_q, whole_k, FULL)]
    for a, qa in enumerate(qs):  # a query piece that sees both key pieces whole: one call
        if all((a, b) in full for b in range(len(ks))):
            calls.append(Call(qa, whole_k, FULL))
            full -= {(a, b) for b in range(len(ks))}
    for b, kb in enumerate(ks):  # a key piece seen whole by both query pieces: one call
        if all((a, b) in full for a in range(len(qs))):
            calls.append(Call(whole_q, kb, FULL))
            full -= {(a, b) for a in range(len(qs))}
    for (a, b), (kind, mask) in kinds.items():
        if kind in (CAUSAL, MASKED) or (a, b) in full:
            calls.append(Call(qs[a], ks[b], kind, *_on_device(mask, device)))
    return calls


def _on_device(mask: torch.Tensor | None, device) -> tuple:
    if mask is None:
        return ()
    return mask.unsqueeze(1).to(device), (~mask.any(-1)).unsqueeze(1).to(device)
