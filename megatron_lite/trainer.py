"""The training loop over a DP x PP x TP grid: data, model, DDP, AdamW, logs, evaluation, checkpoints, sample.

One optimizer step consumes `train.global_batch_size` sequences: each DP rank runs `grad_accum` micro-batches
of `train.micro_batch_size` through the pipeline schedule (pipeline_parallel: at PP = 1 forward and backward
of each micro-batch in turn); the gradients are reduced over the DP x CP group once, during the last
micro-batch's backward (DDP's all-reduce, or the distributed optimizer's reduce-scatter under parallel.zero=1;
after the schedule at PP > 1 with zero=0), and finalized (optim.finalize_model_grads) once per optimizer step.
The step's loss, computed on the last pipeline stage, is the mean over all of its counted targets (token_loss.py:
each micro-batch's loss is weighted by its share of them).

At every step boundary the ranks agree whether to stop (a stop signal, the time limit) and on the outcome of
the checkpoint in flight; a hang watchdog is armed for every step, evaluation and save (resilience.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from .checkpoint import Checkpointer, load_model
from .config import Config, config_warnings, gpt_config, grad_accum_steps, train_dtype
from .context_parallel import shard_batch
from .data import TokenizedCorpus, dp_sample_indices, prepare_corpus
from .data.packing import make_windows
from .generate import generate
from .hf_config import architecture, is_hf_model_dir, read_hf_config
from .metrics import MetricsLogger
from .model import GPT
from .optim import build_optimizer, lr_at
from .parallel import ParallelContext, build_parallel_context, init_parallel, set_matmul_precision
from .pipeline_parallel import PipelineExecutor, describe, stage_chunks
from .readout import read_to_host
from .resilience import RunGuard
from .token_loss import dp_cp_average, forward_backward, mean_loss


class DivergenceError(RuntimeError):
    """A non-finite loss or gradient norm; raised on every rank at the same step."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global sequences consumed: the data position


def train(cfg: Config) -> None:
    guard = RunGuard(cfg)  # before the process groups: it turns PyTorch's flight recorder on
    p = cfg.parallel
    ctx = init_parallel(p.tp, device=None if cfg.train.device == "auto" else cfg.train.device, cp_size=p.cp, pp_size=p.pp)
    try:
        _train(cfg, ctx, guard)
    finally:
        guard.close()
        dist.destroy_process_group()


