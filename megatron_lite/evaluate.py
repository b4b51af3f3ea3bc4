"""Evaluate a model on a corpus: the mean loss per counted token, the perplexity and the token count, e.g. before
and after fine-tuning.

    python -m megatron_lite.evaluate CHECKPOINT data=text 'data.paths=[my/*.txt]' [model.seq_len=1024] [--split all]
    python -m megatron_lite.evaluate CHECKPOINT data=chat 'data.paths=[chats.jsonl]'      (the assistant's tokens)
    torchrun --standalone --nproc_per_node=3 -m megatron_lite.evaluate CHECKPOINT parallel.tp=3 data=text ...

CHECKPOINT is a run directory, a step_NNNNNNN directory or a Hugging Face model directory; the other arguments
are train.py's config overrides. The corpus is prepared as train.py prepares it (the same data.* settings find
the same cache), tokenized with the checkpoint's own tokenizer unless data.tokenizer names another. The
validation split is evaluated -- what a run with the same data.* settings validates on -- or with `--split all`
the whole corpus.

Every counted target is predicted once, in windows of model.seq_len tokens (by default the window the
checkpoint trained with; for an HF model directory its context, at most 2048) spread over the DP ranks in
micro-batches of train.micro_batch_size:
- text: windows [s, s + L + 1) at s = 0, L, 2L, ... of each split's token stream, the last one shorter (padded,
  the padding not counted), so every token but a stream's first is a target once; with data.document_mask=true
  attention and positions restart at each document, as in training;
- chat formats: each conversation once, packed into windows (or one per window with data.packing=false) exactly as
  training packs them -- a conversation longer than the window cut as training cuts it -- counting the tokens
  the loss counts there (the assistant's, the completion's).
The loss is the mean over all counted targets (sum of their losses / their count), computed by the function that
validates during training (token_loss.mean_loss); perplexity is exp(loss). Rank 0 prints one line to stdout (or,
with --json, one JSON object); the corpus preparation reports on stderr.
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
from .data.chat_prepare import START
from .data.packing import Batch, PackedWindows, document_metadata
from .data.split import hold_out
from .hf_config import is_hf_model_dir
from .parallel import check_world_size, init_parallel
from .pipeline_parallel import PipelineExecutor
from .token_loss import mean_loss
from .trainer import _autocast

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_HF_WINDOW = 2048


class TextWindows:
    """Windows [s, s + L + 1) at s = 0, L, 2L, ... of each token stream (one per split), never crossing streams:
    every token but a stream's first is a target exactly once; the last window of a stream is padded (inputs with
    pad_id, targets -100). `document_eos`: the EOS id, for data.document_mask=true's per-document metadata."""

    def __init__(self, streams: list[np.ndarray], window: int, pad_id: int, document_eos: int | None):
        self.streams, self.window, self.pad_id, self.document_eos = streams, window, pad_id, document_eos
        self.rows = [(i, start) for i, tokens in enumerate(streams) for start in range(0, len(tokens) - 1, window)]

    def batch(self, rows: list[int]) -> Batch:
        x = torch.full((len(rows), self.window), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), self.window), -100, dtype=torch.long)
        for r, j in enumerate(rows):
            i, start = self.rows[j]
            chunk = torch.from_numpy(self.streams[i][start:start + self.window + 1].astype(np.int64))
            x[r, :len(chunk) - 1], y[r, :len(chunk) - 1] = chunk[:-1], chunk[1:]
        if self.document_eos is None:
            return Batch(x, y)
        return Batch(x, y, *document_metadata(x, self.document_eos))


class ChatWindows:
    """Each split's conversations once, in the windows training packs them into (data/packing.py)."""

    def __init__(self, packed: list[PackedWindows]):
        self.packed = packed
        self.rows = [(p, k) for p in packed for k in range(p.windows)]

    def batch(self, rows: list[int]) -> Batch:
        x, y, pos, ids = (torch.from_numpy(np.stack(a)) for a in zip(*(p.window(k) for p, k in
                                                                         (self.rows[j] for j in rows))))
        return Batch(x, y, pos, ids) if self.packed[0].packing else Batch(x, y)


