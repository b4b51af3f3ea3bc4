"""The pipeline schedules and layer splits as tables, without processes (megatron_lite/pipeline_parallel).

- 1F1B: every stage's order is the paper's (P - s - 1 warm-up forwards, one forward one backward, the remaining
  backwards), written out here from the description, and at most P - s micro-batches are in flight on stage s.
- Interleaved: Megatron's table for P=2, V=2, m=4 (written out by hand from its chunk and micro-batch formulas)
  and, for larger cases, the warm-up count of Megatron's formula, each (micro-batch, chunk) forward and backward
  once, backward after forward.
- The programs: every send has its receive in the same tick on the peer (so sends and receives never
  criss-cross), a message between two ranks goes one way per tick, and an order that cannot run is refused.
- Layer splits (even, uneven, interleaved) and the one-line errors for layouts that cannot run.
"""
from __future__ import annotations

import pytest

from megatron_lite.pipeline_parallel import (Compute, Exchange, PipelineLayoutError, ScheduleError, build_programs,
                                             compute_order, in_flight_max, layer_counts, stage_chunks,
                                             warmup_forwards)
from megatron_lite.pipeline_parallel.schedules import check


def order_str(order) -> list[str]:
    return [str(a) for a in order]


def one_f_one_b_table(P: int, m: int, s: int) -> list[str]:
    """The paper's 1F1B (PipeDream-Flush, Narayanan et al. 2021 Fig. 4 top), from its description."""
    warmup = min(P - s - 1, m)
    out = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):
        out += [f"F{warmup + i}", f"B{i}"]
    return out + [f"B{i}" for i in range(m - warmup, m)]


@pytest.mark.parametrize("P,m", [(1, 3), (2, 2), (2, 5), (4, 4), (4, 8), (8, 8)])
def test_1f1b_is_the_papers_table_and_holds_at_most_p_minus_s_microbatches(P, m):
    for s in range(P):
        order = compute_order("1f1b", P, 1, m, s)
        assert order_str(order) == one_f_one_b_table(P, m, s)
        assert warmup_forwards("1f1b", P, 1, m, s) == P - s - 1
        assert in_flight_max([(a,) for a in order]) == min(P - s, m)
    if P == 1:  # the no-pipelining schedule: forward then backward of each micro-batch
        assert order_str(compute_order("1f1b", 1, 1, m, 0)) == [x for i in range(m) for x in (f"F{i}", f"B{i}")]


def test_interleaved_is_megatrons_table_at_p2_v2():
    # Megatron-LM forward_backward_pipelining_with_interleaving, P=2, V=2, m=4: forward k is micro-batch
    # (k // 4) * 2 + k % 2 of chunk (k % 4) // 2, backward k the same micro-batch of chunk 1 - (k % 4) // 2;
    # warm-up (P - s - 1) * 2 + (V - 1) * P forwards: 4 on stage 0, 2 on stage 1
    assert order_str(compute_order("interleaved", 2, 2, 4, 0)) == [
        "F0", "F1", "F0.1", "F1.1",                                      # warm-up
        "F2", "B0.1", "F3", "B1.1", "F2.1", "B0", "F3.1", "B1",           # steady state
        "B2.1", "B3.1", "B2", "B3"]                                      # cool-down
    assert order_str(compute_order("interleaved", 2, 2, 4, 1)) == [
        "F0", "F1",
        "F0.1", "B0.1", "F1.1", "B1.1", "F2", "B0", "F3", "B1", "F2.1", "B2.1", "F3.1", "B3.1",
        "B2", "B3"]


@pytest.mark.parametrize("P,V,m", [(2, 2, 4), (2, 2, 8), (2, 3, 6), (4, 2, 8), (4, 2, 16), (4, 4, 8), (2, 2, 2)])
def test_interleaved_warmup_is_megatrons_formula_and_every_pass_runs_once(P, V, m):
    for s in range(P):
        order = compute_order("interleaved", P, V, m, s)
        want_warmup = m * V if m == P else min((P - s - 1) * 2 + (V - 1) * P, m * V)
        first_b = next(k for k, a in enumerate(order) if a.op == "B")
        assert warmup_forwards("interleaved", P, V, m, s) == want_warmup
        assert first_b == want_warmup + (want_warmup < m * V)  # the warm-up, and the first steady-state forward
        for op in "FB":
            assert sorted((a.microbatch, a.chunk) for a in order if a.op == op) == \
                [(i, v) for i in range(m) for v in range(V)]
        done = set()
        for a in order:
            if a.op == "F":
                done.add((a.microbatch, a.chunk))
            else:
                assert (a.microbatch, a.chunk) in done, (s, str(a))
        assert in_flight_max([(a,) for a in order]) == min(want_warmup + 1, m * V)
        # each chunk's micro-batches go forward in order, and backward in order
        for v in range(V):
            for op in "FB":
                assert [a.microbatch for a in order if a.op == op and a.chunk == v] == list(range(m))


@pytest.mark.parametrize("schedule,P,V,m", [("1f1b", 1, 1, 4), ("1f1b", 2, 1, 2), ("1f1b", 4, 1, 8),
                                            ("1f1b", 3, 1, 7), ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8),
                                            ("interleaved", 3, 3, 6)])
