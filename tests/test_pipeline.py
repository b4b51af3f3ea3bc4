"""Pipeline parallelism against one process, in one spawned world of 4 gloo ranks (the module fixture); the
end-to-end runs of train.py are in test_pipeline_cli.py.

The world builds every layout in turn on its first ranks (`build_parallel_context(..., world_size=n,
pp_size=p)`), trains it with the trainer's pieces (the model of the stage, the optimizer, the PipelineExecutor)
and hands rank 0's findings to the tests:

- exactness: at (DP, PP, TP) in (1,2,1), (1,4,1), (2,2,1), (1,2,2)+SP, (1,2,1) interleaved V=2 and (2,2,1)
  zero=1, 8 steps of GPT-2 (tied embedding: a copy on the last stage) and of a GQA Llama (untied) give one
  process's losses and grad norms (clipping active) to float32 rounding, and its weights after the steps; the
  stages together hold exactly one process's parameter names and shapes, layers under their global index; an
  uneven split (`pp_layers`) trains like one process, and recompute (full, selective) changes nothing;
- the executed order of passes on every rank is the 1F1B / interleaved table, and the activations held at once
  never exceed P - stage (1F1B); p2p bytes per step equal 2 (PV - 1) m s b h x 4 (/T under SP);
- a stage made slow on purpose changes nothing (same losses and weights, bitwise): no deadlock, no mixed-up
  messages, at PP=2 with V=2 (Megatron-LM#750's case) and at PP=4;
- checkpoints: saved at (1,2,2)+SP, one copy of the tied embedding, the same keys and global shapes as a PP=1
  checkpoint; loaded at (1,2,2)+SP it resumes bitwise, at (2,1,2), (1,4,1) and (4,1,1) it loads the saved
  tensors bitwise and trains on like the uninterrupted run; a Llama trained at PP=2 exports (HF tensors) bitwise
  what the same training at PP=1 exports (untied, no clipping, DP=TP=1: nothing is summed in another order);
- an HF checkpoint loads at PP=2 with each stage reading only its own layers' tensors.
"""
from __future__ import annotations

import json
import time
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distributed import run_world
from test_checkpoint import ctx1  # noqa: F401 -- a fixture: a one-process context in the pytest process
from test_pipeline_schedules import one_f_one_b_table
from test_zero import _global_state as tp_gathered_state
from megatron_lite.checkpoint import _full_state, load_state
from megatron_lite.data.packing import Batch
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import build_optimizer
from megatron_lite.parallel import build_parallel_context
from megatron_lite.pipeline_parallel import PipelineExecutor, compute_order, in_flight_max, stage_chunks

WORLD = 4
GPT2 = dict(vocab_size=200, seq_len=16, num_layers=4, hidden_size=32, num_heads=4, dropout=0.0, seed=7)
LLAMA = dict(GPT2, num_kv_heads=2, ffn_hidden_size=48, norm="rmsnorm", position_embedding="rope", mlp="swiglu",
             attention_bias=False, mlp_bias=False, tie_embeddings=False)
MODELS = {"gpt2": GPT2, "llama": LLAMA}
GLOBAL_BATCH, MICRO, STEPS = 8, 1, 8  # m = 8 / DP micro-batches per step
# lr 3e-3: at 1e-2 rounding differences grow over 8 steps past 1e-5 in the grad norm at DP=2 alone (measured
# 5.4e-5 at DP2 x PP1 and DP2 x PP2 alike, 9e-6 at DP1 x PP2), which is about AdamW, not the pipeline
OPTIM = types.SimpleNamespace(lr=3e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-6, grad_clip=0.3, fused=True)
BUCKET = 4096  # zero=1: several buckets even for these small models
# name -> (DP, PP, TP, SP, V, zero)
LAYOUTS = {"(1,2,1)": (1, 2, 1, False, 1, 0), "(1,4,1)": (1, 4, 1, False, 1, 0), "(2,2,1)": (2, 2, 1, False, 1, 0),
           "(1,2,2)+SP": (1, 2, 2, True, 1, 0), "(1,2,1) interleaved V=2": (1, 2, 1, False, 2, 0),
           "(2,2,1) zero=1": (2, 2, 1, False, 1, 1)}
