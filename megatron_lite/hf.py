"""Hugging Face checkpoints in and out: `GPT2LMHeadModel` and `LlamaForCausalLM` <-> megatron-lite's GPT.

In: a local HF model directory (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`). `hf_model_config` maps its config.json to a GPTConfig; `load_hf_weights`
fills a GPT in any TP layout, each rank reading only the rows of each tensor it holds (safetensors reads
slices lazily), so a model larger than one rank's memory loads under TP.
Out: `hf_state_dict` / `hf_config` turn a T=1 GPT into the tensors and config.json transformers expects,
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

from .model import GPT, GPTConfig, RopeScaling
from .tensor_parallel import tp_partition_dim

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM")


class HFError(ValueError):
    """An HF model directory megatron-lite cannot use; the message names the file or value and the fix."""


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with an HF `config.json` (an `architectures` or `model_type` entry)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


def read_hf_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def architecture(hf: dict, path: str | Path = "config.json") -> str:
    archs = hf.get("architectures") or {"gpt2": ["GPT2LMHeadModel"], "llama": ["LlamaForCausalLM"]}.get(
        hf.get("model_type"), [hf.get("model_type")])
    if archs[0] not in SUPPORTED:
        raise HFError(f"{path}: architecture {archs[0]!r} is not supported: megatron-lite converts "
                      f"{' and '.join(SUPPORTED)} (Llama covers Mistral-, SmolLM- and TinyLlama-style checkpoints)")
    return archs[0]


# ------------------------------------------------------------------------------------------- config


def hf_model_config(path: str | Path, **overrides) -> GPTConfig:
    """The GPTConfig of an HF model directory; `overrides` set the fields that are not the model's shape
    (sequence_parallel, dropout, recompute, seed, ...). seq_len is the model's context length."""
    hf = read_hf_config(path)
    fields = (_gpt2_fields if architecture(hf, Path(path) / "config.json") == "GPT2LMHeadModel" else _llama_fields)(hf)
    return GPTConfig(**{**fields, **overrides})


def _gpt2_fields(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"GPT-2 activation_function={act!r} is not supported: megatron-lite's GELU MLP is the tanh "
                      f"approximation (gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise HFError("GPT-2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
    return dict(vocab_size=hf["vocab_size"], seq_len=hf["n_positions"], num_layers=hf["n_layer"],
                hidden_size=hf["n_embd"], num_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position_embedding="learned",
                mlp="gelu", attention_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_fields(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"Llama hidden_act={hf['hidden_act']!r} is not supported: megatron-lite's SwiGLU uses silu")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5.x
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))  # 4.x: top-level rope_theta, rope_scaling
    rope.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if k not in rope})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise HFError(f"RoPE scaling rope_type={rope_type!r} is not supported: megatron-lite implements the "
                      f"default and llama3")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported")
    scaling = None if rope_type == "default" else RopeScaling(
        rope_type="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_position_embeddings=rope["original_max_position_embeddings"])
    heads = hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], seq_len=hf.get("max_position_embeddings", 2048),
                num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_hidden_size=hf["intermediate_size"],
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position_embedding="rope",
                rope_theta=float(rope["rope_theta"]), rope_scaling=scaling, mlp="swiglu",
                attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False))


def hf_config(c: GPTConfig, *, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json for the transformers class that computes what `c` does (raises HFError if none does)."""
    arch = export_architecture(c)
    common = dict(architectures=[arch], vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings,
                  bos_token_id=bos_id, eos_token_id=eos_id, dtype="float32", torch_dtype="float32")
    if arch == "GPT2LMHeadModel":
        return dict(common, model_type="gpt2", n_positions=c.seq_len, n_embd=c.hidden_size, n_layer=c.num_layers,
                    n_head=c.num_heads, n_inner=c.ffn_hidden_size, activation_function="gelu_new",
                    layer_norm_epsilon=c.norm_eps, attn_pdrop=c.dropout, resid_pdrop=c.dropout, embd_pdrop=c.dropout)
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                       high_freq_factor=s.high_freq_factor,
                       original_max_position_embeddings=s.original_max_position_embeddings)
        rope.update(scaling)
    return dict(common, model_type="llama", hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps,
                attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, attention_dropout=c.dropout,
                rope_theta=c.rope_theta, rope_scaling=scaling,  # transformers 4.x
                rope_parameters=rope)  # transformers 5.x


def export_architecture(c: GPTConfig) -> str:
    gpt2 = dict(norm="layernorm", position_embedding="learned", mlp="gelu", attention_bias=True, mlp_bias=True)
    llama = dict(norm="rmsnorm", position_embedding="rope", mlp="swiglu")
    if all(getattr(c, k) == v for k, v in gpt2.items()) and c.num_kv_heads == c.num_heads:
        return "GPT2LMHeadModel"
    if all(getattr(c, k) == v for k, v in llama.items()):
        return "LlamaForCausalLM"
    raise HFError(f"no transformers class computes this model (norm={c.norm}, position_embedding="
                  f"{c.position_embedding}, mlp={c.mlp}, num_kv_heads={c.num_kv_heads}): GPT2LMHeadModel needs "
                  f"{gpt2} and multi-head attention, LlamaForCausalLM needs {llama}")


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
            for kind in ("weight", "bias") if c.attention_bias else ("weight",):
                m[f"{b}.attn.qkv.{kind}"] = FusedQKV(*(f"{h}.self_attn.{x}_proj.{kind}" for x in "qkv"), c.num_heads,
                                                     c.num_kv_heads, c.head_dim)
            if c.attention_bias:
                m[f"{b}.attn.proj.bias"] = Tensor(f"{h}.self_attn.o_proj.bias")
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
