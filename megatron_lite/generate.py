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
