"""Export a checkpoint (any layout) as a Hugging Face model directory that transformers loads as it is.

    python -m megatron_lite.export runs/myrun [OUT_DIR] [--dtype bfloat16]

writes OUT_DIR (default `<checkpoint>/export`): `config.json` (GPT2LMHeadModel or LlamaForCausalLM),
`model.safetensors` (full tensors, padded vocabulary rows sliced off) and the tokenizer:
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load it
with no missing or unexpected keys. DCP reshards the checkpoint, whatever layout saved it, into a
one-process model (T=1). A tokenizer trained here becomes a `tokenizer.json` with the same ids
(hf_tokenizer.py); an HF model's own tokenizer files are passed through.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import CheckpointError, load_model, model_config, resolve
from .hf import HFError, hf_config, hf_state_dict
from .hf_tokenizer import write_hf_tokenizer
from .parallel import init_parallel
from .tokenizer import SP_FILE, SentencePieceTokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint: str | Path, out_dir: str | Path | None = None, dtype: str = "float32") -> Path:
    ckpt = resolve(checkpoint)
    out = Path(out_dir) if out_dir else ckpt / "export"
    tok = load_tokenizer(ckpt)
    config = hf_config(model_config(ckpt), bos_id=tok.bos_id, eos_id=tok.eos_id)  # fails before any loading
    config["dtype"] = config["torch_dtype"] = dtype
    model = load_model(ckpt, init_parallel(1, device="cpu"), sequence_parallel=False)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if isinstance(tok, SentencePieceTokenizer):  # trained here: as a tokenizer.json with the same ids
        write_hf_tokenizer(tok.files[SP_FILE], out)
    else:  # an HF model's own tokenizer: its files as they are
        tok.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run directory, a step_NNNNNNN checkpoint directory or an HF model directory")
    ap.add_argument("out_dir", nargs="?", help="where to write (default: <checkpoint>/export)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved weights")
    args = ap.parse_args()
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype)
    except (CheckpointError, HFError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    config = json.loads((out / "config.json").read_text())
    print(f"exported {resolve(args.checkpoint)} -> {out} ({config['architectures'][0]}, {args.dtype})")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
