"""The run configuration: a structured Hydra schema, plus the cross-field checks Hydra cannot do.

The dataclasses below are registered in Hydra's ConfigStore (`base_config`, and `base_model` / `base_data`
for the YAML presets under configs/ to extend), so an unknown key or a value of the wrong type on the command
line fails at once with Hydra's own message. `validate()` then checks what needs several fields or the world
size (divisibility by TP, global batch vs micro batch x DP, data paths, ...) and raises ConfigError with one
line naming the value and the fix -- before any process group exists.
"""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from megatron_lite.data import DataConfig
from megatron_lite.hf_config import SHAPE  # torch-free too
from megatron_lite.rope_scaling import RopeScaling  # not from model.py: reading a config imports no torch

if TYPE_CHECKING:
    from megatron_lite.model import GPTConfig


_CATCHABLE = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the value and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: num_heads; fewer: grouped-query attention (Llama 2 70B, Llama 3)
    head_dim: Optional[int] = None  # None: hidden_size / num_heads
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    seq_len: int = 128  # the training window, in tokens (for a checkpoint.load of an HF model: <= its context)
    max_seq_len: Optional[int] = None  # the model's context (learned positions; generation); None: seq_len
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm (Llama)
    norm_eps: float = 1e-5
    position_embedding: str = "learned"  # learned (GPT-2) | rope (Llama)
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None  # Llama 3.1+: {rope_type: llama3, factor: 8, ...}
    mlp: str = "gelu"  # gelu (GPT-2, tanh approximation) | swiglu (Llama)
    attention_bias: bool = True  # biases of QKV and the attention output (GPT-2 has them, Llama not)
    qkv_bias: Optional[bool] = None  # biases of QKV alone; None: attention_bias (Qwen2: true, attention_bias false)
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)
    mlp_bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    vocab_pad_multiple: int = 128  # pad the vocabulary to a multiple of this (independent of TP size)
    init_std: float = 0.02
    recompute: str = "none"  # none | selective (attention core) | full (whole layer)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (1, as in Megatron and torchtitan); DP = world size / (tp x cp x pp)
    cp: int = 1  # context-parallel size: the sequence split over cp ranks in every layer
    pp: int = 1  # pipeline-parallel size: the layers split into pp stages
    pp_schedule: str = "1f1b"  # 1f1b (PipeDream-Flush) | interleaved (Megatron's interleaved 1F1B, pp_virtual chunks)
    pp_virtual: int = 1  # interleaved: model chunks per rank (virtual stages); the bubble shrinks by this factor
    pp_layers: Optional[list[int]] = None  # layers per (virtual) stage in model order, for an uneven split; None: even
    sp: bool = True  # sequence parallelism (shards LayerNorm/dropout activations over the TP group)
    tp_comm_overlap: bool = True  # overlap column-parallel layers' input-grad collective with their dW matmul
    zero: int = 0  # 0: AdamW state replicated over DP (DDP); 1: distributed optimizer, AdamW state split over DP


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all DP ranks and micro batches
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    seed: int = 1234
    eval_every: int = 100  # 0: never (except at the end)
    eval_iters: int = 4  # micro batches per evaluation
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    compile_timeout_s: float = 1800.0  # the hang timeout of a launch's first step under compile (it compiles)
    tf32: bool = True  # GPUs: float32 matmuls on TF32 tensor cores (train.dtype=float32, autocast's fp32 parts)
    device: str = "auto"  # auto | cpu | cuda
    # ending well on a cluster (megatron_lite/resilience.py)
    max_minutes: Optional[float] = None  # save and exit 0 before the next step would cross this; None: no limit
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # save and exit 0 on these
    exit_grace_s: float = 25.0  # after a stop signal, exit (non-zero) if not done by then; under torchrun/Slurm's 30 s
    hang_timeout_s: float = 300.0  # a step, evaluation or save with no progress this long: report and exit 3; 0: off


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # end of the decay; configs/config.yaml sets it to ${div:${optim.lr},10}
    lr_decay_style: str = "cosine"  # cosine | linear | constant (after linear warmup)
    warmup_steps: int = 20
    warmup_fraction: Optional[float] = None  # warmup as this fraction of train.steps, instead of warmup_steps
    weight_decay: float = 0.1  # not applied to biases, LayerNorm weights or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # fused AdamW kernel (CUDA only; ignored on CPU)


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "megatron-lite"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: the run directory's name


