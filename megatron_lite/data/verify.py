"""Checking a cache before it is used: once per job, by one process, at a cost the log states.

A cache counts as complete when its files have the sizes meta.json records (cache.problem: every process, free),
but bytes overwritten in place keep the sizes. So before a cache is used, one process compares train.bin and
val.bin with their sha256 in meta.json and, with data.verify_corpus=true, re-hashes every corpus file against
files.json (a same-size edit whose modification time was restored: the cache key, from stat alone, cannot see
it). The result goes to `verified.json` in the cache; a process that started before it was written takes it as
its own (the other ranks of the job, jobs running at the time) and the rest verify again: once per job. A
damaged or stale cache gets a DAMAGED file, which cache.problem reports, so prepare_corpus sets it aside and
prepares it again as it does a truncated one. The verifier is chosen as the builder is (lock.run_once): nothing
is a collective, so no rank hangs on one that failed, and a verifier that dies is replaced.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from .cache import BINS, DAMAGED, problem
from .config import DataConfig, DataError
from .lock import HeldLock, run_once
from .progress import human_bytes

STAMP = "verified.json"
FILES = "files.json"  # each corpus file's path, size, mtime and sha256: what the cache was made from
_IMPORTED = time.time()


def process_start() -> float:
    """When this process started (wall clock), from /proc; else when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def stamp(path: Path, *, corpus: bool, seconds: float, found: str | None = None) -> None:
    """Record a verification (or a build, which computed the same checksums) of the cache at `path`."""
    info = dict(time=time.time(), by=f"{socket.gethostname()}:{os.getpid()}", corpus=corpus, seconds=seconds,
                meta=hashlib.sha256((path / "meta.json").read_bytes()).hexdigest(), problem=found)
    tmp = path / f"{STAMP}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path / STAMP)


def check(path: Path, corpus: bool, status: dict | None = None) -> str | None:
    """What is wrong with the cache's token files (and, with `corpus`, its corpus files), or None."""
    meta = json.loads((path / "meta.json").read_text())
    for name in meta["sha256"]:  # train.bin, val.bin (and, for chat formats, their flags)
        if status is not None:
            status["stage"] = f"verifying {path / name}"
        if sha256_file(path / name) != meta["sha256"][name]:
            return f"{name} does not match its sha256 in meta.json: it was changed after preparation"
    for rec in json.loads((path / FILES).read_text()) if corpus else ():
        if status is not None:
            status["stage"] = f"re-hashing corpus file {rec['path']}"
        if sha256_file(Path(rec["path"])) != rec["sha256"]:
            return (f"stale: corpus file {rec['path']} changed since the cache was prepared (its size and modification "
                    f"time did not, so the cache key could not tell)")
    return None


def verify_once(path: Path, cfg: DataConfig, log: Callable[[str], None]) -> str | None:
    """None when the cache at `path` is sound; else what is wrong with it (marked DAMAGED: prepare it again)."""
    try:
        size = sum((path / name).stat().st_size for name in BINS)
    except OSError:  # set aside by another job since it was found complete
        return problem(path) or "missing"
    since, what = process_start(), f"{human_bytes(size)} of tokens" + (" and the corpus files" if cfg.verify_corpus else "")

    def ready() -> bool:
        if problem(path) is not None:  # marked DAMAGED, or set aside for a rebuild meanwhile
            return True
        got = _stamp(path)
        return got is not None and got["time"] >= since and (got["corpus"] or not cfg.verify_corpus)

    def run(held: HeldLock) -> bool:
        t0 = time.time()
        found = check(path, cfg.verify_corpus, held.status)
        stamp(path, corpus=cfg.verify_corpus, seconds=time.time() - t0, found=found)
        if found:
            (path / DAMAGED).write_text(found)
        log(f"data: verified {what} of {path} in {time.time() - t0:.1f} s (once per job; other processes of "
            f"the job wait for it): {found or 'sound'}")
        return True

    try:
        ran = run_once(path, "verify", ready, run, log, doing=f"verifying {path}", task=f"the verification of {path}")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        return _verify_read_only(path, cfg, what, log)
    wrong = problem(path)
    if not ran and wrong is None:
        got = _stamp(path)
        log(f"data: {path} was verified by {got['by']} {time.time() - got['time']:.0f} s ago ({what} in "
            f"{got['seconds']:.1f} s)")
    return wrong


def _verify_read_only(path: Path, cfg: DataConfig, what: str, log: Callable[[str], None]) -> None:
    """A cache this process cannot write to: verified here, and a damaged one cannot be rebuilt in place."""
    t0 = time.time()
    found = check(path, cfg.verify_corpus)
    if found:
        raise DataError(f"data cache {path} is damaged ({found}) and read-only here: prepare it again where it "
                        f"can be written")
    log(f"data: verified {what} of the read-only cache {path} in {time.time() - t0:.1f} s")


def _stamp(path: Path) -> dict | None:
    try:
        got = json.loads((path / STAMP).read_text())
        return got if got["meta"] == hashlib.sha256((path / "meta.json").read_bytes()).hexdigest() else None
    except (OSError, ValueError, KeyError):
        return None