SLOW = {"(1,2,1) interleaved V=2, stage 1 slow": ("(1,2,1) interleaved V=2", 1),
        "(1,4,1), stage 2 slow": ("(1,4,1)", 2)}  # -> (layout, slow stage)
CKPT_FROM = "(1,2,2)+SP"
CKPT_TO = {"(1,2,2)+SP": (1, 2, 2, True), "(2,1,2)": (2, 1, 2, True), "(1,4,1)": (1, 4, 1, False),
           "(4,1,1)": (4, 1, 1, False)}  # -> (DP, PP, TP, SP)


def global_batch(step: int, cfg: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + step)
    return torch.randint(0, cfg["vocab_size"], (GLOBAL_BATCH, cfg["seq_len"] + 1), generator=g)


def micro_batches(step: int, cfg: dict, ctx) -> list[Batch]:
    """This DP rank's micro-batches of the step, as dp_sample_indices lays them out."""
    tokens, m = global_batch(step, cfg), GLOBAL_BATCH // (MICRO * ctx.dp_size)
    rows = [tokens[(i * ctx.dp_size + ctx.dp_rank) * MICRO:][:MICRO] for i in range(m)]
    return [Batch(r[:, :-1], r[:, 1:]) for r in rows]


def build(ctx, cfg: dict, sp: bool, virtual: int = 1, zero: int = 0, optim=OPTIM, delay: float = 0.0):
    """Model of this stage, optimizer and executor, as the trainer builds them. `delay`: seconds of sleep
    before every forward on this rank (a slow stage)."""
    model = GPT(GPTConfig(**cfg, sequence_parallel=sp), ctx,
                chunks=stage_chunks(cfg["num_layers"], ctx.pp_size, ctx.pp_rank, virtual))
    opt = build_optimizer(model, optim, ctx, zero=zero, **({"bucket_bytes": BUCKET} if zero else {}))
    forward = opt.module
    if delay:
        def forward(*args, **kwargs):
            time.sleep(delay)
            return opt.module(*args, **kwargs)
    m = GLOBAL_BATCH // (MICRO * ctx.dp_size)
    executor = PipelineExecutor(forward, model.config, ctx, m, "interleaved" if virtual > 1 else "1f1b", virtual)
    return model, opt, executor


def train(model, opt, executor, ctx, cfg: dict, steps: int, first_step: int = 0):
    """Optimizer steps as the trainer runs them; the global mean losses and the grad norms."""
    losses, norms = [], []
    for step in range(first_step, first_step + steps):
        batches = micro_batches(step, cfg, ctx)
        out = executor.forward_backward(batches, [1 / len(batches)] * len(batches), opt.no_sync)
        norms.append(opt.prepare_grads().item())
        opt.step()
        opt.zero_grad()
        loss = sum(out, torch.zeros(())) / len(batches)
        for group in (ctx.pp_group, ctx.dp_group):  # the last stage's, averaged over DP
            dist.all_reduce(loss, group=group)
        losses.append(loss.item() / ctx.dp_size)
    return losses, norms


def train_one_process(cfg: dict, steps: int, optim=OPTIM):
    """The reference: one process, a plain loop of forward and backward per micro-batch."""
    ctx = build_parallel_context(1, world_size=1)
    if ctx is None:
        return None
    model = GPT(GPTConfig(**cfg), ctx)
    opt = build_optimizer(model, optim, ctx)
    losses, norms = [], []
    for step in range(steps):
        batches = micro_batches(step, cfg, ctx)
        total = 0.0
        for b in batches:
            loss = model(b.tokens, b.targets)
            (loss * (1 / len(batches))).backward()
            total += loss.item()
        norms.append(opt.prepare_grads().item())
        opt.step()
        opt.zero_grad()
        losses.append(total / len(batches))
    return losses, norms, model.full_state(), {n: list(p.shape) for n, p in model.named_parameters()}


