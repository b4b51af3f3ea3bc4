"""The benchmark suite's own checks: the DTensor peer equals megatron-lite, collectives equal theory,
activation memory equals the adapted Korthikanti formula (and falls as 1/T under SP)."""
import contextlib
import json
import math
import threading

import pytest
import torch

from distributed import run_distributed
from megatron_lite.model import GPT, GPTConfig
from megatron_lite.optim import finalize_model_grads
from megatron_lite.parallel import build_parallel_context

from benchmarks import run, theory
from benchmarks.host_memory import AllocationPeak
from benchmarks.dtensor_gpt import build_dtensor_gpt, dtensor_loss_and_backward, full_grad
from benchmarks.measure import comm_worker, memory_worker, no_tp_collectives
from megatron_lite.comm_count import CollectiveCounter

CFG = dict(vocab_size=256, seq_len=16, num_layers=2, hidden_size=32, num_heads=4, dropout=0.0, seed=7)
B = 3


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _peer_worker():
    ctx = build_parallel_context(2)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CFG["vocab_size"], (B, CFG["seq_len"] + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :4] = -100
    tokens = tokens[:, :-1]
    for sp in (False, True):
        ml = GPT(GPTConfig(**CFG, sequence_parallel=sp), ctx)
        dt = build_dtensor_gpt(ml.config, ctx.tp_group, ml.full_state(), sp)
        loss_ml = ml(tokens, targets)
        loss_ml.backward()
        finalize_model_grads(ml)
        loss_dt = dtensor_loss_and_backward(dt, tokens, targets)
        assert abs(loss_ml.item() - loss_dt.item()) / loss_ml.item() < 1e-5, (sp, loss_ml.item(), loss_dt.item())
        ml_grads = ml.full_state(grads=True)
        dt_params = dict(dt.named_parameters())  # the tied lm_head is wte (named once)
        assert set(dt_params) == set(ml_grads), set(dt_params) ^ set(ml_grads)
        for name, grad in ml_grads.items():
            err = _rel(full_grad(dt_params[name]), grad)
            assert err < 1e-5, f"sp={sp} {name}: gradient relative error {err:.2e}"


def test_dtensor_peer_computes_megatron_lite_loss_and_gradients_at_T2():
    run_distributed(_peer_worker, 2)


def _no_collectives_worker():
    ctx = build_parallel_context(2)
    tokens = torch.randint(0, CFG["vocab_size"], (B, CFG["seq_len"]), generator=torch.Generator().manual_seed(5))
    for sp in (False, True):
        model = GPT(GPTConfig(**CFG, sequence_parallel=sp), ctx)
        counted = {}
        for stand_in in (False, True):
            with CollectiveCounter() as log, (no_tp_collectives() if stand_in else contextlib.nullcontext()):
                model(tokens, tokens).backward()
            counted[stand_in] = len(log.calls)
            assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters()), (sp, stand_in)
            model.zero_grad(set_to_none=True)
        # the decomposition in section 1 is only right if the stand-in leaves no collective behind
        assert counted[False] > 0 and counted[True] == 0, (sp, counted)


def test_section1_step_without_collectives_issues_none_and_runs_every_op():
    run_distributed(_no_collectives_worker, 2)


def _comm_and_memory_worker():
    layouts = [(1, False), (2, False), (2, True), (4, False), (4, True)]  # DP = 4 / T, DDP when DP > 1
    for kw, lays in ((CFG, layouts), (dict(CFG, recompute="full"), [(2, False), (2, True)])):
        for r in comm_worker(torch.device("cpu"), kw, B, lays):
            tag = f"T={r['T']} sp={r['sp']} dp={r['dp']} {kw.get('recompute', 'none')}"
            assert r["equal"], f"{tag}: measured {r['measured']} != theory {r['expected']}"
            assert r["local_params"] == theory.local_params(GPTConfig(**kw), r["T"]), tag
            if r["dp"] > 1:
                assert sum(r["dp_buckets"]) == r["local_params"], tag
    # bf16 autocast: every activation collective moves bf16 (the cross-entropy's statistics and the gradients
    # stay float32), and its bytes equal theory's in bf16
    for r in comm_worker(torch.device("cpu"), CFG, B, [(2, False), (2, True), (4, True)], dtype="bfloat16"):
        assert r["equal"], f"bf16 T={r['T']} sp={r['sp']}: measured {r['measured']} != theory {r['expected']}"
        act = CFG["seq_len"] * B * CFG["hidden_size"] * 2
        assert all(m["dtype"] == "bfloat16" for m in r["measured"] if m["bytes"] == act), r["measured"]
    s, h, a = CFG["seq_len"], CFG["hidden_size"], CFG["num_heads"]
    for dtype in ("float32", "bfloat16"):
        mem = memory_worker(torch.device("cpu"), CFG, B, [1, 2, 4], ["none", "selective", "full"], dtype=dtype)
        assert len(mem) == 15
        per_T1 = {r["recompute"]: r["bytes"] for r in mem if r["T"] == 1}
        for r in mem:
            adapted = theory.adapted_activation_bytes(s, B, h, a, 4 * h, r["T"], r["sp"], r["recompute"],
                                                      dtype=None if dtype == "float32" else dtype)
            assert r["bytes"] == adapted, (r, adapted)
            if r["sp"]:  # sequence parallelism: every saved activation is split, so memory falls as 1/T exactly
                assert r["bytes"] * r["T"] == per_T1[r["recompute"]], r


