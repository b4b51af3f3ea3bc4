"""Context parallelism against its dense counterparts: ring attention against dense causal attention, training at
(DP, CP, TP) layouts against one process, checkpoints across CP sizes, and the hang report of a rank waiting in a
ring transfer.

One spawned world of 4 gloo ranks (the module fixture) builds every layout in turn on its first ranks
(`build_parallel_context(..., world_size=n, cp_size=c)`), runs the checks and hands rank 0's findings to the tests:

- ring attention's output and input gradients equal dense causal attention (SDPA) at S in {64, 1024}, C in
  {2, 4}, multi-head and grouped-query, and document masks (per-sequence document ids) equal SDPA with the same
  mask; the p2p sends per layer equal theory (benchmarks/theory.ring_attention_sends);
- 8 steps of a GPT-2 and of a GQA Llama with RoPE at (DP, CP, TP) in {(1,2,1), (1,4,1), (2,2,1), (1,2,2)+SP,
  (2,2,1) zero=1}, and with recompute selective and full, give one process's losses, grad norms and weights
  (relative 1e-5; clipping active);
- a CP=2 checkpoint resumes bitwise at CP=2 and continues at CP=1, CP=4 and DP2 x CP2 with the same losses;
- a rank that waits in a ring transfer for a stalled peer says so in its hang report, and the peer is "behind".
The end-to-end case (torchrun: save at CP=2, resume bitwise, load at CP=1) is at the bottom.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cli import ROOT, SMALL, TORCHRUN, env, losses, metrics, torchrun
from distributed import run_world
from megatron_lite.checkpoint import load_state
from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.context_parallel import Ring, RingPlan, chunk_ids, kernels, ring_attention
from megatron_lite.context_parallel.plan import CAUSAL, FULL, MASKED, Call
from megatron_lite.hang import write_report
from megatron_lite.parallel import build_parallel_context
from test_checkpoint import python_train
from test_zero import OPTIM, _rel, _save, all_max, broadcast, build, max_rel_err, train

from benchmarks.context_parallel import memory_worker
from benchmarks.theory import adapted_activation_bytes, ring_attention_sends

WORLD, STEPS = 4, 8
GPT2 = dict(vocab_size=200, seq_len=32, num_layers=2, hidden_size=32, num_heads=4, dropout=0.0, seed=7)
LLAMA = dict(GPT2, num_kv_heads=2, ffn_hidden_size=48, norm="rmsnorm", position_embedding="rope", mlp="swiglu",
             attention_bias=False, mlp_bias=False, tie_embeddings=False)
MODELS = {"gpt2": GPT2, "llama": LLAMA}
# name: (DP, CP, TP, SP, zero, recompute, models)
LAYOUTS = {"DP1xCP2": (1, 2, 1, False, 0, "none", MODELS), "DP1xCP4": (1, 4, 1, False, 0, "none", MODELS),
           "DP2xCP2": (2, 2, 1, False, 0, "none", MODELS), "CP2xTP2 SP": (1, 2, 2, True, 0, "none", MODELS),
           "DP2xCP2 zero=1": (2, 2, 1, False, 1, "none", MODELS),
           "CP2xTP2 SP selective": (1, 2, 2, True, 0, "selective", ["llama"]),
           "CP2xTP2 SP full": (1, 2, 2, True, 0, "full", ["llama"])}
# attention cases: (C, S, query heads, KV heads, document masks)
ATTENTION = [(C, S, 4, G, False) for C in (2, 4) for S in (64, 1024) for G in (4, 2)] + \
            [(2, 64, 4, 2, True), (4, 64, 4, 4, True)]
B, D = 2, 16
RTOL = 1e-5
# test_zero's AdamW at lr 3e-3 (as tests/test_pipeline.py): at 1e-2, 8 AdamW steps turn float32 rounding into
# weight differences of 1.4e-5 at CP=2 (6e-6 at DP=2) although the first step's gradients of both equal one
# process's to 6e-7 on every tensor: AdamW's normalized update amplifies the rounding of near-zero entries
CP_OPTIM = types.SimpleNamespace(**{**vars(OPTIM), "lr": 3e-3})


def shard(t: torch.Tensor, ctx, dim: int = 2) -> torch.Tensor:
    """CP rank r's chunks r and 2C-1-r of dim `dim` (the sequence) of a full tensor."""
    c = t.shape[dim] // (2 * ctx.cp_size)
    return torch.cat([t.narrow(dim, i * c, c) for i in chunk_ids(ctx.cp_rank, ctx.cp_size)], dim=dim)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


