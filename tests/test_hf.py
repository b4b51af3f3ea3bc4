"""Hugging Face interop against transformers itself (random models built from configs, nothing downloaded).

- GPT-2 and Llama models (MHA and GQA, tied and untied, biases, Llama-3 RoPE scaling) loaded from an HF
  directory at every T in {1, 2, 4} their KV heads split into, SP off and on: logits, loss and every gradient equal transformers' to float32
  rounding; the same after a DCP reshard of the loaded model from T=2 to T=4;
- HF -> megatron-lite -> HF gives bitwise the same tensors under exactly the same names, and an export
  loads in transformers with no missing or unexpected keys;
- greedy generation with the KV cache equals generation without it (also across a window restart) and
  transformers' own greedy `generate`, at T=1 and T=2;
- the tokenizer written for a megatron-lite sentencepiece model gives the same ids through AutoTokenizer.
"""
from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

from distributed import run_distributed
from megatron_lite.checkpoint import load_model, model_state
from megatron_lite.generate import generate
from megatron_lite.hf import hf_state_dict, to_hf
from megatron_lite.model import GPT
from megatron_lite.optim import finalize_model_grads
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel.mappings import all_gather_last

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

V, S, B = 320, 32, 2  # 320 pads to 384: a vocabulary that is not a multiple of 128
LLAMA3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def _gpt2(**kw):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **kw))


def _llama(heads, kv_heads, **kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=V, **{"max_position_embeddings": 64, **kw}))


SPECS = {  # name -> a random transformers model
    "gpt2": lambda: _gpt2(),
    "llama_4q4kv_untied_bias": lambda: _llama(4, 4, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "llama_4q2kv_tied": lambda: _llama(4, 2, tie_word_embeddings=True),
    "llama_8q2kv_llama3_untied": lambda: _llama(8, 2, tie_word_embeddings=False, rope_theta=500000.0,
                                                rope_scaling=LLAMA3, max_position_embeddings=256),
    "llama_8q4kv_llama3_tied": lambda: _llama(8, 4, tie_word_embeddings=True, rope_theta=500000.0,
                                              rope_scaling=LLAMA3, max_position_embeddings=256),
    "llama_4q1kv_tied": lambda: _llama(4, 1, tie_word_embeddings=True),
}


def _save_hf(name: str, root: Path) -> tuple[Path, torch.nn.Module]:
    """The random model `name` (the same on every rank: seeded), saved by rank 0 under `root`."""
    torch.manual_seed(0)
    hf = SPECS[name]().eval()
    path = root / name
    if dist.get_rank() == 0:
        hf.save_pretrained(path)
    dist.barrier()
    return path, hf


def _batch():
    ids = torch.randint(0, V, (B, S + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def _reference(hf):
    """transformers' logits, loss and gradients (by HF name) on the fixed batch."""
    x, y = _batch()
    logits = hf(x).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    return logits.detach(), loss.item(), {n: p.grad for n, p in hf.named_parameters()}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return all_gather_last(model(_batch()[0]).contiguous(), model.ctx.tp_group)[..., :V]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _parity_worker(root: str):
    root = Path(root)
    for name in SPECS:
        path, hf = _save_hf(name, root)
        ref_logits, ref_loss, ref_grads = _reference(hf)
        kv = hf.config.num_key_value_heads if hasattr(hf.config, "num_key_value_heads") else 4
        for T in [t for t in (1, 2, 4) if kv % t == 0]:
            ctx = build_parallel_context(T)
            for sp in (False, True):
                tag = f"{name} T={T} sp={sp}"
                model = load_model(path, ctx, sequence_parallel=sp).train()
                diff = (_logits(model) - ref_logits).abs().max().item()
                assert diff < 1e-4, f"{tag}: logits differ from transformers' by {diff:.2e}"
                loss = model(*_batch())
                loss.backward()
                finalize_model_grads(model)  # under SP: the replicated gradients' sum over TP
                assert abs(loss.item() - ref_loss) / ref_loss < 1e-6, f"{tag}: loss {loss.item()} vs {ref_loss}"
                grads = to_hf(model.config, model.full_state(grads=True))
                assert grads.keys() == ref_grads.keys(), f"{tag}: {grads.keys() ^ ref_grads.keys()}"
                for k, g in grads.items():
                    assert _rel(g, ref_grads[k]) < 1e-5, f"{tag}: gradient of {k} off by {_rel(g, ref_grads[k]):.1e}"
                if dist.get_rank() == 0:
                    print(f"{tag}: max |logits - transformers'| {diff:.1e}, loss rel {abs(loss.item() - ref_loss) / ref_loss:.1e}, "
                          f"max grad rel {max(_rel(g, ref_grads[k]) for k, g in grads.items()):.1e}", flush=True)
                if T == 2 and sp:  # save at T=2 + SP, reshard to T=4 through DCP
                    ckpt = str(root / f"{name}_dcp")
                    dcp.save(model_state(model, ctx), checkpoint_id=ckpt)
        if kv % 4 == 0:
            ctx4 = build_parallel_context(4)
            resharded = GPT(model.config, ctx4, init_weights=False).eval()
            dcp.load(model_state(resharded, ctx4), checkpoint_id=str(root / f"{name}_dcp"))
            diff = (_logits(resharded) - ref_logits).abs().max().item()
            assert diff < 1e-4, f"{name}: after the T=2 -> T=4 reshard, logits differ by {diff:.2e}"


def test_logits_and_gradients_equal_transformers_at_T_1_2_4_sp_on_off_and_after_reshard(tmp_path):
    run_distributed(_parity_worker, 4, str(tmp_path))


def _generation_worker(root: str):
    for name in ("gpt2", "llama_4q2kv_tied"):
        path, hf = _save_hf(name, Path(root))
        prompt = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(2)).tolist()
        hf.generation_config.eos_token_id = None  # a random model: let both run to max_new_tokens
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0].tolist()
        for T in (1, 2):
            model = load_model(path, build_parallel_context(T), sequence_parallel=True)  # generate turns SP off
            assert generate(model, prompt, 20, temperature=0) == ref, f"{name} T={T}: not transformers' tokens"
            # 70 new tokens cross the 64-position window: the context restarts from the newest half
            cached = generate(model, prompt, 70, temperature=0, use_cache=True)
            assert cached == generate(model, prompt, 70, temperature=0, use_cache=False), f"{name} T={T}"
            assert len(cached) == len(prompt) + 70


def test_greedy_generation_with_kv_cache_equals_without_and_transformers(tmp_path):
    run_distributed(_generation_worker, 2, str(tmp_path))


def _round_trip_worker(root: str):
    from safetensors.torch import load_file
    ctx = build_parallel_context(1)
    for name in SPECS:
        path, _ = _save_hf(name, Path(root))
        saved = load_file(path / "model.safetensors")
        ours = hf_state_dict(load_model(path, ctx))
        assert ours.keys() == saved.keys(), f"{name}: {ours.keys() ^ saved.keys()}"
        for k, t in saved.items():
            assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), f"{name}: {k} changed in the round trip"


