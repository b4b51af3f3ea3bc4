"""Checkpoints end to end, through the CLI (torchrun / python train.py as subprocesses), as a user runs them.

One reference run (DP2 x TP2 with sequence parallelism, 8 steps, a checkpoint every 2: conftest.ref, shared
with test_resilience) serves the module; every other test resumes, reshards, damages, exports or samples from
(a copy of) its checkpoints. SMALL's model trains deterministically on CPU, so a resumed run at the same
layout must match it bitwise.

Also a script: `torchrun --nproc_per_node=N tests/test_checkpoint.py --loss CKPT OUT.json` loads CKPT at
TP=N and writes the loss on a fixed batch (used by the export test).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import (REF_EVERY, REF_STEPS, ROOT, SMALL, TORCHRUN, ckpt_names, end_job, env, loss_steps, losses, metrics,
                 torchrun, worker_pids)

STEPS, EVERY = REF_STEPS, REF_EVERY  # the reference run, conftest.ref
BASE = [*SMALL, f"train.steps={STEPS}", f"checkpoint.every={EVERY}"]
DP2TP2 = ["parallel.tp=2"]  # 4 processes: DP=2 x TP=2, parallel.sp=true (the default)


def step_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def train_log(run_dir) -> str:
    return (Path(run_dir) / "train.log").read_text()


def python_train(*overrides: str, check: bool = True, timeout: float = 240):
    """`python train.py OVERRIDES`: one process, no torchrun agent."""
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_run(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def truncate(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size // 2, size


def assert_close(got: dict, want: dict, steps, rel: float) -> None:
    for s in steps:
        assert math.isclose(got[s], want[s], rel_tol=rel), f"step {s}: loss {got[s]!r} vs {want[s]!r}"


# ---------------------------------------------------------------------------------------------------------
# 1 + 4 + 5. Killed in the middle of step 8's save, with step 6's checkpoint since cut short on disk; relaunched.
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resumed(ref, tmp_path_factory) -> dict:
    """The reference's run dir as a job killed while saving step 8 leaves it, whose step 6 checkpoint was then
    damaged (a shard truncated), relaunched with the same run_dir: it must skip the partial save, name the
    damaged shard, fall back to step 4 and train steps 5..8 again to the same floats.

    What a kill during a save leaves: `step_0000008.tmp/` holding the shards written so far (one of them cut
    short), without DCP's `.metadata` (written last, once every rank is done) or `meta.json` (written at the
    rename); metrics.jsonl and train.log as far as the run got (here: to step 8)."""
    run = copy_run(ref, tmp_path_factory.mktemp("resumed") / "run")
    shutil.rmtree(step_dir(run, 8))
    partial = shutil.copytree(step_dir(ref, 8), step_dir(run, 8).with_name("step_0000008.tmp"))
    for name in (".metadata", "meta.json", "tokenizer.model"):
        (partial / name).unlink()
    truncate(partial / "__1_0.distcp")
    shard = step_dir(run, 6) / "__1_0.distcp"
    cut, size = truncate(shard)
    (run / "train.log").write_text(train_log(run) + "=== killed ===\n")
    torchrun(4, *BASE, *DP2TP2, f"run_dir={run}")
    return dict(run=run, log=train_log(run).split("=== killed ===\n")[1], shard=shard, cut=cut, size=size)


def test_resume_after_interruption_is_bitwise_identical(ref, resumed):
    run, log = resumed["run"], resumed["log"]
    assert f"resumed from {step_dir(run, 4)} at step 4 (32 samples consumed)" in log
    # metrics.jsonl was trimmed to step 4 and steps 5..8 logged again: each step exactly once
    assert loss_steps(run) == list(range(1, STEPS + 1))
    assert [m["step"] for m in metrics(run) if "val_loss" in m] == [STEPS]
    assert losses(run) == losses(ref)  # bitwise: the same floats
    assert [m for m in metrics(run) if "val_loss" in m] == [m for m in metrics(ref) if "val_loss" in m]


def test_save_killed_half_way_is_never_a_candidate_and_is_saved_again(resumed):
    from megatron_lite.checkpoint import verify
    run, log = resumed["run"], resumed["log"]
    assert "step_0000008.tmp" not in log  # the partial save is never a candidate
    # the partial save was cleaned up, and step 8 was saved again, completely
    assert ckpt_names(run) == ["step_0000002", "step_0000004", "step_0000006", "step_0000008"]
    verify(step_dir(run, 8))


def test_truncated_shard_falls_back_to_older_checkpoint(resumed):
    run, shard = resumed["run"], resumed["shard"]
    warning = (f"warning: checkpoint {step_dir(run, 6)} is damaged: shard {shard} is truncated ({resumed['cut']} "
               f"of {resumed['size']} bytes); falling back to an older checkpoint")
    assert warning in resumed["log"], resumed["log"]
    print("\n" + warning)


def test_save_replaces_damaged_checkpoint_of_same_step(resumed):
    """After falling back from a damaged step 6 and training past it again, step 6 is the new, intact save."""
    from megatron_lite.checkpoint import verify
    run = resumed["run"]
    assert "saved checkpoint " + str(step_dir(run, 6)) in resumed["log"]
    verify(step_dir(run, 6))


# ---------------------------------------------------------------------------------------------------------
# 2. Resharding: the DP2 x TP2 + SP checkpoint continues at TP4, DP4 x TP1 and on one process.
# ---------------------------------------------------------------------------------------------------------

LAYOUTS = {  # name: (processes, overrides, load the step dir (else: a run dir whose newest checkpoint it is))
    "TP4": (4, ["parallel.tp=4"], True),
    "DP4xTP1": (4, ["parallel.tp=1"], True),
    "single-process": (1, ["parallel.tp=1"], False),
}


# In `-m slow` only: TP4 and DP4 (every layout's reshard is checked in-process in test_zero, test_pipeline and
# test_context_parallel); the default run keeps the CLI path of `checkpoint.load=<run dir>` on one process.
@pytest.mark.parametrize("layout", [pytest.param(n, marks=pytest.mark.slow) if n != "single-process" else n
                                    for n in LAYOUTS])
def test_load_at_another_layout_continues_the_run(ref, tmp_path, layout):
    nproc, overrides, by_step_dir = LAYOUTS[layout]
    source = step_dir(ref, 4)
    if by_step_dir:
        load = source
    else:  # checkpoint.load=<run dir>: its newest complete checkpoint
        load = tmp_path / "source_run"
        shutil.copytree(source, step_dir(load, 4))
    run = tmp_path / "run"
    args = [*BASE, *overrides, f"checkpoint.load={load}", f"run_dir={run}"]
    proc = torchrun(nproc, *args) if nproc > 1 else python_train(*args)
    resolved = source if by_step_dir else step_dir(load, 4)
    assert f"resumed from {resolved} at step 4 (32 samples consumed)" in train_log(run), proc.stdout
    got = losses(run)
    assert sorted(got) == list(range(5, STEPS + 1))
    want = losses(ref)
    print(f"\n{layout}: max relative loss difference over steps 5..8: "
          f"{max(abs(got[s] - want[s]) / abs(want[s]) for s in got):.1e}")
    assert_close(got, want, range(5, STEPS + 1), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 3. A worker SIGKILLed mid-run (during a save) under --max-restarts=1: torchrun restarts the group, which
#    resumes from the newest complete checkpoint and finishes with the uninterrupted run's losses.
# ---------------------------------------------------------------------------------------------------------

# Restarted workers must not read the dead attempt's addresses from torchrun's shared TCPStore
# (pytorch/pytorch#135712): megatron_lite.parallel prefixes the store's keys per restart.
# With the distributed optimizer (zero=1, the default run's case) the restarted workers gather nothing: each
# loads its own ranges of the AdamW moments from the layout-free checkpoint.
# In `-m slow` only (~20 s): resuming from the newest complete checkpoint after a kill is test_resume_after_...;
# this adds torchrun's restart of the whole group in one job.
@pytest.mark.parametrize("zero", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow)])
def test_worker_killed_mid_run_restarts_and_matches(ref, tmp_path, zero):
    run = tmp_path / "run"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=4", "--max-restarts=1", "--monitor-interval=0.2",
           str(ROOT / "train.py"), *BASE, *DP2TP2, f"parallel.zero={zero}", f"run_dir={run}",
           # torchrun SIGTERMs the survivors, stuck with a dead peer: each waits exit_grace_s (default 25 s)
           # for a step boundary it cannot reach before it exits; a short grace restarts sooner
           "train.exit_grace_s=3"]
    out = open(tmp_path / "torchrun.out", "w")
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        # Kill rank 1 as soon as step 4's save starts (its .tmp dir appears), or failing that once it is done.
        deadline = time.monotonic() + 180
        while not (step_dir(run, 4).with_name("step_0000004.tmp").exists() or step_dir(run, 4).exists()):
            assert agent.poll() is None, (tmp_path / "torchrun.out").read_text()
            assert time.monotonic() < deadline, "no checkpoint of step 4 after 180 s"
            time.sleep(0.002)
        in_save = not step_dir(run, 4).exists()
        victim = worker_pids(agent.pid)[1]
        os.kill(victim, signal.SIGKILL)
        rc = agent.wait(timeout=240)
    finally:
        end_job(agent)  # the test failed: end the job
        out.close()
    output = (tmp_path / "torchrun.out").read_text()
    assert rc == 0, "\n".join([ln for ln in output.splitlines() if "Error" in ln][:5] + [output[-3000:]])
    log = train_log(run)
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert len(resumed) == 1, log
    print(f"\nkilled rank 1 (pid {victim}) {'during' if in_save else 'after'} step 4's save; "
          f"restarted workers: {log[log.index('resumed from'):].splitlines()[0]}")
    assert int(resumed[0][1]) in (2, 4)
    assert loss_steps(run) == list(range(1, STEPS + 1))
    assert_close(losses(run), losses(ref), range(1, STEPS + 1), rel=1e-6)
    if zero == 0:
        assert losses(run) == losses(ref)  # same layout, same data order: bitwise
    else:  # the reference is zero=0: the same math, summed in another order (bitwise resume: tests/test_zero.py)
        print(f"zero=1 vs the zero=0 reference: max relative loss difference "
              f"{max(abs(a - b) / b for a, b in zip(losses(run).values(), losses(ref).values())):.1e}")
        mem = re.search(r"optimizer state per rank: [\d.]+ MiB measured \(([\d,]+) bytes\), theory .* = "
                        r"([\d,]+) bytes", log)
        # theory 8 x 185,664 local parameters / DP 2; measured with the buckets' padding to lcm(DP, 128): 64 more
        assert mem and (mem[1], mem[2]) == ("742,912", "742,656"), log
        print(mem[0])
    assert ckpt_names(run) == ["step_0000002", "step_0000004", "step_0000006", "step_0000008"]


# ---------------------------------------------------------------------------------------------------------
# 5. checkpoint.load of a truncated shard fails naming it (resume=auto falls back: the `resumed` fixture).
# ---------------------------------------------------------------------------------------------------------

def test_load_of_truncated_checkpoint_fails_naming_the_file(ref, tmp_path):
    damaged = shutil.copytree(step_dir(ref, 8), tmp_path / "ckpt" / "step_0000008")
    cut, size = truncate(damaged / "__1_0.distcp")
    proc = python_train(*BASE, "parallel.tp=1", "checkpoint.resume=never", f"checkpoint.load={damaged}",
                        f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    message = f"checkpoint {damaged} is damaged: shard {damaged / '__1_0.distcp'} is truncated ({cut} of {size} bytes)"
    assert message in proc.stderr, proc.stderr[-4000:]
    print("\n" + next(line for line in proc.stderr.splitlines() if message in line))
    assert "loss" not in (tmp_path / "run" / "train.log").read_text()  # no step was taken


# ---------------------------------------------------------------------------------------------------------
# 6 + 9. Async save writes what a synchronous save writes; keep=K keeps the newest K complete checkpoints.
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def async_run(ref, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("async") / "run"
    torchrun(4, *BASE, *DP2TP2, "checkpoint.async_save=true", "checkpoint.keep=2", f"run_dir={run}")
    return run


def _consolidated(ckpt: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("step", [6, 8])
def test_async_save_equals_sync_save(ref, async_run, tmp_path, step):
    sync = _consolidated(step_dir(ref, step), tmp_path / "sync.pt")
    asyn = _consolidated(step_dir(async_run, step), tmp_path / "async.pt")
    assert sorted(sync) == sorted(asyn)
    assert any(k.startswith("model.") for k in sync) and any(k.startswith("optim.") and k.endswith("exp_avg_sq")
                                                              for k in sync)
    for key in sync:
        a, b = sync[key], asyn[key]
        if isinstance(a, torch.Tensor):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), key
        else:
            assert a == b, key
    meta = json.loads((step_dir(async_run, step) / "meta.json").read_text())
    assert (meta["step"], meta["consumed_samples"]) == (step, step * 8)
    assert losses(async_run) == losses(ref)


def test_keep_keeps_newest_complete_checkpoints(async_run):
    assert ckpt_names(async_run) == ["step_0000006", "step_0000008"]  # 2 and 4 deleted, no .tmp left
    saved = re.findall(r"saved checkpoint \S+/(step_\d+)", train_log(async_run))
    assert saved == ["step_0000002", "step_0000004", "step_0000006", "step_0000008"]


# ---------------------------------------------------------------------------------------------------------
# 7. Loading what cannot be loaded fails with a message naming the problem.
# ---------------------------------------------------------------------------------------------------------

def test_load_of_other_model_shape_fails_naming_parameter_and_shapes(ref, tmp_path):
    proc = python_train(*BASE, "parallel.tp=1", "model.hidden_size=32", f"checkpoint.load={step_dir(ref, 4)}",
                        f"run_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    m = re.search(r"checkpoint \S+/step_0000004: parameter (\S+) has shape (\[[\d, ]+\]) there but "
                  r"(\[[\d, ]+\]) in this model[^\n]*", proc.stderr)
    assert m, proc.stderr[-4000:]
    assert m[2] != m[3] and "64" in m[2] and "32" in m[3], m[0]
    print("\n" + m[0])


def test_load_of_dir_without_checkpoint_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = python_train(*BASE, "parallel.tp=1", f"checkpoint.load={empty}", f"run_dir={tmp_path / 'run'}",
                        check=False)
    assert proc.returncode != 0
    assert f"no checkpoint in {empty}" in proc.stderr, proc.stderr[-4000:]
    print("\n" + next(line for line in proc.stderr.splitlines() if line.startswith("megatron_lite.checkpoint.")))


# ---------------------------------------------------------------------------------------------------------
# 8. The export is a Hugging Face model directory: transformers loads it with no missing or unexpected key
#    and computes the sharded model's loss (one process, and the checkpoint as saved, at TP2 + SP).
# ---------------------------------------------------------------------------------------------------------

def _fixed_batch(vocab_size: int, seq_len: int):
    tokens = torch.randint(0, vocab_size, (4, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return tokens[:, :-1], tokens[:, 1:]


@torch.no_grad()
def _loss(model) -> float:
    x, y = _fixed_batch(model.config.vocab_size, 64)
    return model(x.to(model.ctx.device), y.to(model.ctx.device)).item()


@pytest.fixture(scope="module")
def ctx1():
    """A one-process ParallelContext in this (pytest) process; its env variables do not leak to subprocesses."""
    import torch.distributed as dist

    from megatron_lite.parallel import init_parallel
    saved = dict(os.environ)
    try:
        ctx = init_parallel(1, device="cpu")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    yield ctx
    dist.destroy_process_group()


def test_export_loads_in_transformers_with_the_sharded_models_loss(ref, tmp_path, ctx1):
    transformers = pytest.importorskip("transformers")
    from megatron_lite.checkpoint import load_model
    from megatron_lite.tokenizer import load_tokenizer
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "megatron_lite.export", str(ref), str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"exported {step_dir(ref, 8)} -> {out} (GPT2LMHeadModel, float32)" in proc.stdout
    print("\n" + proc.stdout.strip())
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                               "tokenizer_config.json"}

    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected and mismatched keys, error messages: none
    x, y = _fixed_batch(hf.config.vocab_size, 64)
    with torch.no_grad():
        loss_hf = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    loss_t1 = _loss(load_model(ref, ctx1))  # DCP reshards the DP2 x TP2 checkpoint to T=1
    loss_imported = _loss(load_model(out, ctx1))  # the export read back through the HF import

    result = tmp_path / "tp2.json"  # the checkpoint as saved (TP2 + SP), on 2 processes
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(Path(__file__)), "--loss", str(ref), str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    loss_tp2 = json.loads(result.read_text())
    assert loss_tp2["tp"] == 2 and loss_tp2["sp"] is True
    print(f"loss on a fixed batch: transformers {loss_hf!r}, export re-imported {loss_imported!r}, sharded T=1 "
          f"{loss_t1!r}, sharded TP2+SP {loss_tp2['loss']!r}")
    assert loss_imported == loss_t1
    assert math.isclose(loss_hf, loss_t1, rel_tol=1e-6) and math.isclose(loss_t1, loss_tp2["loss"], rel_tol=1e-5)
    assert 5 < loss_t1 < 10  # a trained-a-little model, not a broken one

    ours = load_tokenizer(step_dir(ref, 8))
    text = "import os\n\ndef main():\n\tprint('naïve  <n> </s>')\n"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ours.encode(text)


# ---------------------------------------------------------------------------------------------------------
# 10. Greedy generation from the checkpoint: the same tokens on one process and at TP=2.
# ---------------------------------------------------------------------------------------------------------

def _generate(*launcher: str, ckpt: Path) -> tuple[str, str]:
    cmd = [*launcher, "-m", "megatron_lite.generate", str(ckpt), "--max-new-tokens", "10", "--temperature", "0",
           "--prompt", "import os\n"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    header, _, text = proc.stdout.partition("\n")
    return header, text


@pytest.mark.slow  # test_hf: greedy tokens equal at T=1 and T=2 (and transformers'), with and without the cache
def test_generate_greedy_same_on_one_process_and_tp2(ref):
    header1, text1 = _generate(sys.executable, ckpt=ref)
    header2, text2 = _generate(*TORCHRUN, "--standalone", "--nproc_per_node=2", ckpt=ref)
    assert header1 == f"# {step_dir(ref, 8)} (TP=1)"
    assert header2 == f"# {step_dir(ref, 8)} (TP=2)"
    assert text1.startswith("import os\n") and len(text1) > len("import os\n")
    assert text1 == text2
    print(f"\ngreedy continuation (TP=1 and TP=2): {text1!r}")


# ---------------------------------------------------------------------------------------------------------

def _loss_main(ckpt: str, out: str) -> None:
    import torch.distributed as dist

    from megatron_lite.checkpoint import load_model
    from megatron_lite.parallel import init_parallel
    ctx = init_parallel(int(os.environ["WORLD_SIZE"]), device="cpu")
    model = load_model(ckpt, ctx)
    loss = _loss(model)
    if ctx.is_first_rank:
        Path(out).write_text(json.dumps({"loss": loss, "tp": ctx.tp_size, "sp": model.config.sequence_parallel}))
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loss"]:
        _loss_main(*sys.argv[2:4])
