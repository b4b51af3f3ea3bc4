"""Preparing real corpora: formats, workers, the validation split, bad input, memory, and the build lock
(one builder among processes and ranks, waiting without a timeout, crash and resume).

Corpora are made here from this Python's standard library; most builds use a given sentencepiece tokenizer
(data.tokenizer), trained once per module, and readers.BLOCK = 64 KiB so a small corpus makes many tasks and
its longest documents span several.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from cli import ROOT, SMALL, env
from megatron_lite.data import DataConfig, DataError, check_data, prepare_corpus
from megatron_lite.data import lock, readers
from megatron_lite.tokenizer import train_sentencepiece

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NAMES = ["textwrap.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "functools.py",
         "dataclasses.py", "string.py", "bisect.py", "argparse.py", "typing.py", "inspect.py", "enum.py"]
BLOCK = 64 << 10


def documents() -> list[str]:
    """~0.6 MB: source files (argparse, typing, inspect span several 64 KiB tasks), non-ASCII, CRLF, blank lines."""
    docs = [(STDLIB / n).read_text() for n in NAMES]
    return docs + ["héllo ☃ 日本語\r\nline two\r\n\n\n  indented\n", "no newline at the end", "x\n" * 5000]


def write_corpus(root: Path, fmt: str, docs: list[str]) -> list[str]:
    """The documents as `fmt` files under root; returns data.paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    root.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    if fmt in ("txt", "txt.zst"):
        for i, d in enumerate(docs):
            data = d.encode()
            (root / f"doc{i:03d}.{fmt}").write_bytes(zstandard.compress(data) if fmt == "txt.zst" else data)
        return [str(root / f"*.{fmt}")]
    path = root / f"corpus.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(lines)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        path.write_bytes(zstandard.compress(lines))
    else:
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=4)
    return [str(path)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_sentencepiece([ln for d in documents() for ln in d.split("\n") if ln], 512))
    return str(path)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(readers, "BLOCK", BLOCK)


def cfg_for(paths, cache, **kw) -> DataConfig:
    return DataConfig(name="text", paths=paths, cache_dir=str(cache), **kw)


def build(cfg: DataConfig):
    logs = []
    corpus = prepare_corpus(cfg, log=logs.append)
    return corpus, "\n".join(logs)


def stream(corpus) -> tuple[bytes, bytes]:
    return corpus.train_path.read_bytes(), corpus.val_path.read_bytes()


# ---------------------------------------------------------------- formats, workers, split