def eval_windows(cfg, corpus, window: int, split: str) -> TextWindows | ChatWindows:
    """What `split` (val: the validation windows of a run with these data settings; all: every split) holds, as
    windows of `window` tokens that count each target once."""
    eos = corpus.meta["tokenizer"]["eos_id"]
    if corpus.data_format == "text":
        train, val = corpus.train_tokens(), corpus.val_tokens()
        streams = [hold_out(train, val, window + 1)[1]] if split == "val" else [s for s in (train, val) if len(s)]
        return TextWindows(streams, window, eos, eos if cfg.data.document_mask else None)
    names = ["val"] if split == "val" else [n for n in ("train", "val") if (corpus.flags(n) & START).any()]
    return ChatWindows([PackedWindows(corpus.train_tokens() if name == "train" else corpus.val_tokens(),
                                      corpus.flags(name), window, cfg.train.seed, sampling="epoch",
                                      packing=cfg.data.packing, pad_id=eos, name=name) for name in names])


def rank_batches(windows: TextWindows | ChatWindows, micro_batch: int, dp_rank: int, dp_size: int) -> list[Batch]:
    """This DP rank's micro-batches: windows dp_rank, dp_rank + dp_size, ...; a rank left without any gets one
    window that counts nothing (mean_loss weighs it 0), so that every rank runs the same collectives."""
    mine = list(range(dp_rank, len(windows.rows), dp_size))
    if not mine:
        empty = windows.batch([0])
        return [Batch(empty.tokens, torch.full_like(empty.targets, -100))]
    return [windows.batch(mine[k:k + micro_batch]) for k in range(0, len(mine), micro_batch)]


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
        cfg, ckpt, config, corpus, windows = _prepare(args)
    except (CheckpointError, ValueError, HydraException, OmegaConfBaseException) as e:  # ValueError: ConfigError,
        print(f"error: {_one_line(e)}", file=sys.stderr)  # DataError, HFError, ModelConfigError, ParallelConfigError
        sys.exit(2)

    ctx = init_parallel(cfg.parallel.tp, device=None if cfg.train.device == "auto" else cfg.train.device)
    model = load_model(ckpt, ctx, sequence_parallel=config.sequence_parallel, seq_len=config.seq_len)
    batches = rank_batches(windows, cfg.train.micro_batch_size, ctx.dp_rank, ctx.dp_size)
    one_stage = PipelineExecutor(model, model.config, ctx, len(batches))  # PP = 1: each micro-batch in turn
    loss, tokens = mean_loss(one_stage, batches, ctx, _autocast(cfg, ctx))
    if ctx.is_first_rank:
        what = "validation split" if args.split == "val" else "whole corpus"
        result = dict(checkpoint=str(ckpt), split=args.split, loss=loss, perplexity=math.exp(loss), tokens=tokens,
                      window=config.seq_len, corpus=corpus.identity()["corpus_desc"])
        print(json.dumps(result) if args.json else
              f"{ckpt}: loss {loss:.6f} | perplexity {math.exp(loss):.4f} | {tokens:,} tokens ({what} of "
              f"{result['corpus']}; windows of {config.seq_len}; TP={ctx.tp_size} x DP={ctx.dp_size})", flush=True)
    dist.destroy_process_group()


def _prepare(args):
    """The config, the checkpoint, its model config (window, SP), the prepared corpus and the windows to evaluate,
    all checked."""
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
    windows = eval_windows(cfg, corpus, window, args.split)
    if not windows.rows:
        raise ConfigError(f"the {'validation split' if args.split == 'val' else 'corpus'} of {corpus.path} holds "
                          f"nothing to evaluate")
    return cfg, ckpt, config, corpus, windows


def _one_line(e: Exception) -> str:
    if isinstance(e, MissingMandatoryValue):
        return f"{e.full_key} is required: set it on the command line ({e.full_key}=...)"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    main()
