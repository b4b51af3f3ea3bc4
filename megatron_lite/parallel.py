"""The TP x CP x DP x PP process grid (Megatron's tp-cp-dp-pp order).

Ranks are laid out as ``arange(world).view(pp, dp, cp, tp)``:

    rank = ((pp * DP + dp) * CP + cp) * TP + tp

TP is innermost, so the ranks of a TP group are consecutive (one node under torchrun); CP next, then DP; PP is
outermost, so the stages of a pipeline sit on different nodes and only their p2p crosses the slow links. With
CP = PP = 1 this is the DP x TP grid ``view(dp, tp)``. The groups (a group varies one index, or two):

    TP       tp          column/row-parallel collectives, SP gather/scatter, the vocab-parallel loss
    CP       cp          K/V exchange in attention; the loss's token count
    DP       dp          the data: each DP rank reads its own samples
    DP x CP  dp, cp      gradient reduction and the ZeRO-1 shards (every CP rank holds the same weights)
    PP       pp          p2p to the previous / next stage
    embedding pp in {0, PP-1}  summing a tied embedding's gradient between the first and last stage

Everything that needs a group receives this context explicitly; nothing is stored in module globals, so one
process can build several layouts (the tests do).
"""
from __future__ import annotations

import math
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
    grid: tuple  # grid[pp][dp][cp][tp] = global rank
    cp_group: dist.ProcessGroup
    cp_rank: int
    cp_size: int
    dp_cp_group: dist.ProcessGroup  # gradients and ZeRO shards; the DP group itself when CP = 1
    pp_group: dist.ProcessGroup
    pp_rank: int
    pp_size: int
    embedding_group: dist.ProcessGroup | None  # the first and the last stage (this rank alone at PP = 1); None
    # on a middle stage

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp: int) -> int:
        """The global rank at pipeline stage `pp` with this rank's DP, CP and TP indices."""
        return self.grid[pp][self.dp_rank][self.cp_rank][self.tp_rank]

    def describe(self) -> str:
        g = torch.tensor(self.grid)
        parts = [f"DP={self.dp_size}", f"TP={self.tp_size}"] + [f"{k}={v}" for k, v in (("CP", self.cp_size),
                                                                                       ("PP", self.pp_size)) if v > 1]
        dims = [("TP", 3, self.tp_size), ("CP", 2, self.cp_size), ("DP", 1, self.dp_size), ("PP", 0, self.pp_size)]
        groups = [f"{name} groups: {_groups(g, dim)}" for name, dim, size in dims if size > 1 or name in ("TP", "DP")]
        return f"{' x '.join(parts)} on {self.world_size} ranks ({self.device.type}); " + "; ".join(groups)


def _groups(grid: torch.Tensor, dim: int) -> str:
    """The groups along `dim` of the 4-D grid, e.g. '[0, 1], [2, 3]'."""
    return ", ".join(str(row) for row in grid.movedim(dim, -1).reshape(-1, grid.shape[dim]).tolist())


def check_world_size(world_size: int, tp_size: int, cp_size: int = 1, pp_size: int = 1) -> None:
    for key, size in (("tp", tp_size), ("cp", cp_size), ("pp", pp_size)):
        if size < 1:
            raise ParallelConfigError(f"parallel.{key}={size} must be >= 1")
    model_ranks = tp_size * cp_size * pp_size
    if world_size % model_ranks:
        named = [f"parallel.{k}={v}" for k, v in (("tp", tp_size), ("cp", cp_size), ("pp", pp_size)) if v > 1]
        sizes = named[0] if len(named) == 1 else f"{' x '.join(named)} = {model_ranks}"
        raise ParallelConfigError(
            f"world size {world_size} is not divisible by {sizes}: launch a multiple of {model_ranks} processes "
            f"(--nproc_per_node) or pick sizes whose product divides {world_size}")


