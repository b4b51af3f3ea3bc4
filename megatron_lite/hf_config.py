"""Hugging Face `config.json` <-> GPTConfig, for the architectures megatron-lite computes exactly.

- GPT2LMHeadModel: LayerNorm, learned positions, tanh-GELU, biases everywhere.
- LlamaForCausalLM (SmolLM, TinyLlama, Llama 2/3.x): RMSNorm, RoPE (+ Llama-3 scaling), SwiGLU, GQA.
- MistralForCausalLM: Llama's math. Its sliding-window attention (Mistral 7B v0.1: 4096) equals full causal
  attention on sequences no longer than the window, so the window is the model's context here (`max_seq_len`):
  a longer training window is refused, and generation keeps its context within it.
- Qwen2ForCausalLM: Llama with biases on q, k and v but not on the output projection (`qkv_bias`).
- Qwen3ForCausalLM: Llama with an RMSNorm on each head of q and k before RoPE (`qk_norm`).

In: `hf_model_config(path, seq_len=...)`. Out: `hf_config(GPTConfig)` writes the config.json of the class that
computes the same; an exported fine-tune writes its source model's own config.json instead (`source_config`),
which keeps what megatron-lite does not model (sliding_window, pad_token_id, ...). A checkpoint carries those
files of its source model (`SOURCE_FILES`, in `source_model/`) from the HF directory it started from to every
checkpoint after it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .rope_scaling import RopeScaling  # torch-free: config.py imports this module to read a configuration

if TYPE_CHECKING:
    from .model import GPTConfig

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_BY_MODEL_TYPE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SOURCE_DIR = "source_model"  # in a checkpoint: these files of the HF model the run started from
SOURCE_FILES = ("config.json", "generation_config.json")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# the GPTConfig fields that make a model what it is (the rest are training settings)
SHAPE = ("vocab_size", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
         "norm", "norm_eps", "position_embedding", "rope_theta", "rope_scaling", "mlp", "attention_bias", "qkv_bias",
         "qk_norm", "mlp_bias", "tie_embeddings")


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
    archs = hf.get("architectures") or [_BY_MODEL_TYPE.get(hf.get("model_type"), hf.get("model_type"))]
    if archs[0] not in SUPPORTED:
        raise HFError(f"{path}: architecture {archs[0]!r} is not supported: megatron-lite converts "
                      f"{', '.join(SUPPORTED)} (Llama covers SmolLM- and TinyLlama-style checkpoints)")
    return archs[0]


# ------------------------------------------------------------------------------------------- in


def hf_model_config(path: str | Path, **overrides) -> GPTConfig:
    """The GPTConfig of an HF model directory. `overrides` set what is not the model's shape: `seq_len`, the
    training window (default: the whole context), and sequence_parallel, dropout, recompute, seed, ...
    Raises HFError for a window longer than the model's context or its sliding window."""
    from .model import GPTConfig
    path = Path(path)
    hf = read_hf_config(path)
    fields = gpt_fields(hf, path / "config.json")
    window, context = overrides.get("seq_len"), fields["max_seq_len"]
    if window is not None and window > context:
        sliding = sliding_window(hf)
        if sliding == context:
            raise HFError(f"model.seq_len={window} is longer than the sliding window of {path} (sliding_window="
                          f"{sliding}): megatron-lite has no sliding-window attention, which is full causal attention "
                          f"on sequences of up to {sliding} tokens: use model.seq_len<={sliding}")
        raise HFError(f"model.seq_len={window} exceeds the context of the model in {path} ({context} positions, "
                      f"its max_position_embeddings): use model.seq_len<={context}")
    return GPTConfig(**{**fields, "seq_len": context, **overrides})


def gpt_fields(hf: dict, where: str | Path = "config.json") -> dict:
    """GPTConfig's shape fields (and max_seq_len, the context) of an HF config."""
    arch = architecture(hf, where)
    if arch == "GPT2LMHeadModel":
        return _gpt2_fields(hf)
    fields = _llama_fields(hf)
    if arch == "Qwen2ForCausalLM":  # q, k, v biases; none on o_proj or the MLP
        fields.update(attention_bias=False, qkv_bias=True, mlp_bias=False)
    elif arch == "Qwen3ForCausalLM":
        fields.update(qk_norm=True, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        fields.update(attention_bias=False, mlp_bias=False)
    window = sliding_window(hf)
    if window is not None:
        fields["max_seq_len"] = min(fields["max_seq_len"], window)
    return fields


def sliding_window(hf: dict) -> int | None:
    """The span of sliding-window attention when some layer uses it (Mistral 7B v0.1; Qwen with
    use_sliding_window), else None."""
    window = hf.get("sliding_window")
    if window is None:
        return None
    if "layer_types" in hf:  # transformers 5 names each layer's attention
        return window if "sliding_attention" in hf["layer_types"] else None
    if hf.get("model_type") in ("qwen2", "qwen3"):  # layers from max_window_layers on slide, when switched on
        return window if hf.get("use_sliding_window") and hf.get("max_window_layers", 0) < hf["num_hidden_layers"] \
            else None
    return window


def _gpt2_fields(hf: dict) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"GPT-2 activation_function={act!r} is not supported: megatron-lite's GELU MLP is the tanh "
                      f"approximation (gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise HFError("GPT-2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
    return dict(vocab_size=hf["vocab_size"], max_seq_len=hf["n_positions"], num_layers=hf["n_layer"],
                hidden_size=hf["n_embd"], num_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), position_embedding="learned",
                mlp="gelu", attention_bias=True, mlp_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))