# ---- the world's work ------------------------------------------------------------------------------------

def _attention(out: dict, root: Path) -> None:
    """Each rank computes dense attention on the whole sequence itself (same seed) and compares its chunks."""
    for C in (2, 4):
        ctx = build_parallel_context(1, world_size=C, cp_size=C)
        for case in [a for a in ATTENTION if a[0] == C]:
            if ctx is None:
                continue
            _, S, N, G, docs = case
            g = torch.Generator().manual_seed(S + 10 * N + G + docs)
            q, dout = torch.randn(B, N, S, D, generator=g), torch.randn(B, N, S, D, generator=g)
            k, v = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
            mask = torch.ones(S, S, dtype=torch.bool).tril()
            doc_BS = None
            if docs:  # documents of random lengths, different in each sequence
                doc_BS = (torch.rand(B, S, generator=g) < 0.08).cumsum(1)
                mask = mask & (doc_BS[:, None, :, None] == doc_BS[:, None, None, :])
            dense = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = F.scaled_dot_product_attention(*dense, attn_mask=mask, enable_gqa=N != G)
            ref.backward(dout)
            mine = [shard(t, ctx).requires_grad_() for t in (q, k, v)]
            ring = Ring(ctx.cp_group)
            if docs:  # positions and document ids travel: gathered over CP once per forward
                plan = RingPlan.gathered(ring, shard(torch.arange(S), ctx, 0), shard(doc_BS, ctx, 1))
            else:
                plan = RingPlan.load_balanced(ring, S // C, torch.device("cpu"))
            with CollectiveCounter() as fwd:
                y = ring_attention(*mine, plan)
            with CollectiveCounter() as bwd:
                y.backward(shard(dout, ctx))
            errs = [rel(y, shard(ref, ctx))] + [rel(m.grad, shard(d.grad, ctx)) for m, d in zip(mine, dense)]
            errs = [all_max(e, ctx) for e in errs]
            sends = {phase: sorted((c.bytes for c in log.calls if c.op == "send"), reverse=True)
                     for phase, log in (("forward", fwd), ("backward", bwd))}
            if ctx.rank == 0:
                out.setdefault("attention", {})[case] = dict(errors=errs, sends=sends,
                                                            calls=[len(s) for s in plan.steps])


def _training(out: dict, root: Path) -> None:
    """Rank 0 trains each model as one process; every layout trains it from the same seed."""
    one = build_parallel_context(1, world_size=1)
    refs = {}
    for name, cfg in MODELS.items():
        if one is not None:
            model, opt = build(one, cfg, False, 0, CP_OPTIM)
            losses_, norms = train(model, opt, one, STEPS, cfg)
            refs[name] = (losses_, norms, model.full_state())
    refs = broadcast(refs)
    for layout, (dp, cp, tp, sp, zero, recompute, models) in LAYOUTS.items():
        ctx = build_parallel_context(tp, world_size=dp * cp * tp, cp_size=cp)
        for name in models:
            cfg = MODELS[name]
            if ctx is None:
                continue
            model, opt = build(ctx, dict(cfg, recompute=recompute), sp, zero, CP_OPTIM)
            losses_, norms = train(model, opt, ctx, STEPS, cfg)
            weight_err = all_max(max_rel_err(model.full_state(), refs[name][2]), ctx)
            if ctx.rank == 0:
                out.setdefault("training", {})[(layout, name)] = dict(
                    losses=losses_, norms=norms, weight_err=weight_err, ref_losses=refs[name][0],
                    ref_norms=refs[name][1])


def _checkpoints(out: dict, root: Path) -> None:
    """A DP1 x CP2 run of the Llama saves after 2 steps and goes on for 2; every layout loads it and goes on."""
    ctx = build_parallel_context(1, world_size=2, cp_size=2)
    group = dist.new_group([0, 1])
    root = root / "ckpt"
    source = None
    if ctx is not None:
        model, opt = build(ctx, LLAMA, False, 0)
        train(model, opt, ctx, 2, LLAMA)
        _save(model, opt, ctx, root, group)
        source = train(model, opt, ctx, 2, LLAMA, first_step=2)[0]
    ref_losses = broadcast(source)
    cells = {}
    for dp, cp in ((1, 2), (1, 1), (1, 4), (2, 2)):
        ctx = build_parallel_context(1, world_size=dp * cp, cp_size=cp)
        group = dist.new_group(list(range(dp * cp)))
        if ctx is None:
            continue
        model, opt = build(ctx, LLAMA, False, 0)
        load_state(root / "step_0000002", model, opt, ctx, process_group=group)
        losses_ = train(model, opt, ctx, 2, LLAMA, first_step=2)[0]
        if ctx.rank == 0:
            cells[(dp, cp)] = losses_
    if dist.get_rank() == 0:
        out["checkpoints"] = dict(ref_losses=ref_losses, cells=cells)


def _hang_report(out: dict, root: Path) -> None:
    """CP rank 1 stalls before its ring attention; rank 0 waits for its K/V block. Both write their hang report
    from a thread, as the watchdog does, while their main threads stall and wait."""
    ctx = build_parallel_context(1, world_size=2, cp_size=2)
    if ctx is None:
        return
    root = root / "hang"
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    lines = []
    reporter = threading.Timer(0.5, write_report, args=(root, ctx, 1, "step 7", time.time_ns(), 1.0, lines.append))
    reporter.start()
    if ctx.rank == 1:
        time.sleep(2.5)  # resilience._stall's part
    ring_attention(q, k, v, RingPlan.load_balanced(Ring(ctx.cp_group), 8, torch.device("cpu")))
    reporter.join()
    if ctx.rank == 0:
        out["hang"] = dict(summary=lines, report=(root / "rank_0.txt").read_text())


def _memory(out: dict, root: Path) -> None:
    """make bench's section 10 worker: bytes saved for backward per layer and per forward on a CP rank."""
    r = memory_worker(torch.device("cpu"), GPT2, B, [1, 2, 4], ["none", "selective", "full"])
    if dist.get_rank() == 0:
        out["memory"] = r


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    steps = [_attention, _training, _checkpoints, _hang_report, _memory]
    return run_world(steps, WORLD, tmp_path_factory.mktemp("cp"))


# ---- the tests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ATTENTION, ids=lambda c: f"C{c[0]}-S{c[1]}-N{c[2]}-G{c[3]}{'-docs' if c[4] else ''}")
def test_ring_attention_equals_dense_attention(world, case):
    r = world["attention"][case]
    names = ["output", "dq", "dk", "dv"]
    assert max(r["errors"]) < RTOL, dict(zip(names, r["errors"]))
    print(f"\n{case}: max relative error over ranks " + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, r["errors"]))
          + f"; attention calls per ring step on rank 0: {r['calls']}")


