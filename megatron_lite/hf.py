"""Hugging Face checkpoints in and out: the weights of GPT-2, Llama, Mistral, Qwen2 and Qwen3 <-> megatron-lite's GPT.

In: a local HF model directory (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`). `hf_config.hf_model_config` maps its config.json to a GPTConfig; `load_hf_weights`
fills a GPT in any TP layout, each rank reading only the rows of each tensor it holds (safetensors reads
slices lazily), so a model larger than one rank's memory loads under TP.
Out: `hf_state_dict` / `hf_config.hf_config` turn a T=1 GPT into the tensors and config.json transformers expects,
with the padded vocabulary rows sliced off; `export.py` writes them.

megatron-lite's layout makes conversion a rename (see model.py): the fused QKV weight is Megatron's grouped
layout (per KV group: its query heads, then k, then v), the SwiGLU weight is `[gate; up]` as `[2, F, H]`,
and RoPE is HF's `rotate_half` form, so no q/k permutation is ever needed. GPT-2 stores its linear layers
as Conv1D (`[in, out]`, the transpose of nn.Linear) with `c_attn` = `[q | k | v]` along the output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .hf_config import (HFError, architecture, export_architecture, hf_config,  # noqa: F401 (re-exported)
                        hf_model_config, is_hf_model_dir, read_hf_config)
from .model import GPT, GPTConfig
from .tensor_parallel import tp_partition_dim


# ------------------------------------------------------------------------------------------- weights


def weight_files(path: Path) -> dict[str, str] | None:
    """The weight map of a sharded checkpoint (tensor name -> file), None for one model.safetensors; raises
    HFError naming a missing file. Cheap: reads no tensor (config validation calls it)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for f in sorted(set(weight_map.values())):
            if not (path / f).is_file():
                raise HFError(f"{path / f} is missing: it holds weights listed in {index}")
        return weight_map
    if (path / "model.safetensors").is_file():
        return None
    raise HFError(f"{path} has no model.safetensors or model.safetensors.index.json: megatron-lite reads "
                  f"safetensors weights (convert .bin files with transformers' save_pretrained)")


class SafetensorsReader:
    """The tensors of an HF model directory, read lazily: `read(name, dim, start, stop)` loads one slice."""

    def __init__(self, path: str | Path):
        path = Path(path)
        weight_map = weight_files(path)
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.handles = {f: safe_open(str(path / f), framework="pt") for f in files}
        self.where = weight_map or {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}
        self.path = path

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if name not in self.where:
            raise HFError(f"{self.path}: weight {name} is missing (the checkpoint does not match its config.json)")
        sl = self.handles[self.where[name]].get_slice(name)
        if dim is None:
            return sl[:]
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, stop)
        return sl[tuple(index)]

    def shape(self, name: str) -> list[int]:
        return list(self.handles[self.where[name]].get_slice(name).get_shape())