def test_hf_to_megatron_lite_to_hf_is_bitwise_with_the_same_keys(tmp_path):
    run_distributed(_round_trip_worker, 1, str(tmp_path))


def test_exported_tokenizer_gives_our_ids_through_autotokenizer(tmp_path):
    from megatron_lite.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from megatron_lite.hf_tokenizer import write_hf_tokenizer
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / f).read_text() for f in ("argparse.py", "textwrap.py", "csv.py"))
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece([ln for ln in text.split("\n") if ln], 1000))
    ours = SentencePieceTokenizer(tmp_path / "tokenizer.model")
    write_hf_tokenizer(tmp_path / "tokenizer.model", tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    awkward = ["hello world", "  two  spaces  ", "\ttabs\tand\n\nnewlines\n", "\n", "", " ", "trailing   ",
               "<n>", "a<n>b\n<n>", "</s> <s> <unk>", "naïve café 東京 🙂 \u200b", "x = 1234567890 + 3.14",
               "def f(x):\n    return x**2\n\n\n", "\r\n windows \r\n", "\x00\x01 control", "üü" * 40,
               "    " * 20 + "deep", "a" * 500]
    rng = random.Random(0)
    awkward += [text[i:i + rng.randrange(1, 400)] for i in (rng.randrange(len(text)) for _ in range(200))]
    for s in awkward:
        ids = ours.encode(s)
        assert theirs(s)["input_ids"] == ids, f"ids differ for {s[:60]!r}"
        assert theirs.decode(ids) == ours.decode(ids) == s, f"decode differs for {s[:60]!r}"
