"""Data: find a corpus, train a deterministic BPE tokenizer, cache the token ids, sample training windows.

The token cache lives in <cache_dir>/<key>/, where the key hashes the corpus contents and the tokenizer
settings, so a changed file or setting gets a fresh directory and an unchanged one is never rebuilt.
Sampling is a pure function of (seed, sample index): the data order does not depend on the data-parallel
size, and a resumed run needs only the number of samples consumed.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import sentencepiece as spm
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FORMAT_VERSION = 1  # bump when the cache layout or the encoding changes, so old caches are not reused
NEWLINE = "<n>"  # control symbol standing for "\n": sentencepiece only sees single lines
MAX_LINE_CHARS = 4096  # longer lines (data blobs) are left out of tokenizer training, not out of the data
SP_THREADS = 2  # stored in the .model file, so it must be a constant for the file to be byte-identical
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """A data setting that cannot work; the message names the value and the fix."""


@dataclass
class DataConfig:
    name: str = "pystdlib"  # "pystdlib" (this Python's standard library source) or "text" (cfg.paths)
    paths: list[str] = field(default_factory=list)  # files or globs, for name == "text"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    cache_dir: str = "data/cache"  # a relative path is relative to the repository root, not the cwd
    max_tokenizer_chars: int = 20_000_000  # cap on the text sampled to train the tokenizer


def _check_config(cfg: DataConfig) -> None:
    if cfg.name not in ("pystdlib", "text"):
        raise DataError(f"data.name={cfg.name!r} is unknown: use 'pystdlib' or 'text'")
    if not 0 < cfg.val_fraction < 1:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1), e.g. 0.05")
    if cfg.vocab_size < 300:
        raise DataError(f"data.vocab_size={cfg.vocab_size} is too small: byte fallback alone needs 260; "
                        "use at least 512")
    if cfg.max_tokenizer_chars < 1:
        raise DataError(f"data.max_tokenizer_chars={cfg.max_tokenizer_chars} must be >= 1")


# ---------------------------------------------------------------- corpus discovery


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The corpus files, sorted. Cheap: called before any process group exists, to fail fast."""
    _check_config(cfg)
    return _stdlib_files() if cfg.name == "pystdlib" else _text_files(cfg.paths)


def _stdlib_files() -> list[Path]:
    """This interpreter's own standard library source, minus its test suites and installed packages."""
    files = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune instead of filtering later
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def _text_files(paths: list[str]) -> list[Path]:
    if not paths:
        raise DataError("data.paths is empty for data.name='text': give text files or globs, "
                        "e.g. data.paths='[corpus/*.txt]'")
    files = set()
    for p in paths:
        matches = [Path(m).resolve() for m in glob.glob(os.path.expanduser(p), recursive=True)]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"data.paths entry {p!r} matches no file: give existing text files or globs")
        files.update(matches)
    return sorted(files)


def corpus_key(files: list[Path], cfg: DataConfig) -> str:
    """Identity of the corpus contents plus everything that shapes the tokenizer and the split."""
    h = hashlib.sha256()
    settings = [FORMAT_VERSION, spm.__version__, cfg.vocab_size, cfg.val_fraction, cfg.max_tokenizer_chars]
    h.update(json.dumps(settings).encode())
    for f in files:
        data = f.read_bytes()
        h.update(len(data).to_bytes(8, "little"))  # length prefix: moving bytes between files changes the key
        h.update(data)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- tokenizer


