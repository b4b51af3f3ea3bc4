"""Exactly one builder per cache entry, across the ranks of a job, several jobs, and nodes sharing a filesystem.

    build_once(out, build, check, log)

returns once `out` is complete: built by this process (it won the lock) or by another one it waited for.
Nothing here is a collective, so nothing times out: a waiting process polls the filesystem for as long as
the build takes, printing the builder's progress.

The lock is the file `<out>.lock.<generation>`, created with O_CREAT | O_EXCL (atomic on local filesystems and
on NFS, where flock may hang). Its holder rewrites it every HEARTBEAT_S seconds (os.replace, so it is never
seen half-written) with its host, pid, a beat counter and its progress. A holder is dead when it ran on this
host and its pid is gone, or when its file has not changed for STALE_S seconds as seen by the waiter's own
clock (no clock is compared across hosts); then the waiters race to create generation + 1, and exactly one
wins. The winner builds in its own directory `<out>.build.<generation>`, resuming from the dead holder's, and
renames it to `out` when complete: `out` only ever appears whole, and a complete `out` is never replaced or
deleted (a rename onto it fails). A build that fails writes `<out>.failed` with its message, so the
processes waiting on it stop with the same line instead of each trying again.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from .config import DataError
from .progress import describe

HEARTBEAT_S = 10.0  # the holder rewrites its lock file this often
STALE_S = 120.0  # a lock file unchanged this long belongs to a dead (or hung) holder
POLL_S = 1.0  # waiters look at the filesystem this often
REPORT_S = 30.0  # waiters print the builder's progress this often


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # containers on one host (same hostname) have their own pids
    except OSError:
        return ""


OWNER = {"host": socket.gethostname(), "pidns": _pid_namespace()}


def _alive(info: dict) -> bool | None:
    """Is the holder alive? None when it runs elsewhere (only its heartbeat can tell)."""
    if (info.get("host"), info.get("pidns")) != (OWNER["host"], OWNER["pidns"]):
        return None
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def _generations(root: Path, key: str, kind: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(key)}\.{kind}\.(\d+)$")
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := pattern.match(p.name)))


class HeldLock:
    """The lock of one generation, held by this process, with a heartbeat thread publishing `status`."""

    def __init__(self, path: Path, gen: int):
        self.path, self.gen, self.token = path, gen, secrets.token_hex(8)
        self.status: dict = {}  # what the build is doing; the heartbeat publishes it
        self.lost = False  # a waiter judged this holder dead and took over (it was hung for STALE_S)
        self.beat = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def owner(self) -> str:
        return f"{OWNER['host']}:{os.getpid()}"

    def write(self) -> None:
        self.beat += 1
        info = {**OWNER, "pid": os.getpid(), "token": self.token, "gen": self.gen, "beat": self.beat,
                "status": self.status}
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.path.with_name(f"{self.path.name.rsplit('.', 1)[0]}.{self.gen + 1}").exists():
                self.lost = True
                return
            self.write()

    def start(self) -> None:
        self.write()
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _try_lock(root: Path, key: str, gen: int) -> HeldLock | None:
    path = root / f"{key}.lock.{gen}"
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return None
    held = HeldLock(path, gen)
    held.start()
    return held


def _read(path: Path) -> tuple[str, dict] | None:
    try:
        raw = path.read_text()
        return raw, json.loads(raw) if raw else {}
    except FileNotFoundError:
        return None
    except ValueError:  # just created, not yet written
        return raw, {}


def build_once(out: Path, build: Callable[[Path, Path | None, HeldLock], None], check: Callable[[Path], str | None],
               log: Callable[[str], None]) -> bool:
    """Return True if this process built `out`, False if it found it complete (at once or after waiting).

    `check(out)` is None when `out` is complete, else what is wrong; `build(work, previous, lock)` writes the
    complete contents into `work`, resuming from `previous` (a dead builder's directory) when given."""
    root, key = out.parent, out.name
    root.mkdir(parents=True, exist_ok=True)
    return run_once(root, key, lambda: check(out) is None, lambda held: _build(out, held, build, check, log), log,
                    doing=f"preparing {out}", task=f"the preparation of {out}",
                    first_gen=lambda: 1 + max(_generations(root, key, "build") + [-1]))


def run_once(root: Path, key: str, ready: Callable[[], bool], run: Callable[[HeldLock], bool],
             log: Callable[[str], None], *, doing: str, task: str, first_gen: Callable[[], int] = lambda: 0) -> bool:
    """Exactly one process at a time runs `run(lock)` (holding `<root>/<key>.lock.<gen>`) until `ready()`; the
    others poll, print the holder's progress, and take over from a dead holder. Return `run`'s result if this
    process ran it, False if it found `ready()` (at once or after waiting). A run that raises leaves
    `<root>/<key>.failed` with its message, which the processes waiting on it raise too."""
    seen: dict[int, tuple[str, float]] = {}  # generation -> (content, when this process first saw it)
    watched, reported = None, float("-inf")
    while True:
        if ready():
            return False
        gens = _generations(root, key, "lock")
        if not gens:
            if watched is not None:
                _raise_if_failed(root / f"{key}.failed", watched)
            held = _try_lock(root, key, first_gen())
            if held:
                return _run(root, key, held, run, task)
            continue
        gen = gens[-1]
        got = _read(root / f"{key}.lock.{gen}")
        if got is None:
            continue
        raw, info = got
        now = time.monotonic()
        if gen not in seen or seen[gen][0] != raw:  # (an empty file, just created, is content too)
            seen[gen] = (raw, now)
        alive = _alive(info) if info else None  # not yet written: only the clock can tell
        if alive is False or (alive is None and now - seen[gen][1] > STALE_S):
            held = _try_lock(root, key, gen + 1)
            if held:
                why = "its process is gone" if alive is False else f"its lock has not changed for {STALE_S:.0f} s"
                log(f"data: taking over {task} from {_who(info)}: {why}")
                return _run(root, key, held, run, task)
            continue
        watched = info.get("token", watched)
        if now - reported >= REPORT_S:
            log(f"data: {_who(info)} is {doing}; waiting for it (polling, no timeout): "
                f"{describe(info.get('status', {}))}")
            reported = now
        time.sleep(POLL_S)


def _who(info: dict) -> str:
    return f"{info.get('host', '?')}:{info.get('pid', '?')}"


def _raise_if_failed(marker: Path, token: str) -> None:
    try:
        failed = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    if failed.get("token") == token:
        raise DataError(failed["message"])


def _run(root: Path, key: str, held: HeldLock, run: Callable[[HeldLock], bool], task: str) -> bool:
    try:
        done = run(held)
        for g in _generations(root, key, "lock"):
            if g < held.gen:
                (root / f"{key}.lock.{g}").unlink(missing_ok=True)
        for stray in root.glob(f"{key}.lock.*.tmp"):  # of holders killed between writing and renaming
            if held.token not in stray.name:
                stray.unlink(missing_ok=True)
        (root / f"{key}.failed").unlink(missing_ok=True)
        return done
    except Exception as e:
        message = str(e) if isinstance(e, DataError) else f"{task} failed: {type(e).__name__}: {e}"
        tmp = root / f"{key}.failed.{held.token}.tmp"
        tmp.write_text(json.dumps({"token": held.token, "message": message}))
        os.replace(tmp, root / f"{key}.failed")
        raise
    finally:
        held.release()


def _build(out: Path, held: HeldLock, build, check, log) -> bool:
    root, key = out.parent, out.name
    problem = check(out)
    if problem is None:  # completed by another process between our check and our lock
        return False
    if out.exists():  # damaged: set aside, never deleted (another job may still have it open)
        aside = root / f"{key}.damaged.{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(out, aside)
        log(f"data: cache {out} is damaged ({problem}): moved to {aside}, preparing it again")
    older = [g for g in _generations(root, key, "build") if g < held.gen]
    previous = root / f"{key}.build.{older[-1]}" if older else None
    work = root / f"{key}.build.{held.gen}"
    build(work, previous, held)
    if held.lost:
        raise DataError(f"data: this process stalled for over {STALE_S:.0f} s while preparing {out} and another "
                        f"took the build over")
    try:
        os.rename(work, out)
    except OSError:
        if check(out) is not None:
            raise
        shutil.rmtree(work, ignore_errors=True)  # another (hung, then revived) builder finished first
    for g in older:
        shutil.rmtree(root / f"{key}.build.{g}", ignore_errors=True)
    return True
