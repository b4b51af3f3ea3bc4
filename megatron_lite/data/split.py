"""How a document is cut into segments, and which segments are held out for validation.

A segment is a run of whole lines of one document: segment j holds the lines whose first byte lies in
[j * SEGMENT, (j + 1) * SEGMENT) of the document's UTF-8 bytes, so a document shorter than SEGMENT is one
segment, and where the cuts fall depends only on the document's own text.

A line is what follows a newline, except that a line with no newline within LINE_MAX bytes (a minified file,
a data blob, a 50 MB single-line document) is cut into lines of at most LINE_MAX bytes: before the first space
or tab that precedes a non-space at or after HALF bytes, else at a character boundary at LINE_MAX. Files are
read, split and tokenized in whole lines, so these cuts bound every buffer (and the tokenizer's memory) whatever
the input; they are the only places where the tokens can differ from encoding the document whole. Each cut
depends only on the bytes from the previous line start to LINE_MAX past it, and lines are at least HALF long,
so a piece of a document that ends at a line start finds the same lines as the whole document.

Segment j goes to validation when floor((j + 1) f + u) > floor(j f + u), with f = data.val_fraction and u in
[0, 1) a hash of the document's first segment. A one-segment document is held out with probability f (a
choice made by its content); a document of n segments has floor(n f + u) of them held out, evenly spaced,
so that two large files give about f of their text to validation, not one of them. The choice depends on
nothing but the text: not on the file format, the worker count, or where the document sits in the corpus
(identical documents land on the same side).
"""
from __future__ import annotations

import hashlib
import math
import re

import numpy as np

from .config import DataError

SEGMENT = 8192  # bytes
LINE_MAX = 16384  # bytes: a longer line is cut (see above)
HALF = LINE_MAX // 2
_SPACE_WORD = re.compile(rb"[ \t][^\s]")  # a cut goes before the space, which then leads the next word


def next_start(data: bytes, s: int) -> int:
    """The line start after the one at `s` (len(data) at the end); `data` ends at a line start or the document's
    end, and holds LINE_MAX + 2 bytes past `s` where the document does."""
    n = len(data)
    newline = data.find(b"\n", s, s + LINE_MAX)
    if newline >= 0:
        return newline + 1
    if n - s <= HALF + 1:
        return n
    word = _SPACE_WORD.search(data, s + HALF, min(s + LINE_MAX, n - 2) + 2)
    if word:
        return word.start()
    if s + LINE_MAX >= n:
        return n
    q = s + LINE_MAX
    while q > s + HALF and data[q] & 0xC0 == 0x80:  # not inside a UTF-8 character
        q -= 1
    return q


def first_start(data: bytes, c: int, known: int = 0) -> int:
    """The first line start at or after byte `c` of `data`, which begins at a line start; `known`: a line start
    at or before `c` (where the walk through a long line may begin)."""
    if c >= len(data):
        return len(data)
    s = max(data.rfind(b"\n", 0, c) + 1, known)
    while s < c:
        s = next_start(data, s)
    return s


def last_start(data: bytes) -> int:
    """Where the last line of `data` (which begins at a line start) starts."""
    s = data.rfind(b"\n", 0, len(data) - 1) + 1
    while (t := next_start(data, s)) < len(data):
        s = t
    return s


def segments(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """(j, bytes) of the segments in `data`: whole lines starting at byte `offset` of their document."""
    out, start = [], 0
    while True:
        cut = first_start(data, ((offset + start) // SEGMENT + 1) * SEGMENT - offset, start)
        if cut >= len(data):
            break
        out.append(((offset + start) // SEGMENT, data[start:cut]))
        start = cut  # the first line starting at or after the multiple
    out.append(((offset + start) // SEGMENT, data[start:]))
    return out


def first_segment(data: bytes) -> bytes:
    """Segment 0 of a document whose first bytes (whole lines, at least one segment's worth) are `data`."""
    return segments(data, 0)[0][1]


def _hash(data: bytes, person: bytes, size: int = 8) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=size, person=person).digest(), "big")


def phase(head: bytes) -> float:
    """u of the document whose first segment is `head`."""
    return _hash(head, b"ml-val-split") / 2**64


def is_val(j: int, u: float, fraction: float) -> bool:
    return math.floor((j + 1) * fraction + u) > math.floor(j * fraction + u)


def sample_rank(segment: bytes) -> int:
    """The order in which segments enter the tokenizer's training sample (a seeded shuffle, by content)."""
    return _hash(segment, b"ml-tok-sample")


def content_hash(segment: bytes) -> int:
    """Summed over all segments (mod 2**128) into the corpus fingerprint: order-free, so workers can add."""
    return _hash(segment, b"ml-corpus", 16)


def hold_out(train: np.ndarray, val: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The training and validation token streams of a run whose windows are `window` (model.seq_len + 1) tokens,
    and a line saying what validation holds. The split above works in 8 KiB segments, so a small corpus (a few
    documents) can hold out nothing: then validation gets one window's worth, the end of the training stream;
    a corpus of one to two windows keeps all its text for training and validates on its last window (said so).
    A corpus shorter than one window is the only error."""
    n_train, n_val = len(train), len(val)
    total = n_train + n_val
    if total < window:
        raise DataError(f"the corpus has {total:,} tokens, fewer than one training window (model.seq_len + 1 = "
                        f"{window:,}): give more text (data.paths) or a shorter model.seq_len")
    if n_train >= window and n_val >= window:
        return train, val, f"validation: {n_val:,} tokens ({100 * n_val / total:.1f}%) held out by the split"
    if total < 2 * window:
        whole = np.concatenate([train, val])
        return whole, whole[-window:], (f"validation: the last {window:,} tokens (one window) of the training text, "
                                        f"which is too short ({total:,} tokens) to hold out a window")
    if n_val < window:  # the usual small-corpus case
        k = window - n_val
        return train[:-k], np.concatenate([train[-k:], val]), (
            f"validation: {window:,} tokens (one window): the split held out {n_val:,}, so the last {k:,} tokens of "
            f"the training text were moved to validation")
    k = window - n_train
    return np.concatenate([train, val[:k]]), val[k:], (
        f"validation: {n_val - k:,} tokens: the split left {n_train:,} for training, fewer than a window, so the "
        f"first {k:,} validation tokens were moved to training")
