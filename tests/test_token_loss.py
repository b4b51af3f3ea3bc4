"""Packed sequences in the model, and the per-token loss normalization of a training step (token_loss.py).

One spawned world of 4 gloo ranks builds every layout in turn on its first ranks and hands rank 0's findings to
the tests:
- the model on a packed window (per-conversation positions and document ids) computes for each conversation what
  it computes on the conversation alone: logits, and each conversation's mean loss -- GPT-2 (learned positions) and
  Llama (RoPE, GQA), recomputation none, selective and full;
- `token_loss.forward_backward` (the trainer's step) on packed batches whose masks give every micro-batch a
  different number of counted targets trains at DP4 x TP1, DP2 x TP2 (SP on and off, zero 0 and 1), DP1 x TP4,
  with context parallelism (CP2 x DP2, CP2 x TP2 + SP) and pipeline parallelism (PP2 x CP2, PP2 x DP2 zero 1) like
  one process on the whole global batch at once, whose loss is by definition the mean over all counted targets:
  losses, grad norms, weights;
- with no ignored target and no metadata (plain text) it gives the numbers of the former loop
  (`(loss / M).backward()`, the loss the mean of the means) bit for bit, zero 0 and 1.
"""
from __future__ import annotations

import contextlib
import pickle
import types

import pytest
import torch
import torch.distributed as dist

from distributed import broadcast, max_rel_err, run_distributed
from megatron_lite.context_parallel import shard_batch
from megatron_lite.data.packing import Batch
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel import build_parallel_context
from megatron_lite.pipeline_parallel import PipelineExecutor
from megatron_lite.token_loss import dp_cp_mean, forward_backward

WORLD, S, GLOBAL_BATCH, STEPS = 4, 16, 8, 3
GPT2 = dict(vocab_size=200, seq_len=S, num_layers=2, hidden_size=32, num_heads=4, dropout=0.0, seed=7)
LLAMA = dict(GPT2, num_kv_heads=2, ffn_hidden_size=48, norm="rmsnorm", position_embedding="rope", mlp="swiglu",
             attention_bias=False, mlp_bias=False, tie_embeddings=False)
# lr 3e-3: at 1e-2 AdamW's normalized update amplifies float32 rounding of near-zero gradient entries into
# weight differences above 1e-5 (see tests/test_context_parallel.py's CP_OPTIM)
OPTIM = types.SimpleNamespace(lr=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6, grad_clip=0.5, fused=True)
# name -> (DP, TP, SP, zero, micro-batch size, model, CP, PP): accumulation = GLOBAL_BATCH / (micro x DP) = 2 or 4;
# under CP the ring carries every block's positions and document ids, under PP the stages pass them on
LAYOUTS = {"DP4xTP1": (4, 1, False, 0, 1, "llama", 1, 1), "DP2xTP2 SP zero1": (2, 2, True, 1, 2, "gpt2", 1, 1),
           "DP2xTP2 no SP": (2, 2, False, 0, 1, "llama", 1, 1), "DP1xTP4 SP": (1, 4, True, 0, 2, "gpt2", 1, 1),
           "CP2xDP2": (2, 1, False, 0, 1, "llama", 2, 1), "CP2xTP2 SP zero1": (1, 2, True, 1, 2, "gpt2", 2, 1),
           "PP2xCP2": (1, 1, False, 0, 2, "gpt2", 2, 2), "PP2xDP2 zero1": (2, 1, False, 1, 2, "llama", 1, 2)}
MODELS = {"gpt2": GPT2, "llama": LLAMA}


