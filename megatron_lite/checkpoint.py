"""Sharded checkpoints through torch.distributed.checkpoint (DCP): each rank writes its own shards.

Every parameter and AdamW moment is saved as a global tensor described by its shards (a DTensor over
the DP x TP mesh: replicated over DP, split over TP along the layer's `tp_partition_dim`), so DCP can
read a checkpoint into any DP x TP layout, SP on or off. Nothing is gathered to one rank.

A checkpoint is complete or invisible: it is written to `step_NNNNNNN.tmp/` and renamed to
`step_NNNNNNN/` by rank 0 only after DCP has written its metadata, which it does once every rank has
finished writing. Loading checks that every shard file named by the metadata is there and long enough.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .data import DataError
from .tensor_parallel import tp_partition_dim

_STEP_DIR = re.compile(r"^step_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or parameter."""


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
    """A `step_*` directory, or the newest complete checkpoint of a run directory or checkpoints dir."""
    path = Path(path)
    if _STEP_DIR.match(path.name):
        return path
    for root in (path / "checkpoints", path):
        found = step_dirs(root)
        if found:
            return found[0]
    raise CheckpointError(f"no checkpoint in {path}: expected step_NNNNNNN/ directories under it or under "
                          f"{path / 'checkpoints'}")


def _mesh(ctx) -> DeviceMesh:
    return DeviceMesh.from_group([ctx.dp_group, ctx.tp_group], ctx.device.type, mesh=torch.tensor(ctx.grid),
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


def _init_adam_state(opt: torch.optim.Optimizer) -> None:
    """Create AdamW's (lazily created) state, so that DCP can load into it in place."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state[p]:
                on_device = group.get("fused") or group.get("capturable")
                opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _full_state(model, opt, ctx) -> dict:
    mesh = _mesh(ctx)
    _init_adam_state(opt)
    sd = model_state(model, ctx, mesh)
    for n, p in model.named_parameters():
        st = opt.state[p]
        sd[f"optim.{n}.exp_avg"] = _global(st["exp_avg"], p, mesh, ctx.tp_size)
        sd[f"optim.{n}.exp_avg_sq"] = _global(st["exp_avg_sq"], p, mesh, ctx.tp_size)
        sd[f"optim.{n}.step"] = st["step"]
    for name, state in model.rng.get_states().items():  # the TP-distinct stream is saved per TP rank
        sd[f"rng.{name}" + (f".{ctx.tp_rank}" if name == "tp" else "")] = state
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


class Checkpointer:
    def __init__(self, cfg, ctx, corpus, *, wandb_id: str, log=print):
        self.cfg, self.ctx, self.corpus, self.wandb_id, self.log = cfg, ctx, corpus, wandb_id, log
        self.root = Path(cfg.run_dir) / "checkpoints"
        self.pending = None  # (future, finalize) of the async save in flight
        self._lock = threading.Lock()
        # Async saves talk on their own group, so the background thread never races the training collectives.
        self.group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None

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
            verify(path)
            return path
        return None

    def load(self, path: Path, model, opt) -> dict:
        """Load model, AdamW state and RNG streams in place (any layout); return step and samples consumed."""
        saved = verify(path)
        meta = read_meta(path)
        check_same_data(meta.get("data"), self.corpus.identity(), path, self.cfg.data.allow_corpus_change, self.log)
        check_shapes(saved, model, self.ctx, path)
        sd = {k: v for k, v in _full_state(model, opt, self.ctx).items() if k in saved or not k.startswith("rng.")}
        dcp.load(sd, checkpoint_id=str(path))
        loaded = {k.split(".")[1]: v for k, v in sd.items() if k.startswith("rng.")}
        model.rng.set_states({**model.rng.get_states(), **loaded})  # a stream not in it keeps its seed
        return {"step": meta["step"], "consumed_samples": meta["consumed_samples"]}

    def save(self, step: int, model, opt, state: dict) -> None:
        self.wait()  # at most one save in flight
        final = self.root / f"step_{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        os.makedirs(tmp, exist_ok=True)
        sd = _full_state(model, opt, self.ctx)
        meta = {**state, "config": asdict(self.cfg), "model": asdict(model.config), "data": self.corpus.identity(),
                "tokenizer": {"fingerprint": self.corpus.identity()["tokenizer"], "vocab_size": self.corpus.vocab_size},
                "wandb_id": self.wandb_id,
                "layout": {"dp": self.ctx.dp_size, "tp": self.ctx.tp_size, "sp": self.cfg.parallel.sp},
                "torch": torch.__version__}
        finalize = lambda: self._finalize(tmp, final, meta)  # noqa: E731
        if self.cfg.checkpoint.async_save:
            future = dcp.async_save(sd, checkpoint_id=str(tmp), process_group=self.group)
            self.pending = (future, finalize)
            future.add_done_callback(lambda f: f.exception() is None and finalize())
        else:
            dcp.save(sd, checkpoint_id=str(tmp))
            finalize()

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        """Rank 0, once DCP has written its metadata (so every rank has finished): make it visible."""
        if not self.ctx.is_first_rank:
            return
        with self._lock:
            if not tmp.exists():  # already made visible (async: by the callback, then wait())
                return
            if final.exists():  # a damaged checkpoint of this step that resume skipped: replace it
                shutil.rmtree(final)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            self.corpus.tokenizer().save(tmp)  # load_tokenizer(checkpoint) reads it back
            os.replace(tmp, final)
            self.log(f"saved checkpoint {final}")
            keep = self.cfg.checkpoint.keep
            for old in step_dirs(self.root)[keep:] if keep else []:
                shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Finish the save in flight (training calls this before the next save and before exiting)."""
        if self.pending is not None:
            future, finalize = self.pending
            self.pending = None
            future.result()
            finalize()


def load_model(path: str | Path, ctx, **overrides):
    """A GPT for `ctx`'s layout with the weights of checkpoint `path` (a step dir or a run dir), in eval mode.

    `overrides` change GPTConfig fields that do not change the weights (sequence_parallel, dropout)."""
    from .model import GPT, GPTConfig
    path = resolve(path)
    saved = verify(path)
    model = GPT(GPTConfig(**{**read_meta(path)["model"], **overrides}), ctx)
    check_shapes(saved, model, ctx, path)
    dcp.load(model_state(model, ctx), checkpoint_id=str(path))
    return model.eval()
