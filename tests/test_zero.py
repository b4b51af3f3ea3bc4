"""The distributed optimizer (parallel.zero=1) against zero=0 and a single process, and its checkpoints.

One spawned world of 8 gloo ranks (the module fixture) builds every layout in turn on its first ranks
(`build_parallel_context(..., world_size=n)`), runs the checks and hands rank 0's findings to the tests:

- zero=1 and zero=0 train like one process (losses, grad norms, weights) at DP2 x TP2 with SP on and off (and a
  Llama with SwiGLU's 3-D weight, SP on) and at
  DP4 x TP1 with an odd-sized model, with gradient accumulation, clipping active and several buckets;
- every element of every parameter is owned by exactly one DP rank, and the AdamW state per rank is 1/DP;
- AdamW on the shard gives torch.optim.AdamW's numbers bitwise; a non-finite gradient anywhere reaches every rank;
- the SP-replicated gradients are summed over TP in exactly one all-reduce per optimizer step;
- save/load matrix: a zero=1 DP2 x TP2 checkpoint loads at DP {1, 2, 4} x TP {1, 2} with zero off and on, the
  moments reassemble to the saved ones bitwise, saving again writes the same global tensors, and training goes
  on with the uninterrupted run's losses (bitwise in the same layout).
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distributed import broadcast, max_rel_err, run_distributed
from megatron_lite.checkpoint import _full_state, load_state
from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.context_parallel import shard_sequence
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import build_optimizer, param_groups
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel import gather_tp_shards, replicated_params, tp_partition_dim

WORLD = 8
CFG = dict(vocab_size=200, seq_len=16, num_layers=2, hidden_size=32, num_heads=4, dropout=0.0, seed=7)
# odd sizes (15-wide LayerNorms and biases, a 33-wide MLP, 13 positions): buckets need padding to split 4 ways
ODD = dict(vocab_size=200, seq_len=13, num_layers=2, hidden_size=15, num_heads=3, ffn_hidden_size=33, dropout=0.0,
           seed=3)
GLOBAL_BATCH, ACCUM, STEPS = 8, 2, 3
# eps 1e-6, not 1e-8: the key bias has a zero gradient up to rounding noise, which AdamW with a tiny eps
# turns into updates of +-lr that differ between any two summation orders
OPTIM = types.SimpleNamespace(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6, grad_clip=0.3, fused=True)
BUCKET = 4096  # bytes: several buckets even for these small models
# the Llama family: RMSNorm, RoPE, GQA, untied, and SwiGLU's 3-D [2, F, H] weight split over TP along dim 1
LLAMA = dict(CFG, num_kv_heads=2, ffn_hidden_size=48, norm="rmsnorm", position_embedding="rope", mlp="swiglu",
             attention_bias=False, mlp_bias=False, tie_embeddings=False)
LAYOUTS = {"DP2xTP2 SP": (2, 2, True, CFG), "DP2xTP2 no SP": (2, 2, False, CFG),
           "DP4xTP1 odd sizes": (4, 1, False, ODD), "DP2xTP2 SP llama": (2, 2, True, LLAMA)}


def global_batch(step: int, cfg: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, cfg["vocab_size"], (GLOBAL_BATCH, cfg["seq_len"] + 1), generator=g)


def train(model, opt, ctx, steps, cfg, first_step: int = 0):
    """`steps` optimizer steps of GLOBAL_BATCH sequences, ACCUM micro-batches per DP rank, as the trainer runs
    them (under CP each rank keeps its chunks of every sequence); returns the global mean losses and the grad
    norms."""
    mb = GLOBAL_BATCH // (ACCUM * ctx.dp_size)
    losses, norms = [], []
    for step in range(first_step, first_step + steps):
        tokens = global_batch(step, cfg)
        loss_sum = torch.zeros(())
        for micro in range(ACCUM):
            rows = tokens[(micro * ctx.dp_size + ctx.dp_rank) * mb:][:mb]
            with opt.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext():
                loss = opt.module(shard_sequence(rows[:, :-1], ctx), shard_sequence(rows[:, 1:], ctx))
                (loss / ACCUM).backward()
            loss_sum += loss.detach()
        norms.append(opt.prepare_grads().item())
        opt.step()
        opt.zero_grad()
        loss_avg = loss_sum / ACCUM
        dist.all_reduce(loss_avg, group=ctx.dp_cp_group)
        losses.append(loss_avg.item() / ctx.dp_cp_size)
    return losses, norms


def build(ctx, cfg, sp, zero, optim=OPTIM, **kw):
    model = GPT(GPTConfig(**cfg, sequence_parallel=sp), ctx)
    return model, build_optimizer(model, optim, ctx, zero=zero, **({"bucket_bytes": BUCKET} | kw if zero else {}))


def all_max(x: float, ctx) -> float:
    """The maximum of x over the ranks of ctx's grid."""
    t = torch.tensor([x], dtype=torch.float64)
    for group in (ctx.tp_group, ctx.cp_group, ctx.dp_group):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