@dataclass
class LoggingConfig:
    every: int = 10  # steps between log lines
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between saves; 0: only at the end
    keep: Optional[int] = None  # newest checkpoints to keep; None: all
    resume: str = "auto"  # auto: continue from the newest checkpoint in run_dir | never
    load: Optional[str] = None  # initialize from this checkpoint instead (weights + optimizer + step)
    async_save: bool = False  # write checkpoints in a background thread
    on_error: str = "stop"  # a save that fails: stop (exit 1 naming the path and the OS error) | warn (train on)


@dataclass
class SampleConfig:  # sampled once at the end of training
    prompt: str = "def "
    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: Optional[int] = 50  # None: sample from the whole vocabulary


@dataclass
class Config:
    run_dir: str = MISSING  # set in configs/config.yaml: runs/<torchrun job id, or the start time>
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# `${div:a,b}`: a / b, so configs/config.yaml can say min_lr = lr / 10 and follow an optim.lr override
OmegaConf.register_new_resolver("div", lambda a, b: float(f"{a / b:.12g}"), replace=True)  # 3e-3/10: 3e-4

_cs = ConfigStore.instance()
_cs.store(name="base_config", node=Config)
_cs.store(group="model", name="base_model", node=ModelConfig)
_cs.store(group="data", name="base_data", node=DataConfig)


def gpt_config(cfg: Config) -> GPTConfig:
    """The model of this run: the model.* keys, or the shape of the HF model `checkpoint.load` names (whose
    config.json is the model: the user repeats no model.* keys), with this run's training settings."""
    from megatron_lite.hf_config import hf_model_config, is_hf_model_dir
    from megatron_lite.model import GPTConfig
    m = cfg.model
    training = dict(dropout=m.dropout, sequence_parallel=cfg.parallel.sp, vocab_pad_multiple=m.vocab_pad_multiple,
                    recompute=m.recompute, init_std=m.init_std, seed=cfg.train.seed,
                    tp_comm_overlap=cfg.parallel.tp_comm_overlap)
    if cfg.checkpoint.load and is_hf_model_dir(cfg.checkpoint.load):  # the training window is model.seq_len
        return hf_model_config(cfg.checkpoint.load, seq_len=m.seq_len, **training)
    shape = {k: getattr(m, k) for k in ("seq_len", "max_seq_len", *SHAPE) if k != "vocab_size"}
    return GPTConfig(vocab_size=cfg.data.vocab_size, **shape, **training)


def _record_hf_model(cfg: Config, model: GPTConfig) -> None:
    """Put the shape of the HF model checkpoint.load names in model.*, so that the run's config.yaml says
    which model ran (not the preset the command line started from)."""
    from megatron_lite.hf_config import architecture, read_hf_config
    for key in ("max_seq_len", *SHAPE):
        if key != "vocab_size":
            setattr(cfg.model, key, getattr(model, key))
    cfg.model.name = f"{architecture(read_hf_config(cfg.checkpoint.load))} from {cfg.checkpoint.load}"


