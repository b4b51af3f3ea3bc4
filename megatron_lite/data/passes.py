"""The two parallel passes over the corpus, on worker processes: sampling text for the tokenizer, tokenizing.

Tasks (readers.tasks) go to spawned workers with at most a few per worker in flight, and their results come
back and are used in task order, so nothing depends on the number of workers and memory does not grow with
the corpus. One worker means this process, with the same functions.
"""
from __future__ import annotations

import ctypes
import hashlib
import heapq
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .cache import BINS
from .config import DataConfig, DataError
from .encode import Stats, encode_task, init_worker, sample_task
from .lock import HeldLock
from .progress import Progress
from .readers import tasks


class _Pool(ProcessPoolExecutor):
    """Workers born with SIGINT blocked: Ctrl-C reaches the terminal's whole process group, and a worker still
    starting its interpreter would die of it with a 'Fatal Python error' traceback; blocked (the mask survives
    fork and exec), it stays pending until init_worker has set the worker to ignore it. The parent defers its own
    Ctrl-C until the worker's start is done: another of its threads may take the signal despite the main
    thread's mask, and a KeyboardInterrupt half-way through the start would leave the new worker reading a
    truncated start message (an `EOFError` traceback)."""

    def _spawn_process(self):
        deferred = []
        main = threading.current_thread() is threading.main_thread()
        handler = signal.signal(signal.SIGINT, lambda *_: deferred.append(True)) if main else None
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super()._spawn_process()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            if main:
                signal.signal(signal.SIGINT, handler)
                if deferred:
                    signal.raise_signal(signal.SIGINT)


@contextmanager
def worker_pool(workers: int):
    """Spawned worker processes (None: work in this process). Spawned, not forked: the caller may hold threads
    (torch, gloo, a tokenizers pool) that a fork would copy in an undefined state."""
    if workers == 1:
        yield None
        return
    pool = _Pool(workers, mp_context=mp.get_context("spawn"), initializer=init_worker, initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException:  # an error, Ctrl-C: stop the workers now rather than after their current tasks
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
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


def sample_pass(files: list[Path], cfg: DataConfig, pool, window: int, progress: Progress) -> list[str]:
    """Lines of the distinct training segments of lowest sample_rank, up to cfg.max_tokenizer_chars, in rank
    order (identical segments have the same rank: a segment repeated in the corpus enters the sample once)."""
    kept: list[tuple[int, int, list[str]]] = []  # max-heap on rank: (-rank, chars, lines)
    ranks: set[int] = set()  # of the segments in `kept`
    chars, cutoff = 0, [2**64]  # a segment ranked at or above the cutoff can no longer make the sample

    def items():
        for task in tasks(files, cfg):
            yield task, cfg, cutoff[0]

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


def encode_pass(files: list[Path], cfg: DataConfig, work: Path, state: dict, dtype: str, pool, window: int,
                held: HeldLock, progress: Progress, save: Callable[[], None], sources: dict[str, str]
                ) -> dict[str, str]:
    """Append the token ids of every task not yet counted in `state` to work/train.bin and val.bin, updating
    `state` and calling save() about every second (after flushing); return the .bin files' sha256. `sources`
    receives each corpus file's sha256 (the main process reads every file, done tasks included)."""
    digests = {name: hashlib.sha256() for name in BINS}
    for name in BINS:  # the part copied from a previous attempt
        with open(work / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digests[name].update(chunk)
    all_tasks = tasks(files, cfg, sources)
    for task in islice(all_tasks, state["tasks"]):  # done before: count them as progress
        progress.update(sum(p.disk for p in task), 0)
    items = ((task, cfg, str(work), dtype) for task in all_tasks)
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
                save()
                saved = time.monotonic()
        for f in outs.values():
            f.flush()
            os.fsync(f.fileno())
    save()
    progress.close()
    return {name: d.hexdigest() for name, d in digests.items()}
