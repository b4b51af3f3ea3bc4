"""Reading the corpus: the main process cuts the files into tasks; a worker turns a task into documents.

The main process reads the text-like files (plain text and JSONL, compressed or not) front to back, as a disk
likes it, and cuts them into pieces of whole lines at the first line start after every BLOCK bytes of the
decompressed file (a line longer than split.LINE_MAX is several lines: memory is bounded whatever the input);
Parquet files are cut by row group, which a worker reads itself. Consecutive pieces are grouped into tasks of
at least BLOCK bytes. The cuts depend only on the files, never on the number of workers, and no more than a few
tasks per worker are in flight, so memory does not grow with the corpus. While reading, the main process
hashes each file's bytes (sha256): the content fingerprint recorded in the cache's files.json.

Documents: a plain-text file is one document (read in pieces: a worker may see part of it); a JSONL line's
`data.text_key` field is one; so is a Parquet row's `data.text_key` column; a `.json` file is JSON Lines when
it starts with an object. Bad input (malformed JSON, a missing field, an unreadable file, binary content,
invalid UTF-8 under data.bad_utf8=error) raises DataError naming the file and line; what data.binary_files=skip
and data.bad_utf8=replace let through is counted per file (Stats), never dropped or changed silently.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from .config import DataConfig, DataError
from .corpus import file_format
from .split import LINE_MAX, first_start, first_segment, last_start

BLOCK = 1 << 20  # bytes of text per piece (a multiple of split.SEGMENT) and at least per task
SNIFF = 8192  # bytes at the start of a file that tell text from binary
BINARY_SHARE = 0.3  # of the sniffed bytes that are not UTF-8: binary (Latin-1 text has a few percent)
BAD_UTF8_SHARE = 0.001  # data.bad_utf8=replace: more invalid bytes than this share of a piece: not UTF-8 at all


@dataclass
class Piece:
    path: str
    fmt: str  # text | jsonl | parquet
    offset: int  # byte offset of `data` in the decompressed file; parquet: the first row group
    data: bytes = b""  # whole lines (text, jsonl)
    stop: int = 0  # parquet: row groups [offset, stop)
    line: int = 1  # line number of data's first line, for messages
    size: int = 0  # bytes of text it holds (parquet: uncompressed, from the file's metadata)
    disk: int = 0  # bytes of the file on disk it accounts for (progress)
    last: bool = True  # text: the file (the document) ends in this piece
    prev_line_start: int | None = None  # text: where the line before `offset` starts (None: offset is 0)
    head: bytes | None = None  # text: the document's first segment, when this piece is not the first
    skipped: str | None = None  # the whole file is left out (data.binary_files=skip), and why


@dataclass
class Doc:
    """Whole lines of one document, at byte `offset` of it; `first`/`last`: the document starts/ends here."""
    data: bytes
    offset: int = 0
    first: bool = True
    last: bool = True
    prev_line_start: int | None = None
    head: bytes | None = None


# ---------------------------------------------------------------- main process: files -> tasks


def tasks(files: list[Path], cfg: DataConfig, digests: dict[str, str] | None = None) -> Iterator[list[Piece]]:
    """The corpus as tasks; `digests` (when given) receives each file's sha256 once it has been read whole."""
    group, size = [], 0
    for path in files:
        for piece in _pieces(path, cfg, digests):
            group.append(piece)
            size += piece.size
            if size >= BLOCK:
                yield group
                group, size = [], 0
    if group:
        yield group


def _pieces(path: Path, cfg: DataConfig, digests: dict[str, str] | None) -> Iterator[Piece]:
    fmt, compression = file_format(path)
    sha = hashlib.sha256()
    try:
        if fmt == "parquet":
            yield from _row_groups(path, cfg.text_key)
            if digests is not None:
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        sha.update(chunk)
        else:
            yield from _line_pieces(path, fmt, compression, cfg.binary_files, sha)
    except DataError:
        raise
    except Exception as e:  # OSError, EOFError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException, ...
        raise DataError(f"cannot read corpus file {path}: {type(e).__name__}: {e}") from None
    if digests is not None:
        digests[str(path)] = sha.hexdigest()


class _Hashed(io.RawIOBase):
    """A file whose bytes are hashed as they are read (under a decompressor, the compressed bytes)."""

    def __init__(self, raw: BinaryIO, sha):
        self.raw, self.sha = raw, sha

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.sha.update(memoryview(buffer)[:n])
        return n