@pytest.mark.parametrize("case", [a for a in ATTENTION if not a[4]], ids=lambda c: f"C{c[0]}-S{c[1]}-G{c[3]}")
def test_ring_sends_equal_theory(world, case):
    C, S, N, G, _ = case
    theory = ring_attention_sends(B, S, G, D, C)
    sends = world["attention"][case]["sends"]
    assert sends["forward"] == [theory["forward: K/V blocks"][1]] * (C - 1)
    want = [theory["backward: dK/dV accumulators (float32)"][1], theory["backward: K/V blocks"][1]] * (C - 1)
    assert sends["backward"] == sorted(want, reverse=True)


def test_load_balanced_plan_skips_the_future_and_masks_only_the_diagonal(world):
    # rank 0 at C=4: its own block (3 calls: two causal chunks, one full), then one unmasked call per block
    assert world["attention"][(4, 64, 4, 4, False)]["calls"] == [3, 1, 1, 1]


@pytest.mark.parametrize("layout, model", [(layout, m) for layout, spec in LAYOUTS.items() for m in spec[-1]])
def test_trains_like_one_process(world, layout, model):
    r = world["training"][(layout, model)]
    assert max(r["ref_norms"]) > OPTIM.grad_clip  # clipping is active
    for step in range(STEPS):
        assert _rel(r["losses"][step], r["ref_losses"][step]) < RTOL, (step, r["losses"], r["ref_losses"])
        assert _rel(r["norms"][step], r["ref_norms"][step]) < RTOL, (step, r["norms"], r["ref_norms"])
    assert r["weight_err"] < RTOL, r["weight_err"]  # every weight, on every rank, after 8 AdamW steps
    print(f"\n{model} at {layout}: max relative difference over 8 steps: loss "
          f"{max(map(_rel, r['losses'], r['ref_losses'])):.1e}, grad norm {max(map(_rel, r['norms'], r['ref_norms'])):.1e}, "
          f"weights {r['weight_err']:.1e}")


