"""Data that is never silently wrong (issue 18): binary files, invalid UTF-8, paths without data=text, damaged
and stale caches, the EOS/BOS choice, long lines, the tokenizer's pieces, leftovers of killed builds, the data
command's own behaviour; and small corpora that still get a validation window (issue 17).

Every corpus is made here, small; builds use a sentencepiece BPE trained once per module (or a byte-level BPE
in Hugging Face's format), with readers.BLOCK = 64 KiB where a corpus must span several tasks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli import ROOT, env
from test_data_prepare import build, stream
from megatron_lite.data import DataConfig, DataError, check_data, readers
from megatron_lite.data.split import LINE_MAX, SEGMENT
from megatron_lite.tokenizer import load_tokenizer, train_sentencepiece

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE = [(STDLIB / n).read_text() for n in ("textwrap.py", "json/decoder.py", "string.py", "bisect.py", "functools.py")]
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\x01\0" + bytes(range(256)) * 64  # a binary header, then anything


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(train_sentencepiece([ln for d in CODE for ln in d.split("\n") if ln], 512))
    return str(path)


def cfg_for(paths, cache, **kw) -> DataConfig:
    return DataConfig(name="text", paths=[str(p) for p in paths], cache_dir=str(cache), workers=1, **kw)


# ---------------------------------------------------------------- 1. binary files


def test_a_binary_file_is_refused_naming_it_or_skipped_and_counted(tmp_path, sp_model):
    (tmp_path / "code.py").write_text(CODE[0])
    (tmp_path / "image.txt").write_bytes(PNG)
    with pytest.raises(DataError, match=r"corpus file .*image.txt looks binary \(a NUL byte at offset 8\).*"
                                        r"data.binary_files=skip"):
        build(cfg_for([tmp_path / "*"], tmp_path / "c", tokenizer=sp_model))
    skipped, log = build(cfg_for([tmp_path / "*"], tmp_path / "c", tokenizer=sp_model, binary_files="skip"))
    assert skipped.meta["skipped"] == {str(tmp_path / "image.txt"): "binary (a NUL byte at offset 8)"}
    assert "1 file skipped (e.g." in log and "1 file skipped" in skipped.summary()
    alone = build(cfg_for([tmp_path / "code.py"], tmp_path / "c", tokenizer=sp_model))[0]
    assert stream(skipped) == stream(alone)  # nothing of the image reached the tokens


# ---------------------------------------------------------------- 2. invalid UTF-8


def _latin1_corpus(root: Path, fmt: str, text: bytes) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":
        (root / "doc.txt").write_bytes(text)
        return root / "doc.txt"
    line = b'{"text": "' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n") + b'"}\n'
    (root / "doc.jsonl").write_bytes(b'{"text": "first"}\n' + line)
    return root / "doc.jsonl"


@pytest.mark.parametrize("fmt, where", [("txt", "doc.txt:3"), ("jsonl", "doc.jsonl:2")])
def test_invalid_utf8_is_an_error_in_text_and_jsonl_alike_or_replaced_and_counted(tmp_path, sp_model, fmt, where):
    utf8 = CODE[1].encode()
    one_bad = utf8.replace(b"\n", b"\n\xe9", 1)  # one Latin-1 byte in 30 kB of UTF-8 (line 2 starts with it)
    one_bad = b"line one\n" + one_bad
    path = _latin1_corpus(tmp_path / "one", fmt, one_bad)
    with pytest.raises(DataError, match=rf"{where}: invalid UTF-8 \(byte 0xe9 at offset .*data.bad_utf8=replace"):
        build(cfg_for([path], tmp_path / "c", tokenizer=sp_model))
    corpus, log = build(cfg_for([path], tmp_path / "c", tokenizer=sp_model, bad_utf8="replace"))
    assert corpus.meta["bad_utf8"] == {"replaced": 1, "files": {str(path): 1}}
    assert "1 invalid UTF-8 sequences replaced by U+FFFD in 1 file" in log
    tok = corpus.tokenizer()
    text = tok.decode(np.concatenate([corpus.train_tokens(), corpus.val_tokens()]))
    assert "\ufffd" in text and "\xe9" not in text
    latin1 = _latin1_corpus(tmp_path / "latin1", fmt, "café crème à la française\n".encode("latin-1") * 50)
    with pytest.raises(DataError, match=r"invalid UTF-8 sequences in .* bytes \(over 0.1%, even for "
                                        r"data.bad_utf8=replace\): the file is not UTF-8"):
        build(cfg_for([latin1], tmp_path / "c", tokenizer=sp_model, bad_utf8="replace"))


# ---------------------------------------------------------------- 3. data.paths without data=text


def test_paths_select_the_text_corpus(tmp_path, sp_model):
    (tmp_path / "mine.txt").write_text(CODE[2])
    cfg = DataConfig(paths=[str(tmp_path / "mine.txt")], tokenizer=sp_model, cache_dir=str(tmp_path / "c"), workers=1)
    assert cfg.name == "pystdlib"  # the default, as `train.py data.paths=[...]` leaves it
    corpus = build(cfg)[0]
    assert corpus.meta["name"] == "text" and corpus.meta["files"] == 1
    assert Counter("".join(map(corpus.tokenizer().decode, (corpus.train_tokens(), corpus.val_tokens())))) == \
        Counter(CODE[2])


# ---------------------------------------------------------------- 4. damaged caches, 5. stale caches


@pytest.fixture
def new_job(monkeypatch):
    """Each prepare_corpus call as if from a process started just now (a new job): a verification done before it
    does not count for it. (Verification is once per job: a process takes any done since it started.)"""
    from megatron_lite.data import verify
    monkeypatch.setattr(verify, "process_start", time.time)


def _flip(path: Path, at: int, to: int | None = None) -> None:
    """Change the byte at `at` (to `to`, else all its bits), keeping the file's size and modification time."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] = data[at] ^ 0xFF if to is None else to
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_same_size_byte_flip_in_a_cache_is_found_and_the_cache_rebuilt(tmp_path, sp_model, new_job):
    (tmp_path / "a.py").write_text(CODE[0])
    cfg = cfg_for([tmp_path / "a.py"], tmp_path / "c", tokenizer=sp_model)
    corpus, log = build(cfg)
    assert "verified" not in log  # its builder computed the checksums
    good = stream(corpus)
    again, log = build(cfg)
    assert re.search(r"data: verified [\d.]+ kB of tokens of .* in [\d.]+ s \(once per job.*\): sound", log), log
    assert stream(again) == good
    _flip(corpus.train_path, 100)
    rebuilt, log = build(cfg)
    assert "train.bin does not match its sha256 in meta.json" in log and "set aside and prepared again" in log
    assert stream(rebuilt) == good and len(list((tmp_path / "c").glob("*.damaged.*"))) == 1


