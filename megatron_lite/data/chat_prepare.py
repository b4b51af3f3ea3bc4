"""Preparing a chat or prompt/completion corpus (data.format=chat | prompt_completion) into the cache.

The cache holds the conversations' token ids (train.bin, val.bin, as for text) and beside them one byte per token
(train.flags.bin, val.flags.bin): LOSS, the loss counts this token when it is a target (the assistant's, the
completion's), and START, a conversation starts here. Training reads both memory-mapped (data/packing.py).

The build runs as prepare.py's does (one builder under the lock while the others wait, spawned workers, results
used in task order so that the files do not depend on data.workers) with another task: rows -> conversations ->
ids and flags (data/chat.py). A conversation goes to validation or training whole, chosen by a hash of its
content with probability data.val_fraction, and validation gets at least one: when the hash chose none, the
last training conversation moves there. A conversation without a counted token (no assistant message) is left
out, and counted. A killed chat build starts over (text builds resume; chat corpora are small).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..tokenizer import load_tokenizer
from . import readers
from .cache import BINS, FLAGS
from .chat import check_record, encode_record
from .chat_template import TEMPLATE_FILE, ChatTemplate, find_chat_template
from .config import DataConfig, DataError, token_dtype
from .corpus import FORMAT_VERSION, file_format, given_tokenizer
from .passes import _ordered, worker_pool
from .progress import Progress
from .split import content_hash, is_val, phase
from .verify import FILES, sha256_file, stamp

LOSS, START = 1, 2  # bits of a flags byte
FIELDS = {"chat": ("messages", "tools"), "prompt_completion": ("prompt", "completion")}  # tools: optional
HASH_MOD = 2**128


def check_chat(cfg: DataConfig, files: list[Path]) -> str:
    """What can be checked before reading the rows; returns the fingerprint of the template (for the cache key)."""
    if cfg.name != "text":
        raise DataError(f"data.format={cfg.format} reads your files: use data=chat (or data=text) with "
                        f"data.paths=[conversations.jsonl]")
    if not cfg.tokenizer:
        raise DataError(f"data.format={cfg.format} needs the tokenizer of the model it fine-tunes: set data.tokenizer "
                        f"(checkpoint.load of a Hugging Face model directory sets it)")
    for f in files:
        fmt, _ = file_format(f)
        if fmt == "text":  # (.json: JSON Lines, checked by its first byte as text corpora are)
            raise DataError(f"corpus file {f}: data.format={cfg.format} reads JSONL (.jsonl, .ndjson) or Parquet rows "
                            f"with {' and '.join(repr(k) for k in FIELDS[cfg.format] if k != 'tools')}")
        if fmt == "parquet":
            import pyarrow.parquet as pq
            names = pq.read_schema(f).names
            need = [k for k in FIELDS[cfg.format] if k != "tools" and k not in names]
            if need:
                raise DataError(f"{f}: no column {' or '.join(map(repr, need))} (it has: {', '.join(names)}): "
                                f"data.format={cfg.format} reads {' and '.join(repr(k) for k in FIELDS[cfg.format])}")
    h = hashlib.sha256(cfg.format.encode())
    if cfg.format == "chat":
        template = ChatTemplate.of_tokenizer(cfg.tokenizer)
        template.compiled  # compile it: a syntax error now, not in a worker
        h.update(json.dumps([template.source, template.tokens]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- main process: files -> tasks


def tasks(files: list[Path], cfg: DataConfig, digests: dict[str, str]) -> Iterator[list[readers.Piece]]:
    """JSONL files in pieces of whole lines (readers', binary files refused or skipped as for text), Parquet files
    by row group; at least readers.BLOCK bytes of rows per task. `digests` receives each file's sha256."""
    group, size = [], 0
    for path in files:
        for piece in _pieces(path, cfg, digests):
            group.append(piece)
            size += piece.size
            if size >= readers.BLOCK:
                yield group
                group, size = [], 0
    if group:
        yield group


def _pieces(path: Path, cfg: DataConfig, digests: dict[str, str]) -> Iterator[readers.Piece]:
    kind, compression = file_format(path)
    sha = hashlib.sha256()
    try:
        if kind != "parquet":
            yield from readers._line_pieces(path, kind, compression, cfg.binary_files, sha)
        else:
            import pyarrow.parquet as pq
            meta, disk, row = pq.ParquetFile(path).metadata, path.stat().st_size, 0
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                yield readers.Piece(str(path), "parquet", rg, stop=rg + 1, line=row + 1,
                                    size=meta.row_group(rg).total_byte_size, disk=disk * rows // max(meta.num_rows, 1))
                row += rows
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    sha.update(chunk)
    except DataError:
        raise
    except Exception as e:  # OSError, EOFError, zlib.error, pyarrow.ArrowException, ...
        raise DataError(f"cannot read corpus file {path}: {type(e).__name__}: {e}") from None
    digests[str(path)] = sha.hexdigest()


# ---------------------------------------------------------------- worker: a task -> ids and flags


@dataclass
class ChatEncoded:
    arrays: dict[str, np.ndarray]  # train.bin, val.bin, train.flags.bin, val.flags.bin
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    empty: int = 0  # conversations without a counted token, left out
    text_bytes: int = 0  # of the rows' fields, as canonical JSON
    content: int = 0  # sum of the conversations' content hashes, mod 2**128
    disk: int = 0
    bad_utf8: dict[str, int] = field(default_factory=dict)  # as encode.Stats: file -> sequences replaced
    skipped: dict[str, str] = field(default_factory=dict)  # file -> why it was left out (data.binary_files=skip)


def _rows(piece: readers.Piece, cfg: DataConfig, out: ChatEncoded) -> Iterator[tuple[dict, str]]:
    """(row, where) of a piece: JSON objects of JSONL lines (invalid UTF-8 as data.bad_utf8 says), or Parquet rows
    as dicts."""
    if piece.skipped:
        out.skipped[piece.path] = piece.skipped
        return
    if piece.fmt == "jsonl":
        clean = readers._check_utf8(piece, cfg.bad_utf8, out)
        for k, line in enumerate(piece.data.split(b"\n")):
            if line.strip():
                where = f"{piece.path}:{piece.line + k}"
                try:
                    yield json.loads(line if clean else line.decode("utf-8", "replace")), where
                except ValueError as e:
                    raise DataError(f"{where}: malformed JSON line ({e}): fix or remove the line") from None
        return
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(piece.path)
    columns = [k for k in FIELDS[cfg.format] if k in pf.schema_arrow.names]
    row = piece.line
    for batch in pf.iter_batches(batch_size=256, row_groups=range(piece.offset, piece.stop), columns=columns):
        for record in batch.to_pylist():
            yield record, f"{piece.path}: row {row}"
            row += 1


_cache: dict[str, tuple] = {}  # per worker process: tokenizer directory -> (tokenizer, template)


def encode_chat_task(args) -> ChatEncoded:
    task, cfg, tokenizer_dir, dtype = args
    fmt = cfg.format
    if tokenizer_dir not in _cache:
        _cache[tokenizer_dir] = (load_tokenizer(tokenizer_dir),
                                 ChatTemplate.of_tokenizer(tokenizer_dir) if fmt == "chat" else None)
    tok, template = _cache[tokenizer_dir]
    out = ChatEncoded({}, disk=sum(p.disk for p in task))
    parts: dict[str, tuple[list[int], list[int]]] = {"train": ([], []), "val": ([], [])}
    for piece in task:
        try:
            for record, where in _rows(piece, cfg, out):
                fields = check_record(record, fmt, where)
                canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")
                ids, counted = encode_record(tok, template, fields, fmt, where)
                if not any(counted[1:]):  # the first token is never a target
                    out.empty += 1
                    continue
                side = "val" if is_val(0, phase(canonical), cfg.val_fraction) else "train"
                tokens, flags = parts[side]
                tokens += ids
                flags += [LOSS * c for c in counted]
                flags[len(flags) - len(ids)] |= START
                out.documents[side] += 1
                out.text_bytes += len(canonical)
                out.content = (out.content + content_hash(canonical)) % HASH_MOD
        except DataError:
            raise
        except Exception as e:  # pyarrow.ArrowException, OSError
            raise DataError(f"cannot read corpus file {piece.path}: {type(e).__name__}: {e}") from None
    for side, (tokens, flags) in parts.items():
        out.arrays[f"{side}.bin"] = np.array(tokens, dtype=dtype)
        out.arrays[f"{side}.flags.bin"] = np.array(flags, dtype=np.uint8)
    return out


# ---------------------------------------------------------------- the build


def build(files: list[Path], cfg: DataConfig, key: str, work: Path, previous: Path | None, held, log: Callable,
          bar: bool, workers: int, tokenizer_meta: Callable) -> None:
    """Write the complete cache of a chat corpus into `work` (prepare.prepare_corpus calls this under the lock)."""
    t0 = time.time()
    stamps = {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in files}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    given_tokenizer(cfg).save(work)  # with data.eos_token / data.bos_token
    tok = load_tokenizer(work)
    template = find_chat_template(cfg.tokenizer) if cfg.format == "chat" else None
    if template is not None and not (work / TEMPLATE_FILE).is_file():  # the template the tokens were made with
        (work / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    dtype = token_dtype(cfg, tok.vocab_size)
    progress = Progress("tokenizing conversations", sum(f.stat().st_size for f in files), log, held.status, bar=bar)
    totals, sources = ChatEncoded({}), {}
    items = ((task, cfg, str(work), dtype.name) for task in tasks(files, cfg, sources))
    outs = {name: open(work / name, "wb") for name in (*BINS, *FLAGS)}
    try:
        with worker_pool(workers) as pool:
            for res in _ordered(pool, encode_chat_task, items, 2 * workers):
                if held.lost:
                    raise DataError(f"data: another process took over the preparation in {work.parent}: this one "
                                    f"stalled")
                for name, array in res.arrays.items():
                    outs[name].write(array)
                for side in ("train", "val"):
                    totals.documents[side] += res.documents[side]
                totals.empty += res.empty
                totals.text_bytes += res.text_bytes
                totals.skipped.update(res.skipped)
                for path, n in res.bad_utf8.items():
                    totals.bad_utf8[path] = totals.bad_utf8.get(path, 0) + n
                totals.content = (totals.content + res.content) % HASH_MOD
                progress.update(res.disk, res.text_bytes)
    finally:
        for f in outs.values():
            f.close()
    progress.close()
    for f, (size, mtime) in stamps.items():
        if (f.stat().st_size, f.stat().st_mtime_ns) != (size, mtime):
            raise DataError(f"corpus file {f} changed while it was being prepared: prepare again once it is final")
    (work / FILES).write_text(json.dumps([dict(path=str(f), size=size, mtime_ns=mtime, sha256=sources[str(f)])
                                          for f, (size, mtime) in stamps.items()]))
    kept = sum(totals.documents.values())
    if kept < 2:
        raise DataError(f"the corpus ({len(files)} files, e.g. {files[0]}) holds {kept} conversation"
                        f"{'' if kept == 1 else 's'} with a token to train on ({totals.empty} without one): "
                        f"training and validation need at least 2; check data.paths and data.format={cfg.format}")
    moved = totals.documents["val"] == 0
    if moved:
        _move_last_conversation(work, dtype)
        totals.documents = {"train": totals.documents["train"] - 1, "val": 1}
        log(f"data: data.val_fraction={cfg.val_fraction} held out no conversation: the last training conversation "
            f"is the validation split")
    counts = {name: _count(work, name) for name in FLAGS}
    meta = dict(
        format=FORMAT_VERSION, key=key, name=cfg.name, paths=list(cfg.paths), files=len(files), text_key=cfg.text_key,
        val_fraction=cfg.val_fraction, documents=kept, text_bytes=totals.text_bytes, segments=kept,
        val_segments=totals.documents["val"], corpus=_corpus_id(totals, cfg),
        bad_utf8=dict(replaced=sum(totals.bad_utf8.values()), files=totals.bad_utf8), skipped=totals.skipped,
        train_tokens=counts["train.flags.bin"][0], val_tokens=counts["val.flags.bin"][0], dtype=dtype.name,
        sha256={name: sha256_file(work / name) for name in (*BINS, *FLAGS)},
        tokenizer=tokenizer_meta(tok, cfg, work), seconds=time.time() - t0, workers=workers, host=socket.gethostname(),
        data_format=cfg.format,
        chat=dict(train_documents=totals.documents["train"], val_documents=totals.documents["val"],
                  train_loss_tokens=counts["train.flags.bin"][1], val_loss_tokens=counts["val.flags.bin"][1],
                  empty=totals.empty, moved_to_val=moved,
                  template=hashlib.sha256(template.encode()).hexdigest()[:16] if template else None))
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    stamp(work, corpus=True, seconds=0.0)  # the checksums were computed from the corpus just now
    (work / "DONE").touch()


def _move_last_conversation(work: Path, dtype: np.dtype) -> None:
    flags = np.fromfile(work / "train.flags.bin", dtype=np.uint8)
    start = int(np.flatnonzero(flags & START)[-1])
    for tokens_name, flags_name, itemsize in (("train.bin", "val.bin", dtype.itemsize),
                                              ("train.flags.bin", "val.flags.bin", 1)):
        with open(work / tokens_name, "r+b") as f:
            f.seek(start * itemsize)
            tail = f.read()
            f.truncate(start * itemsize)
        with open(work / flags_name, "ab") as f:
            f.write(tail)


def _count(work: Path, name: str) -> tuple[int, int]:
    """(tokens, counted tokens) of a flags file."""
    size = (work / name).stat().st_size
    if size == 0:
        return 0, 0
    flags = np.memmap(work / name, dtype=np.uint8, mode="r")
    return size, int(np.count_nonzero(flags & LOSS))


def _corpus_id(totals: ChatEncoded, cfg: DataConfig) -> str:
    ident = [FORMAT_VERSION, cfg.format, f"{totals.content:032x}", totals.text_bytes, sum(totals.documents.values()),
             cfg.val_fraction]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def describe_tokens(meta: dict) -> str:
    """One line: conversations and tokens of each kind, per split."""
    c = meta["chat"]
    what = "assistant" if meta["data_format"] == "chat" else "completion"
    parts = []
    for side, name in (("train", "train"), ("val", "validation")):
        n, loss = meta[f"{side}_tokens"], c[f"{side}_loss_tokens"]
        docs = c[f"{side}_documents"]
        parts.append(f"{name}: {docs:,} conversation{'s' if docs != 1 else ''}, {n:,} tokens = {loss:,} {what} tokens "
                     f"(the loss counts these, {100 * loss / max(n, 1):.1f}%) + {n - loss:,} context")
    empty = f"; {c['empty']:,} without {what} tokens left out" if c["empty"] else ""
    return f"{meta['data_format']} data: " + "; ".join(parts) + empty