def _open(path: Path, compression: str | None, sha) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, the raw file under it: its position is the progress on disk)."""
    raw = open(path, "rb")
    hashed = io.BufferedReader(_Hashed(raw, sha), 1 << 16)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=hashed), raw
    if compression == "zstd":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(hashed, read_across_frames=True)), raw
    return hashed, raw


def binary_reason(head: bytes) -> str | None:
    """Why the first bytes of a file look binary (NUL bytes, or mostly not UTF-8), or None for text."""
    head = head[:SNIFF]
    if b"\0" in head:
        return f"a NUL byte at offset {head.index(0)}"
    bad = replacements(head[:len(head) - 3] if len(head) == SNIFF else head)  # (a character may be cut at the end)
    if bad > BINARY_SHARE * len(head):
        return f"{bad} invalid UTF-8 sequences in its first {len(head)} bytes"
    return None


def replacements(data: bytes) -> int:
    """How many U+FFFD decoding `data` with errors="replace" puts in (one per maximal invalid sequence)."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").count("\ufffd") - data.count("\ufffd".encode())


def _line_pieces(path: Path, fmt: str, compression: str | None, binary: str, sha) -> Iterator[Piece]:
    f, raw = _open(path, compression, sha)
    with raw, f:
        buf, eof = f.read(SNIFF), False
        why = binary_reason(buf)
        if why and binary == "skip":
            while f.read(1 << 24):  # hashed all the same: the fingerprint covers every file
                pass
            yield Piece(str(path), fmt, 0, disk=raw.tell(), skipped=f"binary ({why})")
            return
        if why:
            raise DataError(f"corpus file {path} looks binary ({why}): leave it out of data.paths, or set "
                            f"data.binary_files=skip to skip such files (they are counted)")
        if fmt == "json":
            fmt = _json_kind(path, buf)
        offset, line, disk, pending = 0, 1, 0, None
        prev_line_start = head = None
        while True:
            target = BLOCK - offset % BLOCK  # cut at the first line start at or after the next multiple of BLOCK
            while not eof and len(buf) < target + LINE_MAX + 2:
                chunk = f.read(target + LINE_MAX + 2 - len(buf))
                eof = not chunk
                buf += chunk
            if fmt == "text" or target >= len(buf):
                cut = first_start(buf, target)
            else:  # JSON Lines: the line that crosses the multiple is read whole (a record is parsed whole)
                while (end := buf.find(b"\n", target - 1)) < 0 and not eof:
                    chunk = f.readline()
                    eof = not chunk
                    buf += chunk
                cut = end + 1 if end >= 0 else len(buf)
            data, buf = buf[:cut], buf[cut:]
            if pending is not None:  # one piece of look-ahead, to know which one is the last
                pending.last = not data
                yield pending
            if not data:
                return
            pending = Piece(str(path), fmt, offset, data, line=line, size=len(data), disk=raw.tell() - disk,
                            last=False, prev_line_start=prev_line_start, head=head)
            if offset == 0 and fmt == "text":
                head = first_segment(data)
            prev_line_start = offset + (last_start(data) if fmt == "text" else 0)
            disk, offset, line = raw.tell(), offset + len(data), line + data.count(b"\n")


def _json_kind(path: Path, head: bytes) -> str:
    """A .json file: JSON Lines when its first record is an object on its own line; a JSON array is refused."""
    first = head.lstrip()[:1]
    if first == b"{":
        return "jsonl"
    what = "a JSON array" if first == b"[" else "not JSON Lines"
    raise DataError(f"corpus file {path} is {what}: megatron-lite reads JSON Lines (one object per line, "
                    f".jsonl): convert it, e.g. jq -c '.[]' {path} > {Path(path).stem}.jsonl")