def test_cp2_checkpoint_resumes_bitwise_and_loads_at_cp1_cp4_and_dp2(world):
    c = world["checkpoints"]
    assert c["cells"][(1, 2)] == c["ref_losses"]  # the layout that saved it: the same floats
    for (dp, cp), got in c["cells"].items():
        for a, b in zip(got, c["ref_losses"]):
            assert _rel(a, b) < RTOL, f"DP{dp} x CP{cp}: losses {got} vs uninterrupted {c['ref_losses']}"


def test_activation_memory_per_rank_equals_the_formula_at_s_over_c_and_falls_as_1_over_c(world):
    s, h, a = GPT2["seq_len"], GPT2["hidden_size"], GPT2["num_heads"]
    base = {r["recompute"]: r for r in world["memory"] if r["cp"] == 1}
    assert len(world["memory"]) == 9
    for r in world["memory"]:
        C, rc = r["cp"], r["recompute"]
        assert r["bytes"] == adapted_activation_bytes(s // C, B, h, a, 4 * h, recompute=rc), r
        assert r["bytes"] * C == base[rc]["bytes"], r
        # the whole forward too, but for a few scalars (the loss's token count) that do not scale
        assert abs(r["forward_bytes"] * C - base[rc]["forward_bytes"]) <= 16 * C, r


def test_hang_report_names_the_ring_transfer_and_the_stalled_peer(world):
    h = world["hang"]
    assert len(h["summary"]) == 1, h
    line = h["summary"][0]
    assert "rank 1 is behind: not in a collective, at tests/test_context_parallel.py" in line, line
    assert "waiting: rank 0 in recv of a K/V block" in line and "from rank 1 over CP ranks [0, 1]" in line, line
    assert "waiting in: recv of a K/V block" in h["report"], h["report"]


def _calls(Sq: int, Sk: int) -> dict[str, Call]:
    """A call of each kind on one piece; the masked one with queries that see no key (their lse must be -inf)."""
    mask = torch.rand(2, 1, Sq, Sk, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, :, 1] = False
    return {"full": Call(slice(0, Sq), slice(0, Sk), FULL), "causal": Call(slice(0, Sq), slice(0, Sq), CAUSAL),
            "masked": Call(slice(0, Sq), slice(0, Sk), MASKED, mask, ~mask.any(-1))}


def _kernel_case(kind: str, device: str, dtype=torch.float32):
    """q, k, v of one call (GQA: 4 query heads on 2 KV heads), a merged (out, lse) from another block of keys
    (the backward's inputs are the merged ones), and an output gradient."""
    g = torch.Generator().manual_seed(1)
    S = 24
    q, k, v, k2, v2, dout = (torch.randn(2, h, S, D, generator=g) for h in (4, 2, 2, 2, 2, 4))
    call = _calls(S, S)[kind]
    other = Call(slice(0, S), slice(0, S), FULL)
    o1, l1, _ = kernels.forward(q, k, v, call)  # on CPU: the reference kernel
    o2, l2, _ = kernels.forward(q, k2, v2, other)
    out, lse = torch.zeros(2, 4, S, D), torch.full((2, 4, S), float("-inf"))
    kernels.merge_(out, lse, o1, l1)
    kernels.merge_(out, lse, o2, l2)
    to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() and t.dim() == 4 else t.dtype)  # noqa: E731
    on_device = (None if t is None else t.to(device) for t in (call.mask, call.empty_rows))
    dev_call = Call(call.q, call.k, call.kind, *on_device)
    return [to(t) for t in (q, k, v, out, dout)] + [lse.to(device), dev_call], (o1, l1)


