"""The TP x CP x DP x PP grid (parallel.py): every group holds the ranks the formula
rank = ((pp * DP + dp) * CP + cp) * TP + tp says, checked by summing each rank's id over its real gloo group."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_lite.parallel import ParallelConfigError, build_parallel_context, check_world_size

# (TP, CP, PP) over 8 ranks; DP = 8 / (TP x CP x PP)
LAYOUTS = [(2, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 2, 2), (1, 1, 4)]


def _expected(tp: int, cp: int, pp: int, world: int) -> dict[str, dict[int, list[int]]]:
    """rank -> the members of each of its groups, from the formula alone."""
    dp = world // (tp * cp * pp)
    rank_of = lambda p, d, c, t: ((p * dp + d) * cp + c) * tp + t  # noqa: E731
    out = {k: {} for k in ("tp", "cp", "dp", "dp_cp", "pp", "embedding")}
    for p, d, c, t in itertools.product(range(pp), range(dp), range(cp), range(tp)):
        r = rank_of(p, d, c, t)
        out["tp"][r] = [rank_of(p, d, c, i) for i in range(tp)]
        out["cp"][r] = [rank_of(p, d, i, t) for i in range(cp)]
        out["dp"][r] = [rank_of(p, i, c, t) for i in range(dp)]
        out["dp_cp"][r] = [rank_of(p, i, j, t) for i in range(dp) for j in range(cp)]
        out["pp"][r] = [rank_of(i, d, c, t) for i in range(pp)]
        out["embedding"][r] = sorted({rank_of(0, d, c, t), rank_of(pp - 1, d, c, t)})  # first and last stage
    return out


def _check_layouts(world: int) -> None:
    rank = dist.get_rank()
    for tp, cp, pp in LAYOUTS:
        ctx = build_parallel_context(tp, torch.device("cpu"), cp_size=cp, pp_size=pp)
        want = _expected(tp, cp, pp, world)
        assert ctx.grid[ctx.pp_rank][ctx.dp_rank][ctx.cp_rank][ctx.tp_rank] == rank
        assert (ctx.tp_size, ctx.cp_size, ctx.pp_size, ctx.dp_size) == (tp, cp, pp, world // (tp * cp * pp))
        assert ctx.dp_cp_rank == want["dp_cp"][rank].index(rank)
        for name in want:
            group = getattr(ctx, f"{name}_group")
            members = want[name][rank]
            if rank not in members:  # a middle pipeline stage is in no embedding group
                assert name == "embedding" and group is None, (name, tp, cp, pp, rank)
                continue
            got = torch.tensor([rank])
            ranks = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
            dist.all_gather(ranks, got, group=group)
            assert sorted(int(x) for x in ranks) == members, (name, tp, cp, pp, rank)
        assert ctx.stage_rank(ctx.pp_rank) == rank
        assert ctx.is_first_stage == (ctx.pp_rank == 0) and ctx.is_last_stage == (ctx.pp_rank == pp - 1)
        if rank == 0:
            print(ctx.describe())


def test_groups_follow_the_formula():
    run_distributed(_check_layouts, 8, 8)


def _timeout_of_the_groups(done: str) -> None:
    """Rank 1 stays away from a TP all-reduce: rank 0's must fail after the world's 1 s, not torch's 30 minutes
    (new_group's default). Rank 0 then leaves a file; without it by 6 s, rank 1 joins, so that without the fix
    rank 0's all-reduce completes late instead of hanging the suite."""
    ctx = build_parallel_context(2, torch.device("cpu"))
    start = time.monotonic()
    if ctx.tp_rank == 1:
        while not Path(done).exists() and time.monotonic() - start < 6:
            time.sleep(0.05)
        if Path(done).exists():
            return
    try:
        dist.all_reduce(torch.ones(1), group=ctx.tp_group)
        failed = False
    except RuntimeError:  # gloo: "Timed out waiting 1000ms for recv operation to complete"
        failed = True
    elapsed = time.monotonic() - start
    if ctx.tp_rank == 0:
        Path(done).touch()
        assert failed and elapsed < 4, (failed, elapsed)


def test_the_groups_time_out_with_the_world(tmp_path):
    run_distributed(_timeout_of_the_groups, 2, str(tmp_path / "rank0_done"), timeout_s=1)


def _rank_0_stalls_while_rank_1_waits_in_an_all_reduce() -> None:
    if dist.get_rank() == 0:
        time.sleep(60)
    dist.all_reduce(torch.ones(1))


def test_a_hung_test_world_fails_at_its_deadline_naming_where_each_rank_is():
    """The harness itself (tests/distributed.py): a hang fails its test in seconds, not the suite in 30 minutes."""
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"(?s)still running after 3 s.*rank 0: .*line \d+ in _rank_0_stalls.*"
                                           r"rank 1: .*all_reduce.*line \d+ in _rank_0_stalls"):
        run_distributed(_rank_0_stalls_while_rank_1_waits_in_an_all_reduce, 2, deadline_s=3)
    assert time.monotonic() - start < 30


def test_world_size_must_divide():
    check_world_size(8, 2, 2, 2)
    with pytest.raises(ParallelConfigError, match=r"world size 6 is not divisible by parallel.tp=2 x parallel.pp=2 = 4"):
        check_world_size(6, 2, 1, 2)
    with pytest.raises(ParallelConfigError, match=r"parallel.cp=0 must be >= 1"):
        check_world_size(4, 1, 0, 1)