def default_device(kind: str | None = None) -> torch.device:
    """This process's device: its GPU when CUDA is available, else the CPU. Its GPU is LOCAL_RANK among those
    it sees, modulo their number: a process that sees one GPU only (Slurm's --gpus-per-task=1, or
    CUDA_VISIBLE_DEVICES per rank) uses cuda:0 whatever its local rank (torchtitan does the same)."""
    if kind == "cuda" or (kind is None and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def cuda_environment(tp_size: int, device: torch.device) -> None:
    """What must be set before the CUDA context exists. CUDA_DEVICE_MAX_CONNECTIONS=1 when TP > 1: with one
    hardware queue the kernels start in the order they are issued, so the column-parallel backward's collective,
    issued before the weight-gradient matmul, runs alongside it instead of waiting behind it (Megatron-LM sets the
    same for its TP/SP communication overlap). A value the user set is kept."""
    if device.type == "cuda" and tp_size > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """float32 matmuls and convolutions on TF32 tensor cores on GPUs (train.tf32; what train.dtype=float32 runs
    on, and the float32 parts of bf16 autocast): 8x the throughput for a 10-bit mantissa in the products.
    CPU runs stay in exact float32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
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


def build_parallel_context(tp_size: int, device: torch.device | None = None, world_size: int | None = None,
                           cp_size: int = 1, pp_size: int = 1) -> ParallelContext | None:
    """Create the TP, CP, DP, DP x CP, PP and embedding groups of the grid over the initialized world.

    Every rank must call this with the same arguments (new_group is collective over the world).
    `world_size`: build the grid over ranks [0, world_size) only, so that one job can hold several layouts
    (tests and benchmarks); the ranks outside it get None."""
    world, rank = world_size or dist.get_world_size(), dist.get_rank()
    check_world_size(world, tp_size, cp_size, pp_size)
    dp_size = world // (tp_size * cp_size * pp_size)
    grid = torch.arange(world).view(pp_size, dp_size, cp_size, tp_size)
    device = device or default_device()
    timeout = world_timeout(device)

    def groups_along(*dims: int) -> dist.ProcessGroup | None:
        """One group per combination of the other indices; returns this rank's."""
        rows = grid.movedim(dims, tuple(range(4 - len(dims), 4))).reshape(-1, math.prod(grid.shape[d] for d in dims))
        mine = None
        for row in rows.tolist():  # every rank creates every group, in the same order
            group = dist.new_group(row, timeout=timeout)
            if rank in row:
                mine = group
        return mine

    # Every group exists at every size (a singleton where a dimension is 1): a collective given `group=None`
    # would run over the whole world instead.
    tp_group, cp_group, dp_group, pp_group = groups_along(3), groups_along(2), groups_along(1), groups_along(0)
    dp_cp_group = groups_along(1, 2) if cp_size > 1 else dp_group
    embedding_group = None
    for row in grid[sorted({0, pp_size - 1})].movedim(0, -1).reshape(-1, min(pp_size, 2)).tolist():
        # the first and the last stage: a tied embedding's gradient is summed here
        group = dist.new_group(row, timeout=timeout)
        if rank in row:
            embedding_group = group
    if rank >= world:
        return None
    pp_rank, dp_rank, cp_rank, tp_rank = (int(i) for i in (grid == rank).nonzero()[0])
    return ParallelContext(
        tp_group=tp_group, dp_group=dp_group, tp_rank=tp_rank, tp_size=tp_size, dp_rank=dp_rank, dp_size=dp_size,
        rank=rank, world_size=world, device=device, grid=_nested(grid),
        cp_group=cp_group, cp_rank=cp_rank, cp_size=cp_size, dp_cp_group=dp_cp_group,
        pp_group=pp_group, pp_rank=pp_rank, pp_size=pp_size, embedding_group=embedding_group)


def world_timeout(device: torch.device) -> timedelta | None:
    """The timeout the world was initialized with (init_distributed's `timeout_s`). new_group does not inherit
    it: a group gets torch's default instead (30 minutes on gloo), so a TP, DP or PP collective would wait far
    longer than the world's, and than the watchdog's bound in config.validate assumes. None (torch's default)
    where the backend does not say."""
    try:
        return dist.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # a private attribute: a backend without options, or a future torch
        return None


def _nested(grid: torch.Tensor) -> tuple:
    return tuple(_nested(g) for g in grid) if grid.dim() else int(grid)


def init_parallel(tp_size: int, device: str | None = None, cp_size: int = 1, pp_size: int = 1) -> ParallelContext:
    """Initialize torch.distributed if needed (NCCL on CUDA, gloo otherwise) and build the grid.

    `device`: "cpu" or "cuda" to force one, None for CUDA when available. The world-size check runs
    before the process group is created when torchrun has set WORLD_SIZE, so a bad layout fails at once
    on every rank instead of hanging on a collective."""
    check_world_size(int(os.environ.get("WORLD_SIZE", 1)), tp_size, cp_size, pp_size)
    dev = default_device(device)
    cuda_environment(tp_size, dev)
    init_distributed(dev)
    return build_parallel_context(tp_size, dev, cp_size=cp_size, pp_size=pp_size)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for single-machine jobs and tests)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