def stage_state(model, ctx, group) -> dict[str, torch.Tensor]:
    """Every parameter of every stage as the full tensor (gathered over TP, then over the stages)."""
    mine = {n: w for n, w in model.full_state().items() if n not in model.tied_copies()}
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine if ctx.tp_rank == 0 and ctx.dp_rank == 0 else {}, group=group)
    return {n: w for part in parts for n, w in part.items()}


def rel_err(got: dict, want: dict) -> float:
    return max(((got[k] - want[k]).norm() / want[k].norm().clamp(min=1e-30)).item() for k in want)


def broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def layout(name: str):
    dp, pp, tp, sp, virtual, zero = LAYOUTS[name]
    group = dist.new_group(list(range(dp * pp * tp)))  # every rank creates every group
    ctx = build_parallel_context(tp, world_size=dp * pp * tp, pp_size=pp)
    return ctx, group, sp, virtual, zero


# ---- the world's work ------------------------------------------------------------------------------------

def _exactness(out: dict, refs: dict) -> None:
    for lname in LAYOUTS:
        for mname, cfg in MODELS.items():
            ctx, group, sp, virtual, zero = layout(lname)
            if ctx is None:
                continue
            model, opt, executor = build(ctx, cfg, sp, virtual, zero)
            executor.trace = []
            losses, norms = train(model, opt, executor, ctx, cfg, 1)
            trace = [(str(a), a.op) for a, *_ in executor.trace]
            bytes_first_step = executor.p2p.bytes_sent
            more = train(model, opt, executor, ctx, cfg, STEPS - 1, first_step=1)
            weights = stage_state(model, ctx, group)
            facts = dict(trace=trace, in_flight=in_flight_max(executor.trace), stage=ctx.pp_rank, rank=ctx.rank,
                         bytes=bytes_first_step)
            per_rank = [None] * dist.get_world_size(group)
            dist.all_gather_object(per_rank, facts, group=group)
            if ctx.rank == 0:
                ref_losses, ref_norms, ref_weights, ref_shapes = refs[mname]
                out.setdefault("exactness", {})[(lname, mname)] = dict(
                    losses=losses + more[0], norms=norms + more[1], ref_losses=ref_losses, ref_norms=ref_norms,
                    names=sorted(weights), ref_names=sorted(ref_weights),
                    shapes={n: list(w.shape) for n, w in weights.items()}, ref_shapes=ref_shapes,
                    weight_err=rel_err(weights, ref_weights), per_rank=per_rank)
            if lname == "(1,2,2)+SP" and mname == "gpt2":
                _tied_copy(model, ctx, group, out)


def _tied_copy(model, ctx, group, out) -> None:
    """The two copies of the tied embedding (stage 0's input embedding, the last stage's output layer) are equal."""
    held = model.wte.weight.detach().clone() if hasattr(model, "wte") else torch.zeros(0)
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (ctx.pp_rank, ctx.tp_rank, held), group=group)
    if ctx.rank == 0:
        first = {tp: w for pp, tp, w in parts if pp == 0}
        last = {tp: w for pp, tp, w in parts if pp == ctx.pp_size - 1}
        out["tied_copy_equal"] = all(torch.equal(first[tp], last[tp]) for tp in first) and len(first) == ctx.tp_size


