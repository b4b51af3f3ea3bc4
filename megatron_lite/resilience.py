"""Ending well on a cluster: stop signals, the wall-clock limit, and hangs that name their rank.

Three mechanisms, each a small class, and `RunGuard`, which the training loop calls in a few lines:

- `ExitSignals` -- Megatron-LM's `--exit-signal-handler`: the first SIGTERM (or any of `train.exit_signals`)
  asks for a stop at the next step boundary; every rank then stops at the *same* step, saves a checkpoint and
  exits 0. A second signal exits at once; so does running past `train.exit_grace_s`. The signals are read by
  a thread through `signal.set_wakeup_fd`, so both work even while the main thread is blocked in a collective
  (a Python-level handler would only run once that collective returns). Both launch styles work: torchrun's
  agent forwards SIGTERM (and, with `--signals-to-handle`, SIGUSR1) to its workers, and a signal sent to the
  workers directly (Slurm signals every process of a job step) is the same request: copies that arrive within
  `SAME_REQUEST_S` of the first count once.
- `TimeLimit` -- Megatron-LM's `--exit-duration-in-mins`, checked *before* the next step: stop when the time
  since training started plus the slowest recent iteration plus the last save would cross `train.max_minutes`.
- `HangWatchdog` -- NVIDIA/Megatron-LM#735 ("hangs with no hint of which rank or collective"): a daemon thread
  per rank, armed at every step (a few attribute writes, no system call). When a step, an evaluation or a save
  makes no progress for `train.hang_timeout_s`, every rank writes `<run_dir>/hang/rank_N.txt` (its Python
  stacks, all threads, and the collectives it issued: op, group ranks, sizes, counts, the one it waits in),
  rank 0 prints one line naming the ranks that are behind and where, and the job exits with status 3, well
  before the collective timeout. The collectives come from PyTorch's flight recorder (`TORCH_FR_BUFFER_SIZE`,
  recorded by the gloo and NCCL backends themselves, so DDP's and DCP's collectives are in it too); the files
  meet in the shared run_dir, never through a collective, which would hang.

The ranks agree on stopping with one all-reduce of four integers per step (`Agreement`), which also carries
the outcome of checkpoint saves (see checkpoint.py): Megatron-LM's `DistributedSignalHandler` all-gathers a
flag per step in the same way. Its cost, and the watchdog's, are measured in `make bench` (section 8).

`MEGATRON_LITE_FAULT=stall:rank=R:step=S[:seconds=T]` (tests only, read in `_fault`) makes rank R sleep at the
start of step S, to produce a hang on purpose.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from .hang import write_report
from .launch import STATUS_FILE_ENV

SAME_REQUEST_S = 3.0  # signals this close to the first are copies of it (Slurm signals launcher and workers)
FLIGHT_RECORDER_ENTRIES = 2000  # collectives kept per process for the hang report
FAULT_ENV = "MEGATRON_LITE_FAULT"


class Agreement:
    """Sums a few integers over all ranks: one small all-reduce on the default group (NCCL on GPUs, whose
    latency grows slowly with the world size; gloo on CPU), from the main thread, at a point where the loop
    has already synchronized with the device (the loss is read every step)."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device = world_size, device

    def sum(self, values: list[int]) -> list[int]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