@pytest.fixture(scope="module")
def formats(tmp_path_factory, sp_model):
    """fmt -> prepared corpus of the same documents, from .txt files ... to Parquet; default BLOCK for 'txt'."""
    root, docs = tmp_path_factory.mktemp("formats"), documents()
    out = {}
    mp = pytest.MonkeyPatch()
    try:
        for fmt in ("txt", "txt.zst", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt, 1 MiB tasks"):
            if fmt == "txt, 1 MiB tasks":
                mp.undo()
            else:
                mp.setattr(readers, "BLOCK", BLOCK)
            paths = write_corpus(root / fmt.split(",")[0], fmt.split(",")[0], docs)
            out[fmt] = build(cfg_for(paths, root / "cache", tokenizer=sp_model, workers=1))[0]
    finally:
        mp.undo()
    return out


def test_every_format_gives_the_same_token_stream(formats):
    ref = formats["txt"]
    assert ref.meta["documents"] == len(documents()) and ref.meta["train_tokens"] > 100_000
    for fmt, corpus in formats.items():
        assert corpus.key != ref.key or fmt == "txt"
        assert stream(corpus) == stream(ref), fmt
        assert corpus.meta["corpus"] == ref.meta["corpus"], fmt  # the fingerprint of the text, not of the files
    tok = ref.tokenizer()
    train = ref.train_tokens()
    eos = np.flatnonzero(train == tok.eos_id)
    assert tok.decode(train[:eos[0]]) in documents()  # the first document, whole, then EOS


def test_same_bytes_for_1_and_3_workers(tmp_path, small_blocks):
    """The trained tokenizer too: both passes (sampling, tokenizing) run on 3 spawned workers."""
    paths = write_corpus(tmp_path / "txt", "txt", documents())
    one = build(cfg_for(paths, tmp_path / "c1", vocab_size=512, workers=1))[0]
    three, log = build(cfg_for(paths, tmp_path / "c3", vocab_size=512, workers=3))
    assert three.meta["workers"] == 3 and one.key == three.key
    assert stream(one) == stream(three)
    assert (one.path / "tokenizer.model").read_bytes() == (three.path / "tokenizer.model").read_bytes()
    print("\n" + three.summary())


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_two_files_give_val_fraction_of_the_tokens(tmp_path, sp_model, fraction):
    """Not one file of the two (half), nor none: about `fraction` of each file's text."""
    docs = documents()
    for i in range(2):
        (tmp_path / f"part{i}.txt").write_text("".join(docs[i::2]))
    corpus = build(cfg_for([str(tmp_path / "*.txt")], tmp_path / "c", tokenizer=sp_model, val_fraction=fraction))[0]
    m = corpus.meta
    share = m["val_tokens"] / (m["train_tokens"] + m["val_tokens"])
    assert abs(share - fraction) < 0.02, share
    assert abs(m["val_segments"] / m["segments"] - fraction) < 0.02


def test_a_jsonl_corpus_holds_out_whole_documents(tmp_path, sp_model):
    docs = [f"document {i}: " + "word " * (i % 40) + "\n" for i in range(3000)]
    corpus = build(cfg_for(write_corpus(tmp_path, "jsonl", docs), tmp_path / "c", tokenizer=sp_model,
                           val_fraction=0.1))[0]
    tok, val = corpus.tokenizer(), corpus.val_tokens()
    ends = np.flatnonzero(val == tok.eos_id)
    held = [tok.decode(val[a + 1:b]) for a, b in zip([-1, *ends[:-1]], ends)]
    assert ends[-1] == len(val) - 1 and set(held) <= set(docs) and 0.08 < len(held) / len(docs) < 0.12


# ---------------------------------------------------------------- bad input: one line, naming file and line


@pytest.mark.parametrize("case, match", [
    ("malformed", r"corpus.jsonl:3: malformed JSON line"),
    ("missing_field", r"corpus.jsonl:2: no 'text' field \(it has: body\): set data.text_key"),
    ("not_string", r"corpus.jsonl:1: field 'text' is int, not a string"),
    ("parquet_column", r"corpus.parquet: no column 'text' \(it has: body\)"),
    ("corrupt_gzip", r"cannot read corpus file .*corpus.jsonl.gz"),
    ("empty", r"holds no text"),
])
def test_bad_input_names_the_file_and_line(tmp_path, sp_model, case, match):
    if case == "malformed":
        (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    elif case == "missing_field":
        (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    elif case == "not_string":
        (tmp_path / "corpus.jsonl").write_text('{"text": 5}\n')
    elif case == "parquet_column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["a"]}), tmp_path / "corpus.parquet")
    elif case == "corrupt_gzip":
        (tmp_path / "corpus.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    else:
        (tmp_path / "corpus.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=match) as info:
        build(cfg_for([str(tmp_path / "corpus.*")], tmp_path / "c", tokenizer=sp_model))
    assert "\n" not in str(info.value)


def test_missing_optional_package_and_small_dtype_are_one_line(tmp_path, monkeypatch, sp_model):
    from tokenizers import Tokenizer, models
    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"</s>": 70_000}, unk_token="w0"))
    big.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w1 w2\n")
    cfg = cfg_for([str(tmp_path / "a.txt")], tmp_path / "c", tokenizer=str(tmp_path), token_dtype="uint16")
    with pytest.raises(DataError, match=r"data.token_dtype=uint16 holds ids below 65536, but the vocabulary has 70001"):
        check_data(cfg)
    cfg.token_dtype = "auto"
    check_data(cfg)
    assert cfg.vocab_size == 70_001  # taken from the tokenizer: data.vocab_size is not needed
    (tmp_path / "b.parquet").write_bytes(b"")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(DataError, match=r"Parquet files .*b.parquet.*pip install 'megatron-lite\[data\]'"):
        check_data(cfg_for([str(tmp_path / "*")], tmp_path / "c", tokenizer=sp_model))


# ---------------------------------------------------------------- the build lock


def test_stale_lock_of_another_host_is_taken_over(tmp_path, sp_model, monkeypatch):
    monkeypatch.setattr(lock, "STALE_S", 1.0)
    monkeypatch.setattr(lock, "POLL_S", 0.1)
    cfg = cfg_for(write_corpus(tmp_path / "txt", "txt", documents()[:3]), tmp_path / "c", tokenizer=sp_model)
    from megatron_lite.data.corpus import corpus_key
    key = corpus_key(check_data(cfg), cfg)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / f"{key}.lock.0").write_text(json.dumps({"host": "elsewhere", "pid": 1, "beat": 7}))
    t0 = time.monotonic()
    corpus, log = build(cfg)
    assert time.monotonic() - t0 >= 1.0
    assert "elsewhere:1 is preparing" in log and "taking over" in log and "has not changed for 1 s" in log
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [key]  # the stale lock is cleaned up


def test_a_lock_file_not_yet_written_is_waited_on_then_taken_over(tmp_path, sp_model, monkeypatch):
    """A holder creates its lock file (O_EXCL) before writing it, so a waiter can find it empty (which once
    crashed the waiting ranks of a job with a KeyError)."""
    monkeypatch.setattr(lock, "STALE_S", 0.5)
    monkeypatch.setattr(lock, "POLL_S", 0.05)
    cfg = cfg_for(write_corpus(tmp_path / "txt", "txt", documents()[:3]), tmp_path / "c", tokenizer=sp_model)
    from megatron_lite.data.corpus import corpus_key
    key = corpus_key(check_data(cfg), cfg)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / f"{key}.lock.0").write_text("")
    corpus, log = build(cfg)
    assert "taking over" in log and "has not changed for 0 s" in log
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [key]