class Tokenizer:
    """sentencepiece BPE plus explicit newlines.

    sentencepiece treats its input as single lines, so text is split at "\\n", the lines are encoded one by
    one and joined by the id of the <n> control symbol. Control symbols never match input text, so any
    string round-trips: decode(encode(s)) == s (identity normalization and byte fallback do the rest).
    """

    def __init__(self, model_path: Path | str):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.newline_id = self.sp.piece_to_id(NEWLINE)

    def encode(self, text: str) -> list[int]:
        ids = []
        for line_ids in self.sp.encode(text.split("\n"), num_threads=SP_THREADS):
            ids += line_ids
            ids.append(self.newline_id)
        ids.pop()  # n lines have n - 1 newlines between them
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        lines, line = [], []
        for i in map(int, ids):  # also accepts tensors and numpy arrays
            if i == self.newline_id:
                lines.append(line)
                line = []
            else:
                line.append(i)
        lines.append(line)
        return "\n".join(self.sp.decode(line) for line in lines)


def _train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    """Train on exactly `lines`, in order. sentencepiece's own sampling (input_sentence_size > 0) is seeded
    per process and gives each rank a different vocabulary, so the caller subsamples and this trains on all."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, character_coverage=1.0, split_digits=True, control_symbols=[NEWLINE],
            input_sentence_size=0, shuffle_input_sentence=False, num_threads=SP_THREADS,
            train_extremely_large_corpus=False, max_sentence_length=4 * MAX_LINE_CHARS,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # keep code whitespace
            allow_whitespace_only_pieces=True, add_dummy_prefix=False, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"data.vocab_size={vocab_size} does not fit this corpus ({e}): change data.vocab_size "
                        "or give more text") from e
    return model.getvalue()


def _tokenizer_sample(docs: list[str], max_chars: int) -> list[str]:
    """Non-empty lines of the documents, in a seeded document order, up to max_chars characters."""
    order = list(range(len(docs)))
    random.Random(1).shuffle(order)
    lines, budget = [], max_chars
    for i in order:
        for line in docs[i].split("\n"):
            if budget <= 0:
                return lines
            if line and len(line) <= MAX_LINE_CHARS:
                lines.append(line)
                budget -= len(line) + 1
    return lines


# ---------------------------------------------------------------- token cache


@dataclass
class TokenizedCorpus:
    key: str  # hex digest of corpus contents + tokenizer settings: the tokenizer identity
    tokenizer_path: Path
    train_path: Path  # raw token ids, np.memmap-able
    val_path: Path
    dtype: str  # "uint16" or "uint32"
    vocab_size: int

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.tokenizer_path)

    def train_tokens(self) -> np.ndarray:
        return np.memmap(self.train_path, dtype=self.dtype, mode="r")

    def val_tokens(self) -> np.ndarray:
        return np.memmap(self.val_path, dtype=self.dtype, mode="r")


def _split_documents(texts: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out whole files (a seeded choice) so validation is unseen text; a single file gives its tail."""
    if len(texts) == 1:
        text = texts[0]
        cut = int(len(text) * (1 - val_fraction))
        cut = text.rfind("\n", 0, cut) + 1 or cut  # prefer a line boundary
        return [text[:cut]], [text[cut:]]
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    val = set(order[:min(max(1, round(len(texts) * val_fraction)), len(texts) - 1)])
    return ([t for i, t in enumerate(texts) if i not in val], [t for i, t in enumerate(texts) if i in val])


def _encode_documents(tok: Tokenizer, docs: list[str], dtype: str) -> np.ndarray:
    """All documents back to back, each followed by EOS so the model sees where one file ends."""
    return np.concatenate([np.array(tok.encode(doc) + [tok.eos_id], dtype=dtype) for doc in docs])


def _token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < 2**16 else "uint32"


def _cache_root(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir).expanduser()
    return root if root.is_absolute() else REPO_ROOT / root