class ExitSignals:
    """A stop request from `names` (e.g. SIGTERM, SIGUSR1); a second one, or `grace_s` passing, exits now."""

    def __init__(self, names: list[str], grace_s: float, say):
        self.grace_s, self.say = grace_s, say
        self.received = 0  # the first signal's number, once one came
        self._first_at = self._deadline = None
        self._closing = False
        self._signals = {signal.Signals[n] for n in names}
        self._read, write = socket.socketpair()
        self._write = write
        for s in (self._read, write):
            s.setblocking(False)
        # The Python-level handler does nothing: the C-level one writes the signal's number to the wakeup fd,
        # where the thread reads it even while the main thread is stuck in C code.
        self._previous = {s: signal.signal(s, lambda *_: None) for s in self._signals}
        self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="exit-signals", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._closing:
            timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            ready, _, _ = select.select([self._read], [], [], timeout)
            if not ready:  # the grace period is over
                name = signal.Signals(self.received).name
                self.say(f"error: not stopped within train.exit_grace_s={self.grace_s:g} s of {name}: exiting now, "
                         f"without a checkpoint of this step; a rerun resumes from the newest checkpoint")
                os._exit(128 + self.received)
            try:
                data = self._read.recv(64)
            except BlockingIOError:
                continue
            for signum in data:
                if signum in self._signals and not self._closing:
                    self._on_signal(signal.Signals(signum))

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if not self.received:
            self.received, self._first_at, self._deadline = int(sig), now, now + self.grace_s
            self.say(f"received {sig.name}: stopping at the end of this step with a checkpoint, within "
                     f"train.exit_grace_s={self.grace_s:g} s; send it again to exit at once")
        elif now - self._first_at > SAME_REQUEST_S:
            self.say(f"received {sig.name} again: exiting now, without a checkpoint of this step")
            os._exit(128 + int(sig))

    def close(self) -> None:
        self._closing = True
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._write.send(b"\0")  # wakes the thread, which sees _closing and returns
        self._thread.join(timeout=5)
        self._read.close()
        self._write.close()


class TimeLimit:
    """train.max_minutes: stop before the next iteration would cross it (at least one step per launch)."""

    def __init__(self, max_minutes: float | None, start: float):
        self.limit_s = None if max_minutes is None else 60.0 * max_minutes
        self.start = start
        self.iterations = deque(maxlen=10)  # seconds of the last iterations (step + evaluation + save)
        self.save_s = 0.0  # the last save's duration: the stop itself saves

    def would_cross(self, now: float) -> bool:
        if self.limit_s is None or not self.iterations:
            return False
        return now - self.start + max(self.iterations) + self.save_s > self.limit_s


class HangWatchdog:
    """A daemon thread that reports and exits when the armed phase makes no progress for `timeout_s`.

    `arm()` only writes the deadline; the thread sleeps until the deadline it last saw and, finding it moved,
    sleeps again: about one wake-up per timeout, nothing per step."""

    def __init__(self, timeout_s: float, report):
        self.timeout_s, self._report = timeout_s, report
        self.phase, self.armed_ns = "", 0
        self._deadline: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
        self._thread.start()

    def arm(self, phase: str) -> None:
        self.phase, self.armed_ns = phase, time.time_ns()
        self._deadline = time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        self._deadline = None

    def _watch(self) -> None:
        while not self._stop.is_set():
            deadline = self._deadline
            wait = self.timeout_s if deadline is None else deadline - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
            elif deadline == self._deadline:  # expired, and the loop did not re-arm meanwhile
                self._report(self.phase, self.armed_ns)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def collective_trace_on() -> None:
    """Turn on PyTorch's flight recorder for the process groups created after this (call before init)."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FLIGHT_RECORDER_ENTRIES))


def _fault(rank: int) -> tuple[int, float] | None:
    """Tests only: (step, seconds) of the stall MEGATRON_LITE_FAULT asks of this rank, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, *fields = spec.split(":")
    opts = dict(f.split("=", 1) for f in fields)
    if kind != "stall" or not {"rank", "step"} <= opts.keys():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected stall:rank=R:step=S[:seconds=T]")
    if int(opts["rank"]) != rank:
        return None
    return int(opts["step"]), float(opts.get("seconds", 3600))


def _stall(seconds: float) -> None:
    time.sleep(seconds)  # MEGATRON_LITE_FAULT: a rank that stops making progress (its name shows in hang reports)


