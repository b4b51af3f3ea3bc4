"""Count the collectives a piece of code issues: operation, group size and logical bytes.

Logical bytes are the size of the full tensor a collective works on (the all-reduced tensor, the
all-gather's output, the reduce-scatter's input): what the Megatron analysis counts, independent of how
a backend implements it (gloo's reduce-scatter, for one, runs a whole all-reduce underneath).
Used by the tests (so no extra communication slips in) and by the benchmarks (measured vs theory).

Point-to-point transfers posted through `batch_isend_irecv` (ring attention's K/V blocks) are recorded too,
each send as op "send" and each receive as "recv", with the bytes of the tensor: a byte moved once is one
send (and one receive on its peer).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch.distributed as dist

# name -> index of the argument holding the full tensor
_COUNTED = {"all_reduce": 0, "all_gather_single": 0, "all_gather_into_tensor": 0,
            "reduce_scatter_single": 1, "reduce_scatter_tensor": 1, "broadcast": 0}
_P2P = {"isend": "send", "irecv": "recv"}  # P2POp.op's name -> the op recorded
_CANONICAL = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
              "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter"}


@dataclass(frozen=True)
class Collective:
    op: str  # all_reduce | all_gather | reduce_scatter | broadcast | send | recv
    group_size: int
    numel: int
    bytes: int
    group: object = field(default=None, compare=False)  # the process group it ran on (None: the default one)


class CollectiveCounter:
    """`with CollectiveCounter() as log: ...` records every collective of torch.distributed in `log.calls`."""

    def __init__(self):
        self.calls: list[Collective] = []

    @contextlib.contextmanager
    def _patched(self):
        originals = {name: getattr(dist, name) for name in _COUNTED}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                t = args[_COUNTED[name]] if len(args) > _COUNTED[name] else \
                    kwargs.get("tensor", kwargs.get("output_tensor", kwargs.get("input")))
                group = kwargs.get("group")
                size = dist.get_world_size(group)
                if size > 1:
                    self.calls.append(Collective(_CANONICAL.get(name, name), size, t.numel(),
                                                 t.numel() * t.element_size(), group))
                return fn(*args, **kwargs)
            return counted

        def batch_counted(p2p_op_list):
            for p in p2p_op_list:
                self.calls.append(Collective(_P2P[p.op.__name__], dist.get_world_size(p.group), p.tensor.numel(),
                                             p.tensor.numel() * p.tensor.element_size(), p.group))
            return batch(p2p_op_list)

        batch = dist.batch_isend_irecv
        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        dist.batch_isend_irecv = batch_counted
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
            dist.batch_isend_irecv = batch

    def __enter__(self):
        self._ctx = self._patched()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def counts(self) -> Counter:
        return Counter(c.op for c in self.calls)

    def bytes_by_op(self) -> Counter:
        out = Counter()
        for c in self.calls:
            out[c.op] += c.bytes
        return out