def _build(files: list[Path], cfg: DataConfig, out: Path, log: Callable[[str], None]) -> None:
    """Write the cache into a temp dir and rename it into place, DONE last: a crash leaves no DONE."""
    t0 = time.time()
    texts = [f.read_text("utf-8", errors="replace") for f in files]
    train_docs, val_docs = _split_documents(texts, cfg.val_fraction)
    sample = _tokenizer_sample(train_docs, cfg.max_tokenizer_chars)
    log(f"data: training tokenizer (vocab {cfg.vocab_size}) on {sum(map(len, sample)) / 1e6:.1f} MB "
        f"of {sum(map(len, texts)) / 1e6:.1f} MB in {len(files)} files ...")
    model = _train_tokenizer(sample, cfg.vocab_size)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.model").write_bytes(model)
    tok = Tokenizer(tmp / "tokenizer.model")
    log(f"data: encoding {len(files)} files ...")
    dtype = _token_dtype(cfg.vocab_size)
    train = _encode_documents(tok, train_docs, dtype)
    val = _encode_documents(tok, val_docs, dtype)
    train.tofile(tmp / "train.bin")
    val.tofile(tmp / "val.bin")
    meta = dict(key=out.name, name=cfg.name, files=len(files), val_files=len(val_docs), chars=sum(map(len, texts)),
                vocab_size=cfg.vocab_size, dtype=dtype, train_tokens=len(train), val_tokens=len(val),
                sentencepiece=spm.__version__, format=FORMAT_VERSION)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / "DONE").touch()
    if (out / "DONE").exists():  # another job finished the same corpus meanwhile: keep theirs
        shutil.rmtree(tmp)
        return
    shutil.rmtree(out, ignore_errors=True)  # leftovers without DONE are never trusted
    os.replace(tmp, out)
    log(f"data: wrote {len(train) / 1e6:.2f}M train tokens, {len(val) / 1e6:.2f}M val tokens to {out} "
        f"in {time.time() - t0:.1f}s")


def prepare_corpus(cfg: DataConfig, *, is_first_rank: bool, barrier: Callable[[], None],
                   log: Callable[[str], None] = print) -> TokenizedCorpus:
    """The first rank builds the cache if needed; every rank calls barrier() exactly once, then opens it."""
    files = corpus_files(cfg)
    out = _cache_root(cfg) / corpus_key(files, cfg)
    if is_first_rank:
        try:
            if (out / "DONE").exists():
                log(f"data: using cached tokens in {out}")
            else:
                _build(files, cfg, out, log)
        finally:  # release the other ranks even on failure, so they report an error instead of hanging
            barrier()
    else:
        barrier()
    if not (out / "DONE").exists():
        raise DataError(f"data cache {out} is missing or incomplete: the first rank failed to prepare it "
                        "(see its error), or data.cache_dir is not shared between the ranks")
    return TokenizedCorpus(key=out.name, tokenizer_path=out / "tokenizer.model", train_path=out / "train.bin",
                           val_path=out / "val.bin", dtype=_token_dtype(cfg.vocab_size), vocab_size=cfg.vocab_size)


# ---------------------------------------------------------------- sampling


class WindowSampler:
    """Sample i is the window starting at an offset drawn from a generator seeded by (seed, i)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, *, name: str = "token"):
        if len(tokens) < seq_len + 1:
            raise DataError(f"the {name} data has {len(tokens)} tokens, fewer than model.seq_len + 1 = "
                            f"{seq_len + 1}: give more text (data.paths) or a shorter model.seq_len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def offset(self, i: int) -> int:
        """Uniform over [0, len(tokens) - seq_len - 1], so the target y never runs past the end."""
        return int(np.random.default_rng([self.seed, i]).integers(len(self.tokens) - self.seq_len))

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.offset(i)
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self.window(i) for i in indices))
        return torch.stack(xs), torch.stack(ys)


def dp_sample_indices(consumed: int, micro_step: int, micro_batch: int, dp_rank: int, dp_size: int) -> list[int]:
    """Global sample indices of one DP rank's micro-batch: a step's micro-batches over all ranks tile
    [consumed, consumed + global_batch) exactly, whatever dp_size is."""
    start = consumed + (micro_step * dp_size + dp_rank) * micro_batch
    return list(range(start, start + micro_batch))