@pytest.mark.parametrize("kind", ["full", "causal", "masked"])
def test_float32_matmul_kernel_equals_the_cpu_flash_kernel(kind):
    """The `_Math` kernel (float32 and masked calls on CUDA) against ATen's CPU flash kernel: forward with its
    log-sum-exp (-inf for queries that see no key), and the backward given a merged output and log-sum-exp."""
    (q, k, v, out, dout, lse, call), (o_ref, l_ref) = _kernel_case(kind, "cpu")
    o, lse_math, _ = kernels._Math.forward(q, k, v, call)
    if call.empty_rows is not None:
        lse_math = lse_math.masked_fill(call.empty_rows, float("-inf"))
    assert rel(o, o_ref) < RTOL and torch.equal(torch.isinf(lse_math), torch.isinf(l_ref))
    assert rel(lse_math.nan_to_num(neginf=0), l_ref.nan_to_num(neginf=0)) < RTOL
    want = kernels._CPUFlash.backward(dout, q, k, v, out, lse, call, None)
    for name, got, ref in zip(("dq", "dk", "dv"), kernels._Math.backward(dout, q, k, v, out, lse, call, None), want):
        assert rel(got, ref) < RTOL, f"{kind} {name}: {rel(got, ref):.1e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["full", "causal"])
def test_cuda_flash_kernel_equals_the_float32_kernel(kind):
    (q, k, v, out, dout, lse, call), _ = _kernel_case(kind, "cuda", torch.bfloat16)
    o, lse_flash, aux = kernels._CUDAFlash.forward(q, k, v, call)
    o_ref, lse_ref, _ = kernels._Math.forward(q, k, v, call)
    assert rel(o, o_ref) < 2e-2 and rel(lse_flash, lse_ref) < 1e-2
    got = kernels._CUDAFlash.backward(dout, q, k, v, out, lse, call, aux)
    for name, a, b in zip(("dq", "dk", "dv"), got, kernels._Math.backward(dout, q, k, v, out, lse, call, None)):
        assert rel(a, b) < 2e-2, f"{kind} {name}: {rel(a, b):.1e}"


# ---- end to end: train.py under torchrun ------------------------------------------------------------------

# GQA and RoPE; 2 layers, h=64, s=64; one validation batch at the end
E2E = ["model=llama-tiny", *SMALL, "train.steps=4", "checkpoint.every=2", "train.eval_iters=1"]


@pytest.fixture(scope="module")
def cp2_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cp2") / "run"
    torchrun(2, *E2E, "parallel.cp=2", f"run_dir={run}")
    return run


