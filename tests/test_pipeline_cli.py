"""Pipeline parallelism end to end: train.py through torchrun, as a user runs it (tests/cli.py).

(1,2,2)+SP (4 processes: TP=2, PP=2): a run with evaluation, checkpoints and the closing sample (rank 0 loads the
final checkpoint at PP=1); resumed from its first checkpoint it continues bitwise; loaded at PP=1 it generates the
closing sample's text again, and its export loads in transformers. Slow: a SIGTERM stops every stage at one step
with a checkpoint; a stalled stage is named by the hang summary, with the exchange its peer waits in.
(The exactness, schedule, checkpoint-resharding and HF tests run in-process: test_pipeline.py.)
"""
from __future__ import annotations

import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import ROOT, SMALL, ckpt_names, end_job, env, loss_steps, losses, metrics, torchrun
from test_checkpoint import ctx1  # noqa: F401 -- a fixture: a one-process context in the pytest process

E2E = [*SMALL, "train.steps=4", "checkpoint.every=2", "train.eval_every=2", "parallel.tp=2", "parallel.pp=2",
       "sample.max_new_tokens=8", "sample.temperature=0"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pp_e2e") / "run"
    proc = torchrun(4, *E2E, f"run_dir={run}")
    (run / "stdout.txt").write_text(proc.stdout)
    return run


def test_end_to_end_pp2_tp2_sp_trains_evaluates_and_samples(e2e):
    out = (e2e / "stdout.txt").read_text()
    assert out.count("layout: DP=1 x TP=2 x PP=2 on 4 ranks (cpu); TP groups: [0, 1], [2, 3]; DP groups: "
                     "[0], [1], [2], [3]; PP groups: [0, 2], [1, 3]") == 1, out
    assert ("pipeline: 1f1b over PP=2, 4 micro-batches per step (bubble (P-1)/(V m) = 0.250); stage 0: embedding + "
            "layer 0; stage 1: layer 1 + final norm + output layer (a copy of the tied embedding)") in out, out
    # the loss comes from the last stage, printed by rank 0; the whole model counted once across the stages
    train = {m["step"]: m for m in metrics(e2e) if "loss" in m}
    val = {m["step"]: m["val_loss"] for m in metrics(e2e) if "val_loss" in m}
    assert sorted(train) == [1, 2, 3, 4] and sorted(val) == [2, 4]
    assert abs(train[1]["loss"] - math.log(4096)) < 0.1 and train[4]["loss"] < train[1]["loss"]
    assert "model: 0.37M parameters (0.16M on this rank)" in out, out  # as in test_train's DP2 x TP2: 0.37M
    assert ckpt_names(e2e) == ["step_0000002", "step_0000004"]
    # the closing sample: rank 0 alone loads the final checkpoint at PP = 1
    assert re.search(r"^sample:\ndef ", out, re.M), out[-2000:]


@pytest.mark.slow  # PP checkpoints resume in every layout in test_pipeline's world; CLI resume: test_checkpoint
def test_end_to_end_resume_is_bitwise(e2e, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(e2e, run)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    torchrun(4, *E2E, f"run_dir={run}", "sample.max_new_tokens=0")
    assert losses(run) == losses(e2e)  # steps 3 and 4 again, from step 2's checkpoint: bitwise
    assert {m["step"]: m["grad_norm"] for m in metrics(run) if "loss" in m} == \
        {m["step"]: m["grad_norm"] for m in metrics(e2e) if "loss" in m}


def test_end_to_end_pp_checkpoint_generates_and_exports_at_pp1(e2e, tmp_path, ctx1):
    transformers = pytest.importorskip("transformers")
    from megatron_lite.checkpoint import load_model
    from megatron_lite.export import export
    from megatron_lite.generate import generate
    from megatron_lite.tokenizer import load_tokenizer
    # generation loads the PP checkpoint at PP=1 (as python -m megatron_lite.generate does): the closing sample's
    # greedy text again
    tok = load_tokenizer(e2e / "checkpoints" / "step_0000004")
    ids = generate(load_model(e2e, ctx1), tok.frame(tok.encode("def "), last=False), 8, temperature=0, seed=1234,
                   eos_id=tok.eos_id)
    assert f"sample:\n{tok.decode(ids)}\n" in (e2e / "stdout.txt").read_text()
    out = export(e2e, tmp_path / "export")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert hf.config.n_layer == 2 and hf.config.tie_word_embeddings


# ---- operations: a stop signal and a stalled stage (slow: test_resilience covers both at DP x TP) --------

def _job(tmp: Path, run: Path, nproc: int, *args: str, extra_env: dict | None = None):
    """`python -m megatron_lite.launch` (torchrun) of train.py, each worker wrapped by tests/as_worker.py."""
    rcs = tmp / "workers"
    rcs.mkdir()
    cmd = [sys.executable, "-m", "megatron_lite.launch", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "as_worker.py"), str(rcs), str(ROOT / "train.py"), *SMALL, f"run_dir={run}", *args]
    with open(tmp / "torchrun.out", "w") as out:
        agent = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=out,
                                 stderr=subprocess.STDOUT)
    return agent, rcs


