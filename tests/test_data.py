"""Data pipeline: corpus discovery, tokenizer determinism, the token cache, the validation split, and
DP-independent sampling (random windows and epochs). Preparation at scale (formats, workers, locks, memory):
test_data_prepare.py."""
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.data import (DataConfig, DataError, EpochSampler, WindowSampler, corpus_files, dp_sample_indices,
                                prepare_corpus)
from megatron_lite.data.split import SEGMENT, is_val, segments

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = ["textwrap.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "functools.py",
         "dataclasses.py", "string.py", "bisect.py"]  # ~0.3 MB: enough for a 512-piece BPE, fast to train
SNIPPET = "def f(x):\n\tif x:  # tab, two spaces\n        return 'héllo ☃ 日本語 ⏎ <n> </s>'\n\n\r\n  \n"


def small_cfg(cache_dir, **kw) -> DataConfig:
    return DataConfig(name="text", paths=[str(STDLIB / f) for f in SMALL], vocab_size=512,
                      cache_dir=str(cache_dir), **kw)


def prepare(cfg):
    logs = []
    corpus = prepare_corpus(cfg, log=logs.append)
    return corpus, " ".join(logs)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = small_cfg(tmp_path_factory.mktemp("cache"))
    corpus, log = prepare(cfg)
    assert "training the tokenizer" in log
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
    assert tok.vocab_size == cfg.vocab_size == corpus.vocab_size and corpus.meta["documents"] == len(SMALL)
    assert train[-1] == val[-1] == tok.eos_id  # every document (and every piece held out of one) ends with EOS
    assert (train == tok.eos_id).sum() + (val == tok.eos_id).sum() >= len(SMALL)
    assert tok.decode(tok.encode(SNIPPET)) == SNIPPET
    source = (STDLIB / "textwrap.py").read_text()
    assert tok.decode(tok.encode(source)) == source
    assert tok.decode(torch.tensor(tok.encode(source))) == source  # tensors from generation decode too
    assert len(tok.encode(source)) < len(source) / 1.5  # even 512 pieces compress code


@pytest.mark.parametrize("damage", ["no DONE", "truncated"])
def test_damaged_cache_is_set_aside_and_rebuilt(small, tmp_path, damage):
    """A cache without DONE (a crash) or with a file shorter than meta.json says is never trained on: it is
    moved aside (not deleted: another job may have it open) and prepared again."""
    cfg = small_cfg(tmp_path)
    corpus = prepare(cfg)[0]
    if damage == "no DONE":
        (corpus.path / "DONE").unlink()
    else:
        corpus.train_path.write_bytes(corpus.train_path.read_bytes()[:-2])
    rebuilt, log = prepare(cfg)
    assert "is damaged" in log and "training the tokenizer" in log and rebuilt.path == corpus.path
    assert np.array_equal(rebuilt.train_tokens(), small[1].train_tokens())
    assert len(list(tmp_path.glob(f"{corpus.key}.damaged.*"))) == 1
    rebuilt.verify_checksums()


def test_segments_cut_at_line_starts():
    doc = b"".join(b"%05d %s\n" % (i, b"x" * (i % 50)) for i in range(2000))
    segs = segments(doc, 0)
    assert b"".join(s for _, s in segs) == doc and len(segs) == len(doc) // SEGMENT + 1
    starts = np.cumsum([0] + [len(s) for _, s in segs[:-1]])
    for (j, s), start in zip(segs, starts):
        assert j == start // SEGMENT and (start == 0 or doc[start - 1:start] == b"\n") and s.endswith(b"\n")
    # the same segments when the document is read in two pieces cut at a segment start (as tasks cut files)
    cut = doc.index(b"\n", 5 * SEGMENT - 1) + 1
    assert segments(doc[:cut], 0) + segments(doc[cut:], cut) == segs


def test_long_documents_give_val_fraction_of_their_segments():
    for f in (0.05, 0.1, 0.3):
        for u in (0.0, 0.37, 0.99):
            held = sum(is_val(j, u, f) for j in range(1000))
            assert held in (int(1000 * f), int(1000 * f) + 1), (f, u, held)
    # a one-segment document is held out for u >= 1 - f: with probability f over documents
    assert [is_val(0, u, 0.1) for u in (0.0, 0.89, 0.9, 0.95)] == [False, False, True, True]


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
    with pytest.raises(DataError, match=r"val data has 10 tokens.*data.val_fraction"):
        EpochSampler(np.arange(10, dtype=np.uint16), 10, seed=0, name="val")


def test_epoch_mode_visits_every_window_once_per_epoch():
    seq, n_tokens = 8, 8 * 37 + 1 + 5  # 37 windows; the 5 tokens at the end are never a window start
    sampler = EpochSampler(np.arange(n_tokens, dtype=np.uint32), seq, seed=3)
    assert sampler.windows == 37
    for epoch in range(3):
        idx = range(epoch * 37, (epoch + 1) * 37)
        starts = [sampler.offset(i) for i in idx]
        assert sorted(starts) == [k * seq for k in range(37)], epoch  # each window exactly once
        assert {sampler.epoch(i) for i in idx} == {epoch}
        x, y = sampler.batch(list(idx))
        assert torch.equal(x[:, 1:], y[:, :-1]) and int(y.max()) < n_tokens
    orders = [[sampler.offset(i) for i in range(e * 37, (e + 1) * 37)] for e in range(2)]
    assert orders[0] != orders[1]  # a new permutation each epoch
    # a fresh sampler (a resumed run) at any position gives the same windows, in any order of asking
    again = EpochSampler(np.arange(n_tokens, dtype=np.uint32), seq, seed=3)
    assert [again.offset(i) for i in (80, 3, 40, 36, 37)] == [sampler.offset(i) for i in (80, 3, 40, 36, 37)]


@pytest.mark.parametrize("resume_at, dp_sizes", [(0, (1,)), (3, (1, 2)), (7, (4, 1))])
def test_epoch_order_resumes_at_any_step_and_dp_size(resume_at, dp_sizes):
    """A run that changes DP size at step `resume_at` sees the same samples as one that never stopped."""
    tokens = np.arange(8 * 50 + 1, dtype=np.uint16)
    global_batch, micro = 8, 2
    reference = EpochSampler(tokens, 8, seed=5)
    expected = [reference.window(i)[0] for i in range(12 * global_batch)]  # 12 steps: two epochs of 50 windows
    seen = []
    for step in range(12):
        dp = dp_sizes[0] if step < resume_at else dp_sizes[-1]
        if step in (0, resume_at):  # a fresh process: the position is all it knows
            sampler = EpochSampler(tokens, 8, seed=5)
        step_samples = {}
        for rank in range(dp):
            for m in range(global_batch // (micro * dp)):
                idx = dp_sample_indices(step * global_batch, m, micro, rank, dp)
                step_samples.update(zip(idx, sampler.batch(idx)[0]))
        seen += [step_samples[i] for i in sorted(step_samples)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == len(expected)
