"""Export a checkpoint (any layout) as a Hugging Face model directory that transformers loads as it is.

    python -m megatron_lite.export runs/myrun [OUT_DIR] [--dtype bfloat16] [--tokenizer PATH]

writes OUT_DIR (default `<checkpoint>/export`): `config.json`, `model.safetensors` (full tensors, padded vocabulary
rows sliced off), the tokenizer and, for a fine-tuned HF model, its `generation_config.json`:
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `AutoTokenizer.from_pretrained(OUT_DIR)` load it with no
missing or unexpected keys. DCP reshards the checkpoint, whatever layout saved it, into a one-process model (T=1).

- config.json: a fine-tuned HF model's own (its architecture, sliding_window, pad_token_id, ... kept), else the
  one of the class that computes the model (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM).
- dtype: by default the source model's (its config's `dtype`/`torch_dtype`), or for a model trained here the
  one it trained in (bfloat16 on GPUs, float32 on CPUs); `--dtype` chooses.
- the tokenizer: the checkpoint's (`--tokenizer` for a checkpoint without one). A tokenizer trained here becomes a
  `tokenizer.json` with the same ids (hf_tokenizer.py); an HF tokenizer's files (chat template included) are
  copied as they are.
Files are written readable by others (mode 0666 less the umask), as Hugging Face downloads are.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import CheckpointError, checkpoint_tokenizer, load_model, model_config, read_meta, resolve
from .hf import hf_state_dict
from .hf_config import HFError, config_dtype, hf_config, is_hf_model_dir, read_source_files, source_config
from .hf_tokenizer import write_hf_tokenizer
from .parallel import init_parallel
from .tokenizer import SP_FILE, SentencePieceTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint: str | Path, out_dir: str | Path | None = None, dtype: str | None = None,
           tokenizer: str | Path | None = None) -> Path:
    ckpt = resolve(checkpoint)
    out = Path(out_dir) if out_dir else ckpt / "export"
    tok = checkpoint_tokenizer(ckpt, tokenizer, "--tokenizer PATH")
    source = read_source_files(ckpt)
    dtype = dtype or default_dtype(ckpt, source)
    c = model_config(ckpt)
    config = source_config(c, source, dtype) or hf_config(c, bos_id=tok.bos_id, eos_id=tok.eos_id, dtype=dtype)
    model = load_model(ckpt, init_parallel(1, device="cpu"), sequence_parallel=False)  # fails before writing
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o666 & ~_umask())  # safetensors writes 0600
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if "generation_config.json" in source:
        (out / "generation_config.json").write_bytes(source["generation_config.json"])
    if isinstance(tok, SentencePieceTokenizer):  # trained here: as a tokenizer.json with the same ids
        write_hf_tokenizer(tok.files[SP_FILE], out)
    else:  # an HF tokenizer: its files as they are
        tok.save(out)
    return out


def default_dtype(ckpt: Path, source: dict[str, bytes]) -> str:
    """The source HF model's dtype, else the dtype the checkpoint trained in, else float32."""
    if "config.json" in source:
        named = config_dtype(json.loads(source["config.json"]))
        if named:
            return named
    if is_hf_model_dir(ckpt):
        return "float32"
    meta = read_meta(ckpt)
    trained = meta.get("dtype") or meta["config"]["train"]["dtype"]  # older checkpoints: the setting
    return trained if trained in DTYPES else "float32"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run directory, a step_NNNNNNN checkpoint directory or an HF model directory")
    ap.add_argument("out_dir", nargs="?", help="where to write (default: <checkpoint>/export)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="dtype of the saved weights (default: the source model's, or the one it trained in)")
    ap.add_argument("--tokenizer", default=None, help="the tokenizer to write (default: the checkpoint's own)")
    args = ap.parse_args()
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype, args.tokenizer)
    except (CheckpointError, HFError, ValueError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    config = json.loads((out / "config.json").read_text())
    print(f"exported {resolve(args.checkpoint)} -> {out} ({config['architectures'][0]}, {config['dtype']})")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
