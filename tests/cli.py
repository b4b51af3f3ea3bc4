"""Launch train.py through torchrun, as a user would, and read what the run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# A small, fast model for end-to-end tests: seconds per run on 2 cores.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4", "model.seq_len=64",
         "train.global_batch_size=8", "train.micro_batch_size=2", "logging.every=1", "train.eval_every=0",
         "optim.warmup_steps=2", "sample.max_new_tokens=0", "logging.wandb.mode=disabled"]


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
