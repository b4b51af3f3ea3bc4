"""End-to-end tests of train.py, launched through torchrun as a user would (tests/cli.py), on the real
default corpus (data=pystdlib, tokenized once into data/cache) and the small model of cli.SMALL.

- a DP=2 x TP=2 run with sequence parallelism trains (the loss falls) and writes its run directory;
- the per-step losses and gradient norms of every layout (DP x TP, SP on or off, 2 or 4 accumulated micro-batches)
  equal those of a single process at the same global batch and seed;
- two torchrun agents rendezvousing over c10d train together as one DP=2 x TP=2 grid ("two nodes");
- a loss that turns NaN stops every rank with a message naming the step.
"""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import uuid

import pytest
from omegaconf import OmegaConf

from cli import ROOT, SMALL, TORCHRUN, env, losses, metrics, torchrun
from megatron_lite.parallel import free_port

STEPS = 5  # optimizer steps of the parity runs; warmup_steps=2 in SMALL, so the lr warms up then decays
PARITY = [f"train.steps={STEPS}", *SMALL]  # global batch 8, micro batch 2, dropout 0, float32 on CPU
RTOL = 1e-4

# name -> (processes, overrides, DP size); the reference is one process: parallel.tp=1, 4 micro-batches per step
LAYOUTS = {
    "dp2_tp2_sp": (4, ["parallel.tp=2", "parallel.sp=true"], 2),
    "dp2_tp2_nosp": (4, ["parallel.tp=2", "parallel.sp=false"], 2),
    "dp1_tp4_sp": (4, ["parallel.tp=4", "parallel.sp=true"], 1),
    "dp2_tp1": (2, ["parallel.tp=1"], 2),
}
# In `-m slow` only: SP off and TP=4 are checked against T=1 numerically in test_model, test_hf and test_zero,
# pure DP in test_zero; the default run keeps DP x TP + SP end to end.
SLOW_LAYOUTS = {"dp2_tp2_nosp", "dp1_tp4_sp", "dp2_tp1"}


def _layouts(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_LAYOUTS else n for n in names]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _records(run_dir) -> tuple[dict[int, dict], dict[int, float]]:
    """step -> training record, step -> val loss."""
    train, val = {}, {}
    for m in metrics(run_dir):
        if "loss" in m:
            train[m["step"]] = m
        if "val_loss" in m:
            val[m["step"]] = m["val_loss"]
    return train, val


def assert_same_training(run_dir, reference_dir) -> None:
    """Per-step loss and grad norm within RTOL of the reference run's, and the same lr schedule."""
    got, _ = _records(run_dir)
    ref, _ = _records(reference_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        g, r = got[step], ref[step]
        assert _rel(g["loss"], r["loss"]) < RTOL, f"step {step}: loss {g['loss']} != reference {r['loss']}"
        assert _rel(g["grad_norm"], r["grad_norm"]) < RTOL, \
            f"step {step}: grad norm {g['grad_norm']} != reference {r['grad_norm']}"
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)
        assert g["consumed_samples"] == r["consumed_samples"] == 8 * step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run (TP=1, DP=1: 4 accumulated micro-batches per step); its run_dir."""
    run_dir = tmp_path_factory.mktemp("reference")
    torchrun(1, f"run_dir={run_dir}", "parallel.tp=1", *PARITY)
    assert len(losses(run_dir)) == STEPS
    return run_dir


@pytest.fixture(scope="module")
def layout_run(tmp_path_factory):
    """name -> run_dir of that layout's parity run; each layout is launched once per module."""
    done = {}

    def run(name):
        if name not in done:
            nproc, overrides, _ = LAYOUTS[name]
            run_dir = tmp_path_factory.mktemp(name)
            torchrun(nproc, f"run_dir={run_dir}", *overrides, *PARITY)
            done[name] = run_dir
        return done[name]
    return run


# ---------------------------------------------------------------- 1. a DP x TP run trains


