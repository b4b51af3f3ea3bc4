"""Moving values between the host and the device without needless synchronization.

On a GPU every read of a device value on the host (`.item()`, `.tolist()`, `float(t)`, `if t:`) waits for all the
work queued before it: the CPU stops running ahead, and the GPU idles while the CPU queues the next kernels. A
training step needs its loss, its gradient norm (to stop before a non-finite update) and the ranks' stop votes:
`read_to_host` reads them in one transfer. Batches go the other way: `to_device` copies them from pinned memory
without blocking (a pageable copy synchronizes the stream).

`HostReadCounter` counts the reads megatron-lite's own code makes (tests: one per training step).
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch

_PACKAGE = str(Path(__file__).resolve().parent)


def read_to_host(*tensors: torch.Tensor) -> list[float]:
    """The values of `tensors` (scalars or vectors, on one device), flattened in order, in one transfer."""
    return torch.cat([t.detach().double().reshape(-1) for t in tensors]).tolist()


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`: from pinned memory, asynchronously, on CUDA (the caching host allocator keeps
    the pinned buffer until the copy is done); as it is on the CPU."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu")  # (.numpy() refuses a CUDA
# tensor: it reads host memory only)


class HostReadCounter:
    """`with HostReadCounter() as reads: ...` records, in `reads.calls`, each Tensor method call that reads a
    value on the host (`item`, `tolist`, `float(t)`, `int(t)`, `bool(t)`, `.cpu()`) made from megatron-lite's
    own source files, as (file:line, method, phase). `phase` is what `mark(phase)` last set (e.g. the step)."""

    def __init__(self):
        self.calls: list[tuple[str, str, str]] = []
        self.phase = ""

    def mark(self, phase: str) -> None:
        self.phase = phase

    def per_phase(self) -> Counter:
        return Counter(phase for _, _, phase in self.calls)

    @contextlib.contextmanager
    def _patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in _READS}
        own = {name for name in _READS if name in vars(torch.Tensor)}  # the rest are TensorBase's

        def wrap(name, fn):
            def read(t, *args, **kwargs):
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(_PACKAGE):
                    where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
                    self.calls.append((where, name, self.phase))
                return fn(t, *args, **kwargs)
            return read

        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                if name in own:
                    setattr(torch.Tensor, name, fn)
                else:
                    delattr(torch.Tensor, name)

    def __enter__(self):
        self._ctx = self._patched()
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