def _slow_stage(out: dict) -> None:
    for name, (lname, slow) in SLOW.items():
        results = {}
        for delay in (0.0, 0.02):
            ctx, group, sp, virtual, zero = layout(lname)
            if ctx is None:
                continue
            model, opt, executor = build(ctx, GPT2, sp, virtual, zero, delay=delay if ctx.pp_rank == slow else 0.0)
            losses, norms = train(model, opt, executor, ctx, GPT2, 2)
            results[delay] = (losses, norms, stage_state(model, ctx, group))
        if dist.get_rank() == 0:
            (l0, n0, w0), (l1, n1, w1) = results[0.0], results[0.02]
            out.setdefault("slow", {})[name] = dict(losses=(l0, l1), norms=(n0, n1),
                                                    weights_equal=all(torch.equal(w0[k], w1[k]) for k in w0))


def _checkpoints(out: dict, root: Path) -> None:
    """(1,2,2)+SP trains 2 steps, saves, trains 2 more (the uninterrupted run); every layout loads the save."""
    src = root / "pp_ckpt" / "step_0000002"
    ctx, group, sp, virtual, zero = layout(CKPT_FROM)
    saved = None
    if ctx is not None:
        model, opt, executor = build(ctx, GPT2, sp)
        train(model, opt, executor, ctx, GPT2, 2)
        dcp.save(_full_state(model, opt, ctx, copies=False), checkpoint_id=str(src), process_group=group)
        if ctx.rank == 0:
            (src / "meta.json").write_text(json.dumps({"step": 2, "consumed_samples": 2 * GLOBAL_BATCH}))
        saved = {k: v for k, v in _global_state(model, opt, ctx, group).items() if "copy:" not in k}  # as saved
        saved = (saved, train(model, opt, executor, ctx, GPT2, 2, first_step=2)[0])
    saved, ref_losses = broadcast(saved)
    flat = root / "pp1_ckpt"  # the same model, never trained, saved at PP=1: keys and shapes to compare
    one = build_parallel_context(1, world_size=1)
    single = dist.new_group([0])
    if one is not None:
        model, opt, _ = build(one, GPT2, False)
        dcp.save(_full_state(model, opt, one, copies=False), checkpoint_id=str(flat), process_group=single)
    dist.barrier()
    cells = {}
    for name, (dp, pp, tp, sp) in CKPT_TO.items():
        group = dist.new_group(list(range(dp * pp * tp)))
        ctx = build_parallel_context(tp, world_size=dp * pp * tp, pp_size=pp)
        if ctx is None:
            continue
        model, opt, executor = build(ctx, GPT2, sp)
        load_state(src, model, opt, ctx, process_group=group)
        got = _global_state(model, opt, ctx, group)
        losses = train(model, opt, executor, ctx, GPT2, 2, first_step=2)[0]
        if ctx.rank == 0:
            cells[name] = dict(differs=sorted(k for k in got if not torch.equal(got[k], saved[k.replace("copy:", "")])),
                               missing=sorted(set(saved) - set(got)), copies=sorted(k for k in got if "copy:" in k),
                               losses=losses)
    if dist.get_rank() == 0:
        meta = {p.name: {k: list(v.size) for k, v in dcp.FileSystemReader(str(p)).read_metadata()
                         .state_dict_metadata.items() if not k.startswith("rng.")} for p in (src, flat)}
        out["checkpoints"] = dict(cells=cells, ref_losses=ref_losses, keys=meta, saved=sorted(saved))


def _global_state(model, opt, ctx, group) -> dict[str, torch.Tensor]:
    """Weights and AdamW moments of every stage as full global tensors (test_zero's, gathered over the stages;
    the tied copy's under a `copy:` name, to check that it loaded)."""
    copies = model.tied_copies()
    mine = {}
    for k, v in tp_gathered_state(model, opt, ctx).items():
        name = next((n for n in copies if k == f"model.{n}" or k.startswith(f"optim.{n}.")), None)
        mine[k.replace(name, f"copy:{name}") if name else k] = v
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine if ctx.tp_rank == 0 and ctx.dp_rank == 0 else {}, group=group)
    return {k: v for part in parts for k, v in part.items()}


