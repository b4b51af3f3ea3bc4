"""What a worker does with a task: documents -> segments -> train/validation runs -> token ids.

Within a document, each maximal run of consecutive segments on the same side of the split is one document of
that side's token stream: `tok.encode_document(run)` (BOS if the tokenizer's convention has one, the ids,
EOS). A run cut by a task boundary (a plain-text file longer than readers.BLOCK) is encoded in parts, with
BOS only on the first and EOS only on the last.

The tokenizer is given pieces of about CHUNK bytes, which it is fast on and whose memory is bounded, cut where
its ids do not change: between segments for sentencepiece (it encodes lines independently), before a line's
first word for a Hugging Face tokenizer whose pre-tokenizer splits there (`Tokenizer.line_cuts`, checked when
it is loaded; others get whole runs), and always where a long line was cut (split.LINE_MAX: the one documented
place where ids can differ from encoding the document whole).

The same functions run in worker processes (spawned: a worker never inherits a parent's threads) or, with one
worker, in the calling process; they return the same arrays either way.
"""
from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..tokenizer import MAX_LINE_CHARS, Tokenizer, load_tokenizer, word_cuts
from .config import DataConfig
from .readers import Doc, Piece, documents
from .split import SEGMENT, content_hash, is_val, phase, sample_rank, segments

HASH_MOD = 2**128
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class Stats:
    documents: int = 0
    text_bytes: int = 0
    segments: int = 0
    val_segments: int = 0
    content: int = 0  # sum of the segments' content hashes, mod 2**128: the corpus fingerprint
    bad_utf8: dict[str, int] = field(default_factory=dict)  # file -> invalid UTF-8 sequences replaced by U+FFFD
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was left out (data.binary_files=skip)

    def add(self, other: "Stats") -> None:
        for k in ("documents", "text_bytes", "segments", "val_segments"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.content = (self.content + other.content) % HASH_MOD
        for path, n in other.bad_utf8.items():
            self.bad_utf8[path] = self.bad_utf8.get(path, 0) + n
        self.skipped.update(other.skipped)


@dataclass
class Encoded:
    train: np.ndarray
    val: np.ndarray
    stats: Stats
    disk: int  # bytes of corpus files on disk the task accounted for


@dataclass
class Sampled:
    candidates: list[tuple[int, list[str]]]  # (rank, lines) of training segments ranked below the cutoff
    stats: Stats = field(default_factory=Stats)
    disk: int = 0


def runs(doc: Doc, fraction: float, stats: Stats) -> Iterator[tuple[bool, list[bytes], bool, bool]]:
    """(is_val, segments, starts a document, ends a document) for each same-side run of `doc`."""
    segs = segments(doc.data, doc.offset)
    u = phase(doc.head if doc.head is not None else segs[0][1])
    sides = [is_val(j, u, fraction) for j, _ in segs]
    before = None if doc.first else is_val(doc.prev_line_start // SEGMENT, u, fraction)
    after = None if doc.last else is_val((doc.offset + len(doc.data)) // SEGMENT, u, fraction)
    stats.documents += doc.last
    stats.text_bytes += len(doc.data)
    stats.segments += len(segs)
    stats.val_segments += sum(sides)
    for _, seg in segs:
        stats.content = (stats.content + content_hash(seg)) % HASH_MOD
    k = 0
    while k < len(segs):
        m = k + 1
        while m < len(segs) and sides[m] == sides[k]:
            m += 1
        yield (sides[k], [seg for _, seg in segs[k:m]], k > 0 or before != sides[k],
               m < len(segs) or after != sides[k])
        k = m


CHUNK = 8192  # bytes: about what the tokenizer is given at a time


def chunks(segs: list[bytes], line_cuts: str) -> list[bytes]:
    """A run's segments as the pieces the tokenizer gets (see the module docstring): cut wherever a long line
    was, and at line starts ("lines": the segments themselves) or before a line's first word ("words")."""
    if line_cuts == "lines":
        return segs
    blocks, cur = [], []
    for seg in segs:
        cur.append(seg)
        if not seg.endswith(b"\n"):  # a long line's cut (or the run's end)
            blocks.append(b"".join(cur))
            cur = []
    if cur:
        blocks.append(b"".join(cur))
    return [c for b in blocks for c in (word_cuts(b, CHUNK) if line_cuts == "words" else [b])]


class Worker:
    """Per-process state: the tokenizers loaded so far (by directory), so each is read once per worker."""

    def __init__(self):
        self.tokenizers: dict[str, Tokenizer] = {}

    def sample(self, task: list[Piece], cfg: DataConfig, cutoff: int) -> Sampled:
        out = Sampled([], disk=sum(p.disk for p in task))
        for doc in (d for piece in task for d in documents(piece, cfg, out.stats)):
            for held_out, segs, _, _ in runs(doc, cfg.val_fraction, out.stats):
                for seg in segs if not held_out else ():
                    rank = sample_rank(seg)
                    if rank < cutoff:
                        lines = [ln for ln in seg.decode("utf-8", "replace").split("\n") if 0 < len(ln) <= MAX_LINE_CHARS]
                        if lines:
                            out.candidates.append((rank, lines))
        return out

    def encode(self, task: list[Piece], cfg: DataConfig, tokenizer_dir: str, dtype: str) -> Encoded:
        if tokenizer_dir not in self.tokenizers:
            self.tokenizers[tokenizer_dir] = load_tokenizer(tokenizer_dir)
        tok, stats = self.tokenizers[tokenizer_dir], Stats()
        parts = [r for piece in task for doc in documents(piece, cfg, stats) for r in runs(doc, cfg.val_fraction, stats)]
        cut = [chunks(segs, tok.line_cuts) for _, segs, _, _ in parts]
        ids = iter(tok.encode_batch([p.decode("utf-8", "replace") for ps in cut for p in ps]))
        streams: tuple[list[int], list[int]] = ([], [])
        for (held_out, _, first, last), ps in zip(parts, cut):
            run_ids = next(ids)
            for _ in ps[1:]:
                run_ids += next(ids)
            streams[held_out].extend(tok.frame(run_ids, first=first, last=last))
        train, val = (np.array(s, dtype=dtype) for s in streams)
        return Encoded(train, val, stats, sum(p.disk for p in task))


_worker = Worker()  # one per process


def init_worker(parent: int) -> None:
    """Worker processes run one task at a time on one core: keep `tokenizers` from starting a thread pool. A
    worker dies with its parent (Linux: PR_SET_PDEATHSIG), even one killed with SIGKILL, instead of waiting for
    tasks forever; Ctrl-C is the parent's to handle (it stops the workers)."""
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked from birth (passes._Pool); now ignored
    libc = getattr(ctypes.CDLL(None), "prctl", None)
    if libc is not None:
        libc(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def sample_task(args) -> Sampled:
    return _worker.sample(*args)


def encode_task(args) -> Encoded:
    return _worker.encode(*args)
