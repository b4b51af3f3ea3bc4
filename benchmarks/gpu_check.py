"""The prepared GPU check: `make gpu-check` (= `python -m benchmarks.gpu_check`), one GPU, unattended, < 8 minutes.

Prints, and writes to bench_results/gpu_check.json:

1. MFU of a gpt2-small- and a llama3.2-1b-shaped model at T=1, bf16 autocast, fused AdamW, through megatron-lite's
   own model, optimizer and step sequence (the trainer's: one device-to-host read per step): tokens/s, MFU
   (megatron_lite.metrics: PaLM's 6N + 12LHQT over the device table's dense bf16 peak; goal 50% on H100/H200),
   eager and (gpt2-small) torch.compile; which SDPA backend ran (flash expected); peak memory against
   metrics.memory_estimate; the profiler's top kernels; the host syncs of one step (CUDA's sync debug mode).
2. A 20-step loss curve of a small model on the device in bf16 against the same model, weights and batches on
   the CPU in float32: equal within bf16 tolerance.
3. A checkpoint round trip across devices: a zero=1 checkpoint saved on the device (AdamW's moments as pieces,
   RNG streams keyed by device) loads into a CPU model, weights and moments equal, RNG streams reseeded.

`--device cpu` runs all of it with small shapes (no MFU: no peak to divide by) in seconds: `make test` runs it
so that the script keeps working between the days a GPU is lent. One process, a gloo world of one: at T=1
nothing is communicated, and gloo lets one job hold CPU and CUDA tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_lite.checkpoint import _full_state, load_state
from megatron_lite.metrics import flops_per_token, memory_estimate, peak_flops
from megatron_lite.model import GPT, GPTConfig, RopeScaling
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel import build_parallel_context, set_matmul_precision
from megatron_lite.readout import HostReadCounter, read_to_host, to_device

from .host_memory import AllocationPeak

GPT2_SMALL = dict(vocab_size=50257, seq_len=1024, num_layers=12, hidden_size=768, num_heads=12)
LLAMA_1B = dict(vocab_size=128256, seq_len=2048, num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                ffn_hidden_size=8192, norm="rmsnorm", position_embedding="rope", rope_theta=500000.0,
                rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192),
                mlp="swiglu", attention_bias=False, mlp_bias=False, tie_embeddings=True)
TINY = dict(vocab_size=512, seq_len=64, num_layers=2, hidden_size=64, num_heads=4)
TINY_LLAMA = dict(LLAMA_1B, vocab_size=512, seq_len=64, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=128)
LOSS_MODEL = dict(vocab_size=4096, seq_len=256, num_layers=4, hidden_size=256, num_heads=4)
# name -> (shape, micro-batch, torch.compile too) on a GPU, and on the CPU
MODELS = {"cuda": {"gpt2-small": (GPT2_SMALL, 16, True), "llama3.2-1b": (LLAMA_1B, 4, False)},
          "cpu": {"gpt2-small (tiny)": (TINY, 2, False), "llama3.2-1b (tiny)": (TINY_LLAMA, 2, False)}}
LOSS = {"cuda": (LOSS_MODEL, 8), "cpu": (dict(TINY, vocab_size=256, seq_len=32, hidden_size=32, num_heads=2), 4)}
OPTIM = SimpleNamespace(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0, fused=True)
LOSS_RTOL = 2e-2  # bf16 autocast against float32, per step over 20 steps (a bf16 mantissa is 2^-8 = 4e-3)
MFU_GOAL = 0.50


def batch(cfg: GPTConfig, micro_batch: int, step: int, device: torch.device):
    """Sequences of a fixed random bigram chain (each token's successor is perm[token] 9 times in 10): something
    to learn in a few steps, so that the loss curves compared below fall."""
    g = torch.Generator().manual_seed(7000 + step)
    perm = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(7))
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len + 1), generator=g)
    follow = torch.rand(micro_batch, cfg.seq_len + 1, generator=g) < 0.9
    for i in range(1, cfg.seq_len + 1):
        tokens[:, i] = torch.where(follow[:, i], perm[tokens[:, i - 1]], tokens[:, i])
    return to_device(tokens[:, :-1], device), to_device(tokens[:, 1:], device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(forward, opt, tokens, targets, bf16: bool) -> tuple[float, float]:
    """The trainer's sequence for one micro-batch: forward, backward, finalize + norm, one read, update."""
    with autocast(tokens.device, bf16):
        loss = forward(tokens, targets)
    loss.backward()
    norm = opt.prepare_grads()
    loss_value, norm_value = read_to_host(loss, norm)
    opt.step()
    opt.zero_grad()
    return loss_value, norm_value


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. MFU, memory, SDPA backend, kernels, syncs ----------------------------------------------------------

def measure_model(name: str, kw: dict, micro_batch: int, compiled: bool, device: torch.device, warmup: int,
                  steps: int) -> dict:
    ctx = build_parallel_context(1, device)
    cfg = GPTConfig(**kw)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    # peak memory: the CUDA allocator's counter on a GPU; on the CPU the profiler's memory events (not around a
    # GPU's compilation: they would record all of it)
    with AllocationPeak() if device.type == "cpu" else contextlib.nullcontext() as alloc:
        model = GPT(cfg, ctx)
        opt = build_optimizer(model, OPTIM, ctx)
        forward = torch.compile(model) if compiled else model
        t0 = time.perf_counter()
        train_step(forward, opt, *batch(cfg, micro_batch, 0, device), bf16=True)
        synced(device)
        first_step_s = time.perf_counter() - t0  # with compilation, when compiled
        for i in range(1, warmup):
            train_step(forward, opt, *batch(cfg, micro_batch, i, device), bf16=True)
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else alloc.peak
    times, losses = [], []
    for i in range(steps):
        tokens, targets = batch(cfg, micro_batch, warmup + i, device)
        synced(device)
        t0 = time.perf_counter()
        losses.append(train_step(forward, opt, tokens, targets, bf16=True)[0])
        synced(device)
        times.append(time.perf_counter() - t0)
    full, _ = model.num_parameters()
    step_s = statistics.median(times)
    tokens_per_s = micro_batch * cfg.seq_len / step_s
    fpt = flops_per_token(cfg, full, cfg.seq_len)
    peak = peak_flops(device)
    estimate = memory_estimate(model, SimpleNamespace(model=SimpleNamespace(seq_len=cfg.seq_len),
                                                      train=SimpleNamespace(micro_batch_size=micro_batch),
                                                      parallel=SimpleNamespace(zero=0)), ctx)
    estimate_bytes = (estimate["states_gb"] + estimate["activations_gb"]) * 2**30
    prof = profile_step(forward, opt, cfg, micro_batch, device)
    syncs = count_syncs(forward, opt, cfg, micro_batch, device)
    del model, opt, forward
    return dict(name=name, compiled=compiled, config={k: str(v) for k, v in kw.items()}, micro_batch=micro_batch,
                params=full, step_s=step_s, first_step_s=first_step_s, tokens_per_s=tokens_per_s,
                flops_per_token=fpt, achieved_tflops=tokens_per_s * fpt / 1e12,
                peak_tflops=peak / 1e12 if peak else None, mfu=tokens_per_s * fpt / peak if peak else None,
                peak_memory_gib=peak_bytes / 2**30, estimate_gib=estimate_bytes / 2**30,
                memory_vs_estimate=peak_bytes / estimate_bytes, losses=losses, syncs_per_step=syncs, **prof)


def profile_step(forward, opt, cfg, micro_batch, device, rows: int = 10) -> dict:
    """One step under torch.profiler: which SDPA implementation ran, and the top kernels (GPU) or ops (CPU)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tokens, targets = batch(cfg, micro_batch, 10**6, device)
    with profile(activities=acts) as prof:
        train_step(forward, opt, tokens, targets, bf16=True)
        synced(device)
    events = prof.key_averages()
    sdpa = sorted({e.key for e in events if "scaled_dot_product" in e.key or "flash" in e.key.lower()
                   or "attention" in e.key.lower() and e.key.startswith("aten::_")})
    time_of = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    kernels = [e for e in events if time_of(e) > 0 and (device.type != "cuda" or e.device_type.name == "CUDA")]
    total = sum(time_of(e) for e in kernels) or 1
    top = sorted(kernels, key=time_of, reverse=True)[:rows]
    return dict(sdpa_ops=sdpa, sdpa_backend=_sdpa_backend(sdpa),
                top_kernels=[dict(name=e.key[:100], ms=time_of(e) / 1e3, share=time_of(e) / total) for e in top])


def _sdpa_backend(ops: list[str]) -> str:
    for key, backend in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "memory-efficient"),
                         ("math", "math")):
        if any(key in op for op in ops):
            return backend
    return "unknown"


def count_syncs(forward, opt, cfg, micro_batch, device) -> int:
    """Host syncs of one step: CUDA's sync debug mode warns at every synchronizing call (torch's and ours); on
    the CPU, where nothing synchronizes, the host reads megatron-lite's code makes (the trainer's: one)."""
    tokens, targets = batch(cfg, micro_batch, 10**6 + 1, device)
    if device.type != "cuda":
        with HostReadCounter() as reads:
            train_step(forward, opt, tokens, targets, bf16=True)
        return len(reads.calls)
    synced(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(forward, opt, tokens, targets, bf16=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


# ---- 2. bf16 on the device against float32 on the CPU -------------------------------------------------------

def loss_curve(kw: dict, micro_batch: int, steps: int, device: torch.device) -> dict:
    """The same model, weights and batches: float32 on the CPU, bf16 autocast on `device`."""
    cfg = GPTConfig(**kw)
    cpu = build_parallel_context(1, torch.device("cpu"))
    dev = build_parallel_context(1, device)
    ref = GPT(cfg, cpu)
    model = GPT(GPTConfig(**kw), dev, init_weights=False)
    model.load_state_dict(ref.state_dict())
    runs = {}
    for name, m, ctx, bf16 in (("cpu float32", ref, cpu, False), (f"{device.type} bf16", model, dev, True)):
        opt = build_optimizer(m, OPTIM, ctx)
        runs[name] = [train_step(m, opt, *batch(cfg, micro_batch, i, ctx.device), bf16=bf16)[0] for i in range(steps)]
    (a, want), (b, got) = runs.items()
    rel = [abs(x - y) / abs(y) for x, y in zip(got, want)]
    return dict(config=kw, steps=steps, micro_batch=micro_batch, losses=runs, max_rel_diff=max(rel), rtol=LOSS_RTOL,
                equal=max(rel) <= LOSS_RTOL and all(math.isfinite(x) for x in got),
                loss_fell=got[-1] < got[0] and want[-1] < want[0])


# ---- 3. a zero=1 checkpoint saved on the device, loaded on the CPU ---------------------------------------------

def checkpoint_round_trip(device: torch.device, root: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    kw = dict(TINY, dropout=0.1)
    cfg = GPTConfig(**kw)
    ctx = build_parallel_context(1, device)
    model = GPT(cfg, ctx)
    opt = build_optimizer(model, OPTIM, ctx, zero=1)
    for i in range(2):
        train_step(model, opt, *batch(cfg, 2, i, device), bf16=device.type == "cuda")
    path = root / "step_0000002"
    dcp.save(_full_state(model, opt, ctx), checkpoint_id=str(path))
    (path / "meta.json").write_text(json.dumps({"step": 2}))
    cpu = build_parallel_context(1, torch.device("cpu"))
    loaded = GPT(GPTConfig(**kw), cpu, init_weights=False)
    loaded_opt = build_optimizer(loaded, OPTIM, cpu, zero=1)
    notes: list[str] = []
    load_state(path, loaded, loaded_opt, cpu, log=notes.append)
    want, got = opt.full_state(), loaded_opt.full_state()
    same = all(torch.equal(p.detach().cpu(), q.detach()) for p, q in zip(model.parameters(), loaded.parameters()))
    same_moments = all(torch.equal(want[n][k].cpu(), got[n][k]) for n in want for k in ("exp_avg", "exp_avg_sq"))
    steps = loaded_opt.num_steps
    loss, _ = train_step(loaded, loaded_opt, *batch(cfg, 2, 2, torch.device("cpu")), bf16=False)
    return dict(saved_on=device.type, weights_equal=same, moments_equal=same_moments, steps=steps, rng_note=notes,
                trains_on=math.isfinite(loss))


# ---- the report ------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--out", default="bench_results/gpu_check.json")
    p.add_argument("--steps", type=int, default=None, help="measured steps per model (10 on a GPU, 2 on the CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    args = p.parse_args(argv)
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device("cuda", 0) if kind == "cuda" else torch.device("cpu")
    steps = args.steps or (10 if kind == "cuda" else 2)
    t_start = time.perf_counter()
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    set_matmul_precision(device, True)
    out = dict(machine=dict(device=torch.cuda.get_device_name(device) if kind == "cuda" else platform.processor()
                            or platform.machine(), torch=torch.__version__, cuda=torch.version.cuda,
                            cores=os.cpu_count()), device=kind, goal_mfu=MFU_GOAL, models=[])
    say = print
    say(f"megatron-lite GPU check on {out['machine']['device']} (torch {torch.__version__})")
    try:
        for name, (kw, micro, compile_too) in MODELS[kind].items():
            for compiled in (False, True) if compile_too and not args.no_compile else (False,):
                r = measure_model(name, kw, micro, compiled, device, warmup=3 if kind == "cuda" else 1, steps=steps)
                out["models"].append(r)
                mfu = f"MFU {100 * r['mfu']:.1f}% (goal {100 * MFU_GOAL:.0f}%)" if r["mfu"] is not None else \
                    f"{r['achieved_tflops'] * 1e3:.1f} GFLOP/s (no peak on {kind})"
                say(f"== {name}{' (compiled)' if compiled else ''}: {r['params'] / 1e6:.1f}M params, micro-batch "
                    f"{micro} x {kw['seq_len']}: {1e3 * r['step_s']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
                    f"{mfu}; first step {r['first_step_s']:.1f} s")
                say(f"   SDPA: {r['sdpa_backend']} ({', '.join(r['sdpa_ops']) or 'none seen'}); peak memory "
                    f"{r['peak_memory_gib']:.2f} GiB vs estimate {r['estimate_gib']:.2f} GiB "
                    f"(x{r['memory_vs_estimate']:.2f}); host syncs in one step: {r['syncs_per_step']}")
                for k in r["top_kernels"]:
                    say(f"     {100 * k['share']:5.1f}%  {k['ms']:8.2f} ms  {k['name']}")
        kw, micro = LOSS[kind]
        out["loss"] = lc = loss_curve(kw, micro, 20, device)
        say(f"== 20-step loss, {kind} bf16 vs CPU float32 (L={kw['num_layers']} h={kw['hidden_size']} "
            f"s={kw['seq_len']} b={micro}): max relative difference {lc['max_rel_diff']:.2e} "
            f"({'within' if lc['equal'] else 'NOT within'} {LOSS_RTOL:g}); loss fell: {lc['loss_fell']}")
        with tempfile.TemporaryDirectory() as d:
            out["checkpoint"] = ck = checkpoint_round_trip(device, Path(d))
        say(f"== zero=1 checkpoint saved on {kind}, loaded on cpu: weights equal {ck['weights_equal']}, moments "
            f"equal {ck['moments_equal']}, trains on {ck['trains_on']}; " + ("; ".join(ck["rng_note"]) or
                                                                          "RNG streams loaded as saved"))
    finally:
        if own_group:
            dist.destroy_process_group()
    out["wall_s"] = time.perf_counter() - t_start
    say(f"total {out['wall_s']:.0f} s; numbers in {args.out}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