# ---- the world's work ------------------------------------------------------------------------------------

def _equivalence(out: dict) -> None:
    """Rank 0 trains each model as one process; every layout trains it with zero=0 and zero=1."""
    one = build_parallel_context(1, world_size=1)
    refs = {}
    for cfg in (CFG, ODD, LLAMA):
        if one is not None:
            model, opt = build(one, cfg, False, 0)
            losses, norms = train(model, opt, one, STEPS, cfg)
            refs[json.dumps(cfg, sort_keys=True)] = (losses, norms, model.full_state())
    refs = broadcast(refs)
    for name, (dp, tp, sp, cfg) in LAYOUTS.items():
        ctx = build_parallel_context(tp, world_size=dp * tp)
        if ctx is None:
            continue
        ref_losses, ref_norms, ref_weights = refs[json.dumps(cfg, sort_keys=True)]
        res = {"ref_losses": ref_losses, "ref_norms": ref_norms}
        for zero in (0, 1):
            model, opt = build(ctx, cfg, sp, zero)
            losses, norms = train(model, opt, ctx, STEPS, cfg)
            weight_err = all_max(max_rel_err(model.full_state(), ref_weights), ctx)
            res[zero] = dict(losses=losses, norms=norms, weight_err=weight_err)
            if zero == 1:
                res["ownership"] = _ownership(model, opt, ctx)
        if ctx.rank == 0:
            out.setdefault("equivalence", {})[name] = res


def _ownership(model, opt, ctx) -> dict:
    """How many DP ranks own each element of each parameter (summed over DP), and the state's size."""
    owners, present = {}, {}
    for n, p in model.named_parameters():
        owners[n] = torch.zeros(p.numel(), dtype=torch.int32)
        present[n] = torch.zeros(1, dtype=torch.int32)
    for segs in opt.segments:
        for s in segs:
            owners[s.name][s.start:s.end] += 1
            present[s.name] += 1
    for n in owners:
        dist.all_reduce(owners[n], group=ctx.dp_group)
        dist.all_reduce(present[n], group=ctx.dp_group)
    local = sum(p.numel() for p in model.parameters())
    padded = sum(b.numel for b in opt.buckets)
    return dict(min_owners=min(int(o.min()) for o in owners.values()),
                max_owners=max(int(o.max()) for o in owners.values()),
                state_bytes=int(all_max(opt.state_bytes(), ctx)), local=local, padded=padded, dp=ctx.dp_size,
                buckets=len(opt.buckets), params=len(owners),
                params_missing_on_some_rank=sum(int(c) < ctx.dp_size for c in present.values()))