def _export_pair(out: dict, root: Path) -> None:
    """A Llama (untied), DP1 x TP1, no clipping, trained 2 steps at PP=2 and at PP=1, each saved: their exports
    are compared in the test (same keys, same bits)."""
    no_clip = types.SimpleNamespace(**{**vars(OPTIM), "grad_clip": 0.0})
    for pp in (2, 1):
        group = dist.new_group(list(range(pp)))
        ctx = build_parallel_context(1, world_size=pp, pp_size=pp)
        if ctx is None:
            continue
        model, opt, executor = build(ctx, LLAMA, False, optim=no_clip)
        train(model, opt, executor, ctx, LLAMA, 2)
        path = root / f"llama_pp{pp}" / "step_0000002"
        dcp.save(_full_state(model, opt, ctx, copies=False), checkpoint_id=str(path), process_group=group)
        if ctx.rank == 0:
            meta = {"step": 2, "consumed_samples": 2 * GLOBAL_BATCH, "model": asdict(model.config)}
            (path / "meta.json").write_text(json.dumps(meta))
            out.setdefault("export_pair", []).append(str(path))
        dist.barrier(group=group)


def _recompute(out: dict) -> None:
    """Full and selective recompute at (1,2,2)+SP change nothing: the losses and grad norms of 2 steps."""
    runs = {}
    for rc in ("none", "full", "selective"):
        ctx, group, sp, virtual, zero = layout("(1,2,2)+SP")
        if ctx is not None:
            runs[rc] = train(*build(ctx, dict(GPT2, recompute=rc), sp), ctx, GPT2, 2)
    if dist.get_rank() == 0:
        out["recompute"] = runs


def _hf_load(out: dict, root: Path) -> None:
    """A GPT-2 in Hugging Face's format (tied, random) loads at (1,2,1): each stage reads only its own layers'
    tensors (the last also the embedding, its tied output layer), and holds what one process loads."""
    from megatron_lite import hf
    hf_dir = root / "hf_gpt2"
    if dist.get_rank() == 0:
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=200, n_positions=16, n_embd=32, n_layer=4, n_head=4)).save_pretrained(
            hf_dir)
    dist.barrier()
    read, real = set(), hf.SafetensorsReader.read

    def logged(self, name, *args):
        read.add(name)
        return real(self, name, *args)
    hf.SafetensorsReader.read = logged
    got = {}
    for pp in (2, 1):
        group = dist.new_group(list(range(pp)))
        ctx = build_parallel_context(1, world_size=pp, pp_size=pp)
        if ctx is None:
            continue
        model = GPT(hf.hf_model_config(hf_dir), ctx, init_weights=False)
        read.clear()
        hf.load_hf_weights(model, hf_dir)
        executor = PipelineExecutor(model, model.config, ctx, 2)
        loss = sum(executor.forward_only(micro_batches(0, GPT2, ctx)[:2]), torch.zeros(()))
        dist.all_reduce(loss, group=ctx.pp_group)
        reads = [None] * pp
        dist.all_gather_object(reads, (ctx.pp_rank, sorted(read)), group=group)
        got[pp] = (dict(reads), stage_state(model, ctx, group), loss.item())
    hf.SafetensorsReader.read = real
    if dist.get_rank() == 0:
        (reads, weights, loss), (_, one, loss1) = got[2], got[1]
        out["hf_load"] = dict(reads=reads, losses=(loss, loss1), names=sorted(weights) == sorted(one),
                              same=all(torch.equal(weights[k], one[k]) for k in one))