def test_one_process_verifies_and_the_others_take_its_result_or_its_error(tmp_path, sp_model, monkeypatch):
    from megatron_lite.data import lock, verify
    monkeypatch.setattr(lock, "POLL_S", 0.05)
    (tmp_path / "a.py").write_text(CODE[0])
    cfg = cfg_for([tmp_path / "a.py"], tmp_path / "c", tokenizer=sp_model)
    build(cfg)
    start = time.time()
    monkeypatch.setattr(verify, "process_start", lambda: start)  # one job, started after the build
    slow = verify.check
    monkeypatch.setattr(verify, "check", lambda *a: (time.sleep(0.5), slow(*a))[1])
    logs = {}
    threads = [threading.Thread(target=lambda n=n: logs.__setitem__(n, build(cfg)[1])) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted("verified" in log and ": sound" in log for log in logs.values()) == [False, True], logs
    assert any("was verified by" in log for log in logs.values())
    monkeypatch.setattr(verify, "process_start", time.time)  # a new job; its verifier fails
    monkeypatch.setattr(verify, "check", lambda *a: (time.sleep(0.5), 1 / 0))
    errors = []

    def run():
        try:
            build(cfg)
        except (DataError, ZeroDivisionError) as e:
            errors.append(str(e))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and len(errors) == 2  # nobody waits forever
    assert any("the verification of" in e and "ZeroDivisionError" in e for e in errors), errors


def test_a_same_size_edit_with_the_mtime_restored_is_found_by_verify_corpus(tmp_path, sp_model, new_job):
    path = tmp_path / "a.py"
    path.write_text(CODE[0])
    cfg = cfg_for([path], tmp_path / "c", tokenizer=sp_model)
    old = build(cfg)[0]
    records = json.loads((old.path / "files.json").read_text())
    assert records == [dict(path=str(path), size=path.stat().st_size, mtime_ns=path.stat().st_mtime_ns,
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest())]
    _flip(path, 10, ord("X"))  # same size, same mtime: the cache key cannot tell
    assert build(cfg)[0].path == old.path and "stale" not in build(cfg)[1]  # the cheap key: the trade-off
    cfg.verify_corpus = True
    new, log = build(cfg)
    assert f"stale: corpus file {path} changed since the cache was prepared" in log, log
    text = "".join(map(new.tokenizer().decode, (new.train_tokens(), new.val_tokens())))
    assert Counter(text) == Counter(path.read_text())


# ---------------------------------------------------------------- 6. which EOS and BOS


def test_eos_and_bos_are_said_with_their_reason_and_chosen_by_options(tmp_path, sp_model):
    """A bare tokenizer.json of a SmolLM-like vocabulary picks <|endoftext|> by name, its directory picks <|im_end|>
    from tokenizer_config.json: each says so; data.eos_token / data.bos_token choose, and the cache keeps it."""
    import shutil

    from test_tokenizer import hf_bpe
    model = tmp_path / "model"
    hf_bpe(model / "tokenizer.json", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    (tmp_path / "bare").mkdir()
    shutil.copy(model / "tokenizer.json", tmp_path / "bare" / "tokenizer.json")
    bare, full = load_tokenizer(tmp_path / "bare" / "tokenizer.json"), load_tokenizer(model)
    assert (bare.eos_id, bare.bos_id, full.eos_id, full.bos_id) == (0, None, 2, 1)
    assert ("EOS '<|endoftext|>'=0 (no file beside tokenizer.json names one: the first well-known name in its "
            "vocabulary; it also has <|im_end|>; data.eos_token= chooses); no BOS") in bare.describe()
    assert ("EOS '<|im_end|>'=2 (eos_token in tokenizer_config.json); BOS '<|im_start|>'=1 (bos_token in "
            "tokenizer_config.json) not at document starts (what its post-processor does)") in full.describe()
    (tmp_path / "a.py").write_text(CODE[3])
    cfg = cfg_for([tmp_path / "a.py"], tmp_path / "c", tokenizer=str(tmp_path / "bare" / "tokenizer.json"),
                  eos_token="<|im_end|>", bos_token="<|im_start|>")
    check_data(cfg)
    corpus, log = build(cfg)
    assert "EOS '<|im_end|>'=2 (data.eos_token); BOS '<|im_start|>'=1 (data.bos_token) at document starts" in log
    train, val = corpus.train_tokens(), corpus.val_tokens()
    stream_ = train if len(train) else val
    assert stream_[0] == 1 and stream_[-1] == 2 and 0 not in set(np.concatenate([train, val]).tolist())
    again = load_tokenizer(corpus.path)  # the cache's copy (checkpoints and exports carry it) says the same
    assert (again.eos_id, again.bos_id, again.add_bos) == (2, 1, True)
    none = cfg_for([tmp_path / "a.py"], tmp_path / "c", tokenizer=str(model), bos_token="")
    assert load_tokenizer(model, None, "").add_bos is False
    assert build(none)[0].key != corpus.key
    with pytest.raises(DataError, match=r"data.eos_token='<eos>' is not a token of .*tokenizer.json"):
        check_data(cfg_for([tmp_path / "a.py"], tmp_path / "c", tokenizer=str(model), eos_token="<eos>"))
    with pytest.raises(DataError, match=r"is a sentencepiece model, whose EOS and BOS are its own"):
        check_data(cfg_for([tmp_path / "a.py"], tmp_path / "c", tokenizer=sp_model, eos_token="</s>"))


# ---------------------------------------------------------------- 7. long lines, 8. the tokenizer's pieces


def test_long_lines_are_cut_at_spaces_and_lose_no_byte(tmp_path, sp_model, monkeypatch):
    """A 0.4 MB single line across 64 KiB tasks: every character back, every piece the tokenizer saw bounded."""
    monkeypatch.setattr(readers, "BLOCK", 64 << 10)
    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "gamma", "δelta", "日本語", "x" * 30]
    line = " ".join(words[i] for i in rng.integers(0, len(words), 50_000)) + "\nshort line\n"
    (tmp_path / "one_line.txt").write_text(line)
    from megatron_lite.tokenizer import SentencePieceTokenizer
    seen = []
    real = SentencePieceTokenizer.encode_batch
    monkeypatch.setattr(SentencePieceTokenizer, "encode_batch", lambda self, texts: (
        seen.extend(len(t.encode()) for t in texts), real(self, texts))[1])
    corpus = build(cfg_for([tmp_path / "one_line.txt"], tmp_path / "c", tokenizer=sp_model, val_fraction=0.1))[0]
    assert max(seen) <= SEGMENT + LINE_MAX + 1 and len(seen) > 50
    tok, m = corpus.tokenizer(), corpus.meta
    assert 0.05 < m["val_tokens"] / (m["train_tokens"] + m["val_tokens"]) < 0.15  # not all or nothing
    texts = [tok.decode(s) for s in (corpus.train_tokens(), corpus.val_tokens())]  # EOS decodes to nothing
    assert Counter(texts[0] + texts[1]) == Counter(line)  # every character back


# Peak RSS in KiB (VmHWM) of a preparation in one process (data.workers=1: reading and tokenizing together).
MEASURE = """
import sys
from megatron_lite.data import DataConfig, prepare_corpus
prepare_corpus(DataConfig(name="text", paths=[sys.argv[1]], tokenizer=sys.argv[2], workers=1, cache_dir=sys.argv[3]),
               log=lambda _: None)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def test_a_5_mb_single_line_needs_no_more_memory_than_ordinary_text(tmp_path, sp_model):
    ordinary = "".join(CODE)
    ordinary = ordinary * (5 * 10**6 // len(ordinary))
    single = ordinary.replace("\n", " ")
    peaks = {}
    for name, text in (("ordinary", ordinary), ("single line", single)):
        path = tmp_path / f"{name.replace(' ', '_')}.txt"
        path.write_text(text)
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path), sp_model, str(tmp_path / "c")], cwd=ROOT,
                             env=env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peaks[name] = int(out.stdout) // 1024
    print(f"\npeak RSS (MiB): {peaks}")  # before: the whole line in sentencepiece at once, ~50 bytes per byte
    assert peaks["single line"] < peaks["ordinary"] + 20, peaks


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A byte-level BPE (GPT-2 style) and one that prepends "▁" to every text it encodes (Llama 2 style)."""
    from test_tokenizer import TEXTS, hf_bpe
    from tokenizers import Tokenizer, models, normalizers, trainers
    root = tmp_path_factory.mktemp("hf")
    gpt2 = hf_bpe(root / "gpt2" / "tokenizer.json", ["<|endoftext|>"])
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    (root / "llama2").mkdir()
    tk.save(str(root / "llama2" / "tokenizer.json"))
    return {"gpt2": gpt2, "llama2": root / "llama2" / "tokenizer.json"}


@pytest.mark.parametrize("which, cuts", [("gpt2", "words"), ("llama2", "none")])
def test_hf_tokenizer_gets_small_pieces_with_the_ids_of_whole_runs(tmp_path, hf_dirs, monkeypatch, which, cuts):
    """Cut at line starts before a non-space where the tokenizer gives the same ids there (checked at load); the
    token files equal those of encoding each run whole."""
    from megatron_lite.tokenizer import HFTokenizer
    for i, text in enumerate(CODE):
        (tmp_path / f"f{i}.py").write_text(text)
    seen = []
    real = HFTokenizer.encode_batch
    monkeypatch.setattr(HFTokenizer, "encode_batch", lambda self, texts: (seen.extend(map(len, texts)),
                                                                          real(self, texts))[1])
    cfg = cfg_for([tmp_path / "*.py"], tmp_path / "c", tokenizer=str(hf_dirs[which]))
    corpus = build(cfg)[0]
    assert load_tokenizer(hf_dirs[which]).line_cuts == cuts
    assert (max(seen) < 2 * SEGMENT) is (cuts == "words"), max(seen)
    monkeypatch.setattr(HFTokenizer, "line_cuts", "none")  # the reference: every run whole
    whole = build(cfg_for([tmp_path / "*.py"], tmp_path / "whole", tokenizer=str(hf_dirs[which])))[0]
    assert stream(corpus) == stream(whole)


# ---------------------------------------------------------------- 10. messages


def test_unreadable_kinds_of_path_name_the_file_and_the_fix(tmp_path, sp_model):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"data.paths entry '.*dir' is a directory: use '.*dir/\*\*'"):
        check_data(cfg_for([tmp_path / "dir"], tmp_path / "c"))
    (tmp_path / "corpus.txt.xz").write_bytes(b"\xfd7zXZ\0\0")
    with pytest.raises(DataError, match=r"corpus file .*corpus.txt.xz is a .xz file.*\(xz -d\)"):
        check_data(cfg_for([tmp_path / "corpus.txt.xz"], tmp_path / "c"))
    (tmp_path / "array.json").write_text('[{"text": "a"}]')
    with pytest.raises(DataError, match=r"corpus file .*array.json is a JSON array: megatron-lite reads JSON Lines"):
        build(cfg_for([tmp_path / "array.json"], tmp_path / "c", tokenizer=sp_model))
    (tmp_path / "lines.json").write_text('{"text": "%s"}' % CODE[3].replace("\\", "\\\\").replace('"', '\\"')
                                         .replace("\n", "\\n"))
    (tmp_path / "same.jsonl").write_text((tmp_path / "lines.json").read_text())
    as_json = build(cfg_for([tmp_path / "lines.json"], tmp_path / "c", tokenizer=sp_model))[0]
    assert stream(as_json) == stream(build(cfg_for([tmp_path / "same.jsonl"], tmp_path / "c", tokenizer=sp_model))[0])


