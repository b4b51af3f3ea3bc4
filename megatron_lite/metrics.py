"""What rank 0 tells the user: the layout and size at start, a line per logged step, metrics.jsonl, wandb.

Only rank 0 writes (console, `<run_dir>/train.log`, `<run_dir>/metrics.jsonl`, wandb); the other ranks'
calls return at once, so the loop calls the logger unconditionally.
"""
from __future__ import annotations

import json
import os
import resource
import secrets
from dataclasses import asdict

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (the first substring found wins): the PCIe and NVL variants of a
# GPU have lower clocks and power than its SXM form, whose name carries neither (e.g. "NVIDIA H100 80GB HBM3").
PEAK_BF16_TFLOPS = [
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H200 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0),
    ("4090", 165.0),
]


def peak_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of the GPU called `gpu_name`, in TFLOP/s; None for one not in the table."""
    name = gpu_name.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key.lower() in name), None)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = peak_tflops(torch.cuda.get_device_name(device))
    return None if peak is None else peak * 1e12


def flops_per_token(c, n_params: int, seq_len: int) -> float:
    """PaLM (Chowdhery et al. 2022, appendix B): 6N + 12 L H Q T for training, attention included, with
    H Q = num_heads * head_dim (the query width) and T the training sequence length.

    N counts the parameters that do matmul work per token, as nanoGPT does: every parameter but the learned
    position embeddings, an untied input embedding (a lookup, not a matmul) and the output layer's padded
    rows (the vocabulary is padded to model.vocab_pad_multiple; those logits are not model work). A tied
    embedding is the output layer, the largest matmul of a small GPT: its real rows count."""
    h, padding = c.hidden_size, c.padded_vocab_size - c.vocab_size
    n = n_params - padding * h - (0 if c.tie_embeddings else c.padded_vocab_size * h)
    n -= c.max_seq_len * h if c.position_embedding == "learned" else 0
    return 6 * n + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def memory_estimate(model, cfg, ctx) -> dict[str, float]:
    """Bytes per rank: fp32 weights and grads (8 B/param) and AdamW's two moments (8 B/param, or 8/DP with
    parallel.zero=1), and activations from Korthikanti et al. 2022, Table 2 (16-bit; doubled for fp32), with
    the vocab-sharded logits; under pipeline parallelism, of this stage's layers."""
    c, T = model.config, ctx.tp_size
    s = cfg.model.seq_len // ctx.cp_size  # the tokens of a sequence on this rank (context parallelism)
    b, h, a, L = cfg.train.micro_batch_size, c.hidden_size, c.num_heads, len(model.blocks)
    local = sum(p.numel() for p in model.parameters())
    per_layer = s * b * h * ((34 + 5 * a * s / h) / T if c.sequence_parallel else 10 + 24 / T + 5 * a * s / (h * T))
    logits = 2 * 4 * s * b * c.padded_vocab_size / T if ctx.pp_rank == ctx.pp_size - 1 else 0  # the last stage's
    act_bytes = L * per_layer * (1 if ctx.device.type == "cuda" else 2) + logits
    moments = 8 * local / (ctx.dp_cp_size if cfg.parallel.zero == 1 else 1)
    return {"states_gb": (8 * local + moments) / 2**30, "moments_bytes": moments, "activations_gb": act_bytes / 2**30}


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: peak RSS


