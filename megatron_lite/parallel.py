"""The DP x TP process grid.

Ranks are laid out as ``arange(world).view(dp, tp)``: TP is the innermost dimension, so the ranks of a
TP group are consecutive (and share a node under torchrun), and a DP group joins the ranks with the same
TP rank. Everything that needs a group receives this context explicitly; nothing is stored in module
globals, so one process can build several layouts (the tests do).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


COLLECTIVE_TIMEOUT_S = 600.0  # every process group's timeout: a collective waits this long before it fails


class ParallelConfigError(ValueError):
    """A layout that cannot be built; raised before any collective runs."""


@dataclass(frozen=True)
class ParallelContext:
    tp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    rank: int
    world_size: int
    device: torch.device
    grid: tuple[tuple[int, ...], ...]  # grid[d][t] = global rank with DP rank d and TP rank t

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        tp_groups = ", ".join(str(list(row)) for row in self.grid)
        dp_groups = ", ".join(str(list(col)) for col in zip(*self.grid))
        return (f"DP={self.dp_size} x TP={self.tp_size} on {self.world_size} ranks ({self.device.type}); "
                f"TP groups: {tp_groups}; DP groups: {dp_groups}")


def check_world_size(world_size: int, tp_size: int) -> None:
    if tp_size < 1:
        raise ParallelConfigError(f"parallel.tp={tp_size} must be >= 1")
    if world_size % tp_size:
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by parallel.tp={tp_size}: launch a multiple of "
            f"{tp_size} processes (--nproc_per_node) or pick a parallel.tp that divides {world_size}")


def default_device(kind: str | None = None) -> torch.device:
    """This process's device: its GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if kind == "cuda" or (kind is None and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Join the job torchrun (env://) describes; a plain `python` run becomes a world of one."""
    if dist.is_initialized():
        return
    alone = "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = device or default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # A world of one needs no rendezvous: an in-memory store, rather than a "free" port that another process
    # may take before the TCPStore binds it (seen on a busy machine: EADDRINUSE).
    store = dist.HashStore() if alone else _restart_safe_store(timeout)
    dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


def _restart_safe_store(timeout: timedelta) -> dist.Store:
    """The rendezvous store, with keys kept apart per torchrun restart.

    Under torchrun the workers share the agent's TCPStore, and a restarted worker (--max-restarts) would
    read the dead attempt's addresses from it (pytorch/pytorch#135712); a prefix per restart avoids that."""
    addr, port, world = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(addr, port, world, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(addr, port, world, is_master=int(os.environ["RANK"]) == 0, timeout=timeout)
    return dist.PrefixStore(f"megatron_lite/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def build_parallel_context(tp_size: int, device: torch.device | None = None,
                           world_size: int | None = None) -> ParallelContext | None:
    """Create the TP and DP groups of a DP x TP grid over the already initialized world.

    Every rank must call this with the same arguments (new_group is collective over the world).
    `world_size`: build the grid over ranks [0, world_size) only, so that one job can hold several layouts
    (tests and benchmarks); the ranks outside it get None."""
    world, rank = world_size or dist.get_world_size(), dist.get_rank()
    check_world_size(world, tp_size)
    grid = torch.arange(world).view(world // tp_size, tp_size)
    tp_group = dp_group = None
    for row in grid.tolist():  # consecutive ranks: one TP group per DP rank
        group = dist.new_group(row)
        if rank in row:
            tp_group = group
    for col in grid.t().tolist():  # same TP rank across DP replicas
        group = dist.new_group(col)
        if rank in col:
            dp_group = group
    if rank >= world:
        return None
    dp_rank, tp_rank = divmod(rank, tp_size)
    return ParallelContext(
        tp_group=tp_group, dp_group=dp_group, tp_rank=tp_rank, tp_size=tp_size, dp_rank=dp_rank,
        dp_size=world // tp_size, rank=rank, world_size=world, device=device or default_device(),
        grid=tuple(tuple(row) for row in grid.tolist()))


def init_parallel(tp_size: int, device: str | None = None) -> ParallelContext:
    """Initialize torch.distributed if needed (NCCL on CUDA, gloo otherwise) and build the grid.

    `device`: "cpu" or "cuda" to force one, None for CUDA when available. The world-size check runs
    before the process group is created when torchrun has set WORLD_SIZE, so a bad layout fails at once
    on every rank instead of hanging on a collective."""
    check_world_size(int(os.environ.get("WORLD_SIZE", 1)), tp_size)
    dev = default_device(device)
    init_distributed(dev)
    return build_parallel_context(tp_size, dev)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for single-machine jobs and tests)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
