"""Reading the corpus: the main process cuts the files into tasks; a worker turns a task into documents.

The main process reads the text-like files (plain text and JSONL, compressed or not) front to back, as a disk
likes it, and cuts them into pieces of whole lines at the first line start after every BLOCK bytes of the
decompressed file; Parquet files are cut by row group, which a worker reads itself. Consecutive pieces are
grouped into tasks of at least BLOCK bytes. The cuts depend only on the files, never on the number of
workers, and no more than a few tasks per worker are in flight, so memory does not grow with the corpus.

Documents: a plain-text file is one document (read in pieces: a worker may see part of it); a JSONL line's
`data.text_key` field is one; so is a Parquet row's `data.text_key` column. Bad input (malformed JSON, a
missing field, an unreadable file) raises DataError naming the file and line.
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from .config import DataError
from .corpus import file_format
from .split import first_segment

BLOCK = 1 << 20  # bytes of text per piece (a multiple of split.SEGMENT) and at least per task


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


def tasks(files: list[Path], text_key: str) -> Iterator[list[Piece]]:
    group, size = [], 0
    for path in files:
        for piece in _pieces(path, text_key):
            group.append(piece)
            size += piece.size
            if size >= BLOCK:
                yield group
                group, size = [], 0
    if group:
        yield group


def _pieces(path: Path, text_key: str) -> Iterator[Piece]:
    fmt, compression = file_format(path)
    try:
        if fmt == "parquet":
            yield from _row_groups(path, text_key)
        else:
            yield from _line_pieces(path, fmt, compression)
    except DataError:
        raise
    except Exception as e:  # OSError, EOFError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException, ...
        raise DataError(f"cannot read corpus file {path}: {type(e).__name__}: {e}") from None


def _open(path: Path, compression: str | None) -> tuple[BinaryIO, BinaryIO]:
    """(decompressed stream, the raw file under it: its position is the progress on disk)."""
    raw = open(path, "rb")
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw), raw
    if compression == "zstd":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)), raw
    return raw, raw


def _line_pieces(path: Path, fmt: str, compression: str | None) -> Iterator[Piece]:
    f, raw = _open(path, compression)
    with raw, f:
        offset, line, disk, pending = 0, 1, 0, None
        prev_line_start = head = None
        while True:
            data = f.read(BLOCK - offset % BLOCK)  # up to the next multiple of BLOCK ...
            if data and not data.endswith(b"\n"):
                data += f.readline()  # ... and to the end of the line that crosses it
            if pending is not None:  # one piece of look-ahead, to know which one is the last
                pending.last = not data
                yield pending
            if not data:
                return
            pending = Piece(str(path), fmt, offset, data, line=line, size=len(data), disk=raw.tell() - disk,
                            last=False, prev_line_start=prev_line_start, head=head)
            if offset == 0 and fmt == "text":
                head = first_segment(data)
            prev_line_start = offset + data.rfind(b"\n", 0, len(data) - 1) + 1
            disk, offset, line = raw.tell(), offset + len(data), line + data.count(b"\n")


def _row_groups(path: Path, text_key: str) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DataError(f"{path}: no column {text_key!r} (it has: {', '.join(schema.names)}): set data.text_key to "
                        f"the column holding the text")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_key!r} holds {kind}, not strings: set data.text_key to the text column")
    meta, disk, row = pf.metadata, path.stat().st_size, 0
    for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        yield Piece(str(path), "parquet", rg, stop=rg + 1, line=row + 1, size=meta.row_group(rg).total_byte_size,
                    disk=disk * rows // max(meta.num_rows, 1))
        row += rows


# ---------------------------------------------------------------- worker: a piece -> documents


def documents(piece: Piece, text_key: str) -> Iterator[Doc]:
    if piece.fmt == "text":
        yield Doc(piece.data, piece.offset, piece.offset == 0, piece.last, piece.prev_line_start, piece.head)
    elif piece.fmt == "jsonl":
        for k, line in enumerate(piece.data.split(b"\n")):
            if line.strip():
                text = _json_text(line, text_key, f"{piece.path}:{piece.line + k}")
                if text:
                    yield Doc(text.encode("utf-8", "replace"))  # "replace": lone surrogates from \ud800 escapes
    else:
        yield from _parquet_documents(piece, text_key)


def _json_text(line: bytes, key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
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
