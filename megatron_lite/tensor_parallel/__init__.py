"""Megatron-style tensor-parallel building blocks (mirrors Megatron-Core's `tensor_parallel` package)."""
from .cross_entropy import vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, all_reduce_coalesced,
                     column_parallel_linear, gather_tp_shards, replicated_params, tp_partition_dim)
from .mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp,
                       scatter_to_sp, scatter_to_tp)
from .random import RNGTracker, checkpoint

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "column_parallel_linear",
           "replicated_params", "all_reduce_coalesced", "tp_partition_dim", "gather_tp_shards",
           "vocab_parallel_cross_entropy", "copy_to_tp",
           "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "gather_from_sp", "reduce_scatter_to_sp",
           "scatter_to_sp", "RNGTracker", "checkpoint"]
