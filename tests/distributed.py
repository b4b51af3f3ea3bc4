"""Run a test body on several real gloo processes (spawned, on a free local port)."""
from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.parallel import free_port




def _worker(rank, world_size, port, fn, args, timeout_s, stacks):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # run_distributed's deadline asks every rank for its stack (the file stays open for the process's life)
    faulthandler.register(signal.SIGUSR1, file=open(Path(stacks) / f"rank{rank}.txt", "w"), all_threads=False)
    # A short timeout: if one rank fails, the others give up instead of hanging the suite.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


# The ranks are forked from a forkserver that has imported torch and megatron-lite once for the whole session
# (spawned, each rank imported them anew: ~3 s of a 2-core machine per rank); like spawn, and unlike fork, a rank
# starts from a clean single-threaded process, never from a copy of pytest's.
# transformers' model modules too (~4 s a process; ranks of the HF tests build them; skipped when not installed).
mp.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "megatron_lite.model", "megatron_lite.optim",
                           "megatron_lite.checkpoint", "transformers",
                           *(f"transformers.models.{m}.modeling_{m}" for m in ("gpt2", "llama", "mistral", "qwen2", "qwen3"))])


def run_distributed(fn, world_size: int, *args, timeout_s: float = 60, deadline_s: float = 300) -> None:
    """Call fn(*args) on `world_size` gloo ranks; a failure on any rank fails the caller with its traceback.
    `timeout_s`: the world's collective timeout. `deadline_s`: a world still running then is killed and the
    caller fails with every rank's Python stack: a hang costs minutes and says where, never the whole suite."""
    with tempfile.TemporaryDirectory() as stacks:
        procs = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, timeout_s, stacks),
                                   nprocs=world_size, join=False, start_method="forkserver")
        end = time.monotonic() + deadline_s
        while not procs.join(timeout=1):
            if time.monotonic() > end:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks still running after {deadline_s:g} s "
                                   f"(a hang?), killed; their stacks:\n{_stop(procs.processes, Path(stacks))}")


def _stop(processes, stacks: Path) -> str:
    """Kill the ranks, each after it wrote its main thread's stack; the stacks."""
    for p in processes:
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(0.5)  # faulthandler writes from its signal handler, even while the rank is blocked in C++
    for p in processes:
        p.kill()
    return "\n".join(f"rank {rank}: {(stacks / f'rank{rank}.txt').read_text().strip()}"
                     for rank in range(len(processes)))


def broadcast(obj):
    """Rank 0's `obj` on every rank of the world."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_rel_err(got: dict, want: dict) -> float:
    """The largest relative error (L2 norms) over the tensors of `want`."""
    return max(((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-30)).item() for k in want)


def _collect(out_path: str, root: str, steps) -> None:
    out: dict = {}
    for step in steps:
        step(out, Path(root))
    if dist.get_rank() == 0:
        Path(out_path).write_bytes(pickle.dumps(out))


def run_world(steps, world_size: int, root: Path) -> dict:
    """Call each step(out, root) in turn (`steps`: one callable or a list) on `world_size` gloo ranks, every rank
    the same `root` directory; return rank 0's `out` dict (the findings the tests assert on)."""
    steps = [steps] if callable(steps) else steps
    run_distributed(_collect, world_size, str(root / "out.pkl"), str(root), steps)
    return pickle.loads((root / "out.pkl").read_bytes())
