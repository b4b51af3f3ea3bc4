"""Data: find a corpus, tokenize it once into a shared cache, and sample training windows from it.

    config.py    the `data` config group (DataConfig) and DataError
    corpus.py    which files, in which format; the cache key (from stat alone: no rank reads the corpus for it)
    readers.py   the files cut into tasks of whole lines (or Parquet row groups); a task read into documents
    split.py     documents cut into segments; which segments are held out for validation
    encode.py    what a worker does with a task: segments -> token ids (or candidates for the tokenizer sample)
    prepare.py   prepare_corpus: the build (tokenizer, tokens, meta.json) and resuming a dead builder's work
    passes.py    the two parallel passes over the corpus (sampling for the tokenizer, tokenizing), in task order
    lock.py      exactly one builder across ranks, jobs and nodes; the others poll, with no timeout
    progress.py  rate, ETA, progress bar
    cache.py     TokenizedCorpus: a complete cache on disk, checked before use
    verify.py    its checksums (and the corpus files') verified once per job, by one process
    clean.py     python -m megatron_lite.data --clean: damaged copies, abandoned builds, dead locks
    sampler.py   training windows: random (with replacement) or epochs (a permutation per epoch)
    chat_template.py  the model's chat template, rendered as transformers renders it; the assistant's spans
    chat.py      chat and prompt/completion rows as token ids, and which ones the loss counts
    chat_prepare.py  the build of a chat cache: token ids and, beside them, a flags byte per token (loss, start)
    packing.py   windows with per-token metadata: packed conversations, padding, document masks for text
    __main__.py  python -m megatron_lite.data: the preparation command, with train.py's Hydra config

The tokenizers themselves are in megatron_lite/tokenizer.py. The names below are imported on first use, so
that importing one submodule (a worker process imports encode.py; tokenizer.py imports config.py) does not
import the rest, torch (sampler.py) in particular.
"""
from __future__ import annotations

import importlib

_WHERE = {"DataConfig": "config", "DataError": "config", "TokenizedCorpus": "cache", "check_data": "corpus",
          "corpus_files": "corpus", "prepare_corpus": "prepare", "WindowSampler": "sampler", "EpochSampler": "sampler",
          "make_sampler": "sampler", "dp_sample_indices": "sampler"}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
