"""Preparing a corpus: `prepare_corpus(cfg)` finds its cache or builds it, once, whoever else asks for it.

Every process that needs the corpus (each rank of a job, several jobs, or `python -m megatron_lite.data`)
computes the cache key from `stat` alone (corpus.py), then `lock.build_once` lets exactly one of them build
while the others poll the filesystem. The build, in `<key>.build.<generation>/`:

1. the tokenizer: data.tokenizer's files are copied, or a sentencepiece BPE is trained on a sample of at most
   data.max_tokenizer_chars characters: the training segments of lowest `split.sample_rank` (a shuffle by
   content), found in one parallel pass over the corpus that keeps only the current best candidates;
2. the tokens: a second parallel pass; the tasks' token ids are appended to train.bin / val.bin in task order
   as they come back, so the files do not depend on the number of workers, and peak memory is a few tasks per
   worker, whatever the corpus size;
3. meta.json (counts, checksums, the corpus and tokenizer fingerprints) and DONE; the directory is then
   renamed into place.

progress.json records the tasks done (after their bytes are flushed), so a build whose process died is
resumed by the next one from where it stopped.
"""
from __future__ import annotations

import ctypes
import hashlib
import heapq
import json
import multiprocessing as mp
import os
import shutil
import socket
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..tokenizer import load_tokenizer, train_sentencepiece
from .cache import BINS, TokenizedCorpus, problem
from .config import DataConfig, DataError, token_dtype
from .corpus import FORMAT_VERSION, check_data, corpus_key
from .encode import Stats, encode_task, init_worker, sample_task
from .lock import HeldLock, build_once
from .progress import Progress, human_bytes
from . import readers
from .readers import tasks
from .split import SEGMENT

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE = "progress.json"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_root(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir).expanduser()
    return root if root.is_absolute() else REPO_ROOT / root


def prepare_corpus(cfg: DataConfig, log: Callable[[str], None] = print, *, progress_bar: bool = False
                   ) -> TokenizedCorpus:
    """The prepared corpus of `cfg`: from the cache, or built by this process or another one it waits for."""
    if getattr(mp.current_process(), "_inheriting", False):  # multiprocessing's own test for this case
        raise RuntimeError("prepare_corpus was called while a worker process imported the calling script: put the "
                           "script's top-level code under `if __name__ == '__main__':`")
    files = check_data(cfg)
    out = cache_root(cfg) / corpus_key(files, cfg)
    built = build_once(out, lambda work, previous, held: _build(files, cfg, out.name, work, previous, held, log,
                                                                  progress_bar), problem, log)
    corpus = TokenizedCorpus.open(out)
    if built:
        m = corpus.meta
        log(f"data: prepared {out}: {m['documents']:,} documents, {m['train_tokens']:,} train + {m['val_tokens']:,} "
            f"val tokens in {m['seconds']:.1f} s")
    else:
        log(f"data: using cached tokens in {out}")
    return corpus