@pytest.mark.parametrize("forward_only", [False, True])
def test_programs_pair_every_send_with_a_receive_in_the_same_tick(schedule, P, V, m, forward_only):
    programs = build_programs(schedule, P, V, m, forward_only)
    exchanges = {}
    for s, program in enumerate(programs):
        assert [a for a in program if isinstance(a, Compute)] == compute_order(schedule, P, V, m, s, forward_only)
        ticks = [a.tick for a in program if isinstance(a, Exchange)]
        assert ticks == sorted(set(ticks))  # one exchange per tick, in tick order
        exchanges.update({(s, a.tick): a for a in program if isinstance(a, Exchange)})
    sends = recvs = 0
    for (s, tick), ex in exchanges.items():
        for msg in ex.sends:
            assert msg.src % P == s and msg in exchanges[(msg.dst % P, tick)].recvs
            assert abs(msg.dst - msg.src) == 1 and (msg.dst > msg.src) == (msg.kind == "act")
        for msg in ex.recvs:
            assert msg.dst % P == s and msg in exchanges[(msg.src % P, tick)].sends
        directions = [(msg.src % P, msg.dst % P) for msg in ex.sends]
        assert len(directions) == len(set(directions))  # at most one message per direction and tick
        sends, recvs = sends + len(ex.sends), recvs + len(ex.recvs)
    # activations over P*V - 1 boundaries, and as many gradients back: 2 (PV - 1) m messages
    assert sends == recvs == (1 if forward_only else 2) * (P * V - 1) * m


def test_a_compute_order_that_cannot_run_is_refused_before_any_process_communicates(monkeypatch):
    import megatron_lite.pipeline_parallel.schedules as schedules
    real = schedules.compute_order

    def backwards_first(schedule, P, V, m, stage, forward_only=False):  # stage 1 wants a backward before its forward
        order = real(schedule, P, V, m, stage, forward_only)
        return order[1:2] + order[:1] + order[2:] if stage == 1 else order
    monkeypatch.setattr(schedules, "compute_order", backwards_first)
    with pytest.raises(ScheduleError, match=r"1f1b at P=2, V=1, m=2 cannot run: the next passes \['B0', 'B0'\]"):
        schedules.build_programs("1f1b", 2, 1, 2)


def test_layer_splits():
    assert stage_chunks(8, 2, 0) == [[0, 1, 2, 3]] and stage_chunks(8, 2, 1) == [[4, 5, 6, 7]]
    # interleaved: chunk v of rank p is virtual stage v * P + p
    assert stage_chunks(8, 2, 0, virtual=2) == [[0, 1], [4, 5]] and stage_chunks(8, 2, 1, virtual=2) == [[2, 3], [6, 7]]
    assert stage_chunks(6, 3, 0, pp_layers=[1, 3, 2]) == [[0]]
    assert stage_chunks(6, 3, 1, pp_layers=[1, 3, 2]) == [[1, 2, 3]]
    assert stage_chunks(6, 3, 2, pp_layers=[1, 3, 2]) == [[4, 5]]
    assert layer_counts(4, 4) == [1, 1, 1, 1]


@pytest.mark.parametrize("args,message", [
    ((6, 4, 1, None), "model.num_layers=6 is not divisible by parallel.pp=4 = 4 stages: pick parallel.pp in "
                      "[1, 2, 3, 6] or give an uneven split, e.g. parallel.pp_layers=[1,2,2,1]"),
    ((8, 2, 3, None), "model.num_layers=8 is not divisible by parallel.pp=2 x parallel.pp_virtual=3 = 6 stages"),
    ((6, 2, 1, [4, 1]), "parallel.pp_layers=[4, 1] must give 2 non-negative layer counts (parallel.pp=2 virtual "
                        "stages, in model order) summing to model.num_layers=6, e.g. [3,3]"),
    ((6, 2, 1, [6]), "parallel.pp_layers=[6] must give 2 non-negative layer counts"),
])
def test_bad_layer_splits_name_the_values_and_a_fix(args, message):
    with pytest.raises(PipelineLayoutError) as e:
        layer_counts(*args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,message", [
    (("1f1b", 4, 1, 2), "2 micro-batches per step (train.global_batch_size / (train.micro_batch_size x DP)) are "
                        "fewer than the parallel.pp=4 stages"),
    (("interleaved", 2, 2, 5), "the interleaved schedule runs micro-batches in groups of parallel.pp=2, but there are "
                               "5 per step: use a multiple of 2 (e.g. 6)"),
    (("interleaved", 4, 2, 6), "the interleaved schedule runs micro-batches in groups of parallel.pp=4, but there are "
                               "6 per step: use a multiple of 4 (e.g. 8)"),
    (("interleaved", 2, 1, 4), "parallel.pp_schedule=interleaved needs parallel.pp >= 2 and parallel.pp_virtual >= 2"),
    (("1f1b", 2, 2, 4), "parallel.pp_virtual=2 needs parallel.pp_schedule=interleaved"),
    (("gpipe", 2, 1, 4), "parallel.pp_schedule='gpipe' must be one of 1f1b, interleaved"),
])
def test_schedules_that_cannot_run_are_one_line_errors(args, message):
    with pytest.raises(PipelineLayoutError) as e:
        check(*args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
