"""Sample text from a tensor-parallel GPT (temperature, top-k); every rank computes the same tokens."""
from __future__ import annotations

import torch

from .tensor_parallel.mappings import all_gather_last


@torch.no_grad()
def generate(model, ids: list[int], max_new_tokens: int, *, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 0) -> list[int]:
    """Continue `ids`. Logits are gathered over TP, so all ranks draw the same tokens from the same seed."""
    c, ctx = model.config, model.ctx
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        window = out[-c.seq_len:]
        n = len(window)
        # Sequence parallelism needs a length divisible by T: pad on the right; the causal mask keeps the
        # padding out of position n-1.
        pad = (-n) % ctx.tp_size if c.sequence_parallel else 0
        tokens = torch.tensor([window + [0] * pad], device=ctx.device)
        logits = all_gather_last(model(tokens)[0, n - 1].contiguous(), ctx.tp_group)[: c.vocab_size].float()
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        out.append(next_id)
    model.train(was_training)
    return out


def main() -> None:
    """python -m megatron_lite.generate CHECKPOINT [--prompt ...]: load a checkpoint in any TP layout and sample.

    One process (`python -m ...`) or several (`torchrun --nproc_per_node=N -m megatron_lite.generate --tp N`)."""
    import argparse

    import torch.distributed as dist

    from .checkpoint import load_model, resolve
    from .parallel import init_parallel
    from .tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description="Sample text from a megatron-lite checkpoint.")
    ap.add_argument("checkpoint", help="a run directory or a step_NNNNNNN checkpoint directory")
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50, help="0: no top-k filter")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the world size)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = ap.parse_args()

    import os
    ctx = init_parallel(args.tp or int(os.environ.get("WORLD_SIZE", 1)), device=args.device)
    ckpt = resolve(args.checkpoint)
    model = load_model(ckpt, ctx, sequence_parallel=False)
    tok = load_tokenizer(ckpt)
    ids = generate(model, tok.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, seed=args.seed)
    if ctx.is_first_rank:
        print(f"# {ckpt} (TP={ctx.tp_size})\n{tok.decode(ids)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
