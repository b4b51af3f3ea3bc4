"""Cross-entropy over vocab-sharded logits, without gathering them (Shoeybi et al. 2019, section 3).

Legend: `...` any leading shape (`[s, b]` in the GPT), Vt = V/T the vocabulary columns on this rank.

Each rank holds logits for its block of the vocabulary. loss = log(sum_v exp(z_v - m)) - (z_target - m)
needs three numbers per token from the whole vocabulary: the max m, the sum of exponentials and the
target's logit. The max is all-reduced (MAX) first; the other two are summed in one all-reduce. The
backward needs no communication: dL/dz = softmax(z) - onehot(target) on the columns this rank holds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mappings import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index, vocab_size):
        Vt = logits.shape[-1]
        start = dist.get_rank(group) * Vt
        # Columns >= vocab_size are padding (the vocabulary is padded to a fixed multiple): at -inf they weigh
        # nothing in the sum and the softmax, so padding never changes the loss or gets a gradient.
        n_valid = Vt if vocab_size is None else max(0, min(Vt, vocab_size - start))
        logits_max = logits[..., :n_valid].amax(-1).float() if n_valid else \
            logits.new_full(logits.shape[:-1], float("-inf"), dtype=torch.float32)
        logits_max = all_reduce(logits_max, group, op="max")  # -inf on a rank with only padding: the MAX is finite
        # One float32 tensor of the logits' size, and only one: z - max (float32 logits: in one pass; bf16: a
        # float32 copy, shifted in place, as a mixed-dtype subtraction would stage a float32 copy of its own), then
        # exponentiated and normalized in place into the softmax that backward turns into the gradient, also in
        # place. (Llama 3's vocabulary at 8k tokens: bf16 logits 2.1 GB, each float32 tensor of them 4.2 GB.)
        shift = logits_max.unsqueeze(-1)
        z = logits - shift if logits.dtype == torch.float32 else logits.float().sub_(shift)
        if n_valid < Vt:
            z[..., n_valid:] = float("-inf")

        target_local = targets - start
        in_shard = (target_local >= 0) & (target_local < n_valid)
        target_local = target_local.masked_fill(~in_shard, 0)
        target_logit = z.gather(-1, target_local.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)

        softmax = z.exp_()
        sums = torch.stack([softmax.sum(-1), target_logit])
        sums = all_reduce(sums, group)
        sum_exp, target_logit = sums.unbind(0)

        ignored = targets == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, target_local, in_shard, ignored)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target_local, in_shard, ignored = ctx.saved_tensors
        grad = softmax  # d loss / d z = softmax - onehot(target), built in place in the saved buffer
        grad.scatter_add_(-1, target_local.unsqueeze(-1), -in_shard.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, targets: torch.Tensor, tp_group: dist.ProcessGroup,
                                 *, ignore_index: int = -100, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy `[...]` from this rank's logits `[..., Vt]` (columns r*Vt onwards).

    Equals `F.cross_entropy(gathered_logits, targets, reduction="none", ignore_index=ignore_index)`;
    ignored targets give 0. With `vocab_size`, columns from `vocab_size` on are padding and left out."""
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, tp_group, ignore_index, vocab_size)
