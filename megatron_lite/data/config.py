"""The `data` config group (configs/data/*.yaml extend it) and the checks that need no file."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


class DataError(ValueError):
    """Data that cannot work; the message is one line naming the value (or file and line) and the fix."""


@dataclass
class DataConfig:
    name: str = "pystdlib"  # "pystdlib" (this Python's standard library source) or "text" (data.paths); paths select text
    paths: list[str] = field(default_factory=list)  # files or globs (.txt/.md/.py..., .jsonl, .parquet; .gz/.zst)
    text_key: str = "text"  # the JSONL field / Parquet column holding a document's text
    tokenizer: Optional[str] = None  # a sentencepiece .model, HF tokenizer.json or model dir; None: train a BPE
    vocab_size: int = 4096  # of the trained BPE; with data.tokenizer, set from the tokenizer
    token_dtype: str = "auto"  # auto (uint16 when the vocabulary fits, else uint32) | uint16 | uint32
    val_fraction: float = 0.05  # share of the text held out for validation
    workers: Optional[int] = None  # tokenizing processes; None: the cores this process may use
    sampling: str = "random"  # random: windows at random offsets | epoch: every window once per epoch
    allow_corpus_change: bool = False  # resume a checkpoint trained on another corpus or tokenizer
    cache_dir: str = "data/cache"  # a relative path is relative to the repository root, not the cwd
    max_tokenizer_chars: int = 20_000_000  # cap on the text sampled to train the BPE
    binary_files: str = "error"  # a file that looks binary (NUL bytes, mostly not UTF-8): error | skip (counted)
    bad_utf8: str = "error"  # invalid UTF-8 in text or JSONL: error | replace (by U+FFFD, counted per file)
    verify_corpus: bool = False  # re-hash every corpus file against the cache's record before using it
    eos_token: Optional[str] = None  # an HF tokenizer's EOS (null: what its files name, else a well-known name)
    bos_token: Optional[str] = None  # a token starting every document; "" for none; null: the tokenizer's own choice
    # chat and instruction data (data/chat_template.py, chat.py, chat_prepare.py, packing.py)
    format: str = "text"  # text | chat (rows of `messages`) | prompt_completion (rows of `prompt`, `completion`)
    packing: bool = True  # chat formats: whole conversations share a window (attention kept within each); false: pad
    document_mask: bool = False  # text: attention and positions restart at every document (as packed chat data)


DTYPES = {"uint16": 2**16, "uint32": 2**32}


def check_settings(cfg: DataConfig) -> None:
    """The checks that need no file (the corpus and the tokenizer are checked in corpus.check_data). Paths given
    with the default corpus select the text corpus: the user's files, never the standard library in their place."""
    if cfg.name == "pystdlib" and cfg.paths:
        cfg.name = "text"
    if cfg.name not in ("pystdlib", "text"):
        raise DataError(f"data.name={cfg.name!r} is unknown: use 'pystdlib' or 'text'")
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1), e.g. 0.05")
    if cfg.tokenizer is None and cfg.vocab_size < 300:
        raise DataError(f"data.vocab_size={cfg.vocab_size} is too small: byte fallback alone needs 260; "
                        "use at least 512")
    if cfg.max_tokenizer_chars < 1:
        raise DataError(f"data.max_tokenizer_chars={cfg.max_tokenizer_chars} must be >= 1")
    if cfg.token_dtype not in ("auto", *DTYPES):
        raise DataError(f"data.token_dtype={cfg.token_dtype!r} must be auto, uint16 or uint32")
    if cfg.workers is not None and cfg.workers < 1:
        raise DataError(f"data.workers={cfg.workers} must be >= 1, or null for the cores available")
    if cfg.sampling not in ("random", "epoch"):
        raise DataError(f"data.sampling={cfg.sampling!r} must be random (windows at random offsets, with "
                        f"replacement) or epoch (every window once per epoch)")
    for key, choices in (("binary_files", ("error", "skip")), ("bad_utf8", ("error", "replace"))):
        if getattr(cfg, key) not in choices:
            raise DataError(f"data.{key}={getattr(cfg, key)!r} must be {' or '.join(choices)}")
    if (cfg.eos_token is not None or cfg.bos_token is not None) and not cfg.tokenizer:
        raise DataError("data.eos_token / data.bos_token choose among an existing tokenizer's tokens: give "
                        "data.tokenizer (a Hugging Face tokenizer), or leave them unset for the trained BPE")
    if cfg.format not in ("text", "chat", "prompt_completion"):
        raise DataError(f"data.format={cfg.format!r} must be text, chat (JSONL/Parquet rows with `messages`) or "
                        f"prompt_completion (rows with `prompt` and `completion`)")
    if not cfg.text_key:
        raise DataError("data.text_key is empty: name the JSONL field / Parquet column holding the text")


def token_dtype(cfg: DataConfig, vocab_size: int) -> np.dtype:
    """uint16 up to 65536 ids, else uint32; an explicit data.token_dtype that cannot hold the ids is an error."""
    name = cfg.token_dtype if cfg.token_dtype != "auto" else ("uint16" if vocab_size <= DTYPES["uint16"] else "uint32")
    if vocab_size > DTYPES[name]:
        raise DataError(f"data.token_dtype={name} holds ids below {DTYPES[name]}, but the vocabulary has "
                        f"{vocab_size} tokens: use data.token_dtype=auto (or uint32)")
    return np.dtype(name)
