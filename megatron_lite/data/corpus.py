"""Which files make the corpus, what format each is in, and the key of its cache: all cheap (no file is read).

Called on every rank before any process group exists, so bad paths, unreadable files, a missing optional
package or a bad tokenizer fail at once with one line. The cache key hashes the settings and each file's
path, size and modification time, so every rank computes the same key from `stat` alone, without reading the
corpus or waiting for anyone; a changed file gets a new cache.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import sentencepiece as spm

from .config import DataConfig, DataError, check_settings, token_dtype

FORMAT_VERSION = 3  # bump when the cache layout, the split or the encoding changes, so old caches are not reused
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
UNREAD = {".xz": "xz -d", ".lzma": "xz -d", ".bz2": "bunzip2", ".lz4": "lz4 -d", ".zip": "unzip", ".7z": "7z x",
          ".tar": "tar xf", ".tgz": "tar xzf", ".br": "brotli -d"}  # archives and compressions read by nothing here
EXTRA = "pip install 'megatron-lite[data]'"


def file_format(path: Path) -> tuple[str, str | None]:
    """(format, compression): format is jsonl (.jsonl, .ndjson), json (.json: JSON Lines or refused, by its first
    byte; readers.py), parquet, or text (anything else)."""
    name = path.name.lower()
    compression = next((c for ext, c in COMPRESSIONS.items() if name.endswith(ext)), None)
    if compression:
        name = name.rsplit(".", 1)[0]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl", compression
    if name.endswith(".json"):
        return "json", compression
    return ("parquet" if name.endswith(".parquet") else "text"), compression


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The corpus files, sorted, each readable and in a format this installation reads."""
    check_settings(cfg)
    files = _stdlib_files() if cfg.name == "pystdlib" else _text_files(cfg.paths)
    kinds: dict[str, Path] = {}
    for f in files:
        if not os.access(f, os.R_OK):
            raise DataError(f"corpus file {f} is not readable: fix its permissions or leave it out of data.paths")
        fmt, compression = file_format(f)
        unread = next((ext for ext in UNREAD if f.name.lower().endswith(ext)), None)
        if unread:
            raise DataError(f"corpus file {f} is a {unread} file, which megatron-lite does not read: unpack it "
                            f"({UNREAD[unread]}) and give the text, or recompress it as .gz or .zst")
        if fmt == "parquet" and compression:
            raise DataError(f"corpus file {f}: Parquet compresses inside the file; give the .parquet itself")
        kinds.setdefault(fmt, f)
        kinds.setdefault(compression or "", f)
    for kind, module, what in (("parquet", "pyarrow", "Parquet"), ("zstd", "zstandard", "zstd-compressed")):
        if kind in kinds and importlib.util.find_spec(module) is None:
            raise DataError(f"data.paths has {what} files ({kinds[kind]}), which need the {module} package: "
                            f"{EXTRA} (or pip install {module})")
    return files


def _stdlib_files() -> list[Path]:
    """This interpreter's own standard library source, minus its test suites and installed packages."""
    files = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]  # prune instead of filtering later
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def _text_files(paths: list[str]) -> list[Path]:
    if not paths:
        raise DataError("data.paths is empty for data.name='text': give text, JSONL or Parquet files or globs, "
                        "e.g. data.paths='[corpus/*.txt]'")
    files = set()
    for p in paths:
        matches = [Path(m).resolve() for m in glob.glob(os.path.expanduser(p), recursive=True)]
        found = [m for m in matches if m.is_file()]
        if not found and any(m.is_dir() for m in matches):
            raise DataError(f"data.paths entry {p!r} is a directory: use '{p.rstrip('/')}/**' for every file under "
                            f"it, or a pattern such as '{p.rstrip('/')}/**/*.txt'")
        if not found:
            raise DataError(f"data.paths entry {p!r} matches no file: give existing files or globs")
        files.update(found)
    return sorted(files)


def given_tokenizer(cfg: DataConfig):
    """data.tokenizer with data.eos_token / data.bos_token."""
    from ..tokenizer import load_tokenizer
    return load_tokenizer(cfg.tokenizer, cfg.eos_token, cfg.bos_token)


def check_data(cfg: DataConfig) -> list[Path]:
    """Everything about the data that can be checked without reading the corpus; sets data.vocab_size from
    data.tokenizer when one is given (the model's vocabulary is the tokenizer's)."""
    files = corpus_files(cfg)
    if cfg.tokenizer:
        cfg.vocab_size = given_tokenizer(cfg).vocab_size
    token_dtype(cfg, cfg.vocab_size)
    if cfg.format != "text":
        from .chat_prepare import check_chat
        check_chat(cfg, files)
    return files


def corpus_key(files: list[Path], cfg: DataConfig) -> str:
    """The cache directory's name: settings, tokenizer, and each file's path, size and modification time."""
    tokenizer = (given_tokenizer(cfg).fingerprint if cfg.tokenizer else
                 ["sentencepiece-bpe", spm.__version__, cfg.vocab_size, cfg.max_tokenizer_chars])
    settings = [FORMAT_VERSION, tokenizer, cfg.val_fraction, cfg.text_key, cfg.token_dtype, cfg.binary_files, cfg.bad_utf8]
    if cfg.format != "text":  # chat formats: the format and the chat template (text keys stay as they were)
        from .chat_prepare import check_chat
        settings.append(check_chat(cfg, files))
    h = hashlib.sha256(json.dumps(settings).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