def _adamw_exact(out: dict) -> None:
    """Same gradients on every DP rank (multiples of 1/1024: their DP average is exact), no clipping: the
    shard's AdamW equals torch.optim.AdamW's bitwise, weights and moments, over steps with changing lr."""
    ctx = build_parallel_context(1, world_size=4)
    if ctx is None:
        return
    o = types.SimpleNamespace(**{**vars(OPTIM), "grad_clip": 0.0, "eps": 1e-8})
    model = GPT(GPTConfig(**ODD), ctx)
    ref = GPT(GPTConfig(**ODD), ctx)
    opt = build_optimizer(model, o, ctx, zero=1, bucket_bytes=BUCKET)
    torch_opt = torch.optim.AdamW(param_groups(ref, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    g = torch.Generator().manual_seed(11)
    for lr in (1e-2, 3e-3, 5e-2):
        for p, q in zip(model.parameters(), ref.parameters()):
            grad = torch.randint(-2000, 2000, p.shape, generator=g).float() / 1024
            p.grad.copy_(grad)
            q.grad = grad.clone()
        for group in opt.param_groups + torch_opt.param_groups:
            group["lr"] = lr
        opt.step()
        opt.zero_grad()
        torch_opt.step()
    state = opt.full_state()
    diffs = [(p - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())]
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            diffs.append((state[n][key] - torch_opt.state[q][key]).abs().max().item())
    steps = {float(s["step"]) for s in state.values()} | {float(s["step"]) for s in torch_opt.state.values()}
    max_diff = all_max(max(diffs), ctx)
    if ctx.rank == 0:
        out["adamw"] = dict(max_abs_diff=max_diff, steps=sorted(steps), compared=len(diffs))


def _nonfinite(out: dict) -> None:
    """An inf in one rank's gradient (its first micro-batch) makes the norm non-finite on every rank, whichever
    rank owns the element: the loop stops before the update on all of them."""
    ctx = build_parallel_context(2, world_size=4)
    if ctx is None:
        return
    model, opt = build(ctx, CFG, True, 1)
    tokens = global_batch(0, CFG)[:2]
    with opt.no_sync():
        opt.module(tokens[:, :-1], tokens[:, 1:]).backward()
    if ctx.rank == 3:
        next(p for p in model.parameters() if tp_partition_dim(p) is not None).grad.view(-1)[5] = float("inf")
    opt.module(tokens[:, :-1], tokens[:, 1:]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    finite = torch.tensor([float(math.isfinite(opt.prepare_grads().item()))])
    for group in (ctx.tp_group, ctx.dp_group):  # over all 4 ranks
        dist.all_reduce(finite, group=group)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if ctx.rank == 0:
        out["nonfinite"] = dict(finite_on_ranks=int(finite.item()), unchanged=unchanged)


def _coalesced(out: dict) -> None:
    """Every TP all-reduce of one optimizer step, counted on every rank: the cross-entropy's two per micro-batch,
    the norm's one, and one for all SP-replicated gradients together (27 per micro-batch at L=4 before, one per
    parameter). Under zero=1 a rank sums the part of them it owns: none, if it owns none."""
    for dp, tp in ((1, 2), (2, 2)):
        ctx = build_parallel_context(tp, world_size=dp * tp)
        group = dist.new_group(list(range(dp * tp)))
        if ctx is None:
            continue
        for zero in (0, 1):
            for accum in (1, 4):
                model, opt = build(ctx, CFG, True, zero)
                tokens = global_batch(0, CFG)[:accum * dp]
                with CollectiveCounter() as log:
                    for micro in range(accum):
                        rows = tokens[micro * dp + ctx.dp_rank:][:1]
                        with opt.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                            opt.module(rows[:, :-1], rows[:, 1:]).backward()
                    opt.step()
                tp_reduces = [c.numel for c in log.calls if c.op == "all_reduce" and c.group is ctx.tp_group]
                if zero == 0:
                    want = sum(p.numel() for p in replicated_params(model))
                else:
                    want = sum(g.numel() for g in opt.replicated_grad_shards)
                per_rank = [None] * (dp * tp)
                mine = dict(tp_all_reduces=tp_reduces, replicated_numel=want,
                            replicated_total=sum(p.numel() for p in replicated_params(model)))
                dist.all_gather_object(per_rank, mine, group=group)
                if ctx.rank == 0:
                    out.setdefault("coalesced", {})[(dp, tp, zero, accum)] = per_rank


def _checkpoint_matrix(out: dict, root: Path) -> None:
    """A zero=1 DP2 x TP2 (SP) run saves after 2 steps and goes on for 2; every layout x zero loads it."""
    src_dir = root / "source"
    ctx = build_parallel_context(2, world_size=4)
    group = dist.new_group(list(range(4)))  # DCP's group: the layout's ranks
    source = None
    if ctx is not None:
        model, opt = build(ctx, CFG, True, 1)
        train(model, opt, ctx, 2, CFG)
        _save(model, opt, ctx, src_dir, group)
        want = _global_state(model, opt, ctx)
        ref_losses = train(model, opt, ctx, 2, CFG, first_step=2)[0]
        source = (want, ref_losses)
    want, ref_losses = broadcast(source)
    saved = _consolidated(src_dir) if dist.get_rank() == 0 else None
    state_keys = _state_keys(saved) if saved else []
    cells = {}
    for zero in (0, 1):
        for dp, tp in ((1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)):
            ctx = build_parallel_context(tp, world_size=dp * tp)
            group = dist.new_group(list(range(dp * tp)))
            if ctx is None:
                continue
            model, opt = build(ctx, CFG, tp > 1, zero)
            load_state(src_dir / "step_0000002", model, opt, ctx, process_group=group)
            got = _global_state(model, opt, ctx)
            cell_dir = root / f"dp{dp}_tp{tp}_zero{zero}"
            _save(model, opt, ctx, cell_dir, group)
            losses = train(model, opt, ctx, 2, CFG, first_step=2)[0]
            if ctx.rank == 0:
                resaved = _consolidated(cell_dir)
                cells[(dp, tp, zero)] = dict(
                    loaded_differs=[k for k in want if not torch.equal(got[k], want[k])],
                    resaved_differs=[k for k in state_keys if not _same(resaved.get(k), saved[k])],
                    keys_equal=_state_keys(resaved) == state_keys, losses=losses)
    if dist.get_rank() == 0:
        out["matrix"] = dict(cells=cells, ref_losses=ref_losses, keys=len(saved),
                             moment_keys=sum(k.endswith(("exp_avg", "exp_avg_sq")) for k in saved))


def _state_keys(sd: dict) -> list[str]:
    """The model's and the optimizer's entries (the RNG streams saved depend on TP)."""
    return sorted(k for k in sd if k.startswith(("model.", "optim.")))


def _save(model, opt, ctx, run_dir: Path, group=None) -> None:
    step_dir = run_dir / "step_0000002"
    dcp.save(_full_state(model, opt, ctx), checkpoint_id=str(step_dir), process_group=group)
    if ctx.rank == 0:
        (step_dir / "meta.json").write_text(json.dumps({"step": 2, "consumed_samples": 2 * GLOBAL_BATCH}))
    dist.barrier(group=group)


def _global_state(model, opt, ctx) -> dict[str, torch.Tensor]:
    """Weights and AdamW moments as full global tensors (gathered over TP; zero=1's moments over DP first)."""
    moments = opt.full_state()
    out = {}
    for n, p in model.named_parameters():
        dim = tp_partition_dim(p)
        out[f"model.{n}"] = gather_tp_shards(p, dim, ctx.tp_group)
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"optim.{n}.{key}"] = gather_tp_shards(moments[n][key], dim, ctx.tp_group)
        out[f"optim.{n}.step"] = moments[n]["step"].clone()
    return out


def _consolidated(step_root: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = step_root / "consolidated.pt"
    dcp_to_torch_save(str(step_root / "step_0000002"), str(path))
    return torch.load(path, weights_only=False)


def _same(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _world(out_path: str, root: str) -> None:
    out: dict = {}
    _equivalence(out)
    _adamw_exact(out)
    _nonfinite(out)
    _coalesced(out)
    _checkpoint_matrix(out, Path(root))
    if dist.get_rank() == 0:
        Path(out_path).write_bytes(pickle.dumps(out))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("zero")
    run_distributed(_world, WORLD, str(d / "out.pkl"), str(d))
    return pickle.loads((d / "out.pkl").read_bytes())


# ---- the tests -------------------------------------------------------------------------------------------

def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("zero", [0, 1])
def test_trains_like_one_process(world, layout, zero):
    r = world["equivalence"][layout]
    got = r[zero]
    assert max(r["ref_norms"]) > OPTIM.grad_clip  # clipping is active
    for step in range(STEPS):
        assert _rel(got["losses"][step], r["ref_losses"][step]) < 1e-5, (step, got["losses"], r["ref_losses"])
        assert _rel(got["norms"][step], r["ref_norms"][step]) < 1e-5, (step, got["norms"], r["ref_norms"])
    assert got["weight_err"] < 1e-5, got["weight_err"]  # every weight, on every rank, after STEPS AdamW steps


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_element_owned_by_exactly_one_dp_rank_and_state_is_1_over_dp(world, layout):
    o = world["equivalence"][layout]["ownership"]
    assert o["min_owners"] == o["max_owners"] == 1, o
    assert o["buckets"] > 1, o
    assert o["padded"] % o["dp"] == 0 and 0 <= o["padded"] - o["local"] < o["dp"] * o["buckets"], o
    assert o["state_bytes"] == 8 * o["padded"] // o["dp"], o  # exp_avg + exp_avg_sq, fp32, of 1/DP
    print(f"\n{layout}: {o['local']:,} local parameters in {o['buckets']} buckets, {o['padded'] - o['local']} padding; "
          f"AdamW state {o['state_bytes']:,} bytes per rank = 8 x {o['padded']:,} / {o['dp']}; "
          f"{o['params_missing_on_some_rank']} of {o['params']} parameters have no element on some rank")
    if o["dp"] > 1:
        assert o["params_missing_on_some_rank"] > 0  # the small parameters: the case that broke Megatron (#792)


def test_shard_adamw_equals_torch_adamw_bitwise(world):
    r = world["adamw"]
    assert r["max_abs_diff"] == 0.0, r
    assert r["steps"] == [3.0] and r["compared"] > 0, r


def test_nonfinite_grad_on_one_rank_stops_every_rank_before_the_update(world):
    r = world["nonfinite"]
    assert r["finite_on_ranks"] == 0 and r["unchanged"], r


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("accum", [1, 4])
@pytest.mark.parametrize("dp", [1, 2])
def test_sp_replicated_grads_summed_in_one_tp_all_reduce_per_step(world, dp, zero, accum):
    per_rank = world["coalesced"][(dp, 2, zero, accum)]
    b_s = CFG["seq_len"]  # one sequence per micro-batch: the cross-entropy's MAX (b*s) and SUM (2*b*s) all-reduces
    for rank, r in enumerate(per_rank):
        tp_reduces, want = r["tp_all_reduces"], r["replicated_numel"]
        replicated = [want] if want else []  # zero=1: the part in this rank's shard (none: nothing to sum)
        assert sorted(tp_reduces) == sorted([b_s, 2 * b_s] * accum + [1] + replicated), (rank, tp_reduces)  # 1: norm
    # every replicated element is summed: by every DP rank (zero=0), or once, by the DP rank that owns it
    n = per_rank[0]["replicated_total"]
    owned = [r["replicated_numel"] for r in per_rank[::2]]  # TP rank 0 of each DP rank
    assert owned == [n] * dp if zero == 0 else sum(owned) == n, owned


def test_checkpoint_loads_in_every_layout_with_zero_on_and_off(world):
    m = world["matrix"]
    assert len(m["cells"]) == 12 and m["moment_keys"] > 0
    for (dp, tp, zero), c in m["cells"].items():
        tag = f"DP{dp} x TP{tp} zero={zero}"
        assert c["loaded_differs"] == [], f"{tag}: loaded state differs from the saved one: {c['loaded_differs']}"
        assert c["keys_equal"] and c["resaved_differs"] == [], f"{tag}: saved again, differs: {c['resaved_differs']}"
        if (dp, tp, zero) == (2, 2, 1):  # the layout that saved it: bitwise
            assert c["losses"] == m["ref_losses"], (c["losses"], m["ref_losses"])
        for got, ref in zip(c["losses"], m["ref_losses"]):
            assert _rel(got, ref) < 1e-5, f"{tag}: losses {c['losses']} vs uninterrupted {m['ref_losses']}"
