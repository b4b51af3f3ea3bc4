"""How a document is cut into segments, and which segments are held out for validation.

A segment is a run of whole lines of one document: segment j holds the lines whose first byte lies in
[j * SEGMENT, (j + 1) * SEGMENT) of the document's UTF-8 bytes, so a document shorter than SEGMENT is one
segment, and where the cuts fall depends only on the document's own text.

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

SEGMENT = 8192  # bytes


def segments(data: bytes, offset: int) -> list[tuple[int, bytes]]:
    """(j, bytes) of the segments in `data`: whole lines starting at byte `offset` of their document."""
    out, start = [], 0
    while True:
        cut_at = ((offset + start) // SEGMENT + 1) * SEGMENT - offset  # the next multiple, relative to data
        newline = data.find(b"\n", cut_at - 1) if cut_at < len(data) else -1
        if newline < 0 or newline + 1 >= len(data):
            break
        out.append(((offset + start) // SEGMENT, data[start:newline + 1]))
        start = newline + 1  # the first line starting at or after the multiple
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