def test_a_dictionary_encoded_parquet_column_is_read(tmp_path, sp_model):
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = CODE[:3] * 2
    pq.write_table(pa.table({"text": pa.array(docs).dictionary_encode()}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": docs}), tmp_path / "plain.parquet")
    got = build(cfg_for([tmp_path / "d.parquet"], tmp_path / "c", tokenizer=sp_model))[0]
    assert stream(got) == stream(build(cfg_for([tmp_path / "plain.parquet"], tmp_path / "c", tokenizer=sp_model))[0])


def test_tokenizer_training_prints_its_end_and_duration(tmp_path):
    (tmp_path / "a.py").write_text("".join(CODE))
    log = build(cfg_for([tmp_path / "a.py"], tmp_path / "c", vocab_size=512))[1]
    assert "training the tokenizer (vocab 512) on" in log and ": done in " in log.split("training the tokenizer")[-1]


# ---------------------------------------------------------------- 9. leftovers, Ctrl-C, --clean; 10. the command


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += kids - out
            out |= kids
    return out


def _gone(pid: int) -> bool:
    try:  # a zombie is gone: it waits only to be reaped by whoever adopted it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _all_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(map(_gone, pids)):
        time.sleep(0.1)
    assert all(map(_gone, pids)), [pid for pid in pids if not _gone(pid)]


def _start_building(cmd: list[str], cache: Path, **kw) -> tuple[subprocess.Popen, set[int]]:
    """Start a preparation and wait for it to be tokenizing on its two workers; return it and its descendants
    (the workers, multiprocessing's resource tracker)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        kids = _descendants(proc.pid)
        if len(kids) >= 3 and list(cache.glob("*.build.*/progress.json")):
            return proc, kids
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"the preparation was not seen tokenizing: {proc.communicate()}")


def _corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(CODE) * 200)  # 17 MB: seconds of tokenizing
    return path


KILLABLE = """
import sys
from megatron_lite.data import DataConfig, prepare_corpus
prepare_corpus(DataConfig(name="text", paths=[sys.argv[1]], tokenizer=sys.argv[2], workers=2, cache_dir=sys.argv[3]))
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_workers_die_with_the_preparing_process(tmp_path, sp_model, sig):
    cache = tmp_path / "c"
    cmd = [sys.executable, "-c", KILLABLE, str(_corpus_file(tmp_path)), sp_model, str(cache)]
    proc, kids = _start_building(cmd, cache)
    assert len(kids) >= 3, kids  # two workers and the resource tracker
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    _all_gone(kids)


def test_ctrl_c_is_one_line_and_clean_removes_what_is_left(tmp_path, sp_model):
    """Ctrl-C (SIGINT to the terminal's process group) stops the command with one line; --clean then removes the
    build it left and a damaged copy, and keeps a complete cache; the command imports no torch."""
    cache = tmp_path / "c"
    cmd = [sys.executable, "-m", "megatron_lite.data", "data=text", f"data.paths=[{_corpus_file(tmp_path)}]",
           f"data.cache_dir={cache}", "data.workers=2", f"data.tokenizer={sp_model}"]
    proc, kids = _start_building(cmd, cache, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        "interrupted: the preparation stops here; run the same command again to resume it"], err
    _all_gone(kids)
    (tmp_path / "a.py").write_text(CODE[0])
    kept = build(cfg_for([tmp_path / "a.py"], cache, tokenizer=sp_model))[0]
    (cache / f"{kept.key}.damaged.20260101-000000").mkdir()
    (cache / f"{kept.key}.damaged.20260101-000000" / "train.bin").write_bytes(b"x" * 1000)
    before = sorted(p.name for p in cache.iterdir())
    assert any(".build." in name for name in before), before
    cleaned = subprocess.run([sys.executable, "-X", "importtime", "-m", "megatron_lite.data", "--clean",
                              f"data.cache_dir={cache}"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0, cleaned.stderr[-2000:]
    assert sorted(p.name for p in cache.iterdir()) == [kept.key], cleaned.stdout
    assert "removed" in cleaned.stdout and f"kept the cache {kept.path}" in cleaned.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in cleaned.stderr.splitlines() if line.startswith("import time")}
    assert "megatron_lite.config" in imported and not {m for m in imported if m.split(".")[0] == "torch"}


def test_help_lists_the_command_and_its_data_keys():
    out = subprocess.run([sys.executable, "-m", "megatron_lite.data", "--help"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("python -m megatron_lite.data: prepare a corpus")
    assert "  data.bad_utf8=\"error\"  invalid UTF-8 in text or JSONL: error | replace" in out.stdout
    assert "model." not in out.stdout and "Powered by Hydra" not in out.stdout


# ---------------------------------------------------------------- issue 17: small corpora


def _six_documents(tmp_path: Path) -> list[Path]:
    """~100 kB in 6 documents (the fine-tuning corpus of issue 17): the split holds out none of their segments."""
    text = "".join(CODE)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(text[i * 16_000:(i + 1) * 16_000])
    return paths


def test_a_small_corpus_still_gets_a_validation_window(tmp_path, sp_model):
    from megatron_lite.data.split import hold_out
    corpus = build(cfg_for(_six_documents(tmp_path), tmp_path / "c", tokenizer=sp_model))[0]
    train, val = corpus.train_tokens(), corpus.val_tokens()
    assert len(val) == 0 and len(train) > 20_000  # what stopped the run: "the val data has 0 tokens"
    t, v, note = hold_out(train, val, 1025)
    assert len(v) == 1025 and np.array_equal(np.concatenate([t, v]), train)  # nothing lost, nothing repeated
    assert note == ("validation: 1,025 tokens (one window): the split held out 0, so the last 1,025 tokens of the "
                    "training text were moved to validation")
    t, v, note = hold_out(train[:1500], train[1500:1600], 1025)  # under two windows: validate on the last one
    assert len(t) == 1600 and np.array_equal(v, train[575:1600]) and "too short (1,600 tokens)" in note
    t, v, _ = hold_out(train[:100], train[100:5000], 1025)  # training short of a window: it takes from validation
    assert len(t) == 1025 and len(v) == 4900 - 925
    t, v, note = hold_out(train[:5000], train[5000:7000], 1025)
    assert (len(t), len(v)) == (5000, 2000) and note.startswith("validation: 2,000 tokens (28.6%) held out")
    with pytest.raises(DataError, match=r"the corpus has 1,000 tokens, fewer than one training window \(model.seq_len "
                                        r"\+ 1 = 1,025\): give more text \(data.paths\) or a shorter model.seq_len"):
        hold_out(train[:900], train[900:1000], 1025)


@pytest.mark.slow
def test_train_py_runs_on_a_six_document_corpus(tmp_path, sp_model):
    from cli import SMALL
    paths = _six_documents(tmp_path)
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, "train.steps=2", "train.eval_every=2",
                          f"run_dir={tmp_path / 'run'}", "data=text", f"data.paths=[{','.join(map(str, paths))}]",
                          f"data.tokenizer={sp_model}", f"data.cache_dir={tmp_path / 'c'}"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "data: validation: 65 tokens (one window): the split held out 0" in log and "val loss" in log
