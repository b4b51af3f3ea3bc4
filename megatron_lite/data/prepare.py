"""Preparing a corpus: `prepare_corpus(cfg)` finds its cache or builds it, once, whoever else asks for it.

Every process that needs the corpus (each rank of a job, several jobs, or `python -m megatron_lite.data`)
computes the cache key from `stat` alone (corpus.py), then `lock.build_once` lets exactly one of them build
while the others poll the filesystem. The build, in `<key>.build.<generation>/`:

1. the tokenizer: data.tokenizer's files are copied, or a sentencepiece BPE is trained on a sample of at most
   data.max_tokenizer_chars characters: the training segments of lowest `split.sample_rank` (a shuffle by
   content), found in one parallel pass over the corpus that keeps only the current best candidates
   (passes.py);
2. the tokens: a second parallel pass; the tasks' token ids are appended to train.bin / val.bin in task order
   as they come back, so the files do not depend on the number of workers, and peak memory is a few tasks per
   worker, whatever the corpus size;
3. meta.json (counts, checksums, the corpus and tokenizer fingerprints) and DONE; the directory is then
   renamed into place.

progress.json records the tasks done (after their bytes are flushed), so a build whose process died is
resumed by the next one from where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..tokenizer import load_tokenizer, train_sentencepiece
from . import readers
from .cache import BINS, TokenizedCorpus, problem
from .config import DataConfig, DataError, token_dtype
from .corpus import FORMAT_VERSION, check_data, corpus_key, given_tokenizer
from .encode import Stats
from .lock import HeldLock, build_once
from .passes import encode_pass, sample_pass, worker_pool
from .progress import Progress, human_bytes, human_time
from .verify import FILES, stamp, verify_once
from .split import LINE_MAX, SEGMENT

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE = "progress.json"


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_root(cfg: DataConfig) -> Path:
    root = Path(cfg.cache_dir).expanduser()
    return root if root.is_absolute() else REPO_ROOT / root


def prepare_corpus(cfg: DataConfig, log: Callable[[str], None] = print, *, progress_bar: bool = False
                   ) -> TokenizedCorpus:
    """The prepared corpus of `cfg`: from the cache, or built by this process or another one it waits for."""
    if getattr(mp.current_process(), "_inheriting", False):  # multiprocessing's own test for this case
        raise RuntimeError("prepare_corpus was called while a worker process imported the calling script: put the "
                           "script's top-level code under `if __name__ == '__main__':`")
    files = check_data(cfg)
    out = cache_root(cfg) / corpus_key(files, cfg)
    build = _build if cfg.format == "text" else _build_chat
    for attempt in range(3):  # a cache found damaged is prepared again, and that one verified in turn
        built = build_once(out, lambda work, previous, held: build(files, cfg, out.name, work, previous, held, log,
                                                                     progress_bar), problem, log)
        if built or (wrong := verify_once(out, cfg, log)) is None:
            break
        log(f"data: cache {out} is damaged ({wrong}): it is set aside and prepared again")
    else:
        raise DataError(f"data cache {out} was found damaged after each of 3 preparations ({wrong}): check the disk")
    corpus = TokenizedCorpus.open(out)
    if built:
        m = corpus.meta
        log(f"data: prepared {out}: {m['documents']:,} documents, {m['train_tokens']:,} train + {m['val_tokens']:,} "
            f"val tokens in {m['seconds']:.1f} s")
    else:
        log(f"data: using cached tokens in {out}")
    log(f"data: tokenizer: {corpus.meta['tokenizer']['describe']}")
    if corpus.changes():
        log(f"data: left out or changed by the preparation: {corpus.changes()}")
    if cfg.format != "text":
        from .chat_prepare import describe_tokens
        log(f"data: {describe_tokens(corpus.meta)}")
    return corpus


def _build_chat(files: list[Path], cfg: DataConfig, key: str, work: Path, previous: Path | None, held: HeldLock,
                log: Callable[[str], None], bar: bool) -> None:
    """data.format=chat | prompt_completion: data/chat_prepare.py builds, with this module's tokenizer record."""
    from .chat_prepare import build
    total = sum(f.stat().st_size for f in files)
    workers = min(cfg.workers or available_cores(), max(1, -(-total // readers.BLOCK)))
    build(files, cfg, key, work, previous, held, log, bar, workers, _tokenizer_meta)


def _build(files: list[Path], cfg: DataConfig, key: str, work: Path, previous: Path | None, held: HeldLock,
           log: Callable[[str], None], bar: bool) -> None:
    t0 = time.time()
    stamps = {f: (f.stat().st_size, f.stat().st_mtime_ns) for f in files}
    total = sum(size for size, _ in stamps.values())
    workers = min(cfg.workers or available_cores(), max(1, -(-total // readers.BLOCK)))  # not more than tasks
    state = _start(work, previous, log)
    with worker_pool(workers) as pool:
        if not state["tokenizer"]:
            if cfg.tokenizer:
                given_tokenizer(cfg).save(work)
            else:
                lines = sample_pass(files, cfg, pool, 2 * workers, Progress("sampling text for the tokenizer", total,
                                                                            log, held.status, bar=bar))
                size = sum(len(ln) + 1 for ln in lines)
                held.status.clear()
                held.status["stage"] = f"training the tokenizer (vocab {cfg.vocab_size}) on {human_bytes(size)}"
                log(f"data: {held.status['stage']} ...")
                t1 = time.time()
                (work / "tokenizer.model").write_bytes(train_sentencepiece(lines, cfg.vocab_size))
                log(f"data: {held.status['stage']}: done in {human_time(time.time() - t1)}")
                del lines
            state["tokenizer"] = True
            _save_state(work, state)
        tok = load_tokenizer(work)
        dtype = token_dtype(cfg, tok.vocab_size)
        sources: dict[str, str] = {}
        digests = encode_pass(files, cfg, work, state, dtype.name, pool, 2 * workers, held,
                              Progress("tokenizing", total, log, held.status, bar=bar), lambda: _save_state(work, state),
                              sources)
    for f, (size, mtime) in stamps.items():
        if (f.stat().st_size, f.stat().st_mtime_ns) != (size, mtime):
            raise DataError(f"corpus file {f} changed while it was being prepared: prepare again once it is final")
    (work / FILES).write_text(json.dumps([dict(path=str(f), size=size, mtime_ns=mtime, sha256=sources[str(f)])
                                          for f, (size, mtime) in stamps.items()]))
    stats = Stats(**state["stats"])
    if stats.documents == 0:
        raise DataError(f"the corpus ({len(files)} files{', e.g. ' + str(files[0]) if files else ''}) holds no text: "
                        f"check data.paths (and data.text_key for JSONL/Parquet)")
    meta = dict(
        format=FORMAT_VERSION, key=key, name=cfg.name, paths=list(cfg.paths), files=len(files), text_key=cfg.text_key,
        val_fraction=cfg.val_fraction, documents=stats.documents, text_bytes=stats.text_bytes,
        segments=stats.segments, val_segments=stats.val_segments, corpus=_corpus_id(stats, cfg),
        bad_utf8=dict(replaced=sum(stats.bad_utf8.values()), files=stats.bad_utf8),
        skipped=stats.skipped,
        train_tokens=state["train.bin"] // dtype.itemsize, val_tokens=state["val.bin"] // dtype.itemsize,
        dtype=dtype.name, sha256=digests, tokenizer=_tokenizer_meta(tok, cfg, work),
        seconds=time.time() - t0, workers=workers, host=socket.gethostname())
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    stamp(work, corpus=True, seconds=0.0)  # the checksums were computed from the corpus just now
    (work / STATE).unlink()
    (work / "DONE").touch()


def _tokenizer_meta(tok, cfg: DataConfig, work: Path) -> dict:
    return dict(kind=tok.kind, vocab_size=tok.vocab_size, eos_id=tok.eos_id, bos_id=tok.bos_id, add_bos=tok.add_bos,
                fingerprint=tok.fingerprint,
                describe=(given_tokenizer(cfg) if cfg.tokenizer else tok).describe(),  # with its reasons
                source=str(cfg.tokenizer) if cfg.tokenizer else "trained on this corpus",
                files={name: (work / name).stat().st_size for name in tok.files})


def _corpus_id(stats: Stats, cfg: DataConfig) -> str:
    """The text (as a multiset of segments) and its split: equal for a corpus in any format or file order."""
    ident = [FORMAT_VERSION, f"{stats.content:032x}", stats.text_bytes, stats.segments, cfg.val_fraction]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- resuming


def _start(work: Path, previous: Path | None, log) -> dict:
    """A fresh state, or the state of `previous` (a dead builder's directory) with its finished work copied.

    Copied, not moved: a builder that only seemed dead may still be writing there."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in BINS:
        (work / name).touch()
    fresh = {"tokenizer": False, "tasks": 0, "train.bin": 0, "val.bin": 0, "stats": asdict(Stats()),
             "cuts": [readers.BLOCK, SEGMENT, LINE_MAX]}  # what a task is: resume only a build cut the same way
    try:
        state = json.loads((previous / STATE).read_text()) if previous else None
    except (OSError, ValueError):
        state = None
    if state is not None and state.get("cuts") != fresh["cuts"]:
        state = None
    if state is None:
        if previous:
            log(f"data: {previous} holds no finished work to resume; starting over")
        return fresh
    for src in previous.iterdir():
        if src.name not in (*BINS, STATE) and src.is_file():
            shutil.copyfile(src, work / src.name)
    for name in BINS:
        if not _copy_prefix(previous / name, work / name, state[name]):
            log(f"data: {previous / name} is shorter than its progress says; starting over")
            for name in BINS:
                (work / name).write_bytes(b"")
            return fresh
    log(f"data: resuming the preparation left in {previous}: {state['tasks']} tasks "
        f"({human_bytes(state['stats']['text_bytes'])} of text) were done")
    _save_state(work, state)
    return state


def _copy_prefix(src: Path, dst: Path, n: int) -> bool:
    with open(dst, "wb") as out:
        if n == 0:
            return True
        if not src.is_file() or src.stat().st_size < n:
            return False
        with open(src, "rb") as f:
            while n > 0:
                chunk = f.read(min(n, 1 << 24))
                out.write(chunk)
                n -= len(chunk)
    return True


def _save_state(work: Path, state: dict) -> None:
    tmp = work / f"{STATE}.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, work / STATE)
