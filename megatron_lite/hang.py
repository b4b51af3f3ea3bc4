"""The hang report: what each rank writes when its watchdog expires (resilience.HangWatchdog), and the one
line rank 0 prints from all of them.

Every rank writes `<run_dir>/hang/rank_N.txt` for people -- where it is, the collective it waits in, the
collectives it issued, the Python stack of every thread -- and `rank_N.json`, the same facts for rank 0 and for
scripts. The collectives come from PyTorch's flight recorder (a ring buffer the gloo and NCCL backends fill
with every collective they run: operation, process group, sequence number, sizes, the Python call site,
whether it completed), so it also sees the collectives DDP and DCP issue from C++ or from other threads.

Rank 0 waits (at most `REPORT_WAIT_S`) for every rank's file in the shared run_dir -- never a collective,
which would hang -- and names the ranks that are behind: those not inside any collective (their peers wait
for them), else those that issued the fewest collectives. A rank that wrote nothing is named too: it is dead,
or its Python is blocked in a call that holds the GIL.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPORT_WAIT_S = 30.0  # how long rank 0 waits for the other ranks' reports, and they for its summary
_TORCH_DIR = os.path.dirname(torch.__file__)
# Point-to-point transfers that threads wait for (thread id -> (what, since ns)). Gloo's flight recorder records
# collectives only, so p2p waits (ring attention's K/V blocks) mark themselves here, for the report.
_P2P_WAITS: dict[int, tuple[str, int]] = {}


@contextlib.contextmanager
def waiting_in_p2p(what: str):
    """Mark the calling thread as waiting for a point-to-point transfer while the block runs (`what`: e.g. "recv
    of a K/V block from rank 3 over CP ranks [2, 3]"): a hang report then names it, and its peer as the suspect,
    instead of "not in a collective"."""
    tid = threading.get_ident()
    _P2P_WAITS[tid] = (what, time.time_ns())
    try:
        yield
    finally:
        _P2P_WAITS.pop(tid, None)


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _recorded() -> tuple[list[dict], int]:
    """The flight recorder's entries (oldest first) and how many collectives this process issued in all."""
    entries, total = [], 0
    for dump in ("_dump_nccl_trace", "_dump_fr_trace"):  # NCCL's recorder (CUDA builds), then gloo's
        fn = getattr(torch._C._distributed_c10d, dump, None)
        try:
            found = pickle.loads(fn()).get("entries", []) if fn else []
        except Exception:  # noqa: BLE001 -- a report without collectives beats no report
            found = []
        entries += found
        total += max((e["record_id"] + 1 for e in found), default=0)
    return sorted(entries, key=lambda e: e["time_created_ns"]), total


def _group_ranks() -> dict[str, list[int]]:
    out = {}
    for pg, name in dict(getattr(dist.distributed_c10d._world, "pg_names", {})).items():
        try:
            out[name] = dist.get_process_group_ranks(pg)
        except Exception:  # noqa: BLE001
            pass
    return out


def _call_site(frames: list[dict]) -> str:
    for f in frames:  # innermost first: the first frame outside torch is the caller
        if not f["filename"].startswith(_TORCH_DIR):
            return f"{_short(f['filename'])}:{f['line']} in {f['name']}"
    return "torch internals"


def _in_flight(e: dict) -> bool:
    return not e.get("retired", True) and e.get("state") != "completed"


def describe(e: dict, ranks: dict[str, list[int]], now_ns: int, brief: bool = False) -> str:
    op = e["profiling_name"].split(":")[-1]
    name = e["process_group"][0]
    where = f"ranks {ranks[name]}" if name in ranks else f"process group {name}"
    text = f"{op} over {where} (#{e['collective_seq_id']} of that group)"
    if brief:
        return text
    tensors = ", ".join(f"[{', '.join(map(str, s))}] {d.lower()}" for s, d in zip(e["input_sizes"], e["input_dtypes"]))
    state = f"waiting for {(now_ns - e['time_created_ns']) / 1e9:.1f} s" if _in_flight(e) else "completed"
    return f"{text}, input {tensors or 'none'}, {state}, issued at {_call_site(e['frames'])}"


def _stacks() -> tuple[str, str]:
    """Every thread's Python stack (most recent call last), and where the main thread is."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main, where, out = threading.main_thread().ident, "unknown", []
    frames = sorted(sys._current_frames().items(), key=lambda item: item[0] != main)  # main thread first
    for ident, frame in frames:
        stack = traceback.extract_stack(frame)
        label = " (main)" if ident == main else ""
        out.append(f"--- thread {names.get(ident, ident)}{label} ---\n" + "".join(traceback.format_list(stack)))
        if ident == main and stack:
            where = f"{_short(stack[-1].filename)}:{stack[-1].lineno} in {stack[-1].name}"
    return "\n".join(out), where


def write_report(hang_dir: Path, ctx, launch: int, phase: str, armed_ns: int, timeout_s: float, say) -> None:
    """This rank's report; then rank 0 summarizes while the others wait for its summary (bounded). A main
    thread waiting in a point-to-point transfer (a pipeline exchange, a ring-attention block: `waiting_in_p2p`,
    which gloo's flight recorder does not see) is reported with that transfer and its peer."""
    now_ns = time.time_ns()
    entries, total = _recorded()
    ranks = _group_ranks()
    main = str(threading.main_thread().ident)
    flying = [e for e in entries if _in_flight(e)]
    waiting = [e for e in flying if str(e.get("thread_id")) == main] or flying
    stacks, where = _stacks()
    p2p = _P2P_WAITS.get(threading.main_thread().ident)
    fact = dict(rank=ctx.rank, launch=launch, phase=phase, stalled_s=round((now_ns - armed_ns) / 1e9, 1),
                waiting=describe(waiting[0], ranks, now_ns, brief=True) if waiting else p2p and p2p[0], where=where,
                issued_total=total, issued_phase=sum(e["time_created_ns"] >= armed_ns for e in entries),
                host=socket.gethostname(), pid=os.getpid())
    lines = [f"rank {ctx.rank} of {ctx.world_size} (DP rank {ctx.dp_rank}, TP rank {ctx.tp_rank}, CP rank {ctx.cp_rank}, "
             f"pipeline stage {ctx.pp_rank}) on {fact['host']}, pid {fact['pid']}",
             f"hang in {phase}: no progress for {fact['stalled_s']} s (train.hang_timeout_s={timeout_s:g})",
             f"collectives issued: {total} in all, {fact['issued_phase']} in {phase}"
             + (" (flight recorder off: TORCH_FR_BUFFER_SIZE=0)" if not entries and not total else ""),
             "waiting in: " + (describe(waiting[0], ranks, now_ns) if waiting else
                               f"{p2p[0]}, waiting for {(now_ns - p2p[1]) / 1e9:.1f} s, at {where}" if p2p else
                               f"no collective: this rank is running its own code, at {where}"),
             "", f"in flight ({len(flying)}):", *(f"  {describe(e, ranks, now_ns)}" for e in flying),
             "", "last collectives (oldest first):", *(f"  {describe(e, ranks, now_ns)}" for e in entries[-12:]),
             "", "Python stacks, every thread (most recent call last):", stacks]
    hang_dir.mkdir(parents=True, exist_ok=True)
    _write(hang_dir / f"rank_{ctx.rank}.txt", "\n".join(lines) + "\n")
    _write(hang_dir / f"rank_{ctx.rank}.json", json.dumps(fact))
    if ctx.is_first_rank:
        reports = _collect(hang_dir, ctx.world_size, launch)
        line = summarize(reports, ctx.world_size, timeout_s, hang_dir)
        say(line)
        _write(hang_dir / "summary.txt", f"{line}\nlaunch {launch}\n")
    else:
        deadline = time.monotonic() + REPORT_WAIT_S + 10
        while time.monotonic() < deadline and f"launch {launch}" not in _read(hang_dir / "summary.txt"):
            time.sleep(0.2)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # rank 0 never reads half a file


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _collect(hang_dir: Path, world: int, launch: int) -> dict[int, dict]:
    reports, deadline = {}, time.monotonic() + REPORT_WAIT_S
    while len(reports) < world and time.monotonic() < deadline:
        for r in set(range(world)) - set(reports):
            try:
                fact = json.loads(_read(hang_dir / f"rank_{r}.json") or "{}")
            except json.JSONDecodeError:
                continue
            if fact.get("launch") == launch:  # not a previous launch's report
                reports[r] = fact
        if len(reports) < world:
            time.sleep(0.2)
    return reports


def summarize(reports: dict[int, dict], world: int, timeout_s: float, hang_dir: Path) -> str:
    """One line: the ranks that are behind and where they are, then where the others wait."""
    missing = [r for r in range(world) if r not in reports]
    idle = [r for r, f in reports.items() if not f["waiting"]]
    counts = {f["issued_total"] for f in reports.values()}
    if idle or missing:
        behind = sorted(idle + missing)
    elif len(counts) > 1:  # everyone waits, but some in an earlier collective than the others
        behind = [r for r, f in reports.items() if f["issued_total"] == min(counts)]
    else:
        behind = []
    first = reports.get(0) or next(iter(reports.values()), {})
    parts = [f"error: hang in {first.get('phase', 'a step')}: no rank made progress for {timeout_s:g} s "
             f"(train.hang_timeout_s)"]
    for r in sorted(behind):
        f = reports.get(r)
        if f is None:
            parts.append(f"rank {r} is behind: it wrote no report (it died, or its Python is blocked holding the GIL)")
        elif not f["waiting"]:
            parts.append(f"rank {r} is behind: not in a collective, at {f['where']}")
        else:
            parts.append(f"rank {r} is behind: {f['issued_total']} collectives issued, waiting in {f['waiting']}")
    if not behind:
        parts.append(f"every rank waits in a collective after issuing {counts.pop() if counts else 0}: "
                     f"collectives that do not match across ranks?")
    others = [r for r in sorted(reports) if r not in behind]
    if others:
        parts.append("waiting: " + "; ".join(f"rank {r} in {reports[r]['waiting']}" for r in others[:8])
                     + (f"; and {len(others) - 8} more" if len(others) > 8 else ""))
    parts.append(f"stacks and collectives of every rank: {hang_dir}/rank_N.txt")
    return ". ".join(parts)
