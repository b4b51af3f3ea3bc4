"""Process launch and timing helpers shared by the measurement workers.

`launch(fn, N, ...)` runs fn(device, ...) on N fresh processes (gloo on CPU with one thread each, NCCL on
GPUs, one per GPU) and returns rank 0's result. `timed` measures one step from a barrier, `slowest_rank`
turns per-rank step times into the slowest rank's, which is what a synchronous step costs.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_lite.model import GPTConfig
from megatron_lite.optim import finalize_model_grads
from megatron_lite.parallel import free_port

from .dtensor_gpt import dtensor_loss_and_backward


# ---- process launch -------------------------------------------------------------------------------------



def _entry(rank, world, port, device_type, fn, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")  # deprecation chatter from DTensor/gloo would bury the table
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300),
                            device_id=torch.device("cuda", rank) if device_type == "cuda" else None)
    try:
        result = fn(torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu"), *args)
        if rank == 0:
            with open(out_path, "wb") as f:
                pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, device_type: str = "cpu"):
    """Run fn(device, *args) on `world_size` fresh processes; return rank 0's result."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pkl")
        mp.spawn(_entry, args=(world_size, free_port(), device_type, fn, args, out), nprocs=world_size, join=True)
        with open(out, "rb") as f:
            return pickle.load(f)


# ---- helpers --------------------------------------------------------------------------------------------

def batch(cfg: GPTConfig, micro_batch: int, step: int, device, stream: int = 0):
    g = torch.Generator().manual_seed(1000 * (stream + 1) + step)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def timed(fn, device) -> float:
    """Wall time of fn() from a barrier (all ranks start together) to its end on this rank."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def slowest_rank(times: list[float], device) -> list[float]:
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)


def ml_step(net, opt, tokens, targets) -> float:
    """One megatron-lite train step: forward, backward, finalize_model_grads (the SP-replicated gradients'
    TP sum; `net` is the GPT or DDP around it), AdamW."""
    loss = net(tokens, targets)
    loss.backward()
    finalize_model_grads(getattr(net, "module", net))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def dt_step(model, opt, tokens, targets) -> float:
    loss = dtensor_loss_and_backward(model, tokens, targets)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
