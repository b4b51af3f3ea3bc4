"""`python -m megatron_lite.data --clean`: remove what no preparation will use again from the cache directory.

Removed: caches set aside as damaged (`<key>.damaged.*`: a job still reading one keeps its open files), the work
of builds that failed or were abandoned (`<key>.build.N/`, `<key>.failed`) unless a live process holds that key's
lock, locks and temporary files of processes that are gone, and the same inside complete caches (a dead
verifier's lock). Kept: complete caches (each is listed with its size: delete one by hand once no corpus version
needs it) and everything of a build or verification still running. A lock of another host counts as live until
its heartbeat is lock.STALE_S old.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from .cache import problem
from .lock import STALE_S, _alive
from .progress import human_bytes

_LEFTOVER = re.compile(r"^(?P<key>[0-9a-f]{16})\.(?P<kind>build|damaged|failed|lock)\b")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _live(lock: Path) -> bool:
    try:
        info = json.loads(lock.read_text() or "{}")
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False
    alive = _alive(info) if info else None
    return alive is True or (alive is None and age < STALE_S)


def _locks(root: Path, key: str) -> list[Path]:
    return [p for p in root.glob(f"{key}.lock.*") if not p.name.endswith(".tmp")]


def clean(root: Path, log: Callable[[str], None] = print) -> int:
    """Remove the leftovers under `root` (a data.cache_dir); return the bytes freed."""
    if not root.is_dir():
        log(f"data: {root} does not exist: nothing to clean")
        return 0
    freed, kept = 0, []
    for path in sorted(root.iterdir()):
        m = _LEFTOVER.match(path.name)
        if path.is_dir() and problem(path) is None:
            kept.append(path)
            freed += _clean_inside(path, log)
            continue
        if not m:
            continue
        busy = any(_live(lock) for lock in _locks(root, m["key"]))
        why = {"damaged": "a damaged cache set aside", "build": "an unfinished build's work",
               "failed": "a failed build's message", "lock": "the lock of a process that is gone"}[m["kind"]]
        if m["kind"] == "lock":
            busy = _live(path)
        if busy and m["kind"] != "damaged":
            continue
        freed += _remove(path, why, log)
    for path in kept:
        log(f"data: kept the cache {path} ({human_bytes(_size(path))})")
    log(f"data: cleaned {root}: {human_bytes(freed)} freed, {len(kept)} complete cache{'s' if len(kept) != 1 else ''} "
        f"kept")
    return freed


def _clean_inside(cache: Path, log: Callable[[str], None]) -> int:
    """A complete cache: the lock, failure marker and temporary files of a verifier that is gone."""
    locks = [p for p in cache.glob("verify.lock.*") if not p.name.endswith(".tmp")]
    if any(_live(lock) for lock in locks):
        return 0
    return sum(_remove(p, "a verification's leftover", log)
               for p in [*locks, *cache.glob("verify.lock.*.tmp"), *cache.glob("verify.failed"), *cache.glob("*.tmp")])


def _remove(path: Path, why: str, log: Callable[[str], None]) -> int:
    size = _size(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    log(f"data: removed {path} ({why}, {human_bytes(size)})")
    return size
