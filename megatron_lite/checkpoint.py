"""Sharded checkpoints through torch.distributed.checkpoint (DCP): each rank writes its own shards.

Every parameter and AdamW moment is saved as a global tensor described by its shards (a DTensor over
the DP x TP mesh: replicated over DP, split over TP along the layer's `tp_partition_dim`), so DCP can
read a checkpoint into any DP x TP layout, SP on or off, parallel.zero 0 or 1 (the distributed optimizer
hands over its owned ranges as pieces of the same global tensors, checkpoint_shards.py). Nothing is gathered to
one rank.

A checkpoint is complete or invisible: it is written to `step_NNNNNNN.tmp/` and renamed to
`step_NNNNNNN/` by rank 0 only after DCP has written its metadata, which it does once every rank has
finished writing. Loading checks that every shard file named by the metadata is there and long enough.

A save that fails (disk full, permission denied, a vanished path) is failed on every rank alike: DCP gathers
each rank's write error to its coordinator and broadcasts one CheckpointException to all ranks, and rank 0's
own last step (the rename) is shared through the training loop's per-step agreement (`outcome`/`settle`, called
by resilience.RunGuard.check; `wait` agrees on its own). Then rank 0 removes the partial `.tmp`, and the run
stops naming the path and the OS error (checkpoint.on_error=stop) or warns and trains on (warn). Nothing
older is touched, so the previous checkpoint stays intact, `keep` counts complete checkpoints only, and
resume picks the newest intact one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .checkpoint_rng import rng_entries, rng_to_load
from .checkpoint_shards import sharded_moment
from .data import DataError
from .distributed_optimizer import DistributedOptimizer
from .config import train_dtype
from .hf import hf_model_config, is_hf_model_dir, load_hf_weights
from .parallel import world_timeout
from .hf_config import read_source_files, write_source_files
from .tensor_parallel import tp_partition_dim
from .tokenizer import load_tokenizer

_STEP_DIR = re.compile(r"^step_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or parameter."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (checkpoint.on_error=stop); raised on every rank at once."""


@dataclass
class _Save:
    """A save from its start until every rank agrees on its outcome."""
    step: int
    tmp: Path
    done: threading.Event = field(default_factory=threading.Event)  # this rank's part is over
    error: BaseException | None = None  # this rank's: DCP's (the same on every rank) or rank 0's rename


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, raising the OS error itself. PyTorch's zip writer reports a failed write (disk full,
    file too large) as "unexpected pos N vs M" and keeps the OSError only as its __context__, which does not
    survive DCP's pickling of the error to the other ranks."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as e:
            cause = e
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            written = sorted(Path(self.path).glob(f"{plan.storage_data.prefix}*"), key=lambda p: p.stat().st_mtime)
            raise OSError(cause.errno, cause.strerror, cause.filename or (written and str(written[-1])) or None) from e


def _os_error(e: BaseException) -> str:
    """The failing rank and OS error inside a DCP CheckpointException (or the error itself)."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = min(e.failures.items())
        return f"rank {rank}: {inner}"
    return str(e)


class CorpusChangedError(DataError):
    """Resuming on another corpus or tokenizer than the checkpoint's, without data.allow_corpus_change."""


def check_same_data(saved: dict | None, now: dict, path: Path, allow: bool, log=print) -> None:
    """Stop (or, with data.allow_corpus_change, warn) when checkpoint `path` was trained on other data.

    `saved`/`now` are TokenizedCorpus.identity() dicts; checkpoints from before they were recorded pass."""
    if saved is None or (saved["corpus"], saved["tokenizer"]) == (now["corpus"], now["tokenizer"]):
        return
    what = " and ".join(k for k in ("corpus", "tokenizer") if saved[k] != now[k])
    msg = (f"checkpoint {path} was trained on corpus {saved['corpus']} ({saved['corpus_desc']}) with tokenizer "
           f"{saved['tokenizer']} ({saved['tokenizer_desc']}), but this run has corpus {now['corpus']} "
           f"({now['corpus_desc']}) with tokenizer {now['tokenizer']} ({now['tokenizer_desc']})")
    if not allow:
        raise CorpusChangedError(f"{msg}: resume with the same data settings, or set data.allow_corpus_change=true "
                                 f"to continue on the new {what} on purpose (e.g. fine-tuning)")
    log(f"warning: {msg}; continuing on the new {what} (data.allow_corpus_change=true)")


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, newest first (temporary `.tmp` dirs are never listed)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), reverse=True)