def test_dp2_tp2_sp_trains_and_writes_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(4, f"run_dir={run_dir}", "parallel.tp=2", "parallel.sp=true", "data=pystdlib",
                    "train.steps=10", "optim.lr=1e-2", *SMALL)
    out = proc.stdout

    # the layout and the model size, printed once (rank 0 only)
    layout = "layout: DP=2 x TP=2 on 4 ranks (cpu); TP groups: [0, 1], [2, 3]; DP groups: [0, 2], [1, 3]"
    assert out.count(layout) == 1, out
    # 2 layers, hidden 64, vocab 4096, seq 64, tied embeddings: 4096*64 + 64*64 + 2*49,984 + 128 = 366,336
    # parameters; a TP rank holds half the vocabulary and of each column/row-parallel weight: 185,664
    sizes = re.findall(r"^model: ([\d.]+)M parameters \(([\d.]+)M on this rank\)", out, re.M)
    assert sizes == [("0.37", "0.19")], out

    # the loss falls: from about ln(vocab) at initialization to clearly below
    train, val = _records(run_dir)
    assert sorted(train) == list(range(1, 11))  # logging.every=1: every step, once
    first, last = train[1]["loss"], train[10]["loss"]
    assert abs(first - math.log(4096)) < 0.1, first
    assert last < first - 0.5, (first, last)
    assert list(val) == [10] and math.isfinite(val[10])  # evaluated at the end even with eval_every=0

    # metrics.jsonl: one record per logged step with the documented keys
    for step, m in train.items():
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "consumed_samples"} <= m.keys(), m
        assert m["consumed_samples"] == 8 * step
        assert m["tokens_per_sec"] > 0 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert max(m["lr"] for m in train.values()) == pytest.approx(1e-2)
    assert train[1]["lr"] == pytest.approx(5e-3)  # warmup: lr * 1/2 on the first of 2 warmup steps

    # console lines of a step
    assert re.search(r"^step +10/10 \| loss \d+\.\d{4} \| lr [\d.e+-]+ \| grad norm", out, re.M), out

    # config.yaml is the resolved config of the run, overrides included
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True and cfg.data.name == "pystdlib"
    assert cfg.optim.lr == 1e-2 and cfg.optim.min_lr == pytest.approx(1e-3)  # ${div:lr,10} resolved
    assert cfg.model.num_layers == 2 and cfg.train.steps == 10 and cfg.run_dir == str(run_dir)

    # train.log holds what rank 0 printed
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert log_lines[0] == layout
    assert all(line in out for line in log_lines)
    assert any(line.startswith("step     10/10 | loss") for line in log_lines)
    assert (run_dir / "checkpoints" / "step_0000010").is_dir()  # saved at the end


@pytest.mark.slow  # the default run fine-tunes a Llama at TP3 + SP in test_finetune (the README's commands)
def test_llama_tiny_dp2_tp2_sp_trains_and_samples(tmp_path):
    """The Llama family end to end: model=llama-tiny (RMSNorm, RoPE, SwiGLU, 4 query heads on 2 KV heads)
    at DP=2 x TP=2 + SP; the loss falls and the closing sample (KV cache, SP off) is printed."""
    run_dir = tmp_path / "run"
    proc = torchrun(4, f"run_dir={run_dir}", "model=llama-tiny", "parallel.tp=2", "parallel.sp=true", "train.steps=10",
                    "optim.lr=1e-2", *SMALL, "sample.max_new_tokens=16", "sample.temperature=0")
    train, _ = _records(run_dir)
    assert abs(train[1]["loss"] - math.log(4096)) < 0.1 and train[10]["loss"] < train[1]["loss"] - 0.5, train
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert (cfg.model.name, cfg.model.norm, cfg.model.num_kv_heads, cfg.model.mlp) == ("llama-tiny", "rmsnorm", 2, "swiglu")
    assert re.search(r"^sample:\ndef ", proc.stdout, re.M), proc.stdout[-2000:]


# ---------------------------------------------------------------- 2. every layout trains the same model