def train_dtype(cfg: Config, device_type: str) -> str:
    """train.dtype resolved: auto is bfloat16 (autocast) on CUDA, float32 elsewhere."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bfloat16" if device_type == "cuda" else "float32"


def config_warnings(cfg: Config) -> list[str]:
    """Settings that run but are likely mistakes: one line each, which the trainer logs at the start."""
    from megatron_lite.hf_config import is_hf_model_dir
    from megatron_lite.optim import warmup_steps
    o, steps, found = cfg.optim, cfg.train.steps, []
    warmup = warmup_steps(o, steps)
    if warmup >= steps and warmup > 1:
        key = f"optim.warmup_fraction={o.warmup_fraction:g}" if o.warmup_fraction is not None else "optim.warmup_steps"
        found.append(f"warning: the warmup ({warmup} steps, {key}) is not shorter than the run (train.steps={steps}): "
                     f"the learning rate rises for the whole run, to {min(steps, warmup) / warmup:.0%} of optim.lr="
                     f"{o.lr:g}, and never decays; lower optim.warmup_steps or set optim.warmup_fraction (e.g. 0.03)")
    if cfg.checkpoint.load and is_hf_model_dir(cfg.checkpoint.load) and o.lr >= 1e-3:
        found.append(f"warning: optim.lr={o.lr:g} is a pretraining learning rate: it wrecks a pretrained model (checkpoint."
                     f"load={cfg.checkpoint.load}) in a few steps; fine-tune with +recipe=finetune (optim.lr=2e-5, "
                     f"warmup 3% of the run, cosine to 10%), unless that model was never trained")
    return found


def dp_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tp * p.cp * p.pp)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp_size(cfg, world_size))


def _model_ranks(cfg: Config) -> str:
    """'parallel.tp=2' or 'parallel.tp=2 x parallel.pp=2': the sizes DP is the world divided by."""
    p = cfg.parallel
    sizes = [f"parallel.{k}={v}" for k, v in (("tp", p.tp), ("cp", p.cp), ("pp", p.pp)) if v > 1 or k == "tp"]
    return " x ".join(sizes)


def _check_pipeline(cfg: Config, model: GPTConfig, microbatches: int) -> None:
    """The pipeline layout: the schedule and its model chunks, the layers of each stage, enough micro-batches."""
    from megatron_lite.pipeline_parallel import PipelineLayoutError, layer_counts
    from megatron_lite.pipeline_parallel.schedules import check
    p = cfg.parallel
    _need(p.pp_virtual >= 1, f"parallel.pp_virtual={p.pp_virtual} must be >= 1")
    try:
        check(p.pp_schedule, p.pp, p.pp_virtual, microbatches)
        layer_counts(model.num_layers, p.pp, p.pp_virtual, p.pp_layers)
    except PipelineLayoutError as e:
        raise ConfigError(str(e)) from None


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _need(value in choices, f"{key}={value!r} must be one of {', '.join(choices)}")


def _unknown_keys(node: object, prefix: str = ""):
    """Keys Hydra let through with `+key=value` (struct mode does not stop those) that no field reads."""
    names = [f.name for f in fields(node)]
    for key, value in vars(node).items():
        if key not in names:
            yield f"{prefix}{key}", f"{prefix.rstrip('.') or 'the top level'} has {', '.join(names)}"
        elif is_dataclass(value):
            yield from _unknown_keys(value, f"{prefix}{key}.")


def _check_context_parallel(cfg: Config) -> None:
    """CP cuts every window into 2 x cp load-balanced chunks, and SP splits a CP rank's tokens over TP."""
    p, m = cfg.parallel, cfg.model
    if p.cp == 1:
        return
    tp = p.tp if p.sp else 1
    chunks = 2 * p.cp * tp
    if m.seq_len % chunks:
        near = max(chunks, round(m.seq_len / chunks) * chunks)
        by_tp = f" x parallel.tp={p.tp}" if tp > 1 else ""
        raise ConfigError(f"model.seq_len={m.seq_len} is not divisible by 2 x parallel.cp={p.cp}{by_tp} = {chunks}: "
                          f"context parallelism cuts every sequence into 2 x cp chunks"
                          f"{' and sequence parallelism splits them over TP' if tp > 1 else ''}; use model.seq_len="
                          f"{near}{' or parallel.sp=false' if tp > 1 else ''}")
    _need(m.dropout == 0, f"model.dropout={m.dropout} with parallel.cp={p.cp}: ring attention applies no dropout to "
                          f"the attention probabilities; set model.dropout=0 (or parallel.cp=1)")