def _row_groups(path: Path, text_key: str) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DataError(f"{path}: no column {text_key!r} (it has: {', '.join(schema.names)}): set data.text_key to "
                        f"the column holding the text")
    kind = schema.field(text_key).type
    if pa.types.is_dictionary(kind):  # dictionary-encoded strings (pandas categoricals, repeated values)
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_key!r} holds {kind}, not strings: set data.text_key to the text column")
    meta, disk, row = pf.metadata, path.stat().st_size, 0
    for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        yield Piece(str(path), "parquet", rg, stop=rg + 1, line=row + 1, size=meta.row_group(rg).total_byte_size,
                    disk=disk * rows // max(meta.num_rows, 1))
        row += rows


# ---------------------------------------------------------------- worker: a piece -> documents


def documents(piece: Piece, cfg: DataConfig, stats) -> Iterator[Doc]:
    """The documents of a piece; what is skipped or replaced is counted in `stats` (encode.Stats), per file."""
    if piece.skipped:
        stats.skipped[piece.path] = piece.skipped
    elif piece.fmt == "text":
        _check_utf8(piece, cfg.bad_utf8, stats)
        yield Doc(piece.data, piece.offset, piece.offset == 0, piece.last, piece.prev_line_start, piece.head)
    elif piece.fmt == "jsonl":
        clean = _check_utf8(piece, cfg.bad_utf8, stats)
        for k, line in enumerate(piece.data.split(b"\n")):
            if line.strip():
                where = f"{piece.path}:{piece.line + k}"
                text = _json_text(line if clean else line.decode("utf-8", "replace"), cfg.text_key, where)
                if text:
                    yield Doc(_utf8(text, where, cfg, stats, piece.path))
    else:
        yield from _parquet_documents(piece, cfg.text_key)


def _check_utf8(piece: Piece, mode: str, stats) -> bool:
    """True when the piece is valid UTF-8; else (data.bad_utf8=replace, and few enough) count its replacements."""
    bad = replacements(piece.data)
    if bad == 0:
        return True
    if mode == "error":
        try:
            piece.data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = piece.line + piece.data.count(b"\n", 0, e.start)
            raise DataError(f"{piece.path}:{line}: invalid UTF-8 (byte 0x{piece.data[e.start]:02x} at offset "
                            f"{piece.offset + e.start} of the file): convert the file to UTF-8 (e.g. iconv -f latin1 "
                            f"-t utf-8), or set data.bad_utf8=replace to replace such bytes by U+FFFD (counted)") from None
    if bad > BAD_UTF8_SHARE * len(piece.data):
        raise DataError(f"{piece.path}:{piece.line}: {bad} invalid UTF-8 sequences in {len(piece.data):,} bytes (over "
                        f"{BAD_UTF8_SHARE:.1%}, even for data.bad_utf8=replace): the file is not UTF-8; convert it "
                        f"(e.g. iconv -f latin1 -t utf-8) or leave it out of data.paths")
    stats.bad_utf8[piece.path] = stats.bad_utf8.get(piece.path, 0) + bad
    return False


def _utf8(text: str, where: str, cfg: DataConfig, stats, path: str) -> bytes:
    """A JSON string's UTF-8; lone surrogates (from \\ud800-style escapes) are invalid text, as bad bytes are."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        if cfg.bad_utf8 == "error":
            raise DataError(f"{where}: field {cfg.text_key!r} holds a lone surrogate ({text[e.start]!r}, from a \\u "
                            f"escape), which is not text: fix the line, or set data.bad_utf8=replace to replace it by "
                            f"U+FFFD (counted)") from None
        fixed = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
        stats.bad_utf8[path] = stats.bad_utf8.get(path, 0) + sum(a != b for a, b in zip(text, fixed))
        return fixed.encode("utf-8")


def _json_text(line: bytes | str, key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError
        raise DataError(f"{where}: malformed JSON line ({e}): fix or remove the line") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__} where an object with a {key!r} field was expected")
    if key not in record:
        raise DataError(f"{where}: no {key!r} field (it has: {', '.join(map(str, record)) or 'none'}): set "
                        f"data.text_key to the field holding the text")
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {key!r} is {type(text).__name__}, not a string")
    return text


def _parquet_documents(piece: Piece, text_key: str) -> Iterator[Doc]:
    import pyarrow.parquet as pq
    row = piece.line
    try:
        batches = pq.ParquetFile(piece.path).iter_batches(batch_size=1024, row_groups=range(piece.offset, piece.stop),
                                                          columns=[text_key])
        for batch in batches:
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise DataError(f"{piece.path}: row {row} has no {text_key!r} (null)")
                if text:
                    yield Doc(text.encode("utf-8", "replace"))
                row += 1
    except DataError:
        raise
    except Exception as e:  # OSError, pyarrow.ArrowException
        raise DataError(f"cannot read corpus file {piece.path} (row group {piece.offset}): {e}") from None
