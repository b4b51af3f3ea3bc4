"""ZeRO-1's owned flat ranges as pieces of the global tensors a checkpoint holds: saved and loaded in place.

The distributed optimizer (distributed_optimizer.py) keeps AdamW's moments for a contiguous range of its flat
buffers: for each parameter it holds elements [start, end) of the flattened local (TP-shard) tensor, any range,
possibly none. A checkpoint stays layout-free when it holds every moment as the global tensor laid out like its
parameter, what zero=0 saves. Instead of gathering the full moments at every save and load (8 bytes per local
parameter, on the device, at the memory peak of a model that fits only thanks to ZeRO), each rank hands DCP its
ranges as boxes of the global tensor: a flat range of a C-contiguous tensor is a handful of rectangular blocks
(a partial row, whole rows, a partial row, recursively per dimension), each contiguous in memory, so each box is
a view of the optimizer's own state buffer. DCP writes those views and reads into them; it reshards from and to
any other layout by intersecting boxes (Megatron-Core's "fully reshardable" format gathers instead).

The boxes are described with torch's ShardedTensor (the sharded type DCP accepts besides DTensor, whose
placements cannot express a flat range of a 2-D tensor), built from metadata every rank computes alone: the
bucket layout is the same on every DP rank, and the TP ranks of a DP rank hold same-shaped shards.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

# torch 2.13 asks for DTensor instead at every save and load of one; DTensor's placements cannot describe a flat
# range of a 2-D tensor (see above), and DCP reads and writes ShardedTensors as before.
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                        category=FutureWarning)


def flat_boxes(shape: list[int], start: int, end: int) -> list[tuple[list[int], list[int], int]]:
    """Elements [start, end) of a C-contiguous tensor of `shape` as rectangular boxes (offsets, sizes, flat
    offset of the box's first element), in memory order. Each box is contiguous in memory; at most 2 per
    dimension but one."""
    if start >= end:
        return []
    if not shape:
        return [([], [], start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner  # the rows (along dim 0) the range touches
    if first == last:  # inside one row: recurse into it
        return [([first, *off], [1, *size], first * inner + flat)
                for off, size, flat in flat_boxes(shape[1:], start - first * inner, end - first * inner)]
    boxes = []
    if start % inner:  # a partial first row
        boxes += flat_boxes(shape, start, (first + 1) * inner)
        first += 1
    whole_end = last + 1 if end % inner == 0 else last
    if whole_end > first:  # whole rows
        boxes.append(([first] + [0] * (len(shape) - 1), [whole_end - first, *shape[1:]], first * inner))
    if end % inner:  # a partial last row
        boxes += flat_boxes(shape, last * inner, end)
    return boxes


def sharded_moment(like: torch.Tensor, tp_dim: int | None, tp_size: int, owners: list[tuple[int, int, int]],
                   view: torch.Tensor | None, me: tuple[int, int], rank_of: Callable[[int, int], int]) -> ShardedTensor:
    """One AdamW moment of one parameter, as the global tensor this rank holds pieces of (views of `view`).

    `like`: shaped like this rank's (TP shard of the) parameter; `owners`: every DP x CP rank's range of its
    flattened elements, (dp_cp rank, start, end), the same at every TP rank; `view`: the moment of this rank's
    range, flat (None when it owns none); `me`: this rank's (dp_cp rank, tp rank); `rank_of(dp_cp rank, tp rank)`:
    the global rank holding that piece."""
    shape, global_shape = list(like.shape), list(like.shape)
    if tp_dim is not None:
        global_shape[tp_dim] *= tp_size
    shards_md, shards = [], []
    # A TP-replicated parameter's moments are the same on every TP rank: each TP rank describes the global tensor
    # with its own copies (every such description covers it once; DCP writes one of the identical pieces).
    for t in range(tp_size) if tp_dim is not None else [me[1]]:
        for d, start, end in owners:
            rank, mine = rank_of(d, t), (d, t) == me
            for offsets, sizes, flat in flat_boxes(shape, start, end):
                if tp_dim is not None:
                    offsets[tp_dim] += t * shape[tp_dim]
                md = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes,
                                   placement=f"rank:{rank}/{like.device if mine else like.device.type}")
                shards_md.append(md)
                if mine:
                    shards.append(Shard(view[flat - start:flat - start + math.prod(sizes)].view(sizes), md))
    props = TensorProperties(dtype=like.dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    meta = ShardedTensorMetadata(shards_metadata=shards_md, size=torch.Size(global_shape), tensor_properties=props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)
