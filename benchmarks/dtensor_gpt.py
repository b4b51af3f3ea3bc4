"""The peer: the same GPT-2, made tensor-parallel with PyTorch-native TP (`torch.distributed.tensor.parallel`).

`DenseGPT` is a plain single-device GPT-2 with exactly megatron-lite's parameter names, shapes and math
(pre-LayerNorm blocks, fused QKV whose output features are laid out head-major `[N, 3, D]`, causal SDPA,
tanh-GELU MLP, final LayerNorm, output layer tied to the token embedding), so megatron-lite's gathered
state dict loads into it unchanged. Activations are `[b, s, h]` (torch's usual layout; the sequence is
dim 1, the default of `SequenceParallel`).

`parallelize_dense_gpt` applies the plan torchtitan uses for Llama (Megatron's layout expressed as DTensor
placements): QKV and MLP-fc ColwiseParallel, the two output projections RowwiseParallel, the token
embedding RowwiseParallel (vocab-sharded), the output layer ColwiseParallel with Shard(-1) DTensor logits
for `loss_parallel`; under sequence parallelism LayerNorms (and the position embedding) run under
`SequenceParallel` and the row-parallel outputs are Shard(1) (reduce-scatter). Under plain TP the
LayerNorms and the position embedding become replicated DTensors too (`Replicated` below), so every
parameter is a DTensor and the foreach AdamW step sees one kind of tensor.

The vocabulary must not be padded (`vocab_size` a multiple of megatron-lite's `vocab_pad_multiple`): the
dense model has no notion of padding columns, so padding would make the two losses differ.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel, SequenceParallel,
                                               loss_parallel, parallelize_module)



class DenseBlock(nn.Module):
    def __init__(self, h: int, n_heads: int, ffn: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, h // n_heads
        self.ln_1 = nn.LayerNorm(h)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(h, 3 * h)
        self.attn.proj = nn.Linear(h, h)
        self.ln_2 = nn.LayerNorm(h)
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(h, ffn)
        self.mlp.proj = nn.Linear(ffn, h)

    def forward(self, x_BSH):
        qkv = self.attn.qkv(self.ln_1(x_BSH))  # [B, S, 3H] (or this rank's [B, S, 3H/T] under TP)
        B, S, _ = qkv.shape
        # head-major [N, 3, D]: -1 is the number of heads on this rank
        q, k, v = qkv.view(B, S, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)  # [B, Nt, S, D]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, -1)
        x_BSH = x_BSH + self.attn.proj(y)
        return x_BSH + self.mlp.proj(F.gelu(self.mlp.fc(self.ln_2(x_BSH)), approximate="tanh"))


class DenseGPT(nn.Module):
    """forward(tokens [B, S], targets [B, S]) -> mean cross-entropy over targets != -100.

    After `parallelize_dense_gpt`, call forward and backward inside `loss_parallel()` (see `train_step`)."""

    def __init__(self, vocab_size: int, seq_len: int, num_layers: int, hidden_size: int, num_heads: int,
                 ffn_hidden_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden_size)
        self.wpe = nn.Embedding(seq_len, hidden_size)
        self.blocks = nn.ModuleList(DenseBlock(hidden_size, num_heads, ffn_hidden_size) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.tp_rank, self.tp_size, self.sequence_parallel = 0, 1, False

    def forward(self, tokens, targets):
        S = tokens.shape[1]
        # under SP the position embedding sees this rank's block of positions (SequenceParallel style)
        first, St = (self.tp_rank * (S // self.tp_size), S // self.tp_size) if self.sequence_parallel else (0, S)
        positions = torch.arange(first, first + St, device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions.unsqueeze(0))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # a DTensor sharded over the vocabulary after parallelization
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def dense_gpt_from_config(cfg) -> DenseGPT:
    """A DenseGPT with the shapes of a megatron-lite `GPTConfig` (whose vocabulary must need no padding)."""
    if cfg.padded_vocab_size != cfg.vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size} is padded to {cfg.padded_vocab_size} by megatron-lite; "
                         f"use a multiple of {cfg.vocab_pad_multiple} so both models have the same vocabulary")
    if not cfg.tie_embeddings or cfg.dropout:
        raise ValueError("the DTensor peer models tied embeddings and dropout 0 only")
    return DenseGPT(cfg.vocab_size, cfg.seq_len, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden_size)


class Replicated(ParallelStyle):
    """Plain TP: parameters become Replicate DTensors, the (replicated) input is annotated Replicate, the
    output is handed back as a local tensor. No communication forward or backward."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def params(name, mod, mesh):
            for p_name, p in list(mod.named_parameters(recurse=False)):
                replicated = DTensor.from_local(p, mesh, [Replicate()], run_check=False)
                mod.register_parameter(p_name, nn.Parameter(replicated))

        def inputs(mod, args, mesh):
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False) for a in args)

        return distribute_module(module, mesh, params, inputs, lambda mod, out, mesh: out.to_local())


def parallelize_dense_gpt(model: DenseGPT, tp_group: dist.ProcessGroup, sequence_parallel: bool) -> DenseGPT:
    """Shard `model` (holding the full weights on every rank) over `tp_group`, in place; returns it."""
    mesh = DeviceMesh.from_group(tp_group, model.wte.weight.device.type)
    sp = sequence_parallel
    seq = Shard(1)
    norm = SequenceParallel if sp else Replicated
    block_plan = {
        "ln_1": norm(),
        "attn.qkv": ColwiseParallel(input_layouts=seq) if sp else ColwiseParallel(),
        "attn.proj": RowwiseParallel(output_layouts=seq) if sp else RowwiseParallel(),
        "ln_2": norm(),
        "mlp.fc": ColwiseParallel(input_layouts=seq) if sp else ColwiseParallel(),
        "mlp.proj": RowwiseParallel(output_layouts=seq) if sp else RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block, mesh, block_plan)
    parallelize_module(model, mesh, {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq if sp else Replicate()),
        "wpe": SequenceParallel(use_local_output=True) if sp else Replicated(),
        "ln_f": norm(),
        "lm_head": ColwiseParallel(input_layouts=seq if sp else Replicate(), output_layouts=Shard(-1),
                                   use_local_output=False),
    })
    model.lm_head.weight = model.wte.weight  # re-tie: both are Shard(0) over the vocabulary
    model.tp_rank, model.tp_size, model.sequence_parallel = mesh.get_local_rank(), mesh.size(), sp
    return model


def build_dtensor_gpt(cfg, tp_group: dist.ProcessGroup, full_state: dict[str, torch.Tensor],
                      sequence_parallel: bool) -> DenseGPT:
    """The peer of megatron-lite's GPT(cfg): same weights (`full_state`, e.g. `GPT.full_state()`)."""
    model = dense_gpt_from_config(cfg)
    state = dict(full_state, **{"lm_head.weight": full_state["wte.weight"]})
    model.load_state_dict(state, strict=True)
    model.to(next(iter(full_state.values())).device)
    return parallelize_dense_gpt(model, tp_group, sequence_parallel)


def dtensor_loss_and_backward(model: DenseGPT, tokens, targets) -> torch.Tensor:
    """Forward and backward under `loss_parallel` (the vocab-parallel cross-entropy); returns the loss."""
    with loss_parallel():
        loss = model(tokens, targets)
        loss.backward()
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def full_grad(p: torch.Tensor) -> torch.Tensor:
    """The full gradient of a (DTensor) parameter."""
    g = p.grad
    return g.full_tensor() if isinstance(g, DTensor) else g