def validate(cfg: Config, world_size: int) -> None:
    """Raise ConfigError (one line: the value and the fix) for a configuration that cannot run.

    Cheap and collective-free: call it on every rank before any process group exists. With data.tokenizer,
    it also sets data.vocab_size to the tokenizer's, which the model then uses; with an HF model directory as
    checkpoint.load and no data.tokenizer, that directory's tokenizer is the run's."""
    from megatron_lite.data import DataError, check_data
    from megatron_lite.hf import weight_files
    from megatron_lite.hf_config import HFError, architecture, is_hf_model_dir, read_hf_config
    from megatron_lite.model import ModelConfigError
    from megatron_lite.parallel import COLLECTIVE_TIMEOUT_S, ParallelConfigError, check_world_size
    from megatron_lite.tokenizer import tokenizer_files

    for key, known in _unknown_keys(cfg):
        raise ConfigError(f"unknown key {key}: nothing reads it; {known}")
    t, o = cfg.train, cfg.optim
    c = cfg.checkpoint
    _need(c.load is None or Path(c.load).exists(), f"checkpoint.load={c.load} does not exist: fix the path")
    _need(cfg.parallel.zero in (0, 1), f"parallel.zero={cfg.parallel.zero} must be 0 (AdamW state replicated over "
          f"DP) or 1 (distributed optimizer: each DP rank keeps 1/DP of the AdamW state)")
    hf_load = c.load is not None and is_hf_model_dir(c.load)
    if hf_load:  # its own files first: an unsupported architecture, a missing weight file
        try:
            architecture(read_hf_config(c.load), Path(c.load) / "config.json")
            weight_files(Path(c.load))
        except HFError as e:
            raise ConfigError(str(e)) from None
        if cfg.data.tokenizer is None:
            try:
                tokenizer_files(c.load)
            except DataError as e:
                raise ConfigError(f"{e}: checkpoint.load={c.load} is a model without a tokenizer: name one with "
                                  f"data.tokenizer=PATH (a tokenizer.json, a sentencepiece .model or a model "
                                  f"directory)") from None
            cfg.data.tokenizer = c.load  # fine-tuning: the corpus is tokenized with the model's own tokenizer
    # data (DataConfig's own checks, every path, the tokenizer) before the model's, which need the vocab size
    try:
        check_data(cfg.data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    try:
        check_world_size(world_size, cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.pp)
        model = gpt_config(cfg)
        model.validate(cfg.parallel.tp)
    except (ParallelConfigError, ModelConfigError, HFError) as e:
        raise ConfigError(str(e)) from None
    except (KeyError, ValueError) as e:  # a config.json without a key its architecture needs, or not JSON
        raise ConfigError(f"checkpoint.load={c.load}: cannot read its config.json ({type(e).__name__}: {e})") from None
    _need(cfg.data.vocab_size <= model.vocab_size,
          f"data.tokenizer={cfg.data.tokenizer} has {cfg.data.vocab_size} tokens, more than the {model.vocab_size} rows "
          f"of the model's embedding in checkpoint.load={c.load}: use that model's own tokenizer")
    if hf_load:
        _record_hf_model(cfg, model)
    _check_context_parallel(cfg)
    if cfg.parallel.sp:
        _need(cfg.model.seq_len % cfg.parallel.tp == 0,
              f"model.seq_len={cfg.model.seq_len} is not divisible by parallel.tp={cfg.parallel.tp}, which sequence "
              f"parallelism requires: pick a multiple of {cfg.parallel.tp} or set parallel.sp=false")
    if os.environ.get("TORCHELASTIC_RUN_ID") == "none" and Path(cfg.run_dir).name == "none":
        raise ConfigError(f"run_dir={cfg.run_dir}: torchrun was started without a job id (static rendezvous), "
                          f"so the ranks share none: pass --rdzv-id=<job name> to torchrun or set run_dir=<dir>")

    # batch sizes
    _need(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _need(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    dp = dp_size(cfg, world_size)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size < 1 or t.global_batch_size % per_step:
        nearest = max(1, math.floor(t.global_batch_size / per_step + 0.5)) * per_step
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x DP={dp} (world size {world_size} / {_model_ranks(cfg)}) = "
            f"{per_step}: use train.global_batch_size={nearest}, or change train.micro_batch_size")
    _check_pipeline(cfg, model, t.global_batch_size // per_step)
    _need(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0: evaluate only at the end)")
    _need(t.eval_iters >= 1, f"train.eval_iters={t.eval_iters} must be >= 1")
    _one_of("train.dtype", t.dtype, ("auto", "float32", "bfloat16"))
    _one_of("train.device", t.device, ("auto", "cpu", "cuda"))
    _need(t.max_minutes is None or t.max_minutes > 0, f"train.max_minutes={t.max_minutes} must be > 0 or null (no limit)")
    _need(0 <= t.hang_timeout_s < COLLECTIVE_TIMEOUT_S,
          f"train.hang_timeout_s={t.hang_timeout_s:g} must be in [0, {COLLECTIVE_TIMEOUT_S:g}) (0: off): below the "
          f"collective timeout, or the collective times out first, without a report")
    _need(t.compile_timeout_s > 0, f"train.compile_timeout_s={t.compile_timeout_s:g} must be > 0 (seconds)")
    _need(t.exit_grace_s > 0, f"train.exit_grace_s={t.exit_grace_s:g} must be > 0")
    for name in t.exit_signals:
        _need(name in _CATCHABLE, f"train.exit_signals has {name!r}: use signal names such as SIGTERM, SIGUSR1 "
                                  f"(SIGKILL and SIGSTOP cannot be caught)")
    if t.device == "cuda":
        import torch
        _need(torch.cuda.is_available(), "train.device='cuda' but torch sees no CUDA device: use train.device=auto")

    # optimizer and schedule
    _need(math.isfinite(o.lr) and o.lr > 0, f"optim.lr={o.lr} must be > 0 (e.g. optim.lr=3e-4)")
    _need(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _one_of("optim.lr_decay_style", o.lr_decay_style, ("cosine", "linear", "constant"))
    _need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _need(o.warmup_fraction is None or 0 <= o.warmup_fraction <= 1,
          f"optim.warmup_fraction={o.warmup_fraction} must be in [0, 1] (e.g. 0.03), or null to use optim.warmup_steps")
    _need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    for key in ("beta1", "beta2"):
        _need(0 <= getattr(o, key) < 1, f"optim.{key}={getattr(o, key)} must be in [0, 1)")
    _need(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    _need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")

    # logging, checkpoints, sampling
    _need(cfg.logging.every >= 1, f"logging.every={cfg.logging.every} must be >= 1")
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("disabled", "offline", "online"))
    _need(c.every >= 0, f"checkpoint.every={c.every} must be >= 0 (0: save only at the end)")
    _need(c.keep is None or c.keep >= 1, f"checkpoint.keep={c.keep} must be >= 1 or null (keep all)")
    _one_of("checkpoint.resume", c.resume, ("auto", "never"))
    _one_of("checkpoint.on_error", c.on_error, ("stop", "warn"))
    s = cfg.sample
    _need(s.max_new_tokens >= 0, f"sample.max_new_tokens={s.max_new_tokens} must be >= 0")
    _need(s.temperature >= 0, f"sample.temperature={s.temperature} must be >= 0 (0: greedy)")
    _need(s.top_k is None or s.top_k >= 1, f"sample.top_k={s.top_k} must be >= 1 or null (no top-k filter)")