def test_cp2_run_resumes_bitwise_and_loads_on_one_process(cp2_run, tmp_path):
    resumed = shutil.copytree(cp2_run, tmp_path / "resumed")
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    torchrun(2, *E2E, "parallel.cp=2", f"run_dir={resumed}")
    assert losses(resumed) == losses(cp2_run)  # steps 3 and 4 again: the same floats
    val = [m["val_loss"] for m in metrics(cp2_run) if "val_loss" in m]
    assert [m["val_loss"] for m in metrics(resumed) if "val_loss" in m] == val

    one = tmp_path / "one"
    python_train(*E2E, f"checkpoint.load={cp2_run / 'checkpoints' / 'step_0000002'}", f"run_dir={one}")
    got, want = losses(one), losses(cp2_run)
    assert sorted(got) == [3, 4]
    for step in got:
        assert _rel(got[step], want[step]) < RTOL, (got, want)
    assert _rel([m["val_loss"] for m in metrics(one) if "val_loss" in m][0], val[0]) < RTOL


@pytest.mark.slow  # the in-process world loads the CP=2 checkpoint at CP=4 (and DP2 x CP2) already
def test_cp2_run_loads_at_cp4(cp2_run, tmp_path):
    run = tmp_path / "cp4"
    torchrun(4, *E2E, "parallel.cp=4", f"checkpoint.load={cp2_run / 'checkpoints' / 'step_0000002'}", f"run_dir={run}")
    got, want = losses(run), losses(cp2_run)
    assert "CP groups: [0, 1, 2, 3]" in (run / "train.log").read_text()
    assert sorted(got) == [3, 4] and all(_rel(got[s], want[s]) < RTOL for s in got), (got, want)


@pytest.mark.slow  # test_hang_report_names_the_ring_transfer_and_the_stalled_peer checks the report in-process
def test_hang_in_ring_attention_names_the_stalled_rank(tmp_path):
    run = tmp_path / "run"
    # GPT-2 (no buffers: DDP broadcasts a Llama's RoPE frequencies before every forward), step 3 (step 2 begins
    # with DDP's one-time broadcast of its bucket order): the first thing rank 0 waits for is the all-reduce of the
    # step's target count over DP x CP (token_loss.token_weights), then the ring; the in-process test stalls a
    # rank inside the ring
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *SMALL, "parallel.cp=2",
           "train.steps=20", "train.hang_timeout_s=6", f"run_dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), "MEGATRON_LITE_FAULT": "stall:rank=1:step=3:seconds=120"},
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    summary = re.findall(r"^error: hang in step 3: .*$", out, re.M)
    assert proc.returncode != 0 and "exitcode  : 3" in out and len(summary) == 1, out[-4000:]
    print("\n" + summary[0])
    assert "rank 1 is behind: not in a collective, at megatron_lite/resilience.py" in summary[0]
    assert "waiting: rank 0 in all_reduce over ranks [0, 1]" in summary[0], summary[0]


@pytest.mark.slow
def test_hf_checkpoint_load_at_cp2_trains_like_one_process(cp2_run, tmp_path):
    """A random HF Llama (GQA, RoPE) as checkpoint.load, tokenized with the CP=2 run's tokenizer: 2 steps at
    DP1 x CP2 give the single process's losses."""
    from test_hf import _llama
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    _llama(4, 2, vocab_size=4096, max_position_embeddings=128).save_pretrained(hf_dir)
    args = [*E2E, "train.steps=2", f"checkpoint.load={hf_dir}",
            f"data.tokenizer={cp2_run / 'checkpoints' / 'step_0000002' / 'tokenizer.model'}"]
    torchrun(2, *args, "parallel.cp=2", f"run_dir={tmp_path / 'cp2'}")
    python_train(*args, f"run_dir={tmp_path / 'one'}")
    got, want = losses(tmp_path / "cp2"), losses(tmp_path / "one")
    assert sorted(got) == [1, 2] and all(_rel(got[s], want[s]) < RTOL for s in got), (got, want)
