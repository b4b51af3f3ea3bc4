"""Section 7 of `make bench`: data preparation, against the tokenizer's own encode speed and across corpus sizes.

Corpora are this Python's standard library source (the pystdlib corpus: .py files outside the test suites),
copied as many times as it takes to reach the size asked for, one directory per copy. Every preparation
runs `python -m megatron_lite.data` style, in a fresh process (`prepare_corpus` in a subprocess), which
reports its wall-clock time, its CPU time (with its workers': a rate per CPU-second does not depend on what else
runs on the machine) and its peak memory: VmHWM of the preparing process and the largest ru_maxrss of its workers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PREPARE = """
import json, resource, sys, time
from megatron_lite.data import DataConfig, prepare_corpus
if __name__ == "__main__":
    kw = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    corpus = prepare_corpus(DataConfig(name="text", **kw), log=lambda _: None)
    seconds = time.perf_counter() - t0
    hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
    cpu = sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
    print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu, text_bytes=corpus.meta["text_bytes"], path=str(corpus.path),
                          tokens=corpus.meta["train_tokens"] + corpus.meta["val_tokens"], main_kib=hwm,
                          worker_kib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)))
"""


def make_corpus(root: Path, target_bytes: int) -> tuple[Path, int]:
    """Copies of the stdlib source under root/copyNNN/ until at least target_bytes; returns (root, bytes)."""
    from megatron_lite.data.corpus import _stdlib_files
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [(f.relative_to(stdlib), f.read_bytes()) for f in _stdlib_files()]
    total, copy = 0, 0
    while total < target_bytes:
        for rel, data in sources:
            dst = root / f"copy{copy:03d}" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            total += len(data)
            if total >= target_bytes:
                break
        copy += 1
    return root, total


def prepare(paths: list[str], cache: Path, **kw) -> dict:
    """prepare_corpus in a fresh process; its time, sizes and peak memory."""
    out = subprocess.run([sys.executable, "-c", PREPARE, json.dumps(dict(paths=paths, cache_dir=str(cache), **kw))],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"preparation failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def raw_encode_rate(tokenizer_dir: Path, text_files: list[Path]) -> dict:
    """MB per CPU-second of sentencepiece's own encode (one thread, every line of the text) and of megatron-lite's
    Tokenizer.encode_batch (the same, plus the <n> joins), on the same text as the pipeline."""
    from megatron_lite.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir)
    texts = [f.read_bytes().decode("utf-8", "replace") for f in text_files]
    size = sum(len(t.encode()) for t in texts)
    lines = [ln for t in texts for ln in t.split("\n")]
    t0 = time.process_time()
    tok.sp.encode(lines, num_threads=1)
    raw = time.process_time() - t0
    t0 = time.process_time()
    tok.encode_batch(texts)
    ours = time.process_time() - t0
    return {"bytes": size, "sentencepiece": size / raw / 1e6, "encode_batch": size / ours / 1e6}


def run(work: Path, sizes_mb: list[int], throughput_mb: int, **settings) -> dict:
    """Throughput (given tokenizer, 1 and 2 workers, vs raw encode) and memory/time at each corpus size."""
    shutil.rmtree(work, ignore_errors=True)
    res: dict = {"sizes": []}
    for mb in sizes_mb:  # default settings: the BPE is trained on a sample of at most 20M characters
        root, total = make_corpus(work / f"corpus{mb}", mb * 10**6)
        r = prepare([str(root / "**/*.py")], work / f"cache{mb}", **settings)
        res["sizes"].append(dict(mb=mb, corpus_bytes=total, **r))
        shutil.rmtree(root)
    tokenizer = Path(res["sizes"][0]["path"])
    root, total = make_corpus(work / "slice", throughput_mb * 10**6)
    files = sorted(root.rglob("*.py"))
    res["raw"] = raw_encode_rate(tokenizer, files)
    res["workers"] = {}
    for workers in (1, 2):
        r = prepare([str(root / "**/*.py")], work / f"tp{workers}", tokenizer=str(tokenizer), workers=workers)
        res["workers"][workers] = dict(r, mb_s=r["text_bytes"] / r["seconds"] / 1e6,
                                       mb_cpu_s=r["text_bytes"] / r["cpu_seconds"] / 1e6)
    shutil.rmtree(work, ignore_errors=True)
    return res
