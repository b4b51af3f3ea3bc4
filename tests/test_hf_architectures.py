"""Mistral, Qwen2 and Qwen3 against transformers itself, as test_hf.py holds the Llama family (random models built
from configs, nothing downloaded; their norm weights and biases drawn away from 1 and 0, so a weight put in the
wrong place cannot hide):

- loaded from an HF directory at every T their 2 KV heads split into (1, 2), SP on (Qwen3 also SP off: its q/k
  norm weights' gradient is summed over TP in another way then): logits, loss and every gradient equal
  transformers' to float32 rounding, and greedy generation with the KV cache gives transformers' tokens;
- HF -> megatron-lite -> HF bitwise with the same keys; a model built here with their settings exports to a
  directory transformers loads under the same class, with the same logits;
- Mistral's sliding window: a training window longer than it is refused with one line naming sliding_window,
  and generation keeps its context within it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed
from megatron_lite.checkpoint import load_model
from megatron_lite.generate import generate
from megatron_lite.hf import hf_state_dict, to_hf
from megatron_lite.hf_config import HFError, export_architecture, hf_config, hf_model_config, sliding_window
from megatron_lite.optim import finalize_model_grads
from megatron_lite.parallel import build_parallel_context
from test_hf import V, _batch, _logits, _reference, _rel  # the same batch and measures as the Llama family

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=V, max_position_embeddings=64)


def _build(arch: str):
    """A random transformers model of `arch` (seeded), its norms and biases perturbed."""
    t = transformers
    torch.manual_seed(0)
    hf = {"mistral": lambda: t.MistralForCausalLM(t.MistralConfig(
              **SMALL, num_attention_heads=8, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
          "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(
              **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
          "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(  # head_dim 24: q width 96 != hidden 64
              **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
          }[arch]().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return hf


ARCHS = {"mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _save(arch: str, root: Path):
    hf = _build(arch)
    path = root / arch
    if dist.get_rank() == 0:
        hf.save_pretrained(path)
    dist.barrier()
    return path, hf


def _worker(root: str):
    from safetensors.torch import load_file, save_file
    root = Path(root)
    for arch, cls in ARCHS.items():
        path, hf = _save(arch, root)
        x, y = _batch()
        ref_logits, ref_loss, ref_grads = _reference(hf)
        prompt = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(2)).tolist()
        hf.generation_config.eos_token_id = None  # a random model: let both run to max_new_tokens
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0].tolist()
        for T in (1, 2):  # every T the 2 KV heads split into
            ctx = build_parallel_context(T)
            for sp in (True, False) if arch == "qwen3" else (True,):
                tag = f"{arch} T={T} sp={sp}"
                model = load_model(path, ctx, sequence_parallel=sp).train()
                diff = (_logits(model) - ref_logits).abs().max().item()
                assert diff < 2e-6, f"{tag}: logits differ from transformers' by {diff:.2e}"
                loss = model(x, y)
                loss.backward()
                finalize_model_grads(model)
                assert abs(loss.item() - ref_loss) / ref_loss < 1e-6, f"{tag}: loss {loss.item()} vs {ref_loss}"
                grads = to_hf(model.config, model.full_state(grads=True))
                assert grads.keys() == ref_grads.keys(), f"{tag}: {grads.keys() ^ ref_grads.keys()}"
                worst = max(grads, key=lambda k: _rel(grads[k], ref_grads[k]))
                assert _rel(grads[worst], ref_grads[worst]) < 1e-5, f"{tag}: gradient of {worst} off by " \
                                                                     f"{_rel(grads[worst], ref_grads[worst]):.1e}"
                assert generate(model, prompt, 16, temperature=0) == greedy, f"{tag}: not transformers' tokens"
                if dist.get_rank() == 0:
                    print(f"{tag}: max |logits - transformers'| {diff:.1e}, loss rel "
                          f"{abs(loss.item() - ref_loss) / ref_loss:.1e}, max grad rel "
                          f"{_rel(grads[worst], ref_grads[worst]):.1e} ({worst}); greedy text equal", flush=True)
        model = load_model(path, build_parallel_context(1))
        if dist.get_rank() == 0:
            saved, ours = load_file(path / "model.safetensors"), hf_state_dict(model)
            assert ours.keys() == saved.keys(), f"{arch}: {ours.keys() ^ saved.keys()}"
            for k, t in saved.items():
                assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), f"{arch}: {k} changed in the round trip"
            # the same model built here, exported without its source config.json: the class that computes it
            out = root / f"{arch}_export"
            out.mkdir()
            (out / "config.json").write_text(json.dumps(hf_config(model.config, bos_id=None, eos_id=None)))
            save_file(ours, str(out / "model.safetensors"), metadata={"format": "pt"})
            theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
            assert not any(info.values()), (arch, info)  # no missing, unexpected or mismatched keys
            expected = "LlamaForCausalLM" if arch == "mistral" else cls  # Mistral without a sliding window is a Llama
            assert type(theirs).__name__ == expected == export_architecture(model.config)
            with torch.no_grad():
                assert torch.equal(theirs.eval()(x).logits, ref_logits), arch
        dist.barrier()


def test_equal_transformers_logits_grads_at_every_T_sp_round_trip_export_and_greedy_text(tmp_path):
    run_distributed(_worker, 2, str(tmp_path))


def test_mistral_sliding_window_bounds_the_window_and_qwen_sliding_only_when_switched_on(tmp_path):
    t = transformers
    mistral = t.MistralConfig(**{**SMALL, "max_position_embeddings": 256}, num_attention_heads=4,
                              num_key_value_heads=2, sliding_window=48)
    mistral.save_pretrained(tmp_path / "mistral")
    c = hf_model_config(tmp_path / "mistral", seq_len=48)
    assert (c.seq_len, c.max_seq_len) == (48, 48)  # full causal attention equals the sliding window up to 48
    with pytest.raises(HFError) as e:
        hf_model_config(tmp_path / "mistral", seq_len=64)
    assert "model.seq_len=64" in str(e.value) and "sliding_window=48" in str(e.value) \
        and "use model.seq_len<=48" in str(e.value) and "\n" not in str(e.value)
    t.MistralConfig(**{**SMALL, "max_position_embeddings": 256}, sliding_window=None).save_pretrained(
        tmp_path / "mistral_full")
    assert hf_model_config(tmp_path / "mistral_full", seq_len=64).max_seq_len == 256
    with pytest.raises(HFError, match=r"model.seq_len=300 exceeds the context .* use model.seq_len<=256"):
        hf_model_config(tmp_path / "mistral_full", seq_len=300)
    qwen = t.Qwen2Config(**SMALL, num_attention_heads=4, sliding_window=16).to_dict()
    assert sliding_window(qwen) is None  # use_sliding_window is off by default
    on = t.Qwen2Config(**SMALL, num_attention_heads=4, use_sliding_window=True, sliding_window=16,
                       max_window_layers=1).to_dict()
    assert sliding_window(on) == 16
    legacy = {k: v for k, v in on.items() if k != "layer_types"}  # a transformers 4.x config
    assert sliding_window(legacy) == 16 and sliding_window({**legacy, "max_window_layers": 2}) is None