def verify(path: Path) -> dict:
    """Raise CheckpointError naming the first missing or truncated file; return the metadata's tensors."""
    for name in (".metadata", "meta.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {path / name} is missing")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated .metadata does not unpickle
        raise CheckpointError(f"checkpoint {path} is damaged: cannot read {path / '.metadata'} ({e})") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(needed.items()):
        f = path / rel
        actual = f.stat().st_size if f.is_file() else None
        if actual is None or actual < size:
            what = "is missing" if actual is None else f"is truncated ({actual} of {size} bytes)"
            raise CheckpointError(f"checkpoint {path} is damaged: shard {f} {what}")
    return metadata.state_dict_metadata


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def resolve(path: str | Path) -> Path:
    """A `step_*` directory, or the newest complete checkpoint of a run directory or checkpoints dir; an HF
    model directory as it is."""
    path = Path(path)
    if _STEP_DIR.match(path.name) or is_hf_model_dir(path):
        return path
    for root in (path / "checkpoints", path):
        found = step_dirs(root)
        if found:
            return found[0]
    raise CheckpointError(f"no checkpoint in {path}: expected step_NNNNNNN/ directories under it or under "
                          f"{path / 'checkpoints'}")


def _mesh(ctx) -> DeviceMesh:
    # this stage's (DP x CP, TP) ranks: weights are replicated over DP x CP and split over TP
    mesh = torch.tensor(ctx.grid[ctx.pp_rank]).view(-1, ctx.tp_size)
    return DeviceMesh.from_group([ctx.dp_cp_group, ctx.tp_group], ctx.device.type, mesh=mesh,
                                 mesh_dim_names=("dp", "tp"))


def _global(local: torch.Tensor, param: torch.Tensor, mesh: DeviceMesh, tp_size: int) -> DTensor:
    """`local` (this rank's part of a tensor laid out like `param`) as a DTensor describing the full tensor."""
    dim = tp_partition_dim(param)
    shape = list(local.shape)
    if dim is not None:
        shape[dim] *= tp_size
    placements = [Replicate(), Shard(dim) if dim is not None else Replicate()]
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def model_state(model, ctx, mesh=None) -> dict:
    mesh = mesh or _mesh(ctx)
    return {f"model.{n}": _global(p.data, p, mesh, ctx.tp_size) for n, p in model.named_parameters()}


def _full_state(model, opt, ctx, copies: bool = True) -> dict:
    """The state dict DCP saves or loads into: the model, AdamW's moments and step, the RNG streams. The moments
    are whole per-parameter global tensors whatever parallel.zero: zero=0's live tensors as DTensors, zero=1's
    owned ranges as pieces of them (checkpoint_shards.py), nothing gathered. `copies=False` (saving) leaves out
    the parameters that copy another stage's (the last stage's tied embedding): the checkpoint holds one, which
    every copy loads."""
    mesh = _mesh(ctx)
    sd = model_state(model, ctx, mesh)
    if isinstance(opt, DistributedOptimizer):
        sd.update(_zero_moments(model, opt, ctx))
    else:
        moments = opt.full_state()
        for n, p in model.named_parameters():
            st = moments[n]
            sd[f"optim.{n}.exp_avg"] = _global(st["exp_avg"], p, mesh, ctx.tp_size)
            sd[f"optim.{n}.exp_avg_sq"] = _global(st["exp_avg_sq"], p, mesh, ctx.tp_size)
            sd[f"optim.{n}.step"] = st["step"]
    sd.update(rng_entries(model.rng.get_states(), ctx))
    if not copies:
        twice = [f"model.{n}" for n in model.tied_copies()]
        twice += [f"optim.{n}.{k}" for n in model.tied_copies() for k in ("exp_avg", "exp_avg_sq", "step")]
        sd = {k: v for k, v in sd.items() if k not in twice}
    return sd


