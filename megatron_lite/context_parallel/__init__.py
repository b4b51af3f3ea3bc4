"""Context parallelism (CP): every layer sees only seq_len / C tokens of each sequence on each CP rank.

    layout.py    the load-balanced layout: CP rank r holds chunks r and 2C-1-r of 2C; true positions
    plan.py      which query/key pairs each ring step computes (skip, full, causal, masked), from positions
    kernels.py   one block's attention with its log-sum-exp (CPU flash, CUDA flash, float32 matmul), the merge
    ring.py      ring attention: K/V blocks around the CP ring over async p2p, overlapped with compute

Attention is the only module that exchanges anything: the rest of the model (norms, MLP, the loss) works on
this rank's tokens alone, so activation memory per rank falls as 1/C. CP ranks hold the same weights; their
gradients are averaged over DP x CP (parallel.py's dp_cp_group, used by DDP and the distributed optimizer).
"""
from .layout import chunk_ids, load_balanced_positions, shard_batch, shard_sequence
from .plan import Ring, RingPlan
from .ring import ring_attention

__all__ = ["chunk_ids", "load_balanced_positions", "shard_batch", "shard_sequence", "Ring", "RingPlan", "ring_attention"]