def _uneven(out: dict, refs: dict) -> None:
    """parallel.pp_layers: a GPT-2 split [1, 2, 1] over 3 stages trains like one process too (2 steps)."""
    group = dist.new_group([0, 1, 2])
    ctx = build_parallel_context(1, world_size=3, pp_size=3)
    if ctx is None:
        return
    model = GPT(GPTConfig(**GPT2), ctx, chunks=stage_chunks(GPT2["num_layers"], 3, ctx.pp_rank, pp_layers=[1, 2, 1]))
    opt = build_optimizer(model, OPTIM, ctx)
    losses, norms = train(model, opt, PipelineExecutor(model, model.config, ctx, GLOBAL_BATCH), ctx, GPT2, 2)
    layers = [None] * 3
    dist.all_gather_object(layers, sorted(int(n.split(".")[1]) for n, _ in model.named_parameters()
                                          if n.startswith("blocks.") and n.endswith("ln_1.weight")), group=group)
    if ctx.rank == 0:
        out["uneven"] = dict(losses=losses, norms=norms, ref_losses=refs["gpt2"][0][:2], ref_norms=refs["gpt2"][1][:2],
                             layers=layers)


def _world(out: dict, root: Path) -> None:
    refs = broadcast({name: train_one_process(cfg, STEPS) for name, cfg in MODELS.items()})
    _exactness(out, refs)
    _uneven(out, refs)
    _slow_stage(out)
    _checkpoints(out, root)
    _export_pair(out, root)
    _recompute(out)
    _hf_load(out, root)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    return run_world(_world, WORLD, tmp_path_factory.mktemp("pipeline"))


# ---- the tests -------------------------------------------------------------------------------------------

def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_trains_like_one_process(world, name, model):
    r = world["exactness"][(name, model)]
    assert max(r["ref_norms"]) > OPTIM.grad_clip  # clipping is active: the norm over every stage matters
    for step in range(STEPS):
        assert _rel(r["losses"][step], r["ref_losses"][step]) < 1e-5, (step, r["losses"], r["ref_losses"])
        assert _rel(r["norms"][step], r["ref_norms"][step]) < 1e-5, (step, r["norms"], r["ref_norms"])
    assert r["weight_err"] < 1e-5, r["weight_err"]  # every parameter of every stage, after 8 AdamW steps
    # the stages hold one process's parameters between them, each once, named by global layer index
    assert r["names"] == r["ref_names"] and r["shapes"] == r["ref_shapes"]


def test_uneven_split_trains_like_one_process(world):
    r = world["uneven"]
    assert r["layers"] == [[0], [1, 2], [3]]
    for got, want in zip(r["losses"] + r["norms"], r["ref_losses"] + r["ref_norms"]):
        assert _rel(got, want) < 1e-5, r


def test_tied_embedding_copies_stay_equal(world):
    assert world["tied_copy_equal"] is True


@pytest.mark.parametrize("name", ["(1,4,1)", "(2,2,1)", "(1,2,2)+SP"])
def test_executed_order_is_the_1f1b_table_and_at_most_p_minus_s_in_flight(world, name):
    dp, pp, tp, sp, virtual, zero = LAYOUTS[name]
    m = GLOBAL_BATCH // (MICRO * dp)
    for r in world["exactness"][(name, "gpt2")]["per_rank"]:
        assert [p for p, _ in r["trace"]] == one_f_one_b_table(pp, m, r["stage"]), (r["rank"], r["trace"])
        assert r["in_flight"] <= pp - r["stage"], r


def test_executed_order_is_megatrons_interleaved_table(world):
    name = "(1,2,1) interleaved V=2"
    for r in world["exactness"][(name, "llama")]["per_rank"]:
        want = compute_order("interleaved", 2, 2, GLOBAL_BATCH, r["stage"])  # its table: test_pipeline_schedules
        assert [p for p, _ in r["trace"]] == [str(a) for a in want]
        # Megatron's warm-up (P - s - 1) * 2 + (V - 1) * P forwards, then one forward and one backward
        first_b = [op for _, op in r["trace"]].index("B")
        assert first_b == (2 - r["stage"] - 1) * 2 + 2 + 1
        assert r["in_flight"] == first_b


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_p2p_bytes_per_step_equal_theory(world, name):
    dp, pp, tp, sp, virtual, zero = LAYOUTS[name]
    c = GPT2
    m, s, b, h = GLOBAL_BATCH // (MICRO * dp), c["seq_len"], MICRO, c["hidden_size"]
    per_pipeline = 2 * (pp * virtual - 1) * m * s * b * h * 4 // (tp if sp else 1)  # fp32; /T: the SP shard
    sent = sum(r["bytes"] for r in world["exactness"][(name, "gpt2")]["per_rank"])
    assert sent == per_pipeline * dp * tp  # DP x TP pipelines, each TP rank its own shard (or copy without SP)


