"""Data pipeline: corpus discovery, tokenizer determinism, the token cache, and DP-independent sampling."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.data import (DataConfig, DataError, WindowSampler, _split_documents, corpus_files,
                                dp_sample_indices, prepare_corpus)

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = ["textwrap.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "functools.py",
         "dataclasses.py", "string.py", "bisect.py"]  # ~0.3 MB: enough for a 512-piece BPE, fast to train
SNIPPET = "def f(x):\n\tif x:  # tab, two spaces\n        return 'héllo ☃ 日本語 ⏎ <n> </s>'\n\n\r\n  \n"


def small_cfg(cache_dir, **kw) -> DataConfig:
    return DataConfig(name="text", paths=[str(STDLIB / f) for f in SMALL], vocab_size=512,
                      cache_dir=str(cache_dir), **kw)


def prepare(cfg, first=True):
    logs, barriers = [], []
    corpus = prepare_corpus(cfg, is_first_rank=first, barrier=lambda: barriers.append(1), log=logs.append)
    assert len(barriers) == 1
    return corpus, " ".join(logs)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("cache"))
    corpus, log = prepare(cfg)
    assert "training tokenizer" in log
    return cfg, corpus


def test_pystdlib_discovery():
    files = corpus_files(DataConfig())
    assert len(files) > 500 and files == sorted(files)
    rel = {f.relative_to(STDLIB).as_posix() for f in files}
    assert "collections/__init__.py" in rel and "json/decoder.py" in rel
    for f in rel:
        parts = f.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), f


def test_text_globs_sorted_and_deduplicated(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    cfg = DataConfig(name="text", paths=[str(tmp_path / "**/*.txt"), str(tmp_path / "a.txt")])
    assert corpus_files(cfg) == sorted([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub/c.txt"])


def test_bad_paths_and_settings_raise(tmp_path):
    missing = str(tmp_path / "nope*.txt")
    with pytest.raises(DataError, match="nope"):
        corpus_files(DataConfig(name="text", paths=[missing]))
    with pytest.raises(DataError, match="data.paths"):
        corpus_files(DataConfig(name="text"))
    with pytest.raises(DataError, match="val_fraction"):
        corpus_files(DataConfig(val_fraction=0.0))
    with pytest.raises(DataError, match="data.name"):
        corpus_files(DataConfig(name="wiki"))


def test_tokenizer_identical_across_processes(tmp_path):
    """Two fresh processes, two caches: byte-identical tokenizer and token files."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from tests.test_data import small_cfg, prepare; "
            "c, _ = prepare(small_cfg(sys.argv[2])); "
            "print(json.dumps([c.key, c.tokenizer().encode(sys.argv[3])]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO), str(tmp_path / f"c{i}"), SNIPPET],
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    outs = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    key = outs[0][0]
    for name in ("tokenizer.model", "train.bin", "val.bin"):
        assert (tmp_path / "c0" / key / name).read_bytes() == (tmp_path / "c1" / key / name).read_bytes()


def test_prepare_corpus_cache_and_round_trip(small):
    cfg, corpus = small
    done = corpus.train_path.parent / "DONE"
    mtime = done.stat().st_mtime_ns
    again, log = prepare(cfg)
    assert "cached" in log and "training" not in log and done.stat().st_mtime_ns == mtime
    assert again == corpus
    train, val = corpus.train_tokens(), corpus.val_tokens()
    assert train.dtype == np.uint16 and len(train) > 10_000 and len(val) > 100
    assert int(train.max()) < cfg.vocab_size and int(val.max()) < cfg.vocab_size
    tok = corpus.tokenizer()
    assert tok.vocab_size == cfg.vocab_size and (train == tok.eos_id).sum() == len(SMALL) - 1
    assert tok.decode(tok.encode(SNIPPET)) == SNIPPET
    source = (STDLIB / "textwrap.py").read_text()
    assert tok.decode(tok.encode(source)) == source
    assert tok.decode(torch.tensor(tok.encode(source))) == source  # tensors from generation decode too
    assert len(tok.encode(source)) < len(source) / 1.5  # even 512 pieces compress code


def test_other_rank_opens_cache_and_fails_without_one(small, tmp_path):
    cfg, corpus = small
    assert prepare(cfg, first=False)[0] == corpus
    with pytest.raises(DataError, match="first rank"):
        prepare(small_cfg(tmp_path), first=False)


def test_partial_cache_is_rebuilt(small, tmp_path):
    """A directory without DONE (a crashed preparation) is never used."""
    cfg = small_cfg(tmp_path)
    corpus = prepare(cfg)[0]
    (corpus.train_path.parent / "DONE").unlink()
    corpus.train_path.write_bytes(b"\xff\xff" * 10)
    rebuilt, log = prepare(cfg)
    assert "training tokenizer" in log and (rebuilt.train_path.parent / "DONE").exists()
    assert np.array_equal(rebuilt.train_tokens(), small[1].train_tokens())


def test_single_file_holds_out_its_tail():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = _split_documents([text], 0.1)
    assert train[0] + val[0] == text and val[0].startswith("line 9") and val[0].count("\n") == 10


def test_window_sampler_is_a_function_of_seed_and_index():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = WindowSampler(tokens, 16, seed=1), WindowSampler(tokens, 16, seed=1)
    x, y = a.window(5)
    assert x.dtype == torch.int64 and x.shape == (16,) and torch.equal(y[:-1], x[1:]) and y[-1] == x[-1] + 1
    assert all(torch.equal(a.window(i)[0], b.window(i)[0]) for i in range(20))
    other = WindowSampler(tokens, 16, seed=2)
    assert any(not torch.equal(a.window(i)[0], other.window(i)[0]) for i in range(20))
    starts = [a.offset(i) for i in range(2000)]
    assert min(starts) == 0 and max(starts) == len(tokens) - 16 - 1  # covers the whole range, no overrun
    xb, yb = a.batch([3, 4])
    assert xb.shape == yb.shape == (2, 16) and torch.equal(xb[1], a.window(4)[0])


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_data_order_does_not_depend_on_dp_size(dp_size):
    global_batch, micro_batch = 8, 2
    sampler = WindowSampler(np.arange(500, dtype=np.uint16), 8, seed=0)
    expected = [sampler.window(i)[0] for i in range(3 * global_batch)]
    for step in range(3):
        consumed = step * global_batch
        by_index = {}
        for micro_step in range(global_batch // (micro_batch * dp_size)):
            for rank in range(dp_size):
                idx = dp_sample_indices(consumed, micro_step, micro_batch, rank, dp_size)
                for i, x in zip(idx, sampler.batch(idx)[0]):
                    assert i not in by_index
                    by_index[i] = x
        assert sorted(by_index) == list(range(consumed, consumed + global_batch))
        assert all(torch.equal(by_index[i], expected[i]) for i in by_index)


def test_too_short_corpus_raises():
    with pytest.raises(DataError, match=r"10 tokens.*seq_len"):
        WindowSampler(np.arange(10, dtype=np.uint16), 10, seed=0)
