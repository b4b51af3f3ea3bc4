"""megatron-lite benchmark suite: `python -m benchmarks.run [--quick] [--out FILE] [--sections 1,2,...,12]`.

1. against the peer: train-step time of megatron-lite / PyTorch-native TP (DTensor), T=2, SP off and on
2. communication: every collective of a train step, counted, against the Megatron analysis (theory.py)
3. activation memory per layer, measured, against Korthikanti et al. 2022 Table 2 (and its float32 adaptation)
4. scaling: tokens/s for TP = 1, 2, 4 and the DP x TP layouts of 4 processes, fixed global batch
5. MFU on one GPU (gpt2-small, bf16 autocast), PaLM's formula; skipped without CUDA
6. optimizations, before and after: column-parallel grad-reduce overlap, DP gradient reduction overlapped with
   backward (DDP buckets), recompute none/selective/full (time, and the memory of section 3)
7. the distributed optimizer (parallel.zero=1): AdamW state per rank against theory at DP = 1, 2, 4; the DP
   collectives of a step against theory; step time against zero=0 and with its overlaps off; the coalesced
   gradient finalization against the per-parameter hooks it replaced
8. run guards (resilience.py): a train step with and without the hang watchdog and the per-step stop
   agreement, flight recorder off and on; each piece alone
9. data preparation: throughput per worker against the tokenizer's own encode speed (sentencepiece and a Hugging
   Face tokenizer), 1 vs 2 workers; a single 50 MB line's peak memory against ordinary text's; peak
   memory and time of preparing a ~100 MB and a ~400 MB corpus (the stdlib source, repeated)
10. context parallelism (benchmarks/context_parallel.py): activation memory per rank against the formula at
   C = 1, 2, 4; ring traffic per layer against theory; a sequence that fits a memory budget only at C = 4
11. pipeline parallelism: the bubble of the executed 1F1B and interleaved schedules at P = 2 and 4 (op-timeline
   replay) against (P - 1) / (V m), step time as context; p2p bytes per step against 2 (PV - 1) m s b h bytes
   (/T under SP); stage 0's activation memory against P micro-batches x L/P layers x the per-layer formula
12. ready for GPUs, measured on CPU: start-up with and without the weights' draw (a resume), the cross-entropy's
   peak bytes, DDP's bytes per parameter, a zero=1 checkpoint's allocations, torch.compile's graphs; the GPU
   itself: `make gpu-check` (benchmarks/gpu_check.py)

CPU: gloo, N spawned processes with one thread each. GPUs: NCCL, one process per GPU; a job that needs more
processes than there are GPUs runs on CPU (and says so). Sections 2 and 3 count things that do not depend
on the device and always run on CPU; so does section 6 (2 processes). Prints tables and writes the numbers
to a JSON file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from megatron_lite.resilience import FLIGHT_RECORDER_ENTRIES

from . import context_parallel, data_prep, guards, measure, pipeline, readiness, theory, zero
from .launch import launch

BENCH = dict(vocab_size=4096, seq_len=256, num_layers=4, hidden_size=512, num_heads=8, dropout=0.0, seed=0)
SMALL = dict(BENCH, hidden_size=256, num_heads=4)  # section 1 context: less compute per collective and per op
QUICK = dict(vocab_size=256, seq_len=32, num_layers=2, hidden_size=64, num_heads=4, dropout=0.0, seed=0)
GPT2_SMALL = dict(vocab_size=50257, seq_len=1024, num_layers=12, hidden_size=768, num_heads=12, dropout=0.0)
PIPELINE = dict(SMALL, num_layers=8)  # section 11: m micro-batches per step through 8 layers, at 6 layouts
GOAL = 0.78  # megatron-lite / DTensor train-step time
ARITH_GOAL = 1.3  # megatron-lite's step time / the time of its matmuls and attention


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                gpus=gpus, loadavg_start=list(os.getloadavg()))


def mib(x: float) -> str:
    return f"{x / 2**20:.3f}"


def human_bytes(n: int) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.4g} {unit}"
    return f"{n} B"


class Report:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = ""):
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list]):
        cells = [header] + [[str(c) for c in r] for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        for k, r in enumerate(cells):
            self("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if k == 0:
                self("  ".join("-" * w for w in widths))


def shape_str(kw: dict, b: int) -> str:
    return (f"L={kw['num_layers']} h={kw['hidden_size']} a={kw['num_heads']} s={kw['seq_len']} "
            f"V={kw['vocab_size']} b={b}")


def section_peer(rep: Report, args, shapes: dict[str, dict], dev) -> dict:
    b = args.micro_batch
    rep(f"== 1. megatron-lite vs PyTorch-native TP (DTensor), T=2, float32, micro-batch {b}, AdamW, no clipping")
    rep(f"   device {dev}; {args.steps} steps after {args.warmup} warm-up, the two alternating step by step in the "
        f"same 2 processes; s/step = median of the slowest rank's step time; vs arithmetic = s/step / the self time "
        f"of the matmuls and attention in a profiled step (rank 0, median of 3): the overhead of everything else")
    for name, kw in shapes.items():
        rep(f"   {name}: {shape_str(kw, b)}")
    res = launch(measure.ab_worker, 2, shapes, b, args.warmup, args.steps, [False, True], args.profile,
                 device_type=dev)
    rows = []
    for key, r in res.items():  # the goals are stated for the brief's shape; other shapes are context
        arith = r["vs_arithmetic"]
        brief = r["config"] == BENCH
        verdict = ("met" if r["ratio"] <= GOAL else "NOT met") if brief else "(context)"
        arith_verdict = ("met" if arith["megatron-lite"] <= ARITH_GOAL else "NOT met") if brief else "(context)"
        rows.append([r["shape"], "on" if r["sp"] else "off", f"{r['median']['megatron-lite']:.3f}",
                     f"{r['median']['dtensor']:.3f}", f"{r['ratio']:.3f}", f"{r['paired_ratio']:.3f}", verdict,
                     f"{arith['megatron-lite']:.2f}", f"{arith['dtensor']:.2f}", arith_verdict,
                     f"{r['loss_rel_diff']:.1e}"])
    rep.table(["shape", "SP", "megatron-lite s/step", "DTensor s/step", "ratio ML/DT", "median paired ratio",
               f"goal <= {GOAL}", "ML vs arithmetic", "DT vs arithmetic", f"goal <= {ARITH_GOAL}",
               "step-0 loss rel diff"], rows)
    rep("   megatron-lite's step decomposed: the same step with every TP collective replaced by a stand-in that "
        "moves nothing (benchmarks/measure.py `no_tp_collectives`), alternating with the real step (8 each), leaves "
        "its arithmetic and its local overhead; the difference to the real step is the communication, including "
        "each collective's wait for the slower rank; the arithmetic: the step without collectives x the share of "
        "matmul + attention self time in its profiled wall time (rank 0, median of 3 profiled steps)")
    rep.table(["shape", "SP", "step s", "without collectives s", "communication + waits s", "matmul + attention s",
               "local overhead s", "without collectives / arithmetic"],
              [[r["shape"], "on" if r["sp"] else "off", f"{d['step_s']:.3f}", f"{d['without_collectives_s']:.3f}",
                f"{d['communication_s']:.3f}", f"{d['arithmetic_s']:.3f}", f"{d['local_overhead_s']:.3f}",
                f"{d['without_collectives_vs_arithmetic']:.2f}"]
               for r in res.values() for d in [r["decomposition"]] if "arithmetic_s" in d])
    for key, r in res.items():
        for name, prof in r["profile"].items():
            if not prof.get("table"):
                continue
            rep(f"-- profile of one step, {name}, {key} (rank 0; times: medians of 3 profiled steps, the table: the "
                f"last): self {'device' if dev != 'cpu' else 'CPU'} {prof['total_ms']:.0f} ms, of which matmul "
                f"{prof['matmul_ms']:.0f} ms + attention {prof['attention_ms']:.0f} ms = "
                f"{100 * (prof['matmul_ms'] + prof['attention_ms']) / prof['total_ms']:.0f}%")
            for line in prof["table"].splitlines():
                rep("   " + line)
    rep()
    return res


def section_comm(rep: Report, args, kw) -> list:
    b = args.micro_batch
    layouts = [(1, False), (2, False), (2, True), (4, False), (4, True)]
    rep(f"== 2. collectives per train step (fwd+bwd of one micro-batch, DDP over DP), 4 processes, {shape_str(kw, b)}")
    rep("   logical bytes, float32 and under bf16 autocast; counted with megatron_lite.comm_count.CollectiveCounter "
        "(DP: a DDP comm hook calling the default allreduce_hook); theory: benchmarks/theory.py")
    res = launch(measure.comm_worker, 4, kw, b, layouts) + \
        launch(measure.comm_worker, 4, kw, b, [lay for lay in layouts if lay[0] > 1], "bfloat16")
    for r in res:
        rep(f"-- DP={r['dp']} x TP={r['T']}, SP {'on' if r['sp'] else 'off'}, {r['dtype']}: measured == theory on every "
            f"rank: {'YES' if r['equal'] else 'NO'}" + (f"; DDP buckets (elements): {r['dp_buckets']}, local params "
                                                       f"{r['local_params']}" if r["dp_buckets"] else ""))
        labels: dict[tuple, list[str]] = {}
        for it in r["items"]:
            key = (it["op"], it["group_size"], it["bytes"], it["dtype"])
            labels.setdefault(key, []).append(f"{it['count']:>3} {it['label']}")
        exp = {(e["op"], e["group_size"], e["bytes"], e["dtype"]): e["count"] for e in r["expected"]}
        got = {(e["op"], e["group_size"], e["bytes"], e["dtype"]): e["count"] for e in r["measured"]}
        rows = []
        for key in sorted(set(exp) | set(got)):
            for k, label in enumerate(labels.get(key, ["  - (not in theory)"])):
                rows.append([key[0], key[1], key[3], human_bytes(key[2]), exp.get(key, 0), got.get(key, 0)] if k == 0
                            else ["", "", "", "", "", ""])
                rows[-1].append(label)
        rep.table(["op", "group", "dtype", "bytes each", "theory", "measured", "where (theory count per step)"], rows)
        total = lambda d: sum(k[2] * n for k, n in d.items())  # noqa: E731
        ring = lambda d: sum(theory.ring_bytes(*k[:3]) * n for k, n in d.items())  # noqa: E731
        rep(f"   total per step, logical: theory {human_bytes(total(exp))}, measured {human_bytes(total(got))}; "
            f"sent per rank by ring algorithms: theory {human_bytes(int(ring(exp)))}, "
            f"measured {human_bytes(int(ring(got)))}")
    rep()
    return res


def section_memory(rep: Report, args, kw) -> list:
    b = args.micro_batch
    s, h, a, F = kw["seq_len"], kw["hidden_size"], kw["num_heads"], 4 * kw["hidden_size"]
    rep(f"== 3. activation memory saved for backward, per transformer layer, per rank, {shape_str(kw, b)}, dropout 0")
    rep("   measured: saved_tensors_hooks around one block's forward, deduplicated by storage, parameters (and under "
        "autocast their bf16 copies) left out")
    rep("   Table 2: Korthikanti et al. 2022 (16-bit): sbh(34 + 5as/h); TP sbh(10 + 24/t + 5as/(ht)); "
        "TP+SP sbh/t(34 + 5as/h)")
    rep("   adapted (float32, no dropout, SDPA flash): sbh(64 + 4a/h) + 16sb; TP sbh(16 + 48/t + 4a/(ht)) + 16sb; "
        "TP+SP [sbh(64 + 4a/h) + 16sb]/t;")
    rep("   bf16 autocast: the matmuls' inputs and outputs in 2 bytes, the residual stream (LayerNorm inputs), norm "
        "statistics and log-sum-exp in 4 (benchmarks/theory.adapted_terms)")
    rep("   selective drops 4a/h (the log-sum-exp), full keeps 4sbh (/t with SP)")
    res = [r for dtype in ("float32", "bfloat16")
           for r in launch(measure.memory_worker, 4, kw, b, [1, 2, 4], ["none", "selective", "full"], dtype)]
    base = {(r["recompute"], r["dtype"]): r["bytes"] for r in res if r["T"] == 1}
    rows = []
    for r in res:
        T, sp, rc, dtype = r["T"], r["sp"], r["recompute"], r["dtype"]
        paper = theory.korthikanti_table2(s, b, h, a, T, sp, rc)
        adapted = theory.adapted_activation_bytes(s, b, h, a, F, T, sp, rc, dtype=None if dtype == "float32" else dtype)
        r.update(table2_16bit=paper, adapted=adapted, vs_T1=r["bytes"] / base[(rc, dtype)])
        rows.append([dtype, T, "on" if sp else "off", rc, mib(paper), mib(adapted), mib(r["bytes"]),
                     f"{r['bytes'] / adapted:.4f}", f"{r['vs_T1']:.4f}" + (f" (1/T = {1 / T:.4f})" if sp else "")])
    rep.table(["dtype", "T", "SP", "recompute", "Table2 16-bit MiB", "adapted MiB", "measured MiB", "measured/adapted",
               "measured / T=1"], rows)
    rep()
    return [{k: v for k, v in r.items() if k != "tensors"} | {"tensors": [list(t) for t in r["tensors"]]} for r in res]


def section_scaling(rep: Report, args, kw, dev, n_gpu) -> list:
    gb = args.global_batch
    d = dev if dev == "cuda" and n_gpu >= 4 else "cpu"
    layouts = [(1, 1, False), (2, 1, False), (2, 2, False), (2, 2, True), (4, 1, False), (4, 2, False), (4, 2, True),
               (4, 4, False), (4, 4, True)]
    rep(f"== 4. scaling: megatron-lite tokens/s, fixed global batch {gb} x {kw['seq_len']} tokens, "
        f"{shape_str(kw, gb)[:-len(f' b={gb}')]}, AdamW; device {d}")
    rep(f"   all layouts in one 4-process job, taking turns step by step ({args.scale_steps} rounds after 1 warm-up); "
        f"ranks outside a layout wait; median of the slowest rank")
    if d == "cpu" and (os.cpu_count() or 1) < 4:
        rep(f"   note: {os.cpu_count()} cores: layouts of more than {os.cpu_count()} processes oversubscribe the CPU")
    res = launch(measure.scaling_worker, 4, kw, gb, layouts, 1, args.scale_steps, device_type=d)
    base = res[0]["tokens_per_s"]
    rows = [[r["procs"], f"DP{r['dp']} x TP{r['tp']}", "on" if r["sp"] else "off", r["micro_batch"],
             f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base:.2f}"] for r in res]
    rep.table(["procs", "layout", "SP", "micro-batch", "s/step", "tokens/s", "vs 1 process"], rows)
    rep()
    for r in res:
        r["device"] = d
    return res


def section_mfu(rep: Report, args, dev) -> dict:
    rep("== 5. MFU on one GPU: gpt2-small (L=12 h=768 a=12 s=1024 V=50257), T=1, bf16 autocast, AdamW (fused); "
        "benchmarks/gpu_check.py has more (llama3.2-1b, compile, kernels)")
    if dev != "cuda":
        rep("   skipped: no GPU")
        rep()
        return {"skipped": "no GPU"}
    r = launch(measure.mfu_worker, 1, GPT2_SMALL, args.mfu_batch, 3, args.mfu_steps, device_type="cuda")
    rep(f"   micro-batch {r['micro_batch']}, {r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, "
        f"{r['flops_per_token'] / 1e9:.3f} GFLOP/token (6N + 12*L*h*s, megatron_lite.metrics)")
    rep("   MFU = tokens/s x FLOP/token / peak = " + (f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s "
                                                      f"(dense bf16)" if r["mfu"] else "n/a (GPU not in the peak table)")
        + f"; peak memory {r['peak_memory_gib']:.1f} GiB; SDPA {r['sdpa_backend']}")
    rep()
    return r


DP_CAPS = {"4 MiB buckets": 4, "25 MiB buckets (DDP default)": 25, "one bucket, after backward": 1024}


def verdict(r: dict, name: str) -> str:
    """One line on `name` against the baseline of an A/B summary: faster or slower only when at least 3/4 of
    the paired per-step ratios agree (their quartiles lie on one side of 1)."""
    p, pct = r["paired"][name], 100 * (r["ratio"][name] - 1)
    spread = f"ratio of medians {r['ratio'][name]:.3f}, quartiles of the per-step ratios {p['q1']:.2f}-{p['q3']:.2f}"
    if p["q3"] < 1:
        return f"faster by {-pct:.0f}% ({spread})"
    if p["q1"] > 1:
        return f"slower by {pct:.0f}% ({spread})"
    return f"no measurable difference ({spread}: within this machine's noise)"


def _to_hide(r: dict, baseline: str, what: str) -> str:
    """What an overlap can hide at most: the collectives it overlaps, timed alone."""
    alone = r["collectives_alone_s"]
    return (f"{what} take{'s' if what.startswith('the all-reduce') else ''} {1e3 * alone:.0f} ms alone "
            f"({100 * alone / r['median'][baseline]:.0f}% of the baseline step): the most overlap can hide")


def section_opt(rep: Report, args, kw, memory: list | None) -> dict:
    b, steps = args.micro_batch, args.opt_steps
    rep(f"== 6. optimizations, before and after: megatron-lite train steps, {shape_str(kw, b)}, AdamW; device cpu")
    rep(f"   2 processes; {steps} steps after 1 warm-up; the contenders of each group take turns step by step in the "
        f"same processes; ms/step = median of the slowest rank; the baseline is the un-optimized contender")
    res = launch(measure.optimizations_worker, 2, kw, b, 1, steps, [False, True], DP_CAPS,
                 ["none", "selective", "full"])
    rows, verdicts = [], []

    def group(what, layout, sp, r, labels):
        for k, (name, label) in enumerate(labels.items()):
            p = r["paired"][name]
            rows.append([what if k == 0 else "", layout if k == 0 else "", sp if k == 0 else "", label,
                         f"{1e3 * r['median'][name]:.0f}", f"{r['ratio'][name]:.3f}",
                         f"{p['median']:.3f} ({p['q1']:.2f}-{p['q3']:.2f})", f"{r['loss_max_diff'][name]:.1e}"])

    for r in res["tp_overlap"]:
        sp = "on" if r["sp"] else "off"
        group("a. column-parallel input-grad " + ("reduce-scatter" if r["sp"] else "all-reduce") + " || dW",
              f"DP1 x TP{r['T']}", sp, r, {"overlap": "overlapped (default)", "no overlap": "before dW (baseline)"})
        what = f"the step's {r['collectives']} {'reduce-scatters' if r['sp'] else 'all-reduces'} of " \
               f"{human_bytes(r['collective_bytes'])}"
        verdicts.append(f"a. TP overlap, SP {sp}: {verdict(r, 'overlap')}; {_to_hide(r, 'no overlap', what)}")
    r = res["dp_overlap"]
    labels = {name: f"{name} ({len(r['buckets'][name])})" for name in DP_CAPS}
    group("b. DP grad all-reduce || backward", f"DP{r['dp']} x TP1", "off", r, labels)
    for name in list(DP_CAPS)[:-1]:
        verdicts.append(f"b. DP overlap, {name}: {verdict(r, name)}")
    what = f"the all-reduce of all {human_bytes(r['collective_bytes'])} of gradients, in one go,"
    verdicts.append(f"b. DP overlap: {_to_hide(r, list(DP_CAPS)[-1], what)}")
    rep.table(["optimization", "layout", "SP", "contender (DDP: number of buckets)", "ms/step", "vs baseline",
               "per-step ratio: median (quartiles)", "loss max |diff|"], rows)
    rep("   DDP buckets (elements, last step): " + "; ".join(f"{k}: {v}" for k, v in r["buckets"].items())
        + f"; local params {r['local_params']}")

    r = res["recompute"]
    sec3 = {m["recompute"]: m["bytes"] for m in memory or [] if m["T"] == r["T"] and m["sp"] == r["sp"]
            and m.get("dtype", "float32") == "float32"}
    rep(f"-- c. activation recomputation (model.recompute), DP1 x TP{r['T']}, SP on: time and what it saves; "
        f"memory = bytes saved for backward on one rank")
    rows = []
    for rc, m in r["memory"].items():
        p = r["paired"][rc]
        same = "" if rc not in sec3 else (" (= section 3)" if sec3[rc] == m["layer_bytes"] else " (!= section 3)")
        rows.append([rc, f"{1e3 * r['median'][rc]:.0f}", f"{r['ratio'][rc]:.3f}",
                     f"{p['median']:.3f} ({p['q1']:.2f}-{p['q3']:.2f})", mib(m["layer_bytes"]) + same,
                     mib(m["forward_bytes"]), f"{r['loss_max_diff'][rc]:.1e}"])
    rep.table(["recompute", "ms/step", "vs none", "per-step ratio: median (quartiles)", "per layer MiB",
               "whole forward MiB", "loss max |diff|"], rows)
    base = r["memory"]["none"]
    for rc in ("selective", "full"):
        m = r["memory"][rc]
        verdicts.append(f"c. recompute={rc}: saves {mib(base['layer_bytes'] - m['layer_bytes'])} MiB per layer "
                        f"({100 * (1 - m['layer_bytes'] / base['layer_bytes']):.1f}%), "
                        f"{mib(base['forward_bytes'] - m['forward_bytes'])} MiB of the whole forward; step time: "
                        + verdict(r, rc))
    for line in verdicts:
        rep("   verdict " + line)
    rep()
    return res


def section_zero(rep: Report, args, kw) -> dict:
    b, steps = args.micro_batch, args.opt_steps
    rep(f"== 7. the distributed optimizer (parallel.zero=1: ZeRO-1 over DP), {shape_str(kw, b)}, AdamW, "
        f"fp32; device cpu")
    static = launch(zero.zero_static_worker, 4, kw, b)
    rep("-- a. AdamW state per rank (exp_avg + exp_avg_sq): measured = bytes of the optimizer's state tensors; "
        "theory 8 B x P_local (zero=0), 8 B x P_local / DP (zero=1)")
    rows = []
    for r in static["state"]:
        z0, z1 = r[0], r[1]
        rows.append([f"DP{r['dp']} x TP{r['tp']}", f"{z0['local']:,}", f"{z0['bytes']:,}", f"{z0['theory']:,}",
                     f"{z1['bytes']:,}", f"{z1['theory']:,}", f"{z1['bytes'] - z1['theory']:,}",
                     f"{r['padded'] - z1['local']} in {r['buckets']}", f"{z1['bytes'] / z0['bytes']:.4f}"])
    rep.table(["layout", "P_local", "zero=0 bytes", "theory", "zero=1 bytes", "theory", "zero=1 - theory",
               "padding elements in buckets", "zero=1 / zero=0"], rows)
    rep("-- b. collectives of one optimizer step over the DP group, DP2 x TP2 SP, counted with CollectiveCounter "
        "(DDP's through a comm hook calling its default all-reduce) against theory.zero_dp_collectives; logical bytes")
    rows = []
    for r in static["comm"]:
        for op in sorted(set(r["measured"]) | set(r["expected"])):
            (tc, tb), (mc, mb) = r["expected"].get(op, (0, 0)), r["measured"].get(op, (0, 0))
            rows.append([f"zero={r['zero']}", op, tc, human_bytes(tb), mc, human_bytes(mb),
                         human_bytes(int(theory.ring_bytes(op, r["dp"], mb)))])
    rep.table(["", "op over DP", "theory calls", "theory bytes", "measured calls", "measured bytes",
               "sent per rank by a ring"], rows)
    for r in static["comm"]:
        rep(f"   zero={r['zero']}: measured == theory on every rank (DP and TP): {'YES' if r['equal'] else 'NO'}; "
            f"TP all-reduces per step {r['tp_all_reduces']} (cross-entropy 2, grad norm 1, the SP-replicated "
            f"gradients 1: {r['finalize_numel']:,} elements{' owned by rank 0' if r['zero'] else ''})")
    timing = launch(zero.zero_time_worker, 2, kw, b, 2, 1, steps)
    r = timing["dp"]
    rep(f"-- c. step time, DP{r['dp']} x TP1, one micro-batch of {b}, {steps} steps after 1 warm-up, the contenders "
        f"taking turns step by step (ms/step: median of the slowest rank); zero=1 in {r['buckets']} bucket(s)")
    _ab_table(rep, r)
    a = r["alone"]
    rep(f"   the DP collectives alone, {human_bytes(a['bytes'])} of gradients or parameters: all-reduce "
        f"{1e3 * a['all_reduce']:.0f} ms; reduce-scatter {1e3 * a['reduce_scatter']:.0f} ms + all-gather "
        f"{1e3 * a['all_gather']:.0f} ms (gloo's reduce-scatter runs a whole all-reduce underneath)")
    for name in list(r["median"])[1:]:
        rep(f"   verdict {name} vs zero=0: {verdict(r, name)}")
    r = timing["finalize"]
    counts = r["replicated_all_reduces"]
    rep(f"-- d. the SP-replicated gradients' TP sum, DP1 x TP{r['tp']} SP, zero=0, {r['accum']} micro-batches of "
        f"{r['micro_batch']} per step: all-reduces of them per step: "
        + ", ".join(f"{n}: {c}" for n, c in counts.items()) + f" ({r['replicated_params']} replicated parameters)")
    _ab_table(rep, r)
    rep(f"   verdict finalize_model_grads vs the hooks: {verdict(r, 'finalize_model_grads (coalesced)')}")
    rep()
    return dict(static=static, timing=timing)


def _ab_table(rep: Report, r: dict) -> None:
    rows = [[name, f"{1e3 * r['median'][name]:.0f}", f"{r['ratio'][name]:.3f}",
             f"{r['paired'][name]['median']:.3f} ({r['paired'][name]['q1']:.2f}-{r['paired'][name]['q3']:.2f})",
             f"{r['loss_max_diff'][name]:.1e}"] for name in r["median"]]
    rep.table(["contender", "ms/step", "vs baseline", "per-step ratio: median (quartiles)", "loss max |diff|"], rows)


def section_guards(rep: Report, args, kw) -> dict:
    b, steps = args.micro_batch, args.opt_steps
    rep("== 8. run guards (megatron_lite/resilience.py): hang watchdog, flight recorder, per-step stop agreement; "
        "device cpu")
    rep(f"   a. DP2 x TP2 + SP train steps, 4 processes, {shape_str(kw, b)}, AdamW, flight recorder on; bare and "
        f"guarded (arm + agreement) take turns step by step, {steps} steps after 1 warm-up")
    res = launch(guards.step_worker, 4, kw, 2, b, 1, steps)
    rows = [[name, f"{1e3 * res['median'][name]:.1f}", f"{res['ratio'][name]:.3f}",
             f"{res['paired'][name]['median']:.3f} ({res['paired'][name]['q1']:.2f}-{res['paired'][name]['q3']:.2f})"]
            for name in ("bare", "guarded")]
    rep.table(["contender", "ms/step", "vs bare", "per-step ratio: median (quartiles)"], rows)
    rep(f"   b. one process, no network: CPU time per call, best of {args.guard_rounds} rounds of {args.guard_calls} "
        f"calls, in alternating jobs with the flight recorder off and on")
    calls = {"off": [], "on": []}
    for _ in range(args.guard_jobs):
        for name, size in (("off", "0"), ("on", str(FLIGHT_RECORDER_ENTRIES))):
            saved = os.environ.get("TORCH_FR_BUFFER_SIZE")
            os.environ["TORCH_FR_BUFFER_SIZE"] = size  # inherited by the spawned process
            try:
                calls[name].append(launch(guards.call_worker, 1, args.guard_calls, args.guard_rounds))
            finally:
                os.environ.pop("TORCH_FR_BUFFER_SIZE") if saved is None else os.environ.update(TORCH_FR_BUFFER_SIZE=saved)
    best = {name: min(c["allreduce_s"] for c in cs) for name, cs in calls.items()}
    arm = min(c["arm_s"] for cs in calls.values() for c in cs)
    per_collective = best["on"] - best["off"]  # below 0: within the noise
    rep.table(["flight recorder", "1-element all-reduce us (best)", "recorded"],
              [[name, f"{1e6 * best[name]:.2f}", all(c["recorded"] for c in calls[name])] for name in calls])
    n = res["collectives_per_step"]
    expected = n * max(0.0, per_collective) + arm + res["agreement_s"]
    rep(f"   arm(): {1e9 * arm:.0f} ns; agreement (4 processes): {1e6 * res['agreement_s']:.0f} us; flight recorder: "
        f"{1e6 * per_collective:.2f} us per collective (on - off{': below the noise' if per_collective <= 0 else ''}) "
        f"x {n} collectives per step (its own count, DDP's included)")
    rep(f"   theory: {n} x {1e6 * max(0.0, per_collective):.2f} us + arm + agreement = {1e3 * expected:.3f} ms per step = "
        f"{100 * expected / res['median']['bare']:.2f}% of the bare step; measured: guarded vs bare "
        + verdict(res, "guarded"))
    rep()
    return dict(steps=res, calls=calls, flight_recorder_per_collective_s=per_collective, arm_s=arm,
                expected_s=expected)


def section_data(rep: Report, args) -> dict:
    sizes, slice_mb = ([2, 8], 2) if args.quick else ([100, 400], 20)
    settings = dict(vocab_size=512, max_tokenizer_chars=10**6) if args.quick else {}  # else: the defaults
    cores = os.cpu_count() or 1
    rep("== 9. data preparation (megatron_lite.data) of Python source: this machine's stdlib .py files, copied to size")
    rep(f"   each preparation a fresh process, data.workers = cores ({cores}) unless said; rates per CPU-second count "
        f"the preparing process and its workers (the wall-clock rate depends on the machine's load)")
    res = data_prep.run(Path(args.out).parent / "data_prep", sizes, slice_mb, 5 if args.quick else 50, **settings)
    raw, w = res["raw"], res["workers"]
    rep(f"-- a. tokenizing {raw['bytes'] / 1e6:.1f} MB with a given tokenizer (the BPE of b.), against its own encode")
    rows = [["sentencepiece encode, 1 thread (the limit)", "", f"{raw['sentencepiece']:.2f}", "1.000"],
            ["Tokenizer.encode_batch (+ <n> joins)", "", f"{raw['encode_batch']:.2f}",
             f"{raw['encode_batch'] / raw['sentencepiece']:.3f}"]]
    for n, r in w.items():
        rows.append([f"prepare_corpus, {n} worker{'s' if n > 1 else ' (in-process)'}", f"{r['mb_s']:.2f}",
                     f"{r['mb_cpu_s']:.2f}", f"{r['mb_cpu_s'] / raw['sentencepiece']:.3f}"])
    rep.table(["contender", "MB/s (wall)", "MB per CPU-second", "vs the limit"], rows)
    over = 1 - w[1]["mb_cpu_s"] / raw["sentencepiece"]
    rep(f"   verdict: pipeline overhead per worker (1 worker vs the limit, per CPU-second) {100 * over:.1f}% "
        f"({'met' if over <= 0.10 else 'NOT met'}: goal <= 10%); 2 workers / 1 worker, wall clock: "
        f"{w[2]['mb_s'] / w[1]['mb_s']:.2f}x on {cores} cores (load average now {os.getloadavg()[0]:.1f})")
    rep("-- b. the whole preparation, default data settings (sample, train the BPE on <= 20M characters, tokenize)"
        if not args.quick else "-- b. the whole preparation (--quick: vocab 512, sample <= 1M characters)")
    rows = [[f"{r['corpus_bytes'] / 1e6:.0f} MB", f"{r['seconds']:.1f}", f"{r['corpus_bytes'] / r['seconds'] / 1e6:.2f}",
             f"{r['main_kib'] / 1024:.0f}", f"{r['worker_kib'] / 1024:.0f}",
             f"{(r['main_kib'] + cores * r['worker_kib']) / 1024:.0f}"] for r in res["sizes"]]
    rep.table(["corpus", "s", "MB/s", "peak RSS MiB: main", "largest worker", f"main + {cores} x largest worker"], rows)
    small, big = res["sizes"]
    ratio = big["main_kib"] / small["main_kib"], big["worker_kib"] / small["worker_kib"]
    bound = (big["main_kib"] + cores * big["worker_kib"]) / 2**20
    rep(f"   verdict: for {big['corpus_bytes'] / small['corpus_bytes']:.1f}x the corpus, peak memory x{ratio[0]:.3f} "
        f"(main), x{ratio[1]:.3f} (worker) ({'met' if max(ratio) <= 1.10 else 'NOT met'}: goal within 10%); all "
        f"processes together at most {bound:.2f} GiB ({'met' if bound < 1 else 'NOT met'}: goal < 1 GB)")
    hf = res["hf"]
    rep(f"-- c. a Hugging Face tokenizer (a {'16384' if not args.quick else '2048'}-token byte-level BPE, GPT-2's "
        f"pipeline, trained here with `tokenizers`) on the {hf['bytes'] / 1e6:.1f} MB of a., one thread each")
    rep.table(["contender", "MB per CPU-second", "vs the limit"], [
        ["tokenizers encode_batch on ~8 KiB pieces (the limit)", f"{hf['pieces']:.2f}", "1.000"],
        ["tokenizers encode_batch on whole files", f"{hf['files']:.2f}", f"{hf['files'] / hf['pieces']:.3f}"],
        ["tokenizers encode_batch_fast (no offsets) on the pieces", f"{hf['fast']:.2f}",
         f"{hf['fast'] / hf['pieces']:.3f}"],
        ["prepare_corpus, 1 worker (in-process)", f"{hf['pipeline']:.2f}", f"{hf['pipeline'] / hf['pieces']:.3f}"]])
    share = hf["pipeline"] / hf["pieces"]
    rep(f"   verdict: the pipeline with an HF tokenizer (which calls encode_batch_fast: the same ids) runs at {share:.3f} "
        f"of the library's own encode_batch per CPU-second ({'met' if share >= 0.90 else 'NOT met'}: goal >= 0.90)")
    line = res["long_line"]
    mb = next(iter(line.values()))["text_bytes"] / 1e6
    rep(f"-- d. {mb:.0f} MB of text as ordinary lines and as one single line, 2 workers")
    rep.table(["tokenizer, text", "s", "peak RSS MiB: main", "largest worker"],
              [[k, f"{r['seconds']:.1f}", f"{r['main_kib'] / 1024:.0f}", f"{r['worker_kib'] / 1024:.0f}"]
               for k, r in line.items()])
    worst = max(max(line[f"{t}, one line"][k] / line[f"{t}, ordinary"][k] for k in ("main_kib", "worker_kib"))
                for t in ("sentencepiece", "hf"))
    rep(f"   verdict: one {mb:.0f} MB line needs at most x{worst:.3f} the peak memory of ordinary text "
        f"({'met' if worst <= 1.10 else 'NOT met'}: goal within 10%)")
    rep()
    return res


def section_pipeline(rep: Report, args, kw) -> list:
    b, m, steps = args.pp_micro_batch, args.pp_microbatches, args.pp_steps
    kw = dict(kw, num_layers=8) if args.quick else PIPELINE  # 8 layers: P x V = 8 virtual stages at P = 4, V = 2
    layouts = [(1, 1, 1, False), (2, 1, 1, False), (2, 2, 1, False), (4, 1, 1, False), (4, 2, 1, False),
               (2, 1, 2, True)]
    rep(f"== 11. pipeline parallelism, {shape_str(kw, b)}, {m} micro-batches per step, AdamW, fp32; device cpu "
        f"(4 processes on {os.cpu_count()} cores)")
    rep("   bubble = (step time - busiest stage's compute) / that compute (Narayanan et al. 2021, t_pb / t_id); "
        "replayed from each rank's recorded passes (order as executed, a pass waits for its input, communication "
        "free), with uniform pass times (t_b = 2 t_f) and with the measured median times; the measured idle "
        "fraction and step time are context: the stages' compute shares the cores")
    res = launch(pipeline.pipeline_worker, 4, kw, b, m, layouts, 1, steps)
    base = res[0]["median_s"]
    rows = []
    for r in res:
        P, V, T, sp = r["P"], r["V"], r["T"], r["sp"]
        r["theory_bubble"] = (P - 1) / (V * m)
        r["replay_uniform"] = pipeline.replay(r["per_rank"], P, V, {"F": 1.0, "B": 2.0})
        r["replay_measured"] = pipeline.replay(r["per_rank"], P, V)
        r["idle"] = pipeline.measured_idle(r["per_rank"])
        name = f"PP{P}" + (f" V={V}" if V > 1 else "") + (f" x TP{T}" + (" SP" if sp else "") if T > 1 else "")
        rows.append([name, f"{r['theory_bubble']:.4f}", f"{r['replay_uniform']['bubble']:.4f}",
                     f"{r['replay_measured']['bubble']:.4f}", f"{r['idle']:.3f}", f"{1e3 * r['median_s']:.0f}",
                     f"{r['median_s'] / base:.2f}"])
    rep.table(["layout", "theory (P-1)/(Vm)", "replay, uniform", "replay, measured", "measured idle (context)",
               "ms/step", "vs PP1"], rows)
    s, h = kw["seq_len"], kw["hidden_size"]
    rep("-- p2p bytes of one step, summed over the ranks, against theory 2 (PV - 1) m s b h x 4 B per pipeline "
        "(each TP rank its own pipeline: x T, /T under SP)")
    rows = []
    for r in res[1:]:
        P, V, T, sp = r["P"], r["V"], r["T"], r["sp"]
        r["p2p_theory"] = 2 * (P * V - 1) * m * s * b * h * 4 * T // (T if sp else 1)
        r["p2p_measured"] = sum(x["bytes"] for x in r["per_rank"])
        rows.append([f"PP{P}" + (f" V={V}" if V > 1 else "") + (f" x TP{T} SP" if T > 1 else ""),
                     human_bytes(r["p2p_theory"]), human_bytes(r["p2p_measured"]), r["p2p_measured"] == r["p2p_theory"]])
    rep.table(["layout", "theory", "measured", "equal"], rows)
    a, F = kw["num_heads"], 4 * h
    layer = theory.adapted_activation_bytes(s, b, h, a, F)
    rep(f"-- stage 0's activations held for backward at the peak of the step (saved_tensors_hooks per micro-batch, "
        f"summed over the micro-batches in flight); theory: in-flight x layers of stage 0 x {mib(layer)} MiB per "
        f"layer (section 3's fp32 adaptation of Korthikanti et al. Table 2) + token ids (+ the head at P = 1); 1F1B "
        f"holds min(P, m) micro-batches of L/P layers: as much as one micro-batch through all L layers")
    rows = []
    for r in res:
        P, V, T, sp = r["P"], r["V"], r["T"], r["sp"]
        if T > 1:
            continue
        s0 = next(x for x in r["per_rank"] if x["stage"] == 0)
        chunk_layers = kw["num_layers"] // (P * V)
        r["stage0_peak"] = pipeline.stage0_peak(s0)
        # + token ids (int64); at P = 1 stage 0 is also the last: + the head (final norm input and output, its
        # mean and rstd, the fp32 logits)
        head = 4 * (2 * s * b * h + 2 * s * b + s * b * kw["vocab_size"]) if P == 1 else 0
        r["stage0_theory"] = s0["in_flight"] * (chunk_layers * layer + 8 * s * b + head)
        rows.append([f"PP{P}" + (f" V={V}" if V > 1 else ""), s0["in_flight"], chunk_layers, mib(r["stage0_theory"]),
                     mib(r["stage0_peak"]), f"{r['stage0_peak'] / r['stage0_theory']:.4f}"])
    rep.table(["layout", "micro-batch chunks in flight", "layers per chunk", "theory MiB", "measured MiB",
               "measured/theory"], rows)
    rep()
    for r in res:
        for x in r["per_rank"]:
            x["trace"] = [list(t) for t in x["trace"]]
    return res


def section_readiness(rep: Report, args, kw) -> dict:
    b = args.micro_batch
    rep(f"== 12. ready for GPUs, measured on CPU (issue 19), 4 processes, {shape_str(kw, b)}; the GPU itself: "
        f"make gpu-check")
    r = launch(readiness.readiness_worker, 4, kw, b)
    rows = [[T, f"{x['params'] / 1e6:.2f}M", f"{x['drawn_s']:.3f}", f"{x['skipped_s']:.3f}",
             human_bytes(x["drawn_peak"]), human_bytes(x["skipped_peak"]), human_bytes(x["local"])]
            for T, x in r["build"].items()]
    rep("-- a. start-up: GPT(...) with the weights' draw (a fresh run: full tensors drawn, slices kept) and without "
        "(a resume or an HF load: the checkpoint's weights replace them)")
    rep.table(["T", "params", "with draw s", "without s", "peak bytes with", "without", "this rank's weights"], rows)
    rep("-- b. vocab-parallel cross-entropy, forward, T=2: peak bytes against one float32 copy of the logits")
    rep.table(["logits", "peak", "one float32 copy", "peak / copy", "loss max |diff| vs dense fp32"],
              [[c["dtype"], human_bytes(c["peak"]), human_bytes(c["one_copy"]), f"{c['peak'] / c['one_copy']:.3f}",
                f"{c['loss_err']:.1e}"] for c in r["cross_entropy"]])
    d = r["ddp"]
    rep(f"-- c. DDP (zero=0) at DP=4, bytes held once backward is done: {d['held']:,} for {d['params']:,} parameters "
        f"= {d['per_param']:.2f} B/param (theory 16: weights 4, gradients as views of DDP's buckets 4, AdamW 8)")
    z = r["zero"]
    rep(f"-- d. zero=1 checkpoint at DP={z['dp']} ({z['local']:,} local parameters, moments {human_bytes(z['moments'])} "
        f"per rank, largest bucket {human_bytes(z['bucket_bytes'])}): the state dict adds "
        f"{human_bytes(z['state_dict'])}; largest tensor of a save {human_bytes(z['save_largest'])}, of a load "
        f"{human_bytes(z['load_largest'])}; gathering the moments (the former save and load) adds "
        f"{human_bytes(z['gathered'])}; loaded == saved: {z['same']}")
    c = r["compile"]
    rep(f"-- e. torch.compile at T=2 + SP: dynamo graphs / breaks, whole model {c['graphs']} / {c['breaks']}, one "
        f"block {c['block_graphs']} / {c['block_breaks']}")
    rep()
    return r


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few steps (tests, smoke runs)")
    p.add_argument("--out", default="bench_results/latest.json", help="JSON file for the numbers")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--sections", default="1,2,3,4,5,6,7,8,9,10,11,12", help="comma-separated subset of 1..12")
    p.add_argument("--steps", type=int, default=None, help="measured steps per contender in section 1 (default 16)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps in section 1 (default 2)")
    p.add_argument("--micro-batch", type=int, default=None, help="sections 1-3 (default 4)")
    p.add_argument("--global-batch", type=int, default=None, help="section 4 (default 8)")
    p.add_argument("--scale-steps", type=int, default=None, help="measured steps per layout in section 4 (default 4)")
    p.add_argument("--opt-steps", type=int, default=None,
                   help="measured steps per contender in sections 6 and 7 (default 10)")
    p.add_argument("--guard-jobs", type=int, default=None, help="section 8: jobs per flight-recorder setting (3)")
    p.add_argument("--guard-rounds", type=int, default=7, help="section 8: rounds per job (best of)")
    p.add_argument("--guard-calls", type=int, default=None, help="section 8: calls per round (5000)")
    p.add_argument("--pp-microbatches", type=int, default=8, help="section 11: micro-batches per step")
    p.add_argument("--pp-micro-batch", type=int, default=None, help="section 11: sequences per micro-batch (default 2)")
    p.add_argument("--pp-steps", type=int, default=None, help="section 11: measured steps per layout (default 3)")
    p.add_argument("--mfu-batch", type=int, default=8)
    p.add_argument("--mfu-steps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="add a torch.profiler table of one step of each contender")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, small in (("steps", 16, 2), ("warmup", 2, 1), ("micro_batch", 4, 2), ("global_batch", 8, 4),
                              ("scale_steps", 4, 1), ("opt_steps", 10, 2), ("guard_jobs", 3, 1),
                              ("guard_calls", 5000, 200), ("pp_micro_batch", 2, 2), ("pp_steps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    kw = QUICK if quick else BENCH
    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    n_gpu = torch.cuda.device_count() if dev == "cuda" else 0

    t0 = time.perf_counter()
    rep = Report()
    info = machine_info()
    rep(f"megatron-lite benchmarks{' (--quick)' if quick else ''}: {info['cpu']}, {info['cores']} cores, torch "
        f"{info['torch']}, GPU: {', '.join(info['gpus']) or 'none'}; "
        f"load average at start {info['loadavg_start'][0]:.2f}")
    rep()
    result = dict(machine=info, args=vars(args), config=kw, device=dev, goal_ratio=GOAL)
    if 1 in sections:
        shapes = {"quick": QUICK} if quick else {"brief (h=512)": BENCH, "small (h=256)": SMALL}
        result["peer"] = section_peer(rep, args, shapes, dev if n_gpu >= 2 else "cpu")
    if 2 in sections:
        result["comm"] = section_comm(rep, args, kw)
    if 3 in sections:
        result["memory"] = section_memory(rep, args, kw)
    if 4 in sections:
        result["scaling"] = section_scaling(rep, args, kw, dev, n_gpu)
    if 5 in sections:
        result["mfu"] = section_mfu(rep, args, dev)
    if 6 in sections:
        result["optimizations"] = section_opt(rep, args, kw, result.get("memory"))
    if 7 in sections:
        result["zero"] = section_zero(rep, args, kw)
    if 8 in sections:
        result["guards"] = section_guards(rep, args, kw)
    if 9 in sections:
        result["data"] = section_data(rep, args)
    if 10 in sections:
        result["context_parallel"] = context_parallel.section(rep, args)
    if 11 in sections:
        result["pipeline"] = section_pipeline(rep, args, kw)
    if 12 in sections:
        result["readiness"] = section_readiness(rep, args, kw)
    info["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t0
    rep(f"total {result['wall_s']:.0f} s; load average at end {info['loadavg_end'][0]:.2f}; numbers in {args.out}")
    result["report"] = rep.lines
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