class RunGuard:
    """What the training loop calls: `arm()` per phase, `check()` once per step, `close()` at the end.

    Create it before the process group (it turns the flight recorder on), then `start()` it once the
    ParallelContext and the logger exist."""

    def __init__(self, cfg):
        self.cfg, self.t = cfg, cfg.train
        self.started = time.monotonic()
        self.log = self.signals = self.watchdog = self.p2p = None
        if self.t.hang_timeout_s:
            collective_trace_on()

    def start(self, ctx, log) -> Agreement:
        self.ctx, self.log = ctx, log
        self.agreement = Agreement(ctx.world_size, ctx.device)
        self.time_limit = TimeLimit(self.t.max_minutes, self.started)
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.signals = ExitSignals(self.t.exit_signals, self.t.exit_grace_s, log.info)
        if self.t.hang_timeout_s:
            # a token of this launch (rank 0's clock), so that rank 0 never reads a previous launch's report
            self.launch = self.agreement.sum([time.time_ns() if ctx.is_first_rank else 0])[0]
            self.watchdog = HangWatchdog(self.t.hang_timeout_s, self._hang)
        self.stall = _fault(ctx.rank)
        self._phase, self._phase_start = "", time.monotonic()
        self._iteration_start = None
        return self.agreement

    def watch_p2p(self, p2p) -> None:
        """The pipeline's point-to-point communication (pipeline_parallel.p2p.P2P), whose waits the flight
        recorder does not see: a hang report names the exchange and the peer a rank waits for."""
        self.p2p = p2p

    def arm(self, phase: str) -> None:
        """Start a phase ("step N", "evaluation", "checkpoint save"): the hang timeout counts from here."""
        now = time.monotonic()
        if phase.startswith("step"):
            self._iteration_start = now
        self._phase, self._phase_start = phase, now
        if self.watchdog is not None:
            self.watchdog.arm(phase)
        if self.stall and phase == f"step {self.stall[0]}":
            _stall(self.stall[1])

    def disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.disarm()

    def check(self, ckpt) -> str | None:
        """At a step boundary, on every rank: the reason to stop now (the same on every rank), or None.

        One all-reduce of [stop signal, time limit, failed saves, saves still being written]; the last two
        settle the checkpoint in flight (checkpoint.Checkpointer.settle)."""
        now = time.monotonic()
        if self._iteration_start is not None:
            self.time_limit.iterations.append(now - self._iteration_start)
            if self._phase.startswith("checkpoint save"):
                self.time_limit.save_s = now - self._phase_start
        failed, running = ckpt.outcome()
        signum = self.signals.received if self.signals else 0
        signals, late, failed, running = self.agreement.sum(
            [signum, int(self.time_limit.would_cross(now)), failed, running])
        ckpt.settle(failed, running)
        if signals:
            return f"{signal.Signals(signum).name} received" if signum else "a stop signal received by another rank"
        if late:
            tl = self.time_limit
            return (f"train.max_minutes={self.t.max_minutes:g}: {now - tl.start:.0f} s gone, and the next step and "
                    f"save may take {max(tl.iterations) + tl.save_s:.1f} s")
        return None

    def stopped(self, step: int, reason: str, newest) -> None:
        where = f"newest checkpoint {newest}" if newest else "no checkpoint yet"
        self.log.info(f"stopped at step {step}/{self.t.steps} ({reason}); {where}; to continue, rerun with "
                      f"run_dir={self.cfg.run_dir} (checkpoint.resume=auto)")
        self.write_status(f"stopped {step} {reason}")

    def write_status(self, text: str) -> None:
        """<run_dir>/status: "running", "finished N" or "stopped N <reason>" -- what a job script reads. Under
        `python -m megatron_lite.launch`, local rank 0 of each node also tells its launcher (launch.py)."""
        if self.ctx.is_first_rank:
            Path(self.cfg.run_dir, "status").write_text(text + "\n")
        launcher = os.environ.get(STATUS_FILE_ENV)
        if launcher and os.environ.get("LOCAL_RANK", "0") == "0":
            Path(launcher).write_text(text + "\n")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
        if self.signals is not None:
            self.signals.close()

    def _hang(self, phase: str, armed_ns: int) -> None:
        """The watchdog expired: write this rank's report, let rank 0 summarize, exit 3 (whatever happens)."""
        try:
            write_report(Path(self.cfg.run_dir) / "hang", self.ctx, self.launch, phase, armed_ns,
                         self.t.hang_timeout_s, self.log.info, p2p=self.p2p and self.p2p.waiting())
        except Exception as e:  # noqa: BLE001 -- a hang must end the job even without its report
            print(f"rank {self.ctx.rank}: hang in {phase}, and its report failed: {e!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            os._exit(3)
