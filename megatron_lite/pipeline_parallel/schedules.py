"""Pipeline schedules as precomputed programs: for every rank, the list of actions it runs in one step.

Two steps, both pure functions of (P, V, m), computed once before training:

1. `compute_order`: the order of forward (F) and backward (B) passes of (micro-batch, model chunk) on one rank,
   from the papers' tables:
   - 1F1B (PipeDream-Flush; Narayanan et al. 2021, section 2.2.1, Fig. 4 top): stage s runs min(P - s - 1, m)
     warm-up forwards, then alternates one forward and one backward, then runs the remaining backwards. At
     most P - s micro-batches have their activations alive at once on stage s. At P = 1 this is the
     no-pipelining schedule, forward then backward of each micro-batch in turn: one code path at every P.
   - interleaved 1F1B (section 2.2.2, Fig. 4 bottom), Megatron-LM's `forward_backward_pipelining_with_
     interleaving`: forwards go through the chunks in groups of P micro-batches (chunk 0 for micro-batches
     0..P-1, chunk 1 for the same, ..., then chunk 0 for P..2P-1), backwards through the chunks in reverse;
     (P - s - 1) * 2 + (V - 1) * P warm-up forwards (all of them when m == P). Needs m % P == 0.
   Bubble fraction (P - 1) / m, and (P - 1) / (V m) interleaved (section 2.2.2).

2. `build_programs`: where the messages go. A micro-batch's activation travels from virtual stage k to k + 1
   after its forward there, its gradient from k to k - 1 after the backward. The programs of all ranks are
   simulated together, tick by tick: in each tick every rank runs its next pass if its input has arrived,
   then every message produced in that tick is exchanged. A rank's program is its passes, each followed by
   one `Exchange`: all the sends and receives of that tick that involve it, posted together as one batch
   (`torch.distributed.batch_isend_irecv`) and waited for together. Every send's receive sits in the same
   tick's exchange on the peer, so the two sides always agree on what is in flight between them -- no rank can
   block on a message its peer has not posted in the same exchange, which is how hand-written schedules
   deadlock when sends and receives criss-cross between two ranks (pytorch/PiPPy#1088, Megatron-LM#750 at
   P = 2 with V = 2; torch.distributed.pipelining builds one such time-step-normalized order of every rank's
   actions for the same reason, pytorch#127332). A compute order that cannot run (a pass waiting for one that
   comes after it) is found here, as a ScheduleError, before any process communicates.

Between a pair of ranks at most one message per direction is in an exchange (a rank runs one pass per tick),
so the matching of sends to receives never depends on the order inside a batch (NCCL matches them in order;
gloo by tag).
"""
from __future__ import annotations

from dataclasses import dataclass

from .layout import PipelineLayoutError

SCHEDULES = ("1f1b", "interleaved")


class ScheduleError(RuntimeError):
    """A compute order whose passes cannot all run (their inputs never arrive)."""


@dataclass(frozen=True)
class Compute:
    """Forward ("F") or backward ("B") of `microbatch` through model chunk `chunk` of this rank."""
    op: str
    microbatch: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.op}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Message:
    """The activation ("act", after a forward) or gradient ("grad", after a backward) of `microbatch` from
    virtual stage `src` to virtual stage `dst` (virtual stage k = chunk * P + rank)."""
    kind: str
    microbatch: int
    src: int
    dst: int


@dataclass(frozen=True)
class Exchange:
    """The messages one rank sends and receives in tick `tick`, posted together and waited for together."""
    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]
    tick: int


Action = Compute | Exchange


# ---- 1. the compute order of each rank ---------------------------------------------------------------------

def warmup_forwards(schedule: str, P: int, V: int, m: int, stage: int) -> int:
    """Forwards before the first backward: P - s - 1 (1F1B), Megatron's formula interleaved."""
    if schedule == "1f1b":
        return min(P - stage - 1, m)
    if m == P:  # Megatron: every forward first when there is only one group of micro-batches
        return m * V
    return min((P - stage - 1) * 2 + (V - 1) * P, m * V)


