"""Bytes torch's allocator holds during a piece of code, on the CPU as on a GPU.

`torch.cuda.max_memory_allocated` has no CPU counterpart, and a process's RSS mixes in Python, libraries and
freed-but-kept pages. The profiler's memory events do not: with `profile_memory=True` every allocation and
free of torch's allocator (CPU and CUDA) is recorded with the running total since the profile started, so
the peak and the net change over a region are exact, in bytes of tensors.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationPeak:
    """`with AllocationPeak() as m: ...`; then `m.peak`: the most bytes held at once above what was held at the
    start (0 if nothing was allocated), `m.net`: held at the end minus at the start (negative when the region
    freed more than it kept), `m.largest`: the largest single allocation. Counts the allocations of every device
    torch's allocators report."""

    def __init__(self):
        self.peak = self.net = self.largest = 0

    def __enter__(self):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        events = sorted(_allocations(self._prof.profiler.kineto_results.experimental_event_tree()))
        held = peak = 0
        for _, size in events:
            held += size
            peak = max(peak, held)
        self.peak, self.net, self.largest = peak, held, max([0] + [size for _, size in events])
        return False


def _allocations(nodes):
    """(time, bytes: + allocated, - freed) of every allocator event under the profiler's event tree."""
    for n in nodes:
        if n.tag == torch._C._profiler._EventType.Allocation:
            yield n.start_time_ns, n.extra_fields.alloc_size
        yield from _allocations(n.children)


class LargestFloatTensor(TorchDispatchMode):
    """`with LargestFloatTensor() as m: ...`; then `m.bytes`: the largest floating-point tensor any op produced in
    the region (a checkpoint's own tensors, as opposed to the byte buffers of pickled plans and metadata that
    torch.distributed.checkpoint exchanges between ranks)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.bytes = max(self.bytes, t.nbytes)
        return out