@pytest.mark.parametrize("name", _layouts(LAYOUTS))
def test_layout_matches_single_process(name, layout_run, reference):
    """Same global batch (8) and seed: DP2 accumulates 2 micro-batches of 2, one process 4 of 2."""
    assert_same_training(layout_run(name), reference)


@pytest.mark.parametrize("name", _layouts(n for n, (_, _, dp) in LAYOUTS.items() if dp == 1))
def test_val_loss_matches_single_process_at_dp1(name, layout_run, reference):
    (_, got), (_, ref) = _records(layout_run(name)), _records(reference)
    assert list(got) == list(ref) == [STEPS]
    assert _rel(got[STEPS], ref[STEPS]) < RTOL


def test_val_loss_does_not_depend_on_dp(layout_run, reference):
    (_, got), (_, ref) = _records(layout_run("dp2_tp2_sp")), _records(reference)  # DP=2: two halves of the val batch
    assert _rel(got[STEPS], ref[STEPS]) < RTOL, (got, ref)


# ---------------------------------------------------------------- 3. two nodes on one machine




def _kill(proc: subprocess.Popen) -> None:
    """Kill an agent and its workers (each agent leads its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@pytest.mark.slow  # the grid's rank formula at every layout: test_parallel; this is the two-agent rendezvous
def test_two_nodes_train_as_one_grid(tmp_path, reference):
    """Two torchrun agents (`--nnodes=2 --nproc_per_node=2`, c10d rendezvous on localhost) form one
    DP=2 x TP=2 world: each "node" holds one TP group, DP spans the nodes."""
    run_dir = tmp_path / "run"
    port, rdzv_id = free_port(), f"e2e-{uuid.uuid4().hex[:8]}"
    cmd = [*TORCHRUN, "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}", str(ROOT / "train.py"),
           f"run_dir={run_dir}", "parallel.tp=2", *PARITY]
    agents, logs = [], []
    try:
        for node in range(2):
            log = open(tmp_path / f"node{node}.log", "w+")
            logs.append(log)
            agents.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True))
        for agent in agents:
            agent.wait(timeout=240)
    finally:
        for agent in agents:
            _kill(agent)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    report = "\n".join(f"--- node agent {i} exited {a.returncode}:\n{o[-4000:]}"
                       for i, (a, o) in enumerate(zip(agents, outputs)))
    assert [a.returncode for a in agents] == [0, 0], report

    # one global rank 0 (on whichever agent the rendezvous made node 0) printed the layout of the whole grid
    layout = "layout: DP=2 x TP=2 on 4 ranks (cpu); TP groups: [0, 1], [2, 3]; DP groups: [0, 2], [1, 3]"
    assert sum(o.count(layout) for o in outputs) == 1, report
    assert_same_training(run_dir, reference)


# ---------------------------------------------------------------- 4. divergence stops the run


def test_nan_loss_stops_every_rank_naming_the_step(tmp_path):
    """lr=1e6 without clipping or warmup: step 1 is fine, its update blows the weights up, and step 2's
    loss (or gradient) is not finite. Every rank stops before the update (no hang on a collective), and
    one line names the step."""
    run_dir = tmp_path / "run"
    proc = torchrun(2, f"run_dir={run_dir}", "parallel.tp=2", "train.steps=6", *SMALL,
                    "optim.lr=1e6", "optim.grad_clip=0", "optim.warmup_steps=0", check=False, timeout=180)
    assert proc.returncode != 0, proc.stdout
    found = re.findall(r"error: (?:loss|grad norm) is (-?nan|-?inf) at step (\d+): the run diverged; "
                       r"lower optim\.lr \(now 1000000\.0\)", proc.stderr)
    assert len(found) == 1, proc.stderr[-4000:]  # one line (local rank 0), no traceback per rank
    step = int(found[0][1])
    assert f"error: {'loss' if 'loss is' in proc.stderr else 'grad norm'} is" in (run_dir / "train.log").read_text()
    assert step >= 2  # step 1 runs on the initial weights; its lr=1e6 update is what blows up (step 2 here)
    assert sorted(losses(run_dir)) == list(range(1, step)), "the finite steps are logged, the NaN one not"
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