def _interleaved_pass(k: int, P: int, V: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of a rank's k-th forward or backward in the interleaved schedule (Megatron's
    `get_model_chunk_id` and micro-batch id): groups of P micro-batches per chunk."""
    group, in_group = divmod(k, P * V)
    chunk = in_group // P
    return group * P + in_group % P, (chunk if forward else V - 1 - chunk)


def compute_order(schedule: str, P: int, V: int, m: int, stage: int, forward_only: bool = False) -> list[Compute]:
    """The forwards and backwards rank `stage` runs in one step, in order (see the module docstring)."""
    check(schedule, P, V, m)
    if schedule == "1f1b":
        fwd = [(i, 0) for i in range(m)]
        bwd = fwd
    else:
        fwd = [_interleaved_pass(k, P, V, True) for k in range(m * V)]
        bwd = [_interleaved_pass(k, P, V, False) for k in range(m * V)]
    F = [Compute("F", i, v) for i, v in fwd]
    if forward_only:
        return F
    B = [Compute("B", i, v) for i, v in bwd]
    w = warmup_forwards(schedule, P, V, m, stage)
    order = F[:w]
    for k in range(len(F) - w):  # steady state: one forward, one backward
        order += [F[w + k], B[k]]
    return order + B[len(F) - w:]  # cool-down: the remaining backwards


def check(schedule: str, P: int, V: int, m: int) -> None:
    """Raise PipelineLayoutError (one line naming the values and what would work) if the schedule cannot run
    m micro-batches on P ranks with V chunks each."""
    if schedule not in SCHEDULES:
        raise PipelineLayoutError(f"parallel.pp_schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")
    if schedule == "1f1b" and V != 1:
        raise PipelineLayoutError(
            f"parallel.pp_virtual={V} needs parallel.pp_schedule=interleaved (1f1b runs one model chunk per rank): "
            f"set parallel.pp_schedule=interleaved or parallel.pp_virtual=1")
    if schedule == "interleaved" and (V < 2 or P < 2):
        raise PipelineLayoutError(
            f"parallel.pp_schedule=interleaved needs parallel.pp >= 2 and parallel.pp_virtual >= 2 model chunks per "
            f"rank (got pp={P}, pp_virtual={V}): set both, or use parallel.pp_schedule=1f1b")
    if m < P:
        raise PipelineLayoutError(
            f"{m} micro-batches per step (train.global_batch_size / (train.micro_batch_size x DP)) are fewer than "
            f"the parallel.pp={P} stages: every stage would idle most of the step; use at least {P} (raise "
            f"train.global_batch_size or lower train.micro_batch_size)")
    if schedule == "interleaved" and m % P:
        raise PipelineLayoutError(
            f"the interleaved schedule runs micro-batches in groups of parallel.pp={P}, but there are {m} per step: "
            f"use a multiple of {P} (e.g. {(m // P + 1) * P}) via train.global_batch_size or train.micro_batch_size")


# ---- 2. the messages: a simulation of all ranks, tick by tick ----------------------------------------------

def build_programs(schedule: str, P: int, V: int, m: int, forward_only: bool = False) -> list[list[Action]]:
    """Every rank's program (passes and exchanges) for one step; see the module docstring."""
    orders = [compute_order(schedule, P, V, m, s, forward_only) for s in range(P)]
    last = P * V - 1
    programs: list[list[Action]] = [[] for _ in range(P)]
    position = [0] * P
    arrived: list[set[tuple[str, int, int]]] = [set() for _ in range(P)]  # (kind, micro-batch, virtual stage)
    forwarded: list[set[tuple[int, int]]] = [set() for _ in range(P)]
    tick = 0
    while any(position[s] < len(orders[s]) for s in range(P)):
        sent, ran = [], False
        for s in range(P):
            if position[s] == len(orders[s]):
                continue
            a = orders[s][position[s]]
            k = a.chunk * P + s
            if a.op == "F":
                ready = k == 0 or ("act", a.microbatch, k) in arrived[s]
            else:  # its own forward done, and the gradient from the next virtual stage arrived (but on the last)
                ready = (a.microbatch, a.chunk) in forwarded[s] and (
                    k == last or ("grad", a.microbatch, k) in arrived[s])
            if not ready:
                continue
            programs[s].append(a)
            position[s], ran = position[s] + 1, True
            if a.op == "F":
                forwarded[s].add((a.microbatch, a.chunk))
                if k < last:
                    sent.append(Message("act", a.microbatch, k, k + 1))
            elif k > 0:
                sent.append(Message("grad", a.microbatch, k, k - 1))
        if not ran:  # no pass could run, so no message will ever come
            waiting = [str(orders[s][position[s]]) for s in range(P) if position[s] < len(orders[s])]
            raise ScheduleError(f"{schedule} at P={P}, V={V}, m={m} cannot run: the next passes {waiting} wait "
                                f"for inputs that no rank will produce")
        for s in range(P):
            sends = tuple(msg for msg in sent if msg.src % P == s)
            recvs = tuple(msg for msg in sent if msg.dst % P == s)
            if sends or recvs:
                programs[s].append(Exchange(sends, recvs, tick))
        for msg in sent:
            arrived[msg.dst % P].add((msg.kind, msg.microbatch, msg.dst))
        tick += 1
    return programs
