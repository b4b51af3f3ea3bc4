"""A prepared corpus on disk: `<cache_dir>/<key>/` with meta.json, the tokenizer's files, train.bin, val.bin.

train.bin and val.bin are raw token ids (np.memmap-able) in meta["dtype"]. A cache counts as complete when it
has DONE, no DAMAGED, and every file meta.json names has the size it records; anything else (a truncated copy, a
deleted file, contents a verification found wrong) is reported and prepared again rather than trained on.
meta.json also holds each file's sha256, which verify.py compares once per job before the cache is used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import Tokenizer, load_tokenizer
from .config import DataError

BINS = ("train.bin", "val.bin")
DAMAGED = "DAMAGED"  # written by a verification that found the contents wrong (verify.py): what it found
FLAGS = ("train.flags.bin", "val.flags.bin")  # chat formats: a byte per token beside the ids (data/chat_prepare.py)


def problem(path: Path) -> str | None:
    """None when the cache at `path` is complete, else what is missing or wrong."""
    if not (path / "DONE").is_file():
        return "missing" if not path.exists() else "incomplete: no DONE"
    try:
        return (path / DAMAGED).read_text()
    except OSError:
        pass
    try:
        meta = json.loads((path / "meta.json").read_text())
        expected = {name: meta[f"{name.split('.')[0]}_tokens"] * np.dtype(meta["dtype"]).itemsize for name in BINS}
        expected.update({name: size for name, size in meta["tokenizer"]["files"].items()})
        if meta.get("data_format", "text") != "text":
            expected.update({name: meta[f"{name.split('.')[0]}_tokens"] for name in FLAGS})
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable ({e})"
    for name, size in expected.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            return f"{name} is {'missing' if actual is None else f'{actual} bytes'}, meta.json says {size}"
    return None


@dataclass
class TokenizedCorpus:
    path: Path
    meta: dict

    @classmethod
    def open(cls, path: Path) -> "TokenizedCorpus":
        wrong = problem(path)
        if wrong is not None:
            raise DataError(f"data cache {path} cannot be used: {wrong}")
        return cls(path, json.loads((path / "meta.json").read_text()))

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def train_path(self) -> Path:
        return self.path / "train.bin"

    @property
    def val_path(self) -> Path:
        return self.path / "val.bin"

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def vocab_size(self) -> int:
        return self.meta["tokenizer"]["vocab_size"]

    @property
    def data_format(self) -> str:
        return self.meta.get("data_format", "text")

    def flags(self, split: str) -> np.ndarray | None:
        """Chat formats: the flags byte of each token of `split` (train or val; data/chat_prepare.py); else None."""
        return None if self.data_format == "text" else _tokens(self.path / f"{split}.flags.bin", "uint8")

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    def train_tokens(self) -> np.ndarray:
        return _tokens(self.train_path, self.dtype)

    def val_tokens(self) -> np.ndarray:
        return _tokens(self.val_path, self.dtype)

    def identity(self) -> dict:
        """What a checkpoint records: the corpus (its text and split) and the tokenizer, each with a description."""
        m, t = self.meta, self.meta["tokenizer"]
        paths = f" {m['paths'][0]}" + (f" (+{len(m['paths']) - 1} more)" if len(m["paths"]) > 1 else "") if m["paths"] else ""
        files = f"{m['files']} file{'s' if m['files'] != 1 else ''}"
        return {"corpus": m["corpus"], "tokenizer": t["fingerprint"], "corpus_desc": f"{m['name']}{paths}, {files}",
                "tokenizer_desc": t["describe"]}

    def verify_checksums(self, corpus: bool = False) -> None:
        """Raise DataError unless the token files (and, with `corpus`, the corpus files) match their sha256."""
        from .verify import check
        found = check(self.path, corpus)
        if found:
            raise DataError(f"data cache {self.path}: {found}")

    def changes(self) -> str | None:
        """What the preparation left out or replaced (data.binary_files=skip, data.bad_utf8=replace), or None."""
        m, out = self.meta, []
        if m["skipped"]:
            path, why = next(iter(m["skipped"].items()))
            n = len(m["skipped"])
            out.append(f"{n} file{'s' if n != 1 else ''} skipped (e.g. {path}: {why})")
        if m["bad_utf8"]["replaced"]:
            files = m["bad_utf8"]["files"]
            worst = max(files, key=files.get)
            out.append(f"{m['bad_utf8']['replaced']:,} invalid UTF-8 sequences replaced by U+FFFD in {len(files)} "
                       f"file{'s' if len(files) != 1 else ''} (most: {files[worst]:,} in {worst})")
        return "; ".join(out) or None

    def summary(self) -> str:
        m, t = self.meta, self.meta["tokenizer"]
        train, val = m["train_tokens"], m["val_tokens"]
        changes = self.changes()
        return "\n".join([
            f"data cache: {self.path}",
            f"  corpus:    {self.identity()['corpus_desc']}: {m['documents']:,} documents, {m['text_bytes'] / 1e6:,.1f} MB "
            f"of text (fingerprint {m['corpus']})",
            f"  tokenizer: {t['describe']} (fingerprint {t['fingerprint']})",
            f"  tokens:    {train:,} train + {val:,} validation ({100 * val / max(train + val, 1):.1f}%), {m['dtype']}; "
            f"{m['text_bytes'] / max(train + val, 1):.2f} bytes of text per token",
            *([f"  changes:   {changes} (meta.json has them all)"] if changes else []),
            f"  prepared in {m['seconds']:.1f} s with {m['workers']} worker{'s' if m['workers'] != 1 else ''}",
            *([f"  {_describe_tokens(m)}"] if self.data_format != "text" else [])])


def _describe_tokens(meta: dict) -> str:
    from .chat_prepare import describe_tokens
    return describe_tokens(meta)


def _tokens(path: Path, dtype: str) -> np.ndarray:
    """The token ids of a .bin file, memory-mapped (mmap refuses an empty file: a small corpus can hold out no
    validation text, which the sampler then reports)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