def _zero_moments(model, opt: DistributedOptimizer, ctx) -> dict:
    """zero=1's moments: each rank's owned ranges, views of its state, as pieces of the global tensors."""
    owners, mine = opt.owned_ranges(), {s.name: s for segs in opt.segments for s in segs}
    grid = ctx.grid[ctx.pp_rank]

    def rank_of(dp_cp: int, tp: int) -> int:
        return grid[dp_cp // ctx.cp_size][dp_cp % ctx.cp_size][tp]

    sd = {}
    for n, p in model.named_parameters():
        seg = mine.get(n)
        for key in ("exp_avg", "exp_avg_sq"):
            sd[f"optim.{n}.{key}"] = sharded_moment(p, tp_partition_dim(p), ctx.tp_size, owners[n],
                                                    getattr(seg, key, None), (ctx.dp_cp_rank, ctx.tp_rank), rank_of)
        sd[f"optim.{n}.step"] = opt.step_tensor()
    return sd


def check_shapes(saved: dict, model, ctx, path: Path) -> None:
    for n, p in model.named_parameters():
        key = f"model.{n}"
        if key not in saved:
            raise CheckpointError(f"checkpoint {path} has no parameter {n}: it was saved from another model")
        want = list(p.shape)
        if tp_partition_dim(p) is not None:
            want[tp_partition_dim(p)] *= ctx.tp_size
        got = list(saved[key].size)
        if got != want:
            raise CheckpointError(f"checkpoint {path}: parameter {n} has shape {got} there but {want} in this "
                                  f"model: load a checkpoint of the same model shape (model.* settings)")


def load_state(path: Path, model, opt, ctx, process_group=None, log=None) -> None:
    """Load model, AdamW state and RNG streams from checkpoint `path` in place: any DP x TP layout, SP and
    parallel.zero on or off, saved on any kind of device. `process_group`: the ranks of `ctx` when they are not
    the whole job (tests); `log`: where a note on reseeded RNG streams goes (print)."""
    saved = verify(path)
    check_shapes(saved, model, ctx, path)
    sd = {k: v for k, v in _full_state(model, opt, ctx).items() if not k.startswith("rng.")}
    streams = rng_to_load(saved, model, ctx, f"checkpoint {path}", lambda: _saved_step(path), log or print)
    sd.update({key: model.rng.get_states()[stream] for stream, key in streams.items()})
    dcp.load(sd, checkpoint_id=str(path), process_group=process_group)
    if isinstance(opt, DistributedOptimizer):  # the moments were loaded in place; the step count was not
        opt.load_step_count({n: sd[f"optim.{n}.step"] for n, _ in model.named_parameters()})
    model.rng.set_states({**model.rng.get_states(), **{stream: sd[key] for stream, key in streams.items()}})
    # (a stream not in the checkpoint, e.g. the TP stream of a TP rank the saving layout did not have, keeps its seed)


def _saved_step(path: Path) -> int:
    return read_meta(path).get("step", 0) if (path / "meta.json").is_file() else 0


class Checkpointer:
    def __init__(self, cfg, ctx, corpus, *, wandb_id: str, agree, log=print):
        """`agree(values)` sums a list of ints over all ranks (resilience.Agreement.sum): used to agree on a
        save's outcome in `wait`."""
        self.cfg, self.ctx, self.corpus, self.wandb_id, self.agree, self.log = cfg, ctx, corpus, wandb_id, agree, log
        self.root = Path(cfg.run_dir) / "checkpoints"
        self.pending: _Save | None = None  # the save whose outcome the ranks have not agreed on yet
        # the config.json and generation_config.json of the HF model the run descends from, for every checkpoint
        self.source_files: dict[str, bytes] = {}
        self.saved_step: int | None = None  # the newest step saved by this launch, agreed
        # Async saves talk on their own group, so the background thread never races the training collectives;
        # it times out with the world, as the grid's groups do.
        self.group = (dist.new_group(backend="gloo", timeout=world_timeout(ctx.device))
                      if cfg.checkpoint.async_save else None)

    def resume_source(self) -> Path | None:
        """This run's newest intact checkpoint (resume=auto), else checkpoint.load, else None."""
        if self.ctx.is_first_rank and self.root.is_dir():
            for stale in self.root.glob("step_*.tmp"):  # a save killed half-way
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        if self.cfg.checkpoint.resume == "auto":
            for path in step_dirs(self.root):
                try:
                    verify(path)
                    return path
                except CheckpointError as e:
                    self.log(f"warning: {e}; falling back to an older checkpoint")
        if self.cfg.checkpoint.load:
            path = resolve(self.cfg.checkpoint.load)
            if not is_hf_model_dir(path):
                verify(path)
            return path
        return None

    def load(self, path: Path, model, opt) -> dict:
        """Load model, AdamW state and RNG streams in place (any layout); return step and samples consumed.
        An HF model directory gives the weights only: the optimizer and the data start from scratch."""
        self.source_files = read_source_files(path)
        if is_hf_model_dir(path):
            load_hf_weights(model, path)
            return {"step": 0, "consumed_samples": 0}
        meta = read_meta(path)
        check_same_data(meta.get("data"), self.corpus.identity(), path, self.cfg.data.allow_corpus_change, self.log)
        load_state(path, model, opt, self.ctx, log=self.log)
        if path.parent == self.root:  # this run's own checkpoint: a stop right away needs no new save
            self.saved_step = meta["step"]
        return {"step": meta["step"], "consumed_samples": meta["consumed_samples"]}

    def newest(self) -> Path | None:
        found = step_dirs(self.root)
        return found[0] if found else None

    def covers(self, step: int) -> bool:
        """Whether this launch saved `step` already, or is saving it."""
        return step in (self.saved_step, self.pending and self.pending.step)

    def save(self, step: int, model, opt, state: dict) -> None:
        """Start saving `step` (async_save: in the background). A failure is not raised here: every rank
        learns of it in settle(), through the loop's next agreement, or in wait()."""
        self.wait()  # at most one save in flight
        final = self.root / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")  # DCP creates it, inside its agreed planning step
        sd = _full_state(model, opt, self.ctx, copies=False)
        meta = {**state, "config": asdict(self.cfg), "model": asdict(model.config), "data": self.corpus.identity(),
                "tokenizer": {"fingerprint": self.corpus.identity()["tokenizer"], "vocab_size": self.corpus.vocab_size},
                "wandb_id": self.wandb_id, "dtype": train_dtype(self.cfg, self.ctx.device.type),
                "layout": {"dp": self.ctx.dp_size, "cp": self.ctx.cp_size, "tp": self.ctx.tp_size,
                           "sp": self.cfg.parallel.sp, "pp": self.ctx.pp_size, "pp_virtual": self.cfg.parallel.pp_virtual},
                "torch": torch.__version__}
        job = self.pending = _Save(step, tmp)

        def finish(error: BaseException | None) -> None:  # this rank's part is over (DCP's thread when async)
            if error is None and self.ctx.is_first_rank:
                try:
                    self._finalize(tmp, final, meta)
                except Exception as e:  # noqa: BLE001 -- any failure to make it visible fails the save
                    error = e
            job.error = error
            job.done.set()

        try:
            if self.cfg.checkpoint.async_save:
                future = dcp.async_save(sd, storage_writer=_Writer(str(tmp)), process_group=self.group)
                future.add_done_callback(lambda f: finish(f.exception()))
            else:
                dcp.save(sd, storage_writer=_Writer(str(tmp)))
                finish(None)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            finish(e)

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        """Rank 0, once DCP has written its metadata (so every rank has finished): make it visible."""
        if final.exists():  # a damaged checkpoint of this step that resume skipped: replace it
            shutil.rmtree(final)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        self.corpus.tokenizer().save(tmp)  # load_tokenizer(checkpoint) reads it back
        write_source_files(self.source_files, tmp)  # export writes the source model's config.json
        os.replace(tmp, final)
        self.log(f"saved checkpoint {final}")
        keep = self.cfg.checkpoint.keep
        for old in step_dirs(self.root)[keep:] if keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def outcome(self) -> tuple[int, int]:
        """(failed, still running) of this rank's part of the pending save, to be summed over the ranks."""
        job = self.pending
        if job is None:
            return 0, 0
        return int(job.error is not None), int(not job.done.is_set())

    def settle(self, failed: int, running: int) -> None:
        """Act on the outcome summed over every rank (so every rank does the same): a failure is reported
        (and raised, with on_error=stop); a save finished everywhere is done."""
        job = self.pending
        if job is None or (not failed and running):
            return
        self.pending = None
        if not failed:
            self.saved_step = job.step
            return
        job.done.wait()  # every rank's writes are over once DCP's result (or rank 0's rename) is known
        cleanup = ""
        if self.ctx.is_first_rank and job.tmp.exists():
            shutil.rmtree(job.tmp, ignore_errors=True)
            cleanup = f"; could not remove the partial {job.tmp}" if job.tmp.exists() else \
                f"; removed the partial {job.tmp.name}"
        what = _os_error(job.error) if job.error else "failed on another rank (see its log)"
        previous = self.newest()
        msg = (f"checkpoint of step {job.step} not saved in {job.tmp}: {what}; the previous checkpoint "
               + (f"{previous} is intact" if previous else "does not exist (none saved yet)") + cleanup)
        if self.cfg.checkpoint.on_error == "warn":
            self.log(f"warning: {msg}; training goes on (checkpoint.on_error=warn)")
            return
        self.log(f"error: checkpoint of step {job.step} not saved: {what}")  # train.py prints the whole line
        raise CheckpointSaveError(
            f"{msg}; the run stops (checkpoint.on_error=stop): fix the cause and rerun with run_dir={self.cfg.run_dir} "
            f"to resume from the previous checkpoint, or set checkpoint.on_error=warn to train on without it")

    def wait(self) -> None:
        """Finish the save in flight and agree on its outcome (before the next save and before exiting)."""
        job = self.pending
        if job is not None:
            job.done.wait()
            failed, _ = self.agree([int(job.error is not None), 0])
            self.settle(failed, 0)


def model_config(path: str | Path, **overrides):
    """The GPTConfig of checkpoint `path` (a step dir, a run dir or an HF model directory). `overrides`
    change fields that do not change the weights (sequence_parallel, dropout)."""
    from .model import GPTConfig
    path = resolve(path)
    if is_hf_model_dir(path):
        return hf_model_config(path, **overrides)
    saved = read_meta(path)["model"]
    return GPTConfig(**{"max_seq_len": saved["seq_len"], **saved, **overrides})  # older checkpoints: no max_seq_len


def load_model(path: str | Path, ctx, process_group=None, **overrides):
    """A GPT for `ctx`'s layout with the weights of checkpoint `path` (see `model_config`), in eval mode.
    `process_group`: the ranks of `ctx` when they are not the whole job (e.g. rank 0 alone at PP = 1)."""
    from .model import GPT
    path = resolve(path)
    model = GPT(model_config(path, **overrides), ctx, init_weights=False)
    if is_hf_model_dir(path):
        load_hf_weights(model, path)
        return model.eval()
    saved = verify(path)
    check_shapes(saved, model, ctx, path)
    dcp.load(model_state(model, ctx), checkpoint_id=str(path), process_group=process_group)
    return model.eval()


def checkpoint_tokenizer(ckpt: Path, tokenizer: str | Path | None, option: str):
    """`tokenizer` when given, else the checkpoint's own; a checkpoint without one names `option`, the way to give
    one (e.g. "--tokenizer PATH")."""
    try:
        return load_tokenizer(tokenizer or ckpt)
    except DataError as e:
        if tokenizer:
            raise
        raise DataError(f"{e}: {ckpt} has no tokenizer: name one with {option} (a tokenizer.json, a sentencepiece "
                        f".model or a model directory)") from None
