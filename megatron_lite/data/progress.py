"""Progress of a long preparation: rate and ETA, as a bar on a terminal or a line every 30 s in a log.

The same numbers go into `status` (a dict the build lock's heartbeat publishes), so a process waiting for
another's build can print how far it is.
"""
from __future__ import annotations

import sys
import time
from typing import Callable


def human_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def human_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(status: dict) -> str:
    """One line from a status dict: stage, share done, rate of text, time left."""
    if "total" not in status:
        return status.get("stage", "starting")
    done, total, dt = status["done"], max(status["total"], 1), max(status["seconds"], 1e-9)
    rate = status["text"] / dt
    eta = f", ETA {human_time(dt * (total - done) / done)}" if 0 < done < total else ""
    return (f"{status['stage']}: {100 * done / total:.0f}% of {human_bytes(total)} on disk, "
            f"{human_bytes(rate)}/s of text{eta}")


class Progress:
    def __init__(self, stage: str, total: int, log: Callable[[str], None], status: dict, *, bar: bool = False,
                 every: float = 30.0):
        self.log, self.status, self.bar, self.every = log, status, bar, every
        self.t0 = self.last = time.monotonic()
        status.clear()
        status.update(stage=stage, total=total, done=0, text=0, seconds=0.0)

    def update(self, disk: int, text: int) -> None:
        s, now = self.status, time.monotonic()
        s.update(done=s["done"] + disk, text=s["text"] + text, seconds=now - self.t0)
        if self.bar and now - self.last >= 0.2:
            width, share = 30, min(s["done"] / max(s["total"], 1), 1)
            sys.stderr.write(f"\r[{'#' * int(width * share):<{width}}] {describe(s)}   ")
            sys.stderr.flush()
            self.last = now
        elif not self.bar and now - self.last >= self.every:
            self.log(f"data: {describe(s)}")
            self.last = now

    def close(self) -> None:
        if self.bar:
            sys.stderr.write("\n")
        s = self.status
        self.log(f"data: {s['stage']}: done, {human_bytes(s['text'])} of text in {human_time(s['seconds'])}")