@pytest.mark.parametrize("name", list(SLOW))
def test_a_slow_stage_changes_nothing(world, name):
    r = world["slow"][name]
    assert r["losses"][0] == r["losses"][1] and r["norms"][0] == r["norms"][1] and r["weights_equal"], r


def test_checkpoint_keys_and_shapes_are_those_of_pp1(world):
    keys = world["checkpoints"]["keys"]
    pp, flat = keys["step_0000002"], keys["pp1_ckpt"]
    assert pp == flat  # same keys (one copy of the tied embedding), same global shapes
    assert "model.wte.weight" in pp and "model.blocks.3.attn.qkv.weight" in pp and "optim.wte.weight.exp_avg" in pp


@pytest.mark.parametrize("name", list(CKPT_TO))
def test_checkpoint_loads_in_other_layouts_and_resumes(world, name):
    c = world["checkpoints"]
    cell = c["cells"][name]
    assert cell["differs"] == [] and cell["missing"] == [], cell  # weights and moments, bitwise
    # a last stage holds a copy of the tied embedding, loaded (weights and moments) from the one saved
    assert cell["copies"] == (["model.copy:wte.weight", "optim.copy:wte.weight.exp_avg",
                               "optim.copy:wte.weight.exp_avg_sq", "optim.copy:wte.weight.step"]
                              if CKPT_TO[name][1] > 1 else [])
    if name == CKPT_FROM:  # the layout that saved it: bitwise
        assert cell["losses"] == c["ref_losses"], (cell["losses"], c["ref_losses"])
    for got, want in zip(cell["losses"], c["ref_losses"]):
        assert _rel(got, want) < 1e-5, (cell["losses"], c["ref_losses"])


def test_recompute_changes_nothing_under_pp(world):
    r = world["recompute"]
    assert r["full"] == r["none"] and r["selective"] == r["none"], r


def test_hf_checkpoint_load_reads_each_stages_own_layers(world):
    r = world["hf_load"]
    assert r["same"] and r["names"]  # the stages hold what one process loads, bitwise, every parameter once
    assert r["losses"][0] == pytest.approx(r["losses"][1], rel=1e-6)
    first, last = r["reads"][0], r["reads"][1]
    assert {n.split(".")[2] for n in first if ".h." in n} == {"0", "1"}  # layers 0-1 on stage 0
    assert {n.split(".")[2] for n in last if ".h." in n} == {"2", "3"}  # layers 2-3 on stage 1
    assert "transformer.wte.weight" in first and "transformer.wte.weight" in last  # the tied output layer's copy
    assert "transformer.wpe.weight" in first and "transformer.wpe.weight" not in last
    assert "transformer.ln_f.weight" in last and "transformer.ln_f.weight" not in first


def test_export_of_a_pp_checkpoint_equals_the_export_of_pp1_training(world, ctx1):
    from megatron_lite.checkpoint import load_model
    from megatron_lite.hf import hf_state_dict
    pp2, pp1 = (hf_state_dict(load_model(path, ctx1)) for path in world["export_pair"])
    assert sorted(pp2) == sorted(pp1) and "lm_head.weight" in pp2
    assert all(torch.equal(pp2[k], pp1[k]) for k in pp1), [k for k in pp1 if not torch.equal(pp2[k], pp1[k])]