def test_allocation_peak_counts_what_a_region_keeps_and_frees_on_any_thread():
    """The DDP bytes per parameter were once 20 instead of 16: gloo's worker thread freed DDP's first buckets,
    the profiler records events on the threads it follows only, and the free went missing."""
    with AllocationPeak() as m:
        kept = [torch.empty(1000), torch.empty(10)]
    assert (m.peak, m.net, m.largest) == (4040, 4040, 4000)
    box = [None]
    with AllocationPeak() as m:
        box[0] = torch.empty(1 << 20)
        worker = threading.Thread(target=box.clear)  # the last reference dies on another thread
        worker.start()
        worker.join()
    assert (m.peak, m.net) == (4 << 20, 0)
    with AllocationPeak() as m:  # tensors held before the region, freed in it
        del kept
    assert (m.peak, m.net) == (0, -4040)


def test_collectives_equal_theory_and_activation_memory_equals_adapted_table2():
    """Communication for T=2 and 4, SP on and off (and DP by DDP, and full recompute), float32 and bf16 autocast;
    memory at T=1, 2, 4, float32 and bf16 autocast."""
    run_distributed(_comm_and_memory_worker, 4)


@pytest.mark.slow  # the sections' output and numbers: the section tests here; this is `make bench`'s own CLI
def test_cli_writes_json_with_the_machine_and_skips_mfu_without_gpu(tmp_path):
    """`make bench`'s CLI at --quick shapes: sections 1 (the peer, the decomposition), 5 (MFU: skipped) and 7."""
    out = tmp_path / "bench.json"
    run.main(["--quick", "--sections", "1,5,7", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    # section 1 runs end to end: both contenders computed the same loss, and the profiler found the matmuls and
    # attention by the op names the arithmetic is summed from (a renamed op would make it 0)
    for key, r in res["peer"].items():
        assert r["loss_rel_diff"] < 1e-5, (key, r["loss_step0"])
        prof = r["profile"]["megatron-lite"]
        assert prof["matmul_ms"] > 0 and prof["attention_ms"] > 0 and r["decomposition"]["arithmetic_s"] > 0, (key, prof)
    assert res["mfu"] == {"skipped": "no GPU"}
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"] == torch.__version__ and res["machine"]["cpu"]
    assert any("skipped: no GPU" in line for line in res["report"])
    # section 7: the distributed optimizer's state and collectives equal theory; zero=1's state is 1/DP of the
    # buckets, padded to a multiple of lcm(DP, 128) elements each (Megatron-Core's alignment)
    zero = res["zero"]
    assert [(r["dp"], r["tp"]) for r in zero["static"]["state"]] == [(1, 1), (2, 1), (4, 1), (2, 2)]
    for r in zero["static"]["state"]:
        padding = r["padded"] - r["1"]["local"]
        assert r["0"]["bytes"] == r["0"]["theory"] and 0 <= padding < math.lcm(r["dp"], 128) * r["buckets"], r
        assert r["1"]["bytes"] == r["1"]["theory"] + 8 * padding // r["dp"], r
    assert [r["equal"] for r in zero["static"]["comm"]] == [True, True]
    finalize = zero["timing"]["finalize"]  # 2 micro-batches per step: the hooks fired twice per parameter
    assert finalize["replicated_all_reduces"] == {"finalize_model_grads (coalesced)": 1,
                                                  "per-parameter hooks (before)": 2 * finalize["replicated_params"]}


def test_theory_matches_the_paper_formulas():
    # float32 adaptation = 2 x Table 2 without dropout masks, the 5as/h term replaced by the log-sum-exp
    s, b, h, a = 256, 4, 512, 8
    sbh, sb = s * b * h, s * b
    assert theory.adapted_activation_bytes(s, b, h, a, 4 * h) == sbh * (64 + 4 * a / h) + 16 * sb
    assert theory.adapted_activation_bytes(s, b, h, a, 4 * h, t=4) == sbh * (16 + 48 / 4 + 4 * a / (h * 4)) + 16 * sb
    assert theory.korthikanti_table2(s, b, h, a, t=2) == sbh * (10 + 12 + 5 * a * s / (2 * h))
    assert theory.korthikanti_table2(s, b, h, a, t=2, sp=True, recompute="selective") == sbh / 2 * 34
    cfg = GPTConfig(vocab_size=50304, seq_len=1024, num_layers=12, hidden_size=768, num_heads=12)
    assert theory.non_embedding_params(cfg) == 12 * (12 * 768 * 768 + 13 * 768) + 2 * 768  # GPT-2 small: 85 M
    assert theory.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert theory.peak_tflops("NVIDIA H100 PCIe") == 756.0


def _optimizations_worker():
    from benchmarks.measure import optimizations_worker
    caps = {"small": 0.03, "one": 1024}  # ~130 KiB of gradients: several buckets, and one
    r = optimizations_worker(torch.device("cpu"), CFG, B, 1, 1, [False, True], caps, ["none", "selective", "full"])
    for res in r["tp_overlap"] + [r["dp_overlap"], r["recompute"]]:  # every contender does the same math
        assert all(d == 0 for d in res["loss_max_diff"].values()), res["loss_max_diff"]
    dp = r["dp_overlap"]
    assert len(dp["buckets"]["small"]) > 1 and len(dp["buckets"]["one"]) == 1, dp["buckets"]
    assert all(sum(b) == dp["local_params"] for b in dp["buckets"].values())
    mem = r["recompute"]["memory"]
    s, h, a = CFG["seq_len"], CFG["hidden_size"], CFG["num_heads"]
    for rc, m in mem.items():
        assert m["layer_bytes"] == theory.adapted_activation_bytes(s, B, h, a, 4 * h, 2, True, rc), (rc, m)
    assert mem["full"]["forward_bytes"] < mem["selective"]["forward_bytes"] < mem["none"]["forward_bytes"], mem


def test_optimization_contenders_compute_the_same_losses():
    """Section 6: overlap on/off, DDP bucket caps and recompute modes change the schedule, not the math."""
    run_distributed(_optimizations_worker, 2)


@pytest.mark.slow
def test_data_preparation_section_runs_and_prints(tmp_path):
    """Section 9 at --quick sizes runs and reports both corpus sizes and both worker counts."""
    out = tmp_path / "bench.json"
    res = run.main(["--quick", "--sections", "9", "--out", str(out)])["data"]
    assert [r["mb"] for r in res["sizes"]] == [2, 8] and set(res["workers"]) == {1, 2}
    assert res["workers"][1]["text_bytes"] == res["workers"][2]["text_bytes"] > 2e6
    assert res["hf"]["pipeline"] > 0 and res["hf"]["pieces"] > 0 and len(res["long_line"]) == 4
    assert any("== 9. data preparation" in line for line in json.loads(out.read_text())["report"])


@pytest.mark.parametrize("P,V,m", [(2, 1, 4), (2, 1, 8), (4, 1, 8), (2, 2, 4), (2, 2, 8), (4, 2, 8), (4, 2, 16)])
def test_replayed_bubble_of_the_schedules_is_the_papers(P, V, m):
    """Section 11's op-timeline replay of the 1F1B and interleaved orders, uniform pass times (t_b = 2 t_f):
    the bubble is (P - 1) / (V m) (Narayanan et al. 2021, section 2.2)."""
    from benchmarks.pipeline import replay
    from megatron_lite.pipeline_parallel import compute_order
    per_rank = [dict(stage=s, tp_rank=0, trace=[(a.op, a.microbatch, a.chunk, 0.0, 0.0) for a in
                                                 compute_order("interleaved" if V > 1 else "1f1b", P, V, m, s)])
                for s in range(P)]
    r = replay(per_rank, P, V, {"F": 1.0 / V, "B": 2.0 / V})
    assert r["busy"] == 3 * m and abs(r["bubble"] - (P - 1) / (V * m)) < 1e-12, r


@pytest.mark.slow
def test_pipeline_section_runs_and_equals_theory(tmp_path):
    """Section 11 at --quick sizes: replayed bubbles equal (P-1)/(Vm), p2p bytes equal theory exactly, stage 0's
    peak activation memory within 1% of in-flight x layers x the per-layer formula (P > 1)."""
    res = run.main(["--quick", "--sections", "11", "--out", str(tmp_path / "bench.json")])["pipeline"]
    assert [(r["P"], r["V"], r["T"]) for r in res] == [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 1, 1), (4, 2, 1), (2, 1, 2)]
    for r in res:
        assert abs(r["replay_uniform"]["bubble"] - r["theory_bubble"]) < 1e-12, r["replay_uniform"]
        if r["P"] > 1:
            assert r["p2p_measured"] == r["p2p_theory"]
        if r["P"] > 1 and r["T"] == 1:
            assert abs(r["stage0_peak"] / r["stage0_theory"] - 1) < 0.01, (r["stage0_peak"], r["stage0_theory"])