def _build(files: list[Path], cfg: DataConfig, key: str, work: Path, previous: Path | None, held: HeldLock,
           log: Callable[[str], None], bar: bool) -> None:
    t0 = time.time()
    total = sum(f.stat().st_size for f in files)
    workers = min(cfg.workers or available_cores(), max(1, -(-total // readers.BLOCK)))  # not more than tasks
    state = _start(work, previous, log)
    with _pool(workers) as pool:
        if not state["tokenizer"]:
            if cfg.tokenizer:
                load_tokenizer(cfg.tokenizer).save(work)
            else:
                lines = _sample(files, cfg, pool, 2 * workers, Progress("sampling text for the tokenizer", total, log,
                                                                        held.status, bar=bar))
                size = sum(len(ln) + 1 for ln in lines)
                held.status.clear()
                held.status["stage"] = f"training the tokenizer (vocab {cfg.vocab_size}) on {human_bytes(size)}"
                log(f"data: {held.status['stage']} ...")
                (work / "tokenizer.model").write_bytes(train_sentencepiece(lines, cfg.vocab_size))
                del lines
            state["tokenizer"] = True
            _save_state(work, state)
        tok = load_tokenizer(work)
        dtype = token_dtype(cfg, tok.vocab_size)
        digests = _encode(files, cfg, work, state, str(work), dtype.name, pool, 2 * workers, held,
                          Progress("tokenizing", total, log, held.status, bar=bar))
    stats = Stats(**state["stats"])
    if stats.documents == 0:
        raise DataError(f"the corpus ({len(files)} files{', e.g. ' + str(files[0]) if files else ''}) holds no text: "
                        f"check data.paths (and data.text_key for JSONL/Parquet)")
    meta = dict(
        format=FORMAT_VERSION, key=key, name=cfg.name, paths=list(cfg.paths), files=len(files), text_key=cfg.text_key,
        val_fraction=cfg.val_fraction, documents=stats.documents, text_bytes=stats.text_bytes,
        segments=stats.segments, val_segments=stats.val_segments, corpus=_corpus_id(stats, cfg),
        train_tokens=state["train.bin"] // dtype.itemsize, val_tokens=state["val.bin"] // dtype.itemsize,
        dtype=dtype.name, sha256=digests,
        tokenizer=dict(kind=tok.kind, vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id,
                       add_bos=tok.add_bos, fingerprint=tok.fingerprint, describe=tok.describe(),
                       source=str(cfg.tokenizer) if cfg.tokenizer else "trained on this corpus",
                       files={name: (work / name).stat().st_size for name in tok.files}),
        seconds=time.time() - t0, workers=workers, host=socket.gethostname())
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    (work / STATE).unlink()
    (work / "DONE").touch()


def _corpus_id(stats: Stats, cfg: DataConfig) -> str:
    """The text (as a multiset of segments) and its split: equal for a corpus in any format or file order."""
    ident = [FORMAT_VERSION, f"{stats.content:032x}", stats.text_bytes, stats.segments, cfg.val_fraction]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- resuming


def _start(work: Path, previous: Path | None, log) -> dict:
    """A fresh state, or the state of `previous` (a dead builder's directory) with its finished work copied.

    Copied, not moved: a builder that only seemed dead may still be writing there."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in BINS:
        (work / name).touch()
    fresh = {"tokenizer": False, "tasks": 0, "train.bin": 0, "val.bin": 0, "stats": asdict(Stats()),
             "cuts": [readers.BLOCK, SEGMENT]}  # what a task is: resume only a build cut the same way
    try:
        state = json.loads((previous / STATE).read_text()) if previous else None
    except (OSError, ValueError):
        state = None
    if state is not None and state.get("cuts") != fresh["cuts"]:
        state = None
    if state is None:
        if previous:
            log(f"data: {previous} holds no finished work to resume; starting over")
        return fresh
    for src in previous.iterdir():
        if src.name not in (*BINS, STATE) and src.is_file():
            shutil.copyfile(src, work / src.name)
    for name in BINS:
        if not _copy_prefix(previous / name, work / name, state[name]):
            log(f"data: {previous / name} is shorter than its progress says; starting over")
            for name in BINS:
                (work / name).write_bytes(b"")
            return fresh
    log(f"data: resuming the preparation left in {previous}: {state['tasks']} tasks "
        f"({human_bytes(state['stats']['text_bytes'])} of text) were done")
    _save_state(work, state)
    return state


def _copy_prefix(src: Path, dst: Path, n: int) -> bool:
    with open(dst, "wb") as out:
        if n == 0:
            return True
        if not src.is_file() or src.stat().st_size < n:
            return False
        with open(src, "rb") as f:
            while n > 0:
                chunk = f.read(min(n, 1 << 24))
                out.write(chunk)
                n -= len(chunk)
    return True


def _save_state(work: Path, state: dict) -> None:
    tmp = work / f"{STATE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, work / STATE)


# ---------------------------------------------------------------- the two passes


@contextmanager
def _pool(workers: int):
    """Spawned worker processes (None: work in this process). Spawned, not forked: the caller may hold threads
    (torch, gloo, a tokenizers pool) that a fork would copy in an undefined state."""
    if workers == 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


def _ordered(pool, fn, items: Iterable, window: int) -> Iterator:
    """fn(item) for each item, in order, with at most `window` items in flight (items are pulled lazily:
    unlike Pool.imap, which reads its whole input at once).

    After each task, freed heap pages go back to the OS: glibc raises its mmap threshold once the first
    task-sized buffers are freed, so later ones come from the heap, which then fragments, and without the
    trim the peak RSS would creep up with the number of tasks (measured: +20 MB from 8 to 32 MB of text)."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(fn, item) if pool else _done(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
            if _malloc_trim:
                _malloc_trim(0)
    while pending:
        yield pending.popleft().result()


def _done(fn, item) -> Future:
    future = Future()
    try:
        future.set_result(fn(item))
    except Exception as e:
        future.set_exception(e)
    return future


def _sample(files, cfg: DataConfig, pool, window: int, progress: Progress) -> list[str]:
    """Lines of the distinct training segments of lowest sample_rank, up to cfg.max_tokenizer_chars, in rank
    order (identical segments have the same rank: a segment repeated in the corpus enters the sample once)."""
    kept: list[tuple[int, int, list[str]]] = []  # max-heap on rank: (-rank, chars, lines)
    ranks: set[int] = set()  # of the segments in `kept`
    chars, cutoff = 0, [2**64]  # a segment ranked at or above the cutoff can no longer make the sample

    def items():
        for task in tasks(files, cfg.text_key):
            yield task, cfg.text_key, cfg.val_fraction, cutoff[0]

    for res in _ordered(pool, sample_task, items(), window):
        for rank, lines in res.candidates:
            if rank < cutoff[0] and rank not in ranks:
                size = sum(len(ln) + 1 for ln in lines)
                heapq.heappush(kept, (-rank, size, lines))
                ranks.add(rank)
                chars += size
                while chars - kept[0][1] >= cfg.max_tokenizer_chars:  # the largest rank is not needed
                    ranks.discard(-kept[0][0])
                    chars -= heapq.heappop(kept)[1]
                if chars >= cfg.max_tokenizer_chars:
                    cutoff[0] = -kept[0][0]
        progress.update(res.disk, res.stats.text_bytes)
    progress.close()
    if not kept:
        raise DataError(f"the corpus ({len(files)} files, e.g. {files[0]}) has no line of text to train a tokenizer "
                        f"on: check data.paths (and data.text_key for JSONL/Parquet)")
    return [ln for _, _, lines in sorted(kept, reverse=True) for ln in lines]


def _encode(files, cfg: DataConfig, work: Path, state: dict, tokenizer_dir: str, dtype: str, pool, window: int,
            held: HeldLock, progress: Progress) -> dict[str, str]:
    """Append the token ids of every task not yet in `state` to train.bin/val.bin; return their sha256."""
    digests = {name: hashlib.sha256() for name in BINS}
    for name in BINS:  # the part copied from a previous attempt
        with open(work / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digests[name].update(chunk)
    all_tasks = tasks(files, cfg.text_key)
    for task in islice(all_tasks, state["tasks"]):  # done before: count them as progress
        progress.update(sum(p.disk for p in task), 0)
    items = ((task, cfg.text_key, cfg.val_fraction, tokenizer_dir, dtype) for task in all_tasks)
    stats, saved = Stats(**state["stats"]), time.monotonic()
    with open(work / "train.bin", "ab") as train, open(work / "val.bin", "ab") as val:
        outs = {"train.bin": train, "val.bin": val}
        for res in _ordered(pool, encode_task, items, window):
            if held.lost:
                raise DataError(f"data: another process took over the preparation in {work.parent}: this one stalled")
            for name, ids in (("train.bin", res.train), ("val.bin", res.val)):
                outs[name].write(ids)
                digests[name].update(ids)
                state[name] += ids.nbytes
            stats.add(res.stats)
            state["tasks"] += 1
            state["stats"] = asdict(stats)
            progress.update(res.disk, res.stats.text_bytes)
            if time.monotonic() - saved >= 1.0:  # the bytes first, then the record that they are there
                train.flush()
                val.flush()
                _save_state(work, state)
                saved = time.monotonic()
        for f in outs.values():
            f.flush()
            os.fsync(f.fileno())
    _save_state(work, state)
    progress.close()
    return {name: d.hexdigest() for name, d in digests.items()}
