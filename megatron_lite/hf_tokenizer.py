"""megatron-lite's sentencepiece tokenizer as a Hugging Face `tokenizer.json` that gives the same ids.

megatron-lite trains a sentencepiece BPE with byte fallback, identity normalization, no dummy prefix, and
a control symbol `<n>` for newlines (data.py encodes each line and joins them with its id). transformers'
automatic sentencepiece conversion would turn the control pieces into special tokens and add a
dummy-prefix pipeline, so this writes the equivalent `tokenizers` pipeline itself:

- model: BPE over the same vocabulary (same ids) with byte fallback. sentencepiece merges the adjacent pair
  whose concatenation is the best-scored piece; the merges list below holds every split of every normal
  piece into two pieces, ordered by the merged piece's rank, which makes HF's BPE merge in the same order
  (transformers' SentencePieceExtractor does the same). Control, unknown and byte pieces are never merged.
- normalizer: " " -> "▁" (sentencepiece's whitespace escape), nothing else.
- "\\n" is an added, non-special token with the id of `<n>`: the text is split at newlines before BPE, as
  data.py splits it into lines. The literal text `<n>` stays three characters, as in sentencepiece.
- decoder: "▁" -> " ", byte pieces -> bytes, fused into a string.
- `<s>`, `</s>`, `<unk>` are named in tokenizer_config.json, with `split_special_tokens` so that their
  literal text in a document is plain text (sentencepiece never matches control symbols in input).
"""
from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

NEWLINE_PIECE = "<n>"  # megatron-lite's control symbol for "\n" (data.py)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6  # sentencepiece ModelProto.SentencePiece.Type


def sentencepiece_to_hf(model_file: str | Path):
    """A `tokenizers.Tokenizer` that encodes and decodes as megatron-lite's sentencepiece tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE or not proto.trainer_spec.byte_fallback:
        raise ValueError(f"{model_file}: only BPE models with byte fallback convert (megatron-lite's own)")
    pieces = [(p.piece, p.type) for p in proto.pieces]
    vocab = {("\n" if piece == NEWLINE_PIECE else piece): i for i, (piece, _) in enumerate(pieces)}
    mergeable = {piece: i for i, (piece, kind) in enumerate(pieces) if kind == _NORMAL}
    merges = []
    for piece, rank in sorted(mergeable.items(), key=lambda kv: kv[1]):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in mergeable and piece[k:] in mergeable]
        merges += sorted(splits, key=lambda lr: (mergeable[lr[0]], mergeable[lr[1]]))
    unk = next(piece for piece, kind in pieces if kind == _UNKNOWN)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return tok


def write_hf_tokenizer(model_file: str | Path, out_dir: str | Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for `AutoTokenizer.from_pretrained(out_dir)`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sentencepiece_to_hf(model_file).save(str(out / "tokenizer.json"))
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    spec = proto.trainer_spec
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec.bos_piece, "eos_token": spec.eos_piece,
              "unk_token": spec.unk_piece, "add_bos_token": False, "add_eos_token": False,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False,
              "model_max_length": int(1e30)}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