@dataclass
class Tensor:
    """Our tensor is the HF tensor `name` (transposed for GPT-2's Conv1D; vocab rows padded with zeros)."""
    name: str
    transpose: bool = False
    vocab: int | None = None  # rows past this are megatron-lite's padding

    def load(self, r: SafetensorsReader, dim, start, stop, shape):
        if self.vocab is not None:  # vocab-parallel (dim 0): rows past the vocabulary are zeros
            out = torch.zeros(stop - start, *shape[1:])
            if start < self.vocab:
                out[: min(stop, self.vocab) - start] = r.read(self.name, 0, start, min(stop, self.vocab))
            return out
        if self.transpose:
            return r.read(self.name, None if dim is None else 1 - dim, start, stop).t()
        return r.read(self.name, dim, start, stop)

    def export(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t[: self.vocab] if self.vocab is not None else t
        return {self.name: t.t() if self.transpose else t}


@dataclass
class FusedQKV:
    """Our `[G, Q + 2, D, ...]` grouped QKV from HF's q (N*D rows), k and v (G*D rows each): either three
    tensors (Llama's q_proj, k_proj, v_proj) or one `[q | k | v]` Conv1D (GPT-2's c_attn, transposed)."""
    q: str
    k: str | None
    v: str | None
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def _part(self, r: SafetensorsReader, which: int, start: int, stop: int) -> torch.Tensor:
        if self.k is not None:  # separate q, k, v tensors, rows out-features first
            return r.read((self.q, self.k, self.v)[which], 0, start, stop)
        offset = which * self.num_heads * self.head_dim  # GPT-2: one [in, 3 * N * D] tensor (or its bias)
        if len(r.shape(self.q)) == 1:
            return r.read(self.q, 0, offset + start, offset + stop)
        return r.read(self.q, 1, offset + start, offset + stop).t()

    def load(self, r, dim, start, stop, shape):
        Q, D = self.num_heads // self.num_kv_heads, self.head_dim
        g0, g1 = start // ((Q + 2) * D), (stop if stop is not None else shape[0]) // ((Q + 2) * D)
        q = self._part(r, 0, g0 * Q * D, g1 * Q * D)
        k, v = self._part(r, 1, g0 * D, g1 * D), self._part(r, 2, g0 * D, g1 * D)
        rest = q.shape[1:]
        parts = (q.reshape(g1 - g0, Q, D, *rest), k.reshape(g1 - g0, 1, D, *rest), v.reshape(g1 - g0, 1, D, *rest))
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def export(self, t):
        Q, D, G = self.num_heads // self.num_kv_heads, self.head_dim, self.num_kv_heads
        grouped = t.reshape(G, Q + 2, D, *t.shape[1:])
        q, k, v = (grouped[:, :Q].reshape(-1, *t.shape[1:]), grouped[:, Q].reshape(-1, *t.shape[1:]),
                   grouped[:, Q + 1].reshape(-1, *t.shape[1:]))
        if self.k is not None:
            return {self.q: q, self.k: k, self.v: v}
        qkv = torch.cat([q, k, v])
        return {self.q: qkv.t() if qkv.dim() == 2 else qkv}


@dataclass
class Stacked:
    """Our `[2, F, ...]` SwiGLU weight (or bias) from HF's gate_proj and up_proj, split along F."""
    gate: str
    up: str

    def load(self, r, dim, start, stop, shape):
        return torch.stack([r.read(self.gate, None if dim is None else 0, start, stop),
                            r.read(self.up, None if dim is None else 0, start, stop)])

    def export(self, t):
        return {self.gate: t[0], self.up: t[1]}


def _mapping(c: GPTConfig, r: SafetensorsReader | None = None) -> dict:
    """Our parameter name -> where its tensor lives in the HF checkpoint of the same model."""
    if export_architecture(c) == "GPT2LMHeadModel":
        # hub GPT-2 checkpoints saved by old transformers have no "transformer." prefix
        p = "" if r is not None and "wte.weight" in r and "transformer.wte.weight" not in r else "transformer."
        m = {"wte.weight": Tensor(f"{p}wte.weight", vocab=c.vocab_size), "wpe.weight": Tensor(f"{p}wpe.weight"),
             "ln_f.weight": Tensor(f"{p}ln_f.weight"), "ln_f.bias": Tensor(f"{p}ln_f.bias")}
        for i in range(c.num_layers):
            h, b = f"{p}h.{i}", f"blocks.{i}"
            qkv = lambda kind: FusedQKV(f"{h}.attn.c_attn.{kind}", None, None, c.num_heads, c.num_kv_heads,
                                        c.head_dim)  # noqa: E731
            m.update({f"{b}.ln_1.weight": Tensor(f"{h}.ln_1.weight"), f"{b}.ln_1.bias": Tensor(f"{h}.ln_1.bias"),
                      f"{b}.attn.qkv.weight": qkv("weight"), f"{b}.attn.qkv.bias": qkv("bias"),
                      f"{b}.attn.proj.weight": Tensor(f"{h}.attn.c_proj.weight", transpose=True),
                      f"{b}.attn.proj.bias": Tensor(f"{h}.attn.c_proj.bias"),
                      f"{b}.ln_2.weight": Tensor(f"{h}.ln_2.weight"), f"{b}.ln_2.bias": Tensor(f"{h}.ln_2.bias"),
                      f"{b}.mlp.fc.weight": Tensor(f"{h}.mlp.c_fc.weight", transpose=True),
                      f"{b}.mlp.fc.bias": Tensor(f"{h}.mlp.c_fc.bias"),
                      f"{b}.mlp.proj.weight": Tensor(f"{h}.mlp.c_proj.weight", transpose=True),
                      f"{b}.mlp.proj.bias": Tensor(f"{h}.mlp.c_proj.bias")})
    else:
        m = {"wte.weight": Tensor("model.embed_tokens.weight", vocab=c.vocab_size),
             "ln_f.weight": Tensor("model.norm.weight")}
        for i in range(c.num_layers):
            h, b = f"model.layers.{i}", f"blocks.{i}"
            m.update({f"{b}.ln_1.weight": Tensor(f"{h}.input_layernorm.weight"),
                      f"{b}.ln_2.weight": Tensor(f"{h}.post_attention_layernorm.weight"),
                      f"{b}.attn.proj.weight": Tensor(f"{h}.self_attn.o_proj.weight"),
                      f"{b}.mlp.proj.weight": Tensor(f"{h}.mlp.down_proj.weight")})
            for kind in ("weight", "bias") if c.qkv_bias else ("weight",):
                m[f"{b}.attn.qkv.{kind}"] = FusedQKV(*(f"{h}.self_attn.{x}_proj.{kind}" for x in "qkv"), c.num_heads,
                                                     c.num_kv_heads, c.head_dim)
            if c.attention_bias:
                m[f"{b}.attn.proj.bias"] = Tensor(f"{h}.self_attn.o_proj.bias")
            if c.qk_norm:  # Qwen3
                m[f"{b}.attn.q_norm.weight"] = Tensor(f"{h}.self_attn.q_norm.weight")
                m[f"{b}.attn.k_norm.weight"] = Tensor(f"{h}.self_attn.k_norm.weight")
            for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
                m[f"{b}.mlp.gate_up.{kind}"] = Stacked(f"{h}.mlp.gate_proj.{kind}", f"{h}.mlp.up_proj.{kind}")
            if c.mlp_bias:
                m[f"{b}.mlp.proj.bias"] = Tensor(f"{h}.mlp.down_proj.bias")
    if not c.tie_embeddings:
        m["lm_head.weight"] = Tensor("lm_head.weight", vocab=c.vocab_size)
    return m


@torch.no_grad()
def load_hf_weights(model: GPT, path: str | Path) -> None:
    """Copy the HF checkpoint's weights into `model` (any TP layout): each rank reads its rows only."""
    reader = SafetensorsReader(path)
    mapping = _mapping(model.config, reader)
    T, r = model.ctx.tp_size, model.ctx.tp_rank
    for name, p in model.named_parameters():
        dim = tp_partition_dim(p)
        full = list(p.shape)
        if dim is not None:
            full[dim] *= T
        start, stop = (r * p.shape[dim], (r + 1) * p.shape[dim]) if dim is not None else (0, None)
        local = mapping[name].load(reader, dim, start, stop, full)
        if list(local.shape) != list(p.shape):
            raise HFError(f"{path}: {name} loads as {list(local.shape)} but this model holds {list(p.shape)} on each "
                          f"rank: config.json and the weights disagree")
        p.copy_(local)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The HF tensors of a T=1 model, contiguous, with the padded vocabulary rows sliced off."""
    if model.ctx.tp_size != 1:
        raise ValueError("hf_state_dict needs the whole model on one rank (T=1): gather it with full_state()")
    return to_hf(model.config, {n: p.detach() for n, p in model.named_parameters()})


def to_hf(c: GPTConfig, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """megatron-lite's full (unsharded) tensors by name, e.g. `GPT.full_state()`, as HF's."""
    mapping = _mapping(c)
    return {k: v.contiguous() for name, t in full.items() for k, v in mapping[name].export(t).items()}