def _wait_for_step(run: Path, step: int, agent, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists() and step in loss_steps(run)):
        assert agent.poll() is None and time.monotonic() < deadline, f"no step {step}"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_stops_every_stage_at_the_same_step_with_a_checkpoint(tmp_path):
    from megatron_lite.checkpoint import read_meta, verify
    run = tmp_path / "run"
    agent, rcs = _job(tmp_path, run, 4, "parallel.tp=2", "parallel.pp=2", "train.steps=20")
    try:
        _wait_for_step(run, 2, agent)
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=90)
    finally:
        end_job(agent)
    out = (tmp_path / "torchrun.out").read_text()
    exits = {int(p.stem.split("_")[1]): int(p.read_text()) for p in rcs.glob("rank_*.rc")}
    assert rc == 0 and exits == {0: 0, 1: 0, 2: 0, 3: 0}, out[-3000:]
    log = (run / "train.log").read_text()
    stop = int(re.search(r"stopped at step (\d+)/20 \(SIGTERM received\); newest checkpoint", log)[1])
    assert loss_steps(run) == list(range(1, stop + 1))  # the loss of every step, from the last stage, up to it
    ckpt = run / "checkpoints" / f"step_{stop:07d}"
    verify(ckpt)  # every stage wrote its shards of that one step
    assert read_meta(ckpt)["layout"] == {"dp": 1, "tp": 2, "sp": True, "cp": 1, "pp": 2, "pp_virtual": 1}


@pytest.mark.slow
def test_a_stalled_stage_is_named_by_the_hang_summary(tmp_path):
    run, hang_s = tmp_path / "run", 6
    agent, _ = _job(tmp_path, run, 2, "parallel.pp=2", "train.steps=20", f"train.hang_timeout_s={hang_s}",
                    extra_env={"MEGATRON_LITE_FAULT": "stall:rank=1:step=2"})
    try:
        _wait_for_step(run, 1, agent)
        rc = agent.wait(timeout=120)
    finally:
        end_job(agent)
    out = (tmp_path / "torchrun.out").read_text()
    assert rc != 0 and "exitcode  : 3" in out, out[-3000:]
    summary = re.findall(r"^error: hang in step 2: .*$", out, re.M)
    assert len(summary) == 1, out[-4000:]
    print("\n" + summary[0])
    assert "rank 1 is behind: not in a collective, at megatron_lite/resilience.py" in summary[0]
    # rank 0 waits in a pipeline exchange with rank 1, which the flight recorder does not see on gloo
    assert re.search(r"waiting: rank 0 in p2p (send|recv) of micro-batch \d's activation(s| gradients) "
                     r"(to|from) rank 1 \(stage 1\)", summary[0]), summary[0]
    text = (run / "hang" / "rank_0.txt").read_text()
    assert "pipeline stage 0" in text and re.search(r"waiting in: p2p .* over the PP group \[0, 1\]", text), text[:2000]
