"""Generate text from a tensor-parallel GPT with a KV cache (greedy, or temperature and top-k sampling).

    python -m megatron_lite.generate CHECKPOINT [--prompt "def "] [--temperature 0] [--max-new-tokens 200]
    torchrun --nproc_per_node=2 -m megatron_lite.generate CHECKPOINT        (TP=2; any TP the model splits into)

CHECKPOINT is a megatron-lite run or step directory, or a Hugging Face model directory. Every rank computes
the same tokens: the logits are gathered over TP and each rank draws from the same seeded generator.
"""
from __future__ import annotations

import time

import torch

from .tensor_parallel.mappings import all_gather_last


class KVCache:
    """Keys and values of the tokens seen so far, per layer `[B, Gt, max_len, D]` (this rank's KV heads),
    so that generating a token runs the model on that token alone."""

    def __init__(self, model, batch: int, max_len: int):
        c = model.config
        self.shape = (batch, c.num_kv_heads // model.ctx.tp_size, max_len, c.head_dim)
        self.k: list[torch.Tensor | None] = [None] * c.num_layers  # allocated at first use, in k's dtype
        self.v: list[torch.Tensor | None] = [None] * c.num_layers  # (bf16 under autocast)
        self.length, self.max_len = 0, max_len

    def update(self, layer: int, k_BGtSD, v_BGtSD):
        """Store the new tokens' k and v after the cached ones; return all of them."""
        end = self.length + k_BGtSD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        if self.k[layer] is None:
            self.k[layer] = k_BGtSD.new_empty(self.shape)
            self.v[layer] = v_BGtSD.new_empty(self.shape)
        self.k[layer][:, :, self.length:end] = k_BGtSD
        self.v[layer][:, :, self.length:end] = v_BGtSD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def mask(self, S: int, device) -> torch.Tensor | None:
        """None (SDPA's own causal mask) for a first chunk; else new token i sees positions <= length + i.
        (SDPA's is_causal aligns the mask top-left, which is wrong once keys outnumber queries.)"""
        if self.length == 0:
            return None
        return torch.arange(self.length + S, device=device) <= self.length + torch.arange(S, device=device)[:, None]


@torch.no_grad()
def generate(model, ids: list[int], max_new_tokens: int, *, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 0, eos_id: int | None = None, use_cache: bool = True) -> list[int]:
    """Continue `ids` by up to `max_new_tokens` tokens (stopping after `eos_id`); returns prompt + new tokens.

    The context is the tokens from `start` on. When it outgrows the model's context (max_seq_len), `start` jumps
    so that the newest half is kept (with a KV cache, the cache is rebuilt from them): each token costs O(1)
    amortized, and the tokens are the same with and without the cache."""
    c, ctx = model.config, model.ctx
    if ctx.pp_size > 1:
        raise ValueError(f"generation needs the whole model on each rank, not a pipeline stage (PP={ctx.pp_size}): "
                         f"load the checkpoint at PP=1 (python -m megatron_lite.generate CHECKPOINT)")
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    out = list(ids)
    context = c.max_seq_len
    start = max(0, len(out) - context)
    cache, fed = None, 0  # tokens of out[start:] already in the cache
    with model.sequence_parallel_off(), model.context_parallel_off():  # sequences that grow a token at a time
        for _ in range(max_new_tokens):
            if len(out) - start > context:
                start, cache = len(out) - context // 2, None
            if not use_cache:
                logits_Vt = model(torch.tensor([out[start:]], device=ctx.device))[0, -1]
            else:
                if cache is None:
                    cache, fed = KVCache(model, 1, min(context, len(out) - start + max_new_tokens)), 0
                logits_Vt = model(torch.tensor([out[start + fed:]], device=ctx.device), cache=cache)[0, -1]
                fed = len(out) - start
            next_id = _pick(all_gather_last(logits_Vt.contiguous(), ctx.tp_group)[: c.vocab_size].float(),
                            temperature, top_k, gen)
            out.append(next_id)
            if next_id == eos_id:
                break
    model.train(was_training)
    return out


def _pick(logits_V: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if top_k is not None:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=gen))


def main() -> None:
    import argparse
    import os
    import sys

    import torch.distributed as dist

    from .checkpoint import CheckpointError, checkpoint_tokenizer, load_model, model_config, resolve
    from .parallel import init_parallel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run directory, a step_NNNNNNN checkpoint directory or an HF model directory")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50, help="0: no top-k filter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the world size)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json, .model or model directory (default: the "
                                                      "checkpoint's own)")
    args = ap.parse_args()

    try:  # bad input: one line, before any process group
        ckpt = resolve(args.checkpoint)
        config = model_config(ckpt, sequence_parallel=False)
        config.validate(args.tp or int(os.environ.get("WORLD_SIZE", 1)))
        tok = checkpoint_tokenizer(ckpt, args.tokenizer, "--tokenizer PATH")
    except (CheckpointError, ValueError) as e:  # HFError, ModelConfigError, DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    ctx = init_parallel(args.tp or int(os.environ.get("WORLD_SIZE", 1)), device=args.device)
    model = load_model(ckpt, ctx, sequence_parallel=False)
    prompt = tok.frame(tok.encode(args.prompt), last=False)  # with BOS where the model expects it (Llama)
    t0 = time.perf_counter()
    ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   seed=args.seed, eos_id=tok.eos_id, use_cache=not args.no_cache)
    dt = time.perf_counter() - t0
    if ctx.is_first_rank:
        print(f"# {ckpt} (TP={ctx.tp_size})\n{tok.decode(ids)}", flush=True)
        n = len(ids) - len(prompt)
        print(f"# {n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s ({'no ' if args.no_cache else ''}KV cache, "
              f"TP={ctx.tp_size}, {ctx.device.type})", file=sys.stderr, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
