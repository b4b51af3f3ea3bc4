"""Consolidate a sharded checkpoint into one file that loads on one device.

    python -m megatron_lite.export runs/myrun [OUT_DIR]

writes OUT_DIR (default `<checkpoint>/export`) with `model.safetensors` (full, unsharded weights),
`config.json` (the GPTConfig) and the tokenizer's files (`tokenizer.model`, or `tokenizer.json` and its
configs). DCP reshards the checkpoint, whatever layout saved
it, into a single-process model (T=1), whose state dict is written as is.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import load_model, resolve
from .model import GPT, GPTConfig
from .parallel import init_parallel
from .tokenizer import load_tokenizer


def export(checkpoint: str | Path, out_dir: str | Path | None = None) -> Path:
    ckpt = resolve(checkpoint)
    out = Path(out_dir) if out_dir else ckpt / "export"
    ctx = init_parallel(1, device="cpu")
    model = load_model(ckpt, ctx, sequence_parallel=False)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=1))
    load_tokenizer(ckpt).save(out)
    return out


def load_exported(path: str | Path, ctx) -> GPT:
    """The exported model on one process (ctx with T=1), in eval mode."""
    path = Path(path)
    config = GPTConfig(**{**json.loads((path / "config.json").read_text()), "sequence_parallel": False})
    model = GPT(config, ctx)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(ctx.device)))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run directory or a step_NNNNNNN checkpoint directory")
    ap.add_argument("out_dir", nargs="?", help="where to write (default: <checkpoint>/export)")
    args = ap.parse_args()
    out = export(args.checkpoint, args.out_dir)
    total = sum(t.numel() for t in load_file(str(out / "model.safetensors")).values())
    print(f"exported {resolve(args.checkpoint)} -> {out} ({total / 1e6:.2f}M parameters)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