def _train(cfg: Config, ctx: ParallelContext, guard: RunGuard) -> None:
    torch.manual_seed(cfg.train.seed)
    log = MetricsLogger(cfg, ctx)
    agreement = guard.start(ctx, log)
    log.info(f"layout: {ctx.describe()}")
    set_matmul_precision(ctx.device, cfg.train.tf32)
    corpus = prepare_corpus(cfg.data, log=log.info)  # one process builds, the others poll: no collective
    ckpt = Checkpointer(cfg, ctx, corpus, wandb_id=log.wandb_id(), agree=agreement.sum, log=log.info)
    state = TrainState()
    source = ckpt.resume_source()
    model_cfg, p = gpt_config(cfg), cfg.parallel
    chunks = stage_chunks(model_cfg.num_layers, ctx.pp_size, ctx.pp_rank, p.pp_virtual, p.pp_layers)
    # weights drawn only for a fresh run: a checkpoint's or an HF model's replace them (no draw, no full tensors)
    model = GPT(model_cfg, ctx, init_weights=source is None, chunks=chunks)
    opt = build_optimizer(model, cfg.optim, ctx, zero=cfg.parallel.zero)
    forward = opt.module  # DDP(model) under zero=0 with DP > 1 (and PP = 1), else the model
    if cfg.train.compile:
        forward = torch.compile(forward)
    accum = grad_accum_steps(cfg, ctx.world_size)
    pipeline = PipelineExecutor(forward, model.config, ctx, accum, p.pp_schedule, p.pp_virtual)
    if ctx.pp_size > 1:
        log.info(f"pipeline: {p.pp_schedule} over PP={ctx.pp_size}" + (f" x {p.pp_virtual} model chunks per rank"
                 if p.pp_virtual > 1 else "") + f", {accum} micro-batches per step (bubble (P-1)/(V m) = "
                 f"{(ctx.pp_size - 1) / (p.pp_virtual * accum):.3f}); "
                 + describe(model_cfg.num_layers, ctx.pp_size, p.pp_virtual, p.pp_layers, model_cfg.tie_embeddings))
    if source is not None:
        state = TrainState(**ckpt.load(source, model, opt))
        if is_hf_model_dir(source):
            log.info(f"initialized from the Hugging Face model {source} ({architecture(read_hf_config(source))}): "
                     f"its weights; the optimizer and the data start from scratch")
        else:
            log.info(f"resumed from {source} at step {state.step} ({state.consumed_samples} samples consumed)")
    log.start(model, state.step, optimizer_state_bytes=opt.state_bytes())
    for warning in config_warnings(cfg):
        log.info(warning)
    if ctx.is_first_rank:
        OmegaConf.save(OmegaConf.structured(cfg), os.path.join(cfg.run_dir, "config.yaml"))
    guard.write_status("running")

    train_data, val_data = make_windows(cfg.data, corpus, cfg.model.seq_len, cfg.train.seed, log=log.info)
    if cfg.data.sampling == "epoch":
        log.info(f"data: epochs of {train_data.windows:,} windows ({train_data.windows / cfg.train.global_batch_size:,.1f} "
                 f"steps); sample {state.consumed_samples:,} is in epoch {train_data.epoch(state.consumed_samples)}")
    autocast = _autocast(cfg, ctx)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len

    stop = guard.check(ckpt)  # a signal during setup stops before the first step
    first_step = state.step + 1
    while state.step < cfg.train.steps and not stop:
        # the first step of a launch compiles (train.compile): it has its own hang allowance
        compiling = cfg.train.compile and state.step + 1 == first_step
        guard.arm(f"step {state.step + 1}", timeout_s=cfg.train.compile_timeout_s if compiling else None)
        t0 = time.perf_counter()
        lr = lr_at(state.step, cfg.optim, cfg.train.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = [shard_batch(train_data.sample(dp_sample_indices(state.consumed_samples, micro,
                                                                   cfg.train.micro_batch_size, ctx.dp_rank,
                                                                   ctx.dp_size)), ctx) for micro in range(accum)]
        loss_sum = forward_backward(pipeline, opt, batches, ctx, autocast)  # the DP reduction runs once, at the end
        norm = opt.prepare_grads()  # finalize: DP reduction done, SP-replicated grads summed over TP; global norm
        # the step's one device-to-host transfer: loss, norm and the ranks' stop votes together
        loss_avg, norm_value, *votes = read_to_host(dp_cp_average(loss_sum / accum, ctx), norm, guard.votes(ckpt))
        if not (math.isfinite(loss_avg) and math.isfinite(norm_value)):  # before the update spoils the weights
            what = f"loss is {loss_avg}" if not math.isfinite(loss_avg) else f"grad norm is {norm_value}"
            log.info(f"error: {what} at step {state.step + 1}")
            raise DivergenceError(f"{what} at step {state.step + 1}: the run diverged; lower optim.lr (now "
                                  f"{cfg.optim.lr}) or raise optim.warmup_steps, and resume from the last checkpoint")
        stop = guard.decide(votes, ckpt)  # stop after this step (signal, time limit); settles the save in flight
        opt.step()  # clip to optim.grad_clip, AdamW (zero=1: on this rank's shard, then all-gather the weights)
        opt.zero_grad()
        state.step += 1
        state.consumed_samples += cfg.train.global_batch_size
        dt = time.perf_counter() - t0
        if state.step % cfg.logging.every == 0 or state.step in (1, cfg.train.steps):
            log.step(state.step, loss=loss_avg, lr=lr, grad_norm=norm_value, step_time=dt,
                     tokens_per_sec=tokens_per_step / dt, consumed_samples=state.consumed_samples,
                     epoch=train_data.epoch(state.consumed_samples - 1))
        if (cfg.train.eval_every and state.step % cfg.train.eval_every == 0) or state.step == cfg.train.steps:
            guard.arm(f"evaluation after step {state.step}")
            log.eval(state.step, _evaluate(model, pipeline, val_data, cfg, ctx, autocast))
        if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 or state.step == cfg.train.steps:
            guard.arm(f"checkpoint save of step {state.step}")
            ckpt.save(state.step, model, opt, asdict(state))
    guard.arm(f"checkpoint save of step {state.step}")
    if stop and state.step and not ckpt.covers(state.step):
        ckpt.save(state.step, model, opt, asdict(state))
    ckpt.wait()
    guard.disarm()
    if state.step < cfg.train.steps:
        guard.stopped(state.step, stop, ckpt.newest())
    else:
        guard.write_status(f"finished {state.step}")
        if not stop:  # a stop signal during the last step: exit now, the sample can wait
            _sample(model, corpus, cfg, log, ckpt.newest())
    log.finish()


@torch.no_grad()
def _evaluate(model: GPT, pipeline: PipelineExecutor, data, cfg: Config, ctx: ParallelContext, autocast) -> float:
    """Mean loss over the counted targets of the same eval_iters x global-batch validation windows every time,
    split over DP like a training step (through the pipeline's forwards), so that the value does not depend on
    the layout."""
    model.eval()
    accum = grad_accum_steps(cfg, ctx.world_size)
    loss_sum = count = 0
    for it in range(cfg.train.eval_iters):  # one pipeline program of `accum` micro-batches at a time
        batches = [shard_batch(data.sample(dp_sample_indices(it * cfg.train.global_batch_size, micro,
                                                             cfg.train.micro_batch_size, ctx.dp_rank, ctx.dp_size)),
                               ctx) for micro in range(accum)]
        mean, n = mean_loss(pipeline, batches, ctx, autocast)
        loss_sum, count = loss_sum + mean * n, count + n
    loss = loss_sum / max(count, 1)  # the mean over every counted target of the evaluation
    model.train()
    return loss


def _sample(model: GPT, corpus: TokenizedCorpus, cfg: Config, log: MetricsLogger, newest) -> None:
    """The closing sample. Under pipeline parallelism no rank holds the whole model: rank 0 loads the final
    checkpoint alone, at PP = 1 (checkpoints load in any layout), and generates from it."""
    s, ctx = cfg.sample, model.ctx
    if s.max_new_tokens == 0:
        return
    if ctx.pp_size > 1:
        alone = build_parallel_context(1, ctx.device, world_size=1)  # every rank creates the groups; rank 0's
        if alone is None:
            return
        if newest is None:
            log.info("sample: skipped, no checkpoint to load the whole model from")
            return
        model = load_model(newest, alone, process_group=alone.tp_group, sequence_parallel=False)
    tok = corpus.tokenizer()
    ids = generate(model, tok.frame(tok.encode(s.prompt), last=False), s.max_new_tokens, temperature=s.temperature,
                   top_k=s.top_k, seed=cfg.train.seed, eos_id=tok.eos_id)
    log.info("sample:\n" + tok.decode(ids))


def _autocast(cfg: Config, ctx: ParallelContext):
    if train_dtype(cfg, ctx.device.type) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=torch.bfloat16)