class MetricsLogger:
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx, self.active = cfg, ctx, ctx.is_first_rank
        self.wandb_run = None
        self.flops_per_step = self.peak = None
        if self.active:
            os.makedirs(cfg.run_dir, exist_ok=True)

    def _write(self, name: str, line: str) -> None:
        with open(os.path.join(self.cfg.run_dir, name), "a") as f:
            f.write(line + "\n")

    def info(self, msg: str) -> None:
        if self.active:
            print(msg, flush=True)
            self._write("train.log", msg)

    def wandb_id(self) -> str:
        """The run's wandb id, kept in run_dir so a resumed run logs to the same wandb run."""
        path = os.path.join(self.cfg.run_dir, "wandb_id")
        if self.active and not os.path.exists(path):
            with open(path, "w") as f:
                f.write(secrets.token_hex(4))
        return open(path).read().strip() if self.active else ""

    def start(self, model, resumed_step: int, optimizer_state_bytes: int | None = None) -> None:
        """Print the model's size and memory estimate (and the optimizer state's measured bytes), trim
        metrics.jsonl to `resumed_step`, open wandb."""
        cfg, ctx = self.cfg, self.ctx
        full, local = model.num_parameters()
        self.flops_per_step = flops_per_token(model.config, full, cfg.model.seq_len) * cfg.train.global_batch_size * cfg.model.seq_len
        self.peak = peak_flops(ctx.device)
        if not self.active:
            return
        mem = memory_estimate(model, cfg, ctx)
        dp = ctx.dp_cp_size if cfg.parallel.zero == 1 else 1  # the optimizer state is split over DP x CP
        per_param = "16 B/param" if dp == 1 else f"8 + 8/{dp} B/param"
        self.info(f"model: {full / 1e6:.2f}M parameters ({local / 1e6:.2f}M on this rank); estimated memory per "
                  f"rank: {mem['states_gb']:.2f} GiB weights+grads+AdamW ({per_param}), {mem['activations_gb']:.2f} "
                  f"GiB activations per micro-batch")
        if optimizer_state_bytes is not None:
            how = ("parallel.zero=1: AdamW moments split over DP, buckets padded to a multiple of lcm(DP, 128)" if dp > 1 else
                   f"parallel.zero={cfg.parallel.zero}: AdamW moments replicated over DP")
            self.info(f"optimizer state per rank: {optimizer_state_bytes / 2**20:.2f} MiB measured "
                      f"({optimizer_state_bytes:,} bytes), theory 8 B x {local:,} local parameters"
                      f"{f' / DP {dp}' if dp > 1 else ''} = {int(mem['moments_bytes']):,} bytes ({how})")
        self._drop_metrics_after(resumed_step)
        if cfg.logging.wandb.mode != "disabled":
            import wandb
            w = cfg.logging.wandb
            self.wandb_run = wandb.init(project=w.project, entity=w.entity, dir=cfg.run_dir, mode=w.mode,
                                        name=w.name or os.path.basename(os.path.normpath(cfg.run_dir)),
                                        id=self.wandb_id(), resume="allow", config=asdict(cfg))

    def _drop_metrics_after(self, step: int) -> None:
        """A run resumed from step k logs steps > k again: keep metrics.jsonl free of the lost ones."""
        path = os.path.join(self.cfg.run_dir, "metrics.jsonl")
        if os.path.exists(path):
            lines = [ln for ln in open(path) if ln.strip() and json.loads(ln).get("step", 0) <= step]
            with open(path, "w") as f:
                f.writelines(lines)

    def step(self, step: int, *, loss, lr, grad_norm, step_time, tokens_per_sec, consumed_samples,
             epoch: int | None = None) -> None:
        if not self.active:
            return
        ctx = self.ctx
        record = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_sec=tokens_per_sec,
                      ms_per_step=1000 * step_time, consumed_samples=consumed_samples,
                      mem_gb=memory_gb(ctx.device))
        if epoch is not None:  # data.sampling=epoch: the epoch of the step's last sample
            record["epoch"] = epoch
        if self.peak:
            record["mfu"] = self.flops_per_step / step_time / (self.peak * ctx.world_size)
        mfu = f" | mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
        self.info(f"step {step:>6}/{self.cfg.train.steps} | loss {loss:.4f} | lr {lr:.2e} | grad norm "
                  f"{grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s | {1000 * step_time:.0f} ms/step{mfu} | "
                  f"mem {record['mem_gb']:.2f} GiB" + (f" | epoch {epoch}" if epoch is not None else ""))
        self._log(record)

    def eval(self, step: int, val_loss: float) -> None:
        if self.active:
            self.info(f"step {step:>6}/{self.cfg.train.steps} | val loss {val_loss:.4f}")
            self._log(dict(step=step, val_loss=val_loss))

    def _log(self, record: dict) -> None:
        self._write("metrics.jsonl", json.dumps(record))
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
