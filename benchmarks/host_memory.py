"""Bytes torch's allocator holds during a piece of code, on the CPU as on a GPU.

`torch.cuda.max_memory_allocated` has no CPU counterpart, and a process's RSS mixes in Python, libraries and
freed-but-kept pages. The profiler's memory events do not: with `profile_memory=True` every allocation and
free of torch's allocators is recorded with the allocator's running total, in bytes of tensors.

Only on the threads the profiler follows, though: a tensor whose last reference a collective's worker thread
drops (gloo's, for a DDP bucket it reduced) is freed without an event. Summing the events would keep such a
tensor held forever, so the running totals are read instead: CUDA's caching allocator keeps its total for every
thread; the CPU allocator keeps one only while its `caffe2_report_cpu_memory_usage` flag is on (otherwise it
counts on profiled threads alone), so the first region turns the flag on for the rest of the process (turned
off, the tensors a region kept would stay in the allocator's table after their free, at sizes that go stale).
A free on another thread then shows in the total at the next event, and a one-byte allocation at each end of
the region pins the totals there.
"""
from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


def _cpu_usage_flag() -> ctypes.c_bool:
    """c10's `FLAGS_caffe2_report_cpu_memory_usage`: a gflag of libc10 that torch exposes to no Python API."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")


class AllocationPeak:
    """`with AllocationPeak() as m: ...`; then `m.peak`: the most bytes held at once above what was held at the
    start (0 if nothing was allocated), `m.net`: held at the end minus at the start (negative when the region
    freed more than it kept), `m.largest`: the largest single allocation. Counts the allocations of every device
    torch's allocators report, freed on any thread."""

    def __init__(self):
        self.peak = self.net = self.largest = 0

    def __enter__(self):
        _cpu_usage_flag().value = True
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, profile_memory=True)
        self._prof.__enter__()
        self._mark = torch.empty(1, dtype=torch.uint8)  # its allocation reads the CPU total at the start
        return self

    def __exit__(self, *exc):
        mark = self._mark.data_ptr()
        del self._mark  # its free reads the total at the end, after any free on another thread
        self._prof.__exit__(*exc)
        events = sorted(_allocations(self._prof.profiler.kineto_results.experimental_event_tree()))
        first = next(i for i, e in enumerate(events) if e.ptr == mark and e.size == 1)
        last = max(i for i, e in enumerate(events) if e.ptr == mark and e.size == -1)
        base, now, peak = {events[first].device: events[first].total}, {}, 0
        for e in events[first + 1:last]:
            base.setdefault(e.device, e.total - e.size)  # a device's total before its first event
            now[e.device] = e.total
            peak = max(peak, sum(now.values()) - sum(base[d] for d in now))
        now[events[last].device] = events[last].total + 1
        self.peak, self.net = peak, sum(now.values()) - sum(base.values())
        self.largest = max([0] + [e.size for e in events[first + 1:last]])
        return False


class _Event(NamedTuple):
    time: int
    device: str
    ptr: int
    size: int  # + allocated, - freed
    total: int  # the device allocator's total after it


def _allocations(nodes):
    """Every allocator event under the profiler's event tree."""
    for n in nodes:
        if n.tag == torch._C._profiler._EventType.Allocation:
            f = n.extra_fields
            yield _Event(n.start_time_ns, str(f.device), f.ptr, f.alloc_size, f.total_allocated)
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
