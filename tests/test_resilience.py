"""Runs that end well on a cluster, through the CLI as a user runs them (megatron_lite/resilience.py, hang.py).

- SIGTERM to the launcher's agent (`python -m megatron_lite.launch`, torchrun in-process) of a DP2 x TP2 + SP
  run: every rank stops at one step, saves it, and the job exits 0 well within the grace period; rerunning the
  same command continues bitwise as the uninterrupted run (conftest.ref) -- and, as that rerun finds rank 1's disk "full" (RLIMIT_FSIZE) at its first save with
  checkpoint.on_error=warn, it trains on, and saves again once the limit is lifted.
- train.max_minutes: a run stops cleanly with a checkpoint; rerun into a read-only checkpoints directory
  (chattr +i: as root, chmod stops nothing) it stops with one line, keeping the previous checkpoint; rerun
  once writable, it finishes.
- A rank stalled on purpose (MEGATRON_LITE_FAULT): the job exits within hang_timeout_s + a margin, rank 0's
  one line names the stalled rank, and every rank wrote its stacks and collectives.
- `python train.py train.steps=2`: no torchrun, no overrides.
- The exit-signal thread alone: a copy of the first signal is one request, a second signal exits at once,
  and so does the end of the grace period; the hang summary names who is behind.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import REF_ARGS, REF_STEPS, ROOT, SMALL, TORCHRUN, ckpt_names, end_job, env, loss_steps, losses, worker_pids

GRACE_S = 25  # train.exit_grace_s's default
LAUNCH = [sys.executable, "-m", "megatron_lite.launch"]  # torchrun, exiting 0 after a clean stop on a signal
KEEP = ["checkpoint.on_error=warn", "checkpoint.keep=2"]  # part of the preempted job's command, so of its rerun


def log_text(run_dir) -> str:
    return (Path(run_dir) / "train.log").read_text()


def wait_for(predicate, agent: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert agent.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def start_job(tmp: Path, run: Path, *args: str, extra_env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """The DP2 x TP2 + SP reference command, each worker run by tests/as_worker.py (which records its exit)."""
    rcs = tmp / "workers"
    rcs.mkdir()
    cmd = [*LAUNCH, "--standalone", "--nproc_per_node=4", str(ROOT / "tests" / "as_worker.py"), str(rcs),
           str(ROOT / "train.py"), *REF_ARGS, *KEEP, f"run_dir={run}", *args]
    out = open(tmp / "torchrun.out", "w")
    agent = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return agent, rcs


def worker_exits(rcs: Path) -> dict[int, int]:
    return {int(p.stem.split("_")[1]): int(p.read_text()) for p in rcs.glob("rank_*.rc")}


# ---------------------------------------------------------------------------------------------------------
# 1. Preemption: SIGTERM to the launcher's torchrun agent, then a rerun (which also meets a failed save).
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """The reference job, SIGTERMed at the agent once step 3 is logged."""
    tmp = tmp_path_factory.mktemp("preempted")
    run = tmp / "run"
    agent, rcs = start_job(tmp, run)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and 3 in loss_steps(run), agent, "step 3")
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=GRACE_S + 60)
        elapsed = time.monotonic() - t0
    finally:
        end_job(agent)
    return dict(run=run, rc=rc, elapsed=elapsed, exits=worker_exits(rcs), out=(tmp / "torchrun.out").read_text())


def test_sigterm_to_agent_stops_every_rank_at_one_step_with_a_checkpoint(preempted):
    from megatron_lite.checkpoint import read_meta, verify
    run, out = preempted["run"], preempted["out"]
    # torchrun forwards SIGTERM to every worker; each one saves and exits 0, well within the grace period
    assert preempted["exits"] == {0: 0, 1: 0, 2: 0, 3: 0}, out[-3000:]
    assert preempted["elapsed"] < GRACE_S, f"{preempted['elapsed']:.1f} s from SIGTERM to the agent's exit"
    assert "forcefully exiting via SIGKILL" not in out  # no worker outlived torchrun's shutdown timeout
    # torchrun's agent re-raises the signal it got (torch 2.13, launcher/api.py), whatever its workers did;
    # megatron_lite.launch, torchrun run in-process, turns that into 0 when the workers reported a clean stop
    assert preempted["rc"] == 0, out[-3000:]
    assert re.search(r"megatron_lite.launch: the workers stopped cleanly on signal SIGTERM \(stopped \d+ SIGTERM", out)
    log = log_text(run)
    m = re.search(r"stopped at step (\d+)/8 \(SIGTERM received\); newest checkpoint (\S+); to continue, rerun with "
                  rf"run_dir={re.escape(str(run))} \(checkpoint\.resume=auto\)", log)
    assert m, log
    stop = int(m[1])
    assert 3 <= stop <= 5, log  # the step in flight when the signal came, or the next at worst
    assert "received SIGTERM: stopping at the end of this step" in log
    assert loss_steps(run) == list(range(1, stop + 1))  # no rank went past the stop
    ckpt = run / "checkpoints" / f"step_{stop:07d}"
    assert m[2] == str(ckpt) and read_meta(ckpt)["step"] == stop
    verify(ckpt)  # complete: every rank wrote its shards of that one step
    assert (run / "status").read_text() == f"stopped {stop} SIGTERM received\n"
    print(f"\nSIGTERM to the agent after step 3: stopped at step {stop} in {preempted['elapsed']:.1f} s; workers "
          f"exited {preempted['exits']}")


@pytest.fixture(scope="module")
def rerun(preempted, tmp_path_factory):
    """The same command again, while rank 1 cannot write files past 64 KiB: its first save fails (warned,
    training goes on); once the warning is logged the test lifts the limit, and the next save succeeds."""
    tmp = tmp_path_factory.mktemp("rerun")
    run = preempted["run"]
    (run / "train.log").write_text(log_text(run) + "=== preempted ===\n")
    agent, rcs = start_job(tmp, run, extra_env={"FSIZE_RANK": "1", "FSIZE_BYTES": str(64 * 1024)})
    try:
        wait_for(lambda: "warning: checkpoint of step" in log_text(run).split("=== preempted ===\n")[1], agent,
                 "failed-save warning")
        pid = int((rcs / "rank_1.pid").read_text())
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        rc = agent.wait(timeout=240)
    finally:
        end_job(agent)
    out = (tmp / "torchrun.out").read_text()
    assert rc == 0, out[-4000:]
    return dict(run=run, stop=int(re.search(r"stopped at step (\d+)", log_text(run))[1]),
                log=log_text(run).split("=== preempted ===\n")[1])


def test_rerun_after_preemption_matches_the_uninterrupted_run_bitwise(ref, rerun):
    run, stop = rerun["run"], rerun["stop"]
    assert f"resumed from {run / 'checkpoints' / f'step_{stop:07d}'} at step {stop}" in rerun["log"]
    assert loss_steps(run) == list(range(1, REF_STEPS + 1))
    assert losses(run) == losses(ref)  # the same floats: stopping and the failed save changed nothing
    assert (run / "status").read_text() == f"finished {REF_STEPS}\n"


def test_failed_save_warns_keeps_the_previous_checkpoint_and_the_next_save_succeeds(rerun):
    from megatron_lite.checkpoint import verify
    run, stop, log = rerun["run"], rerun["stop"], rerun["log"]
    failed = stop + 2 - stop % 2  # the first save of the rerun: the next multiple of checkpoint.every=2
    tmp = run / "checkpoints" / f"step_{failed:07d}.tmp"
    warning = re.search(r"^warning: checkpoint of step (\d+) not saved in (\S+): rank 1: \[Errno 27\] File too large: "
                        r"'(\S+)'; "
                        r"the previous checkpoint (\S+) is intact; removed the partial (\S+); training goes on "
                        r"\(checkpoint\.on_error=warn\)$", log, re.M)
    assert warning, log
    print("\n" + warning[0])
    assert int(warning[1]) == failed and warning[2] == str(tmp) and warning[3] == str(tmp / "__1_0.distcp")
    assert warning[4] == str(run / "checkpoints" / f"step_{stop:07d}") and warning[5] == tmp.name
    saved = [int(s) for s in re.findall(r"saved checkpoint \S+/step_(\d+)", log)]
    assert failed not in saved and saved[0] == failed + 2  # the next save, once rank 1 could write again
    # checkpoint.keep=2 counted complete checkpoints only; no partial .tmp is left; all intact
    every_save = [int(s) for s in re.findall(r"saved checkpoint \S+/step_(\d+)", log_text(run))]
    assert ckpt_names(run) == [f"step_{s:07d}" for s in sorted(set(every_save))[-2:]]
    for name in ckpt_names(run):
        verify(run / "checkpoints" / name)


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_every_rank_at_the_same_step(tmp_path):
    """Only rank 3 gets the signal (a worker signalled directly): the per-step agreement stops the other three
    at the same step; every worker exits 0, so torchrun does too."""
    from megatron_lite.checkpoint import verify
    run = tmp_path / "run"
    agent, rcs = start_job(tmp_path, run)
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and 3 in loss_steps(run), agent, "step 3")
        os.kill(int((rcs / "rank_3.pid").read_text()), signal.SIGTERM)
        rc = agent.wait(timeout=GRACE_S + 60)
    finally:
        end_job(agent)
    assert rc == 0 and worker_exits(rcs) == {0: 0, 1: 0, 2: 0, 3: 0}, (tmp_path / "torchrun.out").read_text()[-3000:]
    stop = int(re.search(r"stopped at step (\d+)/8 \(a stop signal received by another rank\)", log_text(run))[1])
    assert "received SIGTERM" not in log_text(run)  # rank 0 never got it
    assert loss_steps(run) == list(range(1, stop + 1))
    verify(run / "checkpoints" / f"step_{stop:07d}")


@pytest.mark.slow
def test_failed_async_save_stops_every_rank_at_the_next_step(tmp_path):
    """checkpoint.async_save=true, on_error=stop, and rank 1 cannot write its shard: the background save fails,
    every rank learns it at a following step boundary, and the run stops there with one line, exit 1."""
    run = tmp_path / "run"
    agent, rcs = start_job(tmp_path, run, "checkpoint.async_save=true", "checkpoint.on_error=stop",
                           extra_env={"FSIZE_RANK": "1", "FSIZE_BYTES": str(64 * 1024)})
    try:
        rc = agent.wait(timeout=240)
    finally:
        end_job(agent)
    out = (tmp_path / "torchrun.out").read_text()
    assert rc != 0 and worker_exits(rcs)[0] == 1, out[-3000:]  # the others: 1, or torchrun's SIGTERM once 0 exits
    errors = re.findall(r"^error: checkpoint of step 2 not saved in \S+: rank 1: \[Errno 27\] File too large: .*$",
                        out, re.M)
    assert len(errors) == 1, out[-4000:]
    print("\n" + errors[0])
    assert "does not exist (none saved yet); removed the partial step_0000002.tmp" in errors[0]
    # learned from a later step's stop votes (read with that step's loss, before its update, so the run ends with
    # step 2's update as the last one), not left behind
    assert 2 <= max(loss_steps(run)) < 8
    assert not (run / "checkpoints").exists() or ckpt_names(run) == []


# ---------------------------------------------------------------------------------------------------------
# 2. train.max_minutes, and a save into a read-only directory with checkpoint.on_error=stop (one process).
# ---------------------------------------------------------------------------------------------------------

def python_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=240)


def chattr(path: Path, flag: str) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def time_limited(tmp_path_factory):
    """`train.max_minutes` tiny, 2 steps: launch 1 stops after step 1 (at least one step per launch); launch 2
    finds checkpoints/ immutable and stops on the failed save; launch 3, the same command, finishes."""
    tmp = tmp_path_factory.mktemp("time_limit")
    probe = tmp / "probe"
    probe.mkdir()
    try:
        chattr(probe, "+i")
        chattr(probe, "-i")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"chattr +i does not work here ({e}): no way to make a directory read-only for root")
    run = tmp / "run"
    cmd = [*SMALL, "parallel.tp=1", "train.steps=2", "train.max_minutes=0.0001", f"run_dir={run}"]
    first = python_train(tmp, *cmd)
    chattr(run / "checkpoints", "+i")
    try:
        second = python_train(tmp, *cmd)
        listing = ckpt_names(run)
    finally:
        chattr(run / "checkpoints", "-i")
    third = python_train(tmp, *cmd)
    return dict(run=run, runs=(first, second, third), listing=listing)


def test_time_limit_stops_cleanly_with_a_checkpoint_and_a_rerun_finishes(time_limited):
    run, (first, _, third) = time_limited["run"], time_limited["runs"]
    assert first.returncode == 0, first.stderr[-3000:]
    line = next(ln for ln in first.stdout.splitlines() if ln.startswith("stopped at step"))
    print("\n" + line)
    assert re.match(rf"stopped at step 1/2 \(train\.max_minutes=0\.0001: \d+ s gone, and the next step and save "
                    rf"may take [\d.]+ s\); newest checkpoint {re.escape(str(run))}/checkpoints/step_0000001; to "
                    rf"continue, rerun with run_dir=", line), line
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout and "step      2/2" in third.stdout
    assert loss_steps(run) == [1, 2] and (run / "status").read_text() == "finished 2\n"
    assert ckpt_names(run) == ["step_0000001", "step_0000002"]


def test_save_into_read_only_directory_stops_with_one_line_and_keeps_the_previous_checkpoint(time_limited):
    from megatron_lite.checkpoint import verify
    run, second = time_limited["run"], time_limited["runs"][1]
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and second.stderr.strip() == errors[0], second.stderr[-3000:]  # no traceback
    print("\n" + errors[0])
    tmp = run / "checkpoints" / "step_0000002.tmp"
    assert errors[0].startswith(f"error: checkpoint of step 2 not saved in {tmp}: rank 0: [Errno 1] Operation not "
                                f"permitted: '{tmp}'; the previous checkpoint {run / 'checkpoints' / 'step_0000001'} is "
                                f"intact; the run stops (checkpoint.on_error=stop)"), errors[0]
    assert f"rerun with run_dir={run}" in errors[0]
    assert time_limited["listing"] == ["step_0000001"]  # nothing new, no .tmp, the old one there
    verify(run / "checkpoints" / "step_0000001")


def test_python_train_without_torchrun_or_overrides(tmp_path):
    """A newcomer's first command: one process, the default model and corpus, parallel.tp=1."""
    proc = python_train(tmp_path, "train.steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert "layout: DP=1 x TP=1 on 1 ranks" in proc.stdout and "sample:\n" in proc.stdout
    assert loss_steps(run) == [1, 2] and ckpt_names(run) == ["step_0000002"]
    assert (run / "status").read_text() == "finished 2\n"


# ---------------------------------------------------------------------------------------------------------
# 3. A hang: rank 1 stalls at step 2.
# ---------------------------------------------------------------------------------------------------------

HANG_S = 6


@pytest.fixture(scope="module")
def hung(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hang")
    run = tmp / "run"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=4", str(ROOT / "train.py"), *SMALL, "parallel.tp=2",
           "train.steps=20", f"train.hang_timeout_s={HANG_S}", f"run_dir={run}"]
    out = open(tmp / "torchrun.out", "w")
    agent = subprocess.Popen(cmd, cwd=ROOT, env={**env(), "MEGATRON_LITE_FAULT": "stall:rank=1:step=2"},
                             stdout=out, stderr=subprocess.STDOUT)
    out.close()
    try:
        wait_for(lambda: (run / "metrics.jsonl").exists() and 1 in loss_steps(run), agent, "step 1")
        t0 = time.monotonic()  # step 2 starts, and rank 1 stalls
        rc = agent.wait(timeout=240)
        elapsed = time.monotonic() - t0
    finally:
        end_job(agent)
    return dict(run=run, rc=rc, elapsed=elapsed, out=(tmp / "torchrun.out").read_text())


def test_stalled_rank_is_named_and_the_job_exits_early(hung):
    run, out = hung["run"], hung["out"]
    assert hung["rc"] != 0 and "exitcode  : 3" in out, out[-3000:]
    assert HANG_S - 1 < hung["elapsed"] < HANG_S + 30, f"exited {hung['elapsed']:.1f} s into the stalled step"
    summary = re.findall(r"^error: hang in step 2: .*$", out, re.M)
    assert len(summary) == 1, out[-4000:]  # one line, from rank 0
    print("\n" + summary[0])
    assert "rank 1 is behind: not in a collective, at megatron_lite/resilience.py" in summary[0]
    assert "in _stall" in summary[0] and re.search(r"rank 0 in \w+ over ranks \[0, 1\]", summary[0])
    assert summary[0] in log_text(run)
    for rank in range(4):
        text = (run / "hang" / f"rank_{rank}.txt").read_text()
        fact = json.loads((run / "hang" / f"rank_{rank}.json").read_text())
        assert fact["stalled_s"] >= HANG_S and fact["phase"] == "step 2", fact
        assert f"rank {rank} of 4" in text and "Python stacks, every thread" in text and "--- thread MainThread" in text
        assert re.search(r"collectives issued: \d+ in all, \d+ in step 2", text), text[:2000]
        if rank == 1:
            assert "waiting in: no collective" in text and fact["issued_phase"] == 0
        else:  # rank 0 waits for rank 1 in their TP group; 2 and 3 wait where DDP and TP chain them to it
            m = re.search(r"waiting in: (\w+) over ranks \[([\d, ]+)\] .* waiting for [\d.]+ s, issued at", text)
            assert m and str(rank) in m[2].split(", ") and (rank != 0 or m[2] == "0, 1"), text[:2000]


# ---------------------------------------------------------------------------------------------------------
# 4. The pieces alone: the exit-signal thread, the hang summary.
# ---------------------------------------------------------------------------------------------------------

SIGNALS = """
import os, signal, sys, time
from megatron_lite.resilience import SAME_REQUEST_S, ExitSignals
ExitSignals(["SIGUSR1"], float(sys.argv[1]), lambda m: print(m, flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGUSR1)  # a copy (as torchrun forwards what Slurm also sent the workers): ignored
time.sleep(SAME_REQUEST_S + 0.5)  # the main thread sits in C code: the thread acts all the same
print("still running", flush=True)
os.kill(os.getpid(), signal.SIGUSR1)  # a second request
time.sleep(30)
"""


def test_second_signal_exits_at_once_and_so_does_the_end_of_the_grace_period():
    jobs = {grace: subprocess.Popen([sys.executable, "-c", SIGNALS, str(grace)], cwd=ROOT, env=env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for grace in (60, 1)}
    (second, _), (graced, _) = (jobs[g].communicate(timeout=60) for g in (60, 1))
    assert jobs[60].returncode == 128 + signal.SIGUSR1, second
    assert second.splitlines() == ["received SIGUSR1: stopping at the end of this step with a checkpoint, within "
                                   "train.exit_grace_s=60 s; send it again to exit at once", "still running",
                                   "received SIGUSR1 again: exiting now, without a checkpoint of this step"], second
    assert jobs[1].returncode == 128 + signal.SIGUSR1, graced
    assert graced.splitlines()[-1] == ("error: not stopped within train.exit_grace_s=1 s of SIGUSR1: exiting now, "
                                       "without a checkpoint of this step; a rerun resumes from the newest checkpoint")


def test_hang_summary_names_who_is_behind(tmp_path):
    from megatron_lite.hang import summarize

    def rep(phase="step 7", waiting=None, issued=10, where="trainer.py:90 in _train"):
        return dict(phase=phase, waiting=waiting, issued_total=issued, where=where)
    ar = "all_reduce over ranks [0, 1] (#5 of that group)"
    line = summarize({0: rep(waiting=ar, issued=11), 1: rep()}, 2, 60, tmp_path)
    assert line.startswith("error: hang in step 7: no rank made progress for 60 s")
    assert "rank 1 is behind: not in a collective, at trainer.py:90 in _train" in line and f"rank 0 in {ar}" in line
    line = summarize({0: rep(waiting=ar, issued=11), 1: rep(waiting=ar, issued=9)}, 2, 60, tmp_path)
    assert "rank 1 is behind: 9 collectives issued, waiting in" in line and "rank 0 is behind" not in line
    line = summarize({0: rep(waiting=ar), 1: rep(waiting=ar)}, 3, 60, tmp_path)
    assert "rank 2 is behind: it wrote no report" in line and "waiting: rank 0 in all_reduce" in line
    line = summarize({0: rep(waiting=ar), 1: rep(waiting=ar)}, 2, 60, tmp_path)
    assert "every rank waits in a collective after issuing 10: collectives that do not match across ranks?" in line
    assert "\n" not in line