def _llama_fields(hf: dict) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act={hf['hidden_act']!r} is not supported: megatron-lite's SwiGLU uses silu")
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
    return dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, ffn_hidden_size=hf["intermediate_size"],
                norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), position_embedding="rope",
                rope_theta=float(rope["rope_theta"]), rope_scaling=scaling, mlp="swiglu",
                attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                tie_embeddings=hf.get("tie_word_embeddings", False))


# ------------------------------------------------------------------------------------------- out


def export_architecture(c: GPTConfig) -> str:
    """The transformers class that computes what `c` does (raises HFError if none does)."""
    gpt2 = dict(norm="layernorm", position_embedding="learned", mlp="gelu", attention_bias=True, qkv_bias=True,
                mlp_bias=True, qk_norm=False)
    llama = dict(norm="rmsnorm", position_embedding="rope", mlp="swiglu")
    if all(getattr(c, k) == v for k, v in gpt2.items()) and c.num_kv_heads == c.num_heads:
        return "GPT2LMHeadModel"
    if all(getattr(c, k) == v for k, v in llama.items()):
        if c.qk_norm and c.qkv_bias == c.attention_bias and not c.mlp_bias:
            return "Qwen3ForCausalLM"
        if not c.qk_norm and c.qkv_bias == c.attention_bias:
            return "LlamaForCausalLM"
        if not c.qk_norm and c.qkv_bias and not c.attention_bias and not c.mlp_bias:
            return "Qwen2ForCausalLM"
    raise HFError(f"no transformers class computes this model (norm={c.norm}, position_embedding="
                  f"{c.position_embedding}, mlp={c.mlp}, num_kv_heads={c.num_kv_heads}, attention_bias="
                  f"{c.attention_bias}, qkv_bias={c.qkv_bias}, qk_norm={c.qk_norm}, mlp_bias={c.mlp_bias}): "
                  f"GPT2LMHeadModel needs {gpt2} and multi-head attention; LlamaForCausalLM, Qwen2ForCausalLM and "
                  f"Qwen3ForCausalLM need {llama}")


def hf_config(c: GPTConfig, *, bos_id: int | None, eos_id: int | None, dtype: str = "float32") -> dict:
    """config.json for the transformers class that computes what `c` does (raises HFError if none does)."""
    arch = export_architecture(c)
    common = dict(architectures=[arch], vocab_size=c.vocab_size, tie_word_embeddings=c.tie_embeddings,
                  bos_token_id=bos_id, eos_token_id=eos_id, dtype=dtype, torch_dtype=dtype)
    if arch == "GPT2LMHeadModel":
        return dict(common, model_type="gpt2", n_positions=c.max_seq_len, n_embd=c.hidden_size, n_layer=c.num_layers,
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
    config = dict(common, model_type={v: k for k, v in _BY_MODEL_TYPE.items()}[arch], hidden_size=c.hidden_size,
                  intermediate_size=c.ffn_hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, hidden_act="silu",
                  max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, attention_bias=c.attention_bias,
                  mlp_bias=c.mlp_bias, attention_dropout=c.dropout,
                  rope_theta=c.rope_theta, rope_scaling=scaling,  # transformers 4.x
                  rope_parameters=rope)  # transformers 5.x
    if arch != "LlamaForCausalLM":  # Qwen: full attention in every layer
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.num_layers)
    return config


def source_config(c: GPTConfig, files: dict[str, bytes], dtype: str) -> dict | None:
    """The config.json of the HF model a checkpoint of `c` was fine-tuned from (its `source_model/` files), with
    `dtype`; None when there is none, or when it describes another model than `c` (a mix-up: the computed
    config is then the truthful one)."""
    from .model import GPTConfig
    if "config.json" not in files:
        return None
    config = json.loads(files["config.json"])
    try:
        source = GPTConfig(**gpt_fields(config))
    except (HFError, KeyError, TypeError, ValueError):
        return None
    if any(getattr(source, k) != getattr(c, k) for k in SHAPE):
        return None
    return {**config, "dtype": dtype, "torch_dtype": dtype}


def config_dtype(hf: dict) -> str | None:
    """The dtype an HF config names (`dtype` in transformers 5, `torch_dtype` in 4.x), if it is one we write."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    return name if name in DTYPE_NAMES else None


# ------------------------------------------------------------------------------------------- carried files


def read_source_files(path: str | Path) -> dict[str, bytes]:
    """SOURCE_FILES of the HF model that checkpoint `path` starts from: an HF directory's own, or those a
    checkpoint carries in source_model/ (none for a model trained from scratch)."""
    path = Path(path)
    where = path if is_hf_model_dir(path) else path / SOURCE_DIR
    return {name: (where / name).read_bytes() for name in SOURCE_FILES if (where / name).is_file()}


def write_source_files(files: dict[str, bytes], checkpoint: Path) -> None:
    if files:
        (checkpoint / SOURCE_DIR).mkdir(exist_ok=True)
        for name, data in files.items():
            (checkpoint / SOURCE_DIR / name).write_bytes(data)
