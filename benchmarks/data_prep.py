"""Section 7 of `make bench`: data preparation, against the tokenizer's own encode speed and across corpus sizes.

Corpora are this Python's standard library source (the pystdlib corpus: .py files outside the test suites),
copied as many times as it takes to reach the size asked for, one directory per copy. Every preparation
runs `python -m megatron_lite.data` style, in a fresh process (`prepare_corpus` in a subprocess), which
reports its wall-clock time, its CPU time (with its workers': a rate per CPU-second does not depend on what else
runs on the machine) and its peak memory: VmHWM of the preparing process and the largest ru_maxrss of its workers.
"""
from __future__ import annotations

import json
import os
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


ONE_THREAD = {**os.environ, "RAYON_NUM_THREADS": "1"}  # tokenizers on one core, as in a preparing worker


def prepare(paths: list[str], cache: Path, **kw) -> dict:
    """prepare_corpus in a fresh process (tokenizers on one thread); its time, sizes and peak memory."""
    out = subprocess.run([sys.executable, "-c", PREPARE, json.dumps(dict(paths=paths, cache_dir=str(cache), **kw))],
                         cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
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


HF_RATE = """
import json, sys, time
from pathlib import Path
from megatron_lite.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1])
texts = [Path(f).read_text() for f in sys.argv[2:]]
size = sum(len(t.encode()) for t in texts)
pieces, whole = [], []
for t in texts:  # ~8 KiB pieces cut at line starts, as the library is fast on
    lines, cur = t.splitlines(keepends=True), ""
    for line in lines:
        cur += line
        if len(cur) >= 8192:
            pieces.append(cur)
            cur = ""
    pieces.append(cur)
rates = {}
for name, encode, batch in (("pieces", tok.tk.encode_batch, pieces), ("files", tok.tk.encode_batch, texts),
                            ("fast", tok.tk.encode_batch_fast, pieces)):
    t0 = time.process_time()
    [e.ids for e in encode(batch, add_special_tokens=False)]
    rates[name] = size / (time.process_time() - t0) / 1e6
print(json.dumps(dict(bytes=size, **rates)))
"""


def hf_tokenizer(directory: Path, files: list[Path], vocab_size: int) -> Path:
    """A byte-level BPE in Hugging Face's format (GPT-2's pipeline: ByteLevel pre-tokenizer and decoder), trained with
    the `tokenizers` library on `files`: a real HF tokenizer.json without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train([str(f) for f in files], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                          show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def hf_rate(tokenizer: Path, files: list[Path]) -> dict:
    """MB per CPU-second of the library's own encode_batch (one thread, the ids taken out as the pipeline does) on
    ~8 KiB pieces and on whole files, and of encode_batch_fast (no offsets) on the pieces."""
    out = subprocess.run([sys.executable, "-c", HF_RATE, str(tokenizer), *map(str, files)], cwd=ROOT,
                         capture_output=True, text=True, env=ONE_THREAD)
    if out.returncode != 0:
        raise RuntimeError(f"HF encode rate failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def long_line(work: Path, mb: int, tokenizers: dict[str, str]) -> dict:
    """Peak memory of preparing `mb` MB of ordinary text and of the same text as one line (newlines -> spaces), with
    each tokenizer, on 2 workers."""
    text = "".join(f.read_text() for f in make_corpus(work / "src", 2 * 10**6)[0].rglob("*.py"))
    text = (text * (mb * 10**6 // len(text) + 1))[:mb * 10**6]
    files = {"ordinary": work / "ordinary.txt", "one line": work / "one_line.txt"}
    files["ordinary"].write_text(text)
    files["one line"].write_text(text.replace("\n", " "))
    out = {}
    for name, tok in tokenizers.items():
        for kind, path in files.items():
            out[f"{name}, {kind}"] = prepare([str(path)], work / f"cache_{name}", tokenizer=tok, workers=2)
    shutil.rmtree(work, ignore_errors=True)
    return out


def run(work: Path, sizes_mb: list[int], throughput_mb: int, long_mb: int, **settings) -> dict:
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
    hf = hf_tokenizer(work / "hf", files[:len(files) // 4], 16384 if throughput_mb >= 10 else 2048)
    r = prepare([str(root / "**/*.py")], work / "hf_cache", tokenizer=str(hf), workers=1)
    res["hf"] = dict(hf_rate(hf, files), pipeline=r["text_bytes"] / r["cpu_seconds"] / 1e6, seconds=r["seconds"])
    shutil.rmtree(root)
    res["long_line"] = long_line(work / "long", long_mb, {"sentencepiece": str(tokenizer), "hf": str(hf)})
    shutil.rmtree(work, ignore_errors=True)
    return res
