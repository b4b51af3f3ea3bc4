"""Evaluate a model on a corpus: the mean loss per token, the perplexity and the token count, e.g. before and after
fine-tuning.

    python -m megatron_lite.evaluate CHECKPOINT data=text 'data.paths=[my/*.txt]' [model.seq_len=1024] [--split all]
    torchrun --standalone --nproc_per_node=3 -m megatron_lite.evaluate CHECKPOINT parallel.tp=3 data=text ...

CHECKPOINT is a run directory, a step_NNNNNNN directory or a Hugging Face model directory; the other arguments
are train.py's config overrides. The corpus is prepared as train.py prepares it (the same data.* settings find
the same cache), tokenized with the checkpoint's own tokenizer unless data.tokenizer names another. The
validation split is evaluated -- the text a run with the same data.* settings held out -- or with `--split all`
every token of the corpus.

Every token of the split (but the first) is predicted exactly once: the split is cut into windows of model.seq_len
tokens -- by default the window the checkpoint trained with; for an HF model directory its context, at most 2048
-- the last one shorter (padded, the padding ignored), and the windows are spread over the DP ranks in
micro-batches of train.micro_batch_size. The loss is the mean over all those predictions (sum of the token losses
/ their count), computed by the loop that validates during training (trainer.evaluate_loss); perplexity is
exp(loss). Rank 0 prints one line to stdout (or, with --json, one JSON object); the corpus preparation reports
on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .checkpoint import CheckpointError, checkpoint_tokenizer, load_model, model_config, read_meta, resolve
from .config import ConfigError
from .data import check_data, prepare_corpus
from .hf_config import is_hf_model_dir
from .parallel import check_world_size, init_parallel
from .trainer import _autocast, evaluate_loss

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_HF_WINDOW = 2048


def windows(streams: list[np.ndarray], window: int) -> list[tuple[int, int]]:
    """(stream, start) of the windows [start, start + window + 1) that predict every token of each stream but its
    first exactly once; a window never crosses streams (the train and validation splits)."""
    return [(i, start) for i, tokens in enumerate(streams) for start in range(0, len(tokens) - 1, window)]


def batches(streams: list[np.ndarray], todo: list[tuple[int, int]], window: int, micro_batch: int, pad_id: int):
    """(x, y) micro-batches of the windows `todo`; a short last window is padded (x with pad_id, y with -100)."""
    for k in range(0, len(todo), micro_batch):
        part = todo[k:k + micro_batch]
        x = torch.full((len(part), window), pad_id, dtype=torch.long)
        y = torch.full((len(part), window), -100, dtype=torch.long)
        for row, (i, start) in enumerate(part):
            chunk = torch.from_numpy(streams[i][start:start + window + 1].astype(np.int64))
            x[row, :len(chunk) - 1], y[row, :len(chunk) - 1] = chunk[:-1], chunk[1:]
        yield x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run directory, a step_NNNNNNN checkpoint directory or an HF model directory")
    ap.add_argument("overrides", nargs="*", help="train.py config overrides: data=..., data.paths=[...], "
                                                 "model.seq_len=..., parallel.tp=..., train.micro_batch_size=...")
    ap.add_argument("--split", choices=["val", "all"], default="val",
                    help="val: the validation split (default); all: the whole corpus")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    args = ap.parse_args()
    try:  # bad input: one line, before any process group
        cfg, ckpt, config, corpus = _prepare(args)
    except (CheckpointError, ValueError, HydraException, OmegaConfBaseException) as e:  # ValueError: ConfigError,
        print(f"error: {_one_line(e)}", file=sys.stderr)  # DataError, HFError, ModelConfigError, ParallelConfigError
        sys.exit(2)

    ctx = init_parallel(cfg.parallel.tp, device=None if cfg.train.device == "auto" else cfg.train.device)
    model = load_model(ckpt, ctx, sequence_parallel=config.sequence_parallel, seq_len=config.seq_len)
    streams = [corpus.val_tokens()] if args.split == "val" else [corpus.train_tokens(), corpus.val_tokens()]
    mine = windows(streams, config.seq_len)[ctx.dp_rank::ctx.dp_size]
    loss_sum, tokens = evaluate_loss(model, batches(streams, mine, config.seq_len, cfg.train.micro_batch_size,
                                                    corpus.tokenizer().eos_id), ctx, _autocast(cfg, ctx))
    loss = loss_sum / tokens
    if ctx.is_first_rank:
        what = "validation split" if args.split == "val" else "whole corpus"
        result = dict(checkpoint=str(ckpt), split=args.split, loss=loss, perplexity=math.exp(loss), tokens=tokens,
                      window=config.seq_len, corpus=corpus.identity()["corpus_desc"])
        print(json.dumps(result) if args.json else
              f"{ckpt}: loss {loss:.6f} | perplexity {math.exp(loss):.4f} | {tokens:,} tokens ({what} of "
              f"{result['corpus']}; windows of {config.seq_len}; TP={ctx.tp_size} x DP={ctx.dp_size})", flush=True)
    dist.destroy_process_group()


def _prepare(args):
    """The config, the checkpoint, its model config (window, SP) and the prepared corpus, all checked."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=args.overrides))
    p, world = cfg.parallel, int(os.environ.get("WORLD_SIZE", 1))
    if p.cp != 1 or p.pp != 1:
        raise ConfigError("evaluate runs with tensor and data parallelism: leave parallel.cp and parallel.pp at 1")
    check_world_size(world, p.tp)
    ckpt = resolve(args.checkpoint)
    tok = checkpoint_tokenizer(ckpt, cfg.data.tokenizer, "data.tokenizer=PATH")
    cfg.data.tokenizer = cfg.data.tokenizer or str(ckpt)
    check_data(cfg.data)
    if any(o.lstrip("+").split("=")[0] == "model.seq_len" for o in args.overrides):
        window = cfg.model.seq_len
    elif is_hf_model_dir(ckpt):
        window = min(model_config(ckpt).max_seq_len, DEFAULT_HF_WINDOW)
        window -= window % p.tp if p.sp else 0
    else:
        window = read_meta(ckpt)["model"]["seq_len"]
    config = model_config(ckpt, sequence_parallel=p.sp, seq_len=window)
    config.validate(p.tp)
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} has {tok.vocab_size} tokens, more than the "
                          f"{config.vocab_size} rows of the embedding of {ckpt}: use that model's own tokenizer")
    first = int(os.environ.get("RANK", 0)) == 0  # the preparation's log goes to stderr, the result to stdout
    corpus = prepare_corpus(cfg.data, log=(lambda line: print(line, file=sys.stderr, flush=True)) if first else
                            (lambda _: None))
    sizes = [len(corpus.val_tokens())] if args.split == "val" else [len(corpus.train_tokens()), len(corpus.val_tokens())]
    if all(n < 2 for n in sizes):
        raise ConfigError(f"the {'validation split' if args.split == 'val' else 'corpus'} of {corpus.path} holds "
                          f"{sum(sizes)} tokens: nothing to evaluate" + (" (try --split all)" if args.split == "val" else ""))
    return cfg, ckpt, config, corpus


def _one_line(e: Exception) -> str:
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key} is required: set it on the command line ({e.full_key}=...)"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    main()