def test_a_failed_build_stops_its_waiters_with_its_message(tmp_path, sp_model, monkeypatch):
    """The waiter does not try again: it raises the builder's one line."""
    monkeypatch.setattr(lock, "POLL_S", 0.05)
    from megatron_lite.data import encode

    def fail_late(self, *a):
        time.sleep(0.5)
        raise DataError("corpus.jsonl:7: malformed JSON line (boom): fix or remove the line")
    monkeypatch.setattr(encode.Worker, "encode", fail_late)
    cfg = cfg_for(write_corpus(tmp_path, "jsonl", ["a\n"]), tmp_path / "c", tokenizer=sp_model, workers=1)
    errors, logs = {}, []

    def run(name, delay):
        time.sleep(delay)
        try:
            prepare_corpus(cfg, log=logs.append)
        except DataError as e:
            errors[name] = str(e)
    threads = [threading.Thread(target=run, args=(n, d)) for n, d in (("builder", 0), ("waiter", 0.2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == {"builder": "corpus.jsonl:7: malformed JSON line (boom): fix or remove the line",
                      "waiter": "corpus.jsonl:7: malformed JSON line (boom): fix or remove the line"}
    assert any("waiting for it" in line for line in logs)


KILLABLE = """
import sys, time
from megatron_lite.data import DataConfig, encode, prepare_corpus, readers
readers.BLOCK = 64 << 10
if sys.argv[1] == "slow":
    fast = encode.Worker.encode
    encode.Worker.encode = lambda *a: (time.sleep(0.3), fast(*a))[1]
prepare_corpus(DataConfig(name="text", paths=sys.argv[2:3], tokenizer=sys.argv[3], workers=1, cache_dir=sys.argv[4]))
"""


def test_a_build_killed_half_way_resumes_when_started_again(tmp_path, sp_model, small_blocks):
    paths = write_corpus(tmp_path / "txt", "txt", documents())
    reference = build(cfg_for(paths, tmp_path / "ref", tokenizer=sp_model, workers=1))[0]
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-c", KILLABLE, "slow", paths[0], sp_model, str(cache)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = cache / f"{reference.key}.build.0" / "progress.json"
    deadline = time.monotonic() + 60
    while not (state.exists() and json.loads(state.read_text())["tasks"] >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["tasks"]
    assert 3 <= done < 10 and not (cache / reference.key).exists()  # half-way, and nothing looks complete
    again = subprocess.run(cmd[:3] + ["fast"] + cmd[4:], cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "its process is gone" in again.stdout and "were done" in again.stdout, again.stdout
    resumed = prepare_corpus(cfg_for(paths, cache, tokenizer=sp_model), log=lambda _: None)
    assert stream(resumed) == stream(reference)
    resumed.verify_checksums()
    assert sorted(p.name for p in cache.iterdir()) == [reference.key]


def _slow_builder_and_waiter(cfg: DataConfig, timeout_s: float):
    """Rank 0 builds for longer than the process group's timeout; rank 1 waits; then they all-reduce."""
    import torch
    import torch.distributed as dist

    from megatron_lite.data import encode
    lock.POLL_S = 0.1
    rank = dist.get_rank()
    if rank == 0:
        fast = encode.Worker.encode
        encode.Worker.encode = lambda *a: (time.sleep(2 * timeout_s), fast(*a))[1]
    else:
        time.sleep(1.0)  # let rank 0 take the lock
    logs = []
    t0 = time.monotonic()
    corpus = prepare_corpus(cfg, log=logs.append)
    waited = time.monotonic() - t0
    total = torch.tensor([len(corpus.train_tokens())], dtype=torch.float64)
    dist.all_reduce(total)  # the first collective after the wait: it would have timed out in a barrier
    assert total.item() == 2 * len(corpus.train_tokens())
    if rank == 1:
        assert waited > timeout_s and any("is preparing" in line and "waiting" in line for line in logs), logs


def _spawned(rank, port, timeout_s, fn, args):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s))
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def test_a_waiting_rank_outlives_the_process_group_timeout(tmp_path, sp_model):
    import torch.multiprocessing as mp

    from megatron_lite.parallel import free_port
    timeout_s = 2.0
    cfg = cfg_for(write_corpus(tmp_path, "jsonl", documents()[:4]), tmp_path / "c", tokenizer=sp_model, workers=1)
    mp.spawn(_spawned, args=(free_port(), timeout_s, _slow_builder_and_waiter, (cfg, timeout_s)), nprocs=2)


# ---------------------------------------------------------------- memory


# Peak RSS in KiB: VmHWM of this process (ru_maxrss would include the pytest process it was started from) and
# ru_maxrss of its largest worker.
MEASURE = """
import resource, sys
from megatron_lite.data import DataConfig, prepare_corpus, readers
readers.BLOCK = 256 << 10
prepare_corpus(DataConfig(name="text", paths=[sys.argv[1]], tokenizer=sys.argv[2], workers=2, cache_dir=sys.argv[3]),
               log=lambda _: None)
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, sp_model):
    """Peak RSS (KiB) of the preparing process and of its largest worker, for a corpus and one 4x larger."""
    text = "".join(documents())
    peaks = {}
    for mb in (2, 8):
        path = tmp_path / f"corpus{mb}.txt"
        path.write_text(text * (mb * 10**6 // len(text)))
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), sp_model, str(tmp_path / "c")], cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        peaks[mb] = [int(x) for x in out.stdout.split()]
    print(f"\npeak RSS (MiB) main, largest worker: {[(mb, [k // 1024 for k in p]) for mb, p in peaks.items()]}")
    for who in (0, 1):  # 6 MB more text: the old code held ~4 bytes per byte of text (24 MB more); allow 6 MiB
        assert peaks[8][who] - peaks[2][who] < 6 * 1024 and peaks[8][who] < 300 * 1024, peaks


# ---------------------------------------------------------------- end to end: two jobs, one cache, an HF tokenizer


def _train(run_dir, *overrides, check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), "parallel.tp=1", *SMALL, "train.steps=2", f"run_dir={run_dir}",
           *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """Two train.py jobs started together, both waiting on a lock held by this test; when it lets go, one
    builds and the other waits for it; both train 2 steps on the same cache, with an HF tokenizer.json."""
    from test_tokenizer import hf_bpe
    root = tmp_path_factory.mktemp("jobs")
    tok = hf_bpe(root / "hf" / "tokenizer.json", ["<|endoftext|>"])
    paths = write_corpus(root / "txt", "txt", documents()[:6])
    data = ["data=text", f"data.paths=[{paths[0]}]", f"data.tokenizer={tok}", f"data.cache_dir={root / 'c'}",
            "data.workers=1"]
    cfg = cfg_for(paths, root / "c", tokenizer=str(tok))
    from megatron_lite.data.corpus import corpus_key
    out = root / "c" / corpus_key(check_data(cfg), cfg)
    out.parent.mkdir()
    held = lock._try_lock(out.parent, out.name, 0)  # a live "builder": this process
    results = {}
    jobs = [threading.Thread(target=lambda n=n: results.__setitem__(n, _train(root / n, *data))) for n in "ab"]
    for t in jobs:
        t.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
            (root / n / "train.log").exists() and "waiting for it" in (root / n / "train.log").read_text() for n in "ab"):
        time.sleep(0.2)
    held.release()  # without building: the two jobs race for the lock
    for t in jobs:
        t.join()
    return root, out, data


def test_two_jobs_prepare_one_corpus_and_train_on_it_with_an_hf_tokenizer(two_jobs):
    root, out, data = two_jobs
    logs = {n: (root / n / "train.log").read_text() for n in "ab"}
    assert all("is preparing" in log and "waiting for it" in log for log in logs.values())  # both waited for us
    assert sorted(f"data: prepared {out}" in log for log in logs.values()) == [False, True], logs  # one built
    assert all(f"using cached tokens in {out}" in log or f"data: prepared {out}" in log for log in logs.values())
    assert all("step      2/2 | loss" in log for log in logs.values())
    meta = json.loads((out / "meta.json").read_text())
    step = root / "a" / "checkpoints" / "step_0000002"
    recorded = json.loads((step / "meta.json").read_text())["data"]
    assert (recorded["corpus"], recorded["tokenizer"]) == (meta["corpus"], meta["tokenizer"]["fingerprint"])
    assert meta["tokenizer"]["kind"] == "hf" and (step / "tokenizer.json").is_file()
    # the preparation command, with the same overrides, finds the same cache and checks it
    cli = subprocess.run([sys.executable, "-m", "megatron_lite.data", *data], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"data cache: {out}" in cli.stdout and "checksums verified" in cli.stdout and "Hugging Face BPE tokenizer" in cli.stdout
    print("\n" + cli.stdout)


def _other_corpus(root: Path, data: list[str]) -> list[str]:
    other = write_corpus(root / "other", "txt", documents()[6:9])
    return [d if not d.startswith("data.paths") else f"data.paths=[{other[0]}]" for d in data]


def test_resuming_on_another_corpus_stops_with_one_line(two_jobs):
    root, _, data = two_jobs
    stopped = _train(root / "a", *_other_corpus(root, data), "train.steps=3", check=False)
    assert stopped.returncode == 2
    error = stopped.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: checkpoint {root / 'a' / 'checkpoints' / 'step_0000002'} was trained on corpus ")
    assert "but this run has corpus" in error and "data.allow_corpus_change=true" in error, error


@pytest.mark.slow
def test_allow_corpus_change_continues_on_the_new_corpus(two_jobs):
    root, _, data = two_jobs
    proc = _train(root / "b", *_other_corpus(root, data), "train.steps=4", "data.allow_corpus_change=true")
    log = (root / "b" / "train.log").read_text()
    assert "continuing on the new corpus (data.allow_corpus_change=true)" in log and "step      4/4 | loss" in log, \
        proc.stdout