def packed_batch(step: int, plain: bool = False) -> Batch:
    """The global batch of a step: rows of documents of random lengths with restarting positions, the last token
    of each document and a random share of each row's targets ignored (the counts differ from row to row)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, GPT2["vocab_size"], (GLOBAL_BATCH, S + 1), generator=g)
    if plain:
        return Batch(tokens[:, :-1], tokens[:, 1:])
    targets = tokens[:, 1:].clone()
    positions, ids = torch.zeros(GLOBAL_BATCH, S, dtype=torch.long), torch.zeros(GLOBAL_BATCH, S, dtype=torch.long)
    for r in range(GLOBAL_BATCH):
        cuts = sorted(torch.randperm(S - 1, generator=g)[:r % 4].add(1).tolist())  # 0..3 boundaries
        for d, (a, b) in enumerate(zip([0, *cuts], [*cuts, S])):
            positions[r, a:b], ids[r, a:b] = torch.arange(b - a), d
            targets[r, b - 1] = -100  # no target across a boundary
        keep = torch.rand(S, generator=g) < (r + 1) / (GLOBAL_BATCH + 1)
        targets[r] = targets[r].masked_fill(~keep, -100)
    return Batch(tokens[:, :-1], targets, positions, ids)


def rows(batch: Batch, lo: int, n: int) -> Batch:
    return Batch(*(None if t is None else t[lo:lo + n] for t in vars(batch).values()))


def build(ctx, name: str, sp: bool, zero: int):
    model = GPT(GPTConfig(**MODELS[name], sequence_parallel=sp), ctx)
    return model, build_optimizer(model, OPTIM, ctx, zero=zero)


def train(model, opt, ctx, mb: int, plain: bool = False, old_loop: bool = False):
    """STEPS steps of GLOBAL_BATCH rows as the trainer runs them (rows split over micro-batches and DP ranks as
    dp_sample_indices does); `old_loop`: the loop before per-token normalization. Returns losses, grad norms."""
    accum = GLOBAL_BATCH // (mb * ctx.dp_size)
    losses, norms = [], []
    for step in range(STEPS):
        batch = packed_batch(step, plain)
        micro = [shard_batch(rows(batch, (m * ctx.dp_size + ctx.dp_rank) * mb, mb), ctx) for m in range(accum)]
        if old_loop:
            loss_sum = torch.zeros(())
            for m, b in enumerate(micro):
                with opt.no_sync() if m < accum - 1 else contextlib.nullcontext():
                    loss = opt.module(b.tokens, b.targets)
                    (loss / accum).backward()
                loss_sum += loss.detach()
        else:
            pipeline = PipelineExecutor(opt.module, model.config, ctx, accum)  # PP = 1: each micro-batch in turn
            loss_sum = forward_backward(pipeline, opt, micro, ctx, contextlib.nullcontext())
        norms.append(opt.prepare_grads().item())
        opt.step()
        opt.zero_grad()
        losses.append(dp_cp_mean(loss_sum / accum, ctx))
    return losses, norms


# ---- the world's work ------------------------------------------------------------------------------------


def _packed_vs_alone(out: dict) -> None:
    ctx = build_parallel_context(1, world_size=1)
    if ctx is None:
        return
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 200, (n,), generator=g) for n in (6, 4, 5)]  # + 1 padding token
    tokens = torch.cat([*docs, torch.zeros(1, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs] + [torch.zeros(1, dtype=torch.long)])[None]
    ids = torch.cat([torch.full((len(d),), k) for k, d in enumerate(docs)] + [torch.tensor([3])])[None]
    res = {}
    for name in MODELS:
        for recompute in ("none", "selective", "full"):
            model = GPT(GPTConfig(**MODELS[name], recompute=recompute), ctx)  # train mode: recompute is on
            logits = model(tokens, positions=positions, document_ids=ids)
            logit_err, loss_err, start = 0.0, 0.0, 0
            for d in docs:
                n = len(d)
                alone = model(d[None])
                logit_err = max(logit_err, (logits[0, start:start + n] - alone[0]).abs().max().item())
                targets = torch.full_like(tokens, -100)  # this conversation's targets only, inside the window
                targets[0, start:start + n - 1] = d[1:]
                packed_loss = model(tokens, targets, positions=positions, document_ids=ids)
                alone_loss = model(d[None, :-1], d[None, 1:])
                loss_err = max(loss_err, abs(packed_loss.item() - alone_loss.item()) / alone_loss.item())
                start += n
            res[(name, recompute)] = dict(logit_err=logit_err, loss_err=loss_err)
    out["packed_vs_alone"] = res


def _per_token(out: dict) -> None:
    one = build_parallel_context(1, world_size=1)
    refs = {}
    if one is not None:
        for name in MODELS:
            model, opt = build(one, name, False, 0)
            losses, norms = train(model, opt, one, GLOBAL_BATCH)  # the whole global batch in one micro-batch
            refs[name] = (losses, norms, model.full_state())
    refs = broadcast(refs)
    for layout, (dp, tp, sp, zero, mb, name, cp, pp) in LAYOUTS.items():
        ctx = build_parallel_context(tp, world_size=dp * tp * cp * pp, cp_size=cp, pp_size=pp)
        if ctx is None:
            continue
        model, opt = build(ctx, name, sp, zero)
        losses, norms = train(model, opt, ctx, mb)
        mine = model.full_state()  # this stage's weights (a tied embedding's copy on the last stage too)
        weight_err = torch.tensor([max_rel_err(mine, {k: refs[name][2][k] for k in mine})], dtype=torch.float64)
        for group in (ctx.tp_group, ctx.cp_group, ctx.dp_group, ctx.pp_group):
            dist.all_reduce(weight_err, op=dist.ReduceOp.MAX, group=group)
        weight_err = weight_err.item()
        if ctx.rank == 0:
            out.setdefault("per_token", {})[layout] = dict(losses=losses, norms=norms, weight_err=weight_err,
                                                           ref_losses=refs[name][0], ref_norms=refs[name][1])


def _plain_unchanged(out: dict) -> None:
    ctx = build_parallel_context(2, world_size=4)
    if ctx is None:
        return
    for zero in (0, 1):
        runs = []
        for old in (True, False):
            model, opt = build(ctx, "llama", True, zero)
            losses, norms = train(model, opt, ctx, 1, plain=True, old_loop=old)
            runs.append((losses, norms, model.full_state()))
        (l0, n0, w0), (l1, n1, w1) = runs
        same = l0 == l1 and n0 == n1 and all(torch.equal(w0[k], w1[k]) for k in w0)
        flags = torch.tensor([float(same)])
        for group in (ctx.tp_group, ctx.dp_group):
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
        if ctx.rank == 0:
            out.setdefault("plain", {})[zero] = dict(bitwise=bool(flags.item()), losses=l1)


def _world(out_path: str) -> None:
    torch.manual_seed(0)
    out: dict = {}
    _packed_vs_alone(out)
    dist.barrier()
    _per_token(out)
    _plain_unchanged(out)
    if dist.get_rank() == 0:
        with open(out_path, "wb") as f:
            pickle.dump(out, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("token_loss") / "out.pkl"
    run_distributed(_world, WORLD, str(path))
    return pickle.loads(path.read_bytes())


def test_packed_conversations_compute_what_they_compute_alone(world):
    for key, r in world["packed_vs_alone"].items():
        assert r["logit_err"] < 1e-5 and r["loss_err"] < 1e-6, (key, r)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_per_token_loss_trains_like_one_process(world, layout):
    r = world["per_token"][layout]
    for got, want in ((r["losses"], r["ref_losses"]), (r["norms"], r["ref_norms"])):
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 1e-5, (layout, got, want)
    assert r["weight_err"] < 1e-5, (layout, r["weight_err"])


def test_micro_batch_counts_differ():
    """The data of the equivalence test: counts differ between micro-batches at every layout (else the test
    could not tell a mean of means from the per-token mean)."""
    batch = packed_batch(0)
    counts = (batch.targets != -100).sum(dim=1).tolist()
    assert len(set(counts)) > GLOBAL_BATCH // 2 and min(counts) > 0
    mean_of_means = sum(1 / c for c in counts) / len(counts)
    assert abs(mean_of_means - 1 / (sum(counts) / len(counts))) > 0.01 * mean_of_means


def test_plain_text_numbers_unchanged_bit_for_bit(world):
    for zero, r in world["plain"].items():
        assert r["bitwise"], (zero, r)
