"""Launch train.py through torchrun, as a user would, and read what the run wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# A small, fast model for end-to-end tests: seconds per run on 2 cores.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=64",
         "train.global_batch_size=8", "train.micro_batch_size=2", "logging.every=1", "train.eval_every=0",
         "optim.warmup_steps=2", "sample.max_new_tokens=0", "logging.wandb.mode=disabled"]


# The reference run (conftest.ref, shared by the checkpoint and resilience tests): DP2 x TP2 + SP, 8 steps,
# a checkpoint every 2.
REF_STEPS, REF_EVERY = 8, 2
REF_ARGS = [*SMALL, f"train.steps={REF_STEPS}", f"checkpoint.every={REF_EVERY}", "parallel.tp=2"]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *overrides: str, extra_args=(), timeout: float = 240, check: bool = True):
    """`torchrun --standalone --nproc_per_node=N train.py OVERRIDES`; returns the CompletedProcess."""
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *extra_args, str(ROOT / "train.py"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl") if line.strip()]


def losses(run_dir) -> dict[int, float]:
    """step -> training loss, from metrics.jsonl."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def ckpt_names(run_dir) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir())


def loss_steps(run_dir) -> list[int]:
    return [m["step"] for m in metrics(run_dir) if "loss" in m]


def worker_pids(agent_pid: int) -> dict[int, int]:
    """RANK -> pid of the torchrun agent's worker processes (its children), read from /proc."""
    out = {}
    for task in Path(f"/proc/{agent_pid}/task").iterdir():
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for pid in children:
            rank = _rank(pid)
            if rank is not None:
                out[rank] = pid
    return out


def _rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def end_job(agent: subprocess.Popen) -> None:
    """Kill a torchrun agent still running (a failed test) and its workers, which run in sessions of their own."""
    if agent.poll() is None:
        stray = list(worker_pids(agent.pid).values())
        agent.kill()
        agent.wait()
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
