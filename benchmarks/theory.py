"""What the papers predict: collectives per train step, activation memory per layer, model FLOPs.

Conventions: s sequence, b micro-batch, h hidden, a heads, F ffn hidden (4h in the papers), L layers,
V padded vocabulary, t (or T) tensor-parallel size, dp data-parallel size. Bytes are *logical* bytes (the
full tensor a collective works on: the all-reduced tensor, the all-gather's output, the reduce-scatter's
input; see megatron_lite.comm_count), for float32 (4 bytes) unless `elem` says otherwise.

Papers: Shoeybi et al. 2019 (Megatron-LM, arXiv 1909.08053) section 3 and Fig. 3-4; Korthikanti et al. 2022
(Reducing Activation Recomputation, arXiv 2205.05198) section 4 and Table 2; Chowdhery et al. 2022 (PaLM,
arXiv 2204.02311) appendix B for MFU.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

DP_GRADS = "all_reduce (DP grads)"  # the data-parallel gradient reduction, summed over DDP's buckets


@dataclass(frozen=True)
class Item:
    label: str
    op: str
    group_size: int
    bytes: int
    count: int


def param_counts(cfg) -> tuple[int, int]:
    """(TP-sharded, TP-replicated) parameter counts of megatron-lite's GPT (a tied embedding counted once)."""
    h, F, L, V = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.padded_vocab_size
    per_layer_sharded = (3 * h * h + 3 * h) + h * h + (F * h + F) + F * h  # qkv w+b, attn proj w, fc w+b, proj w
    per_layer_replicated = 2 * h + h + 2 * h + h  # ln_1, attn proj bias, ln_2, mlp proj bias
    sharded = V * h * (1 if cfg.tie_embeddings else 2) + L * per_layer_sharded
    replicated = cfg.seq_len * h + L * per_layer_replicated + 2 * h  # wpe, blocks, ln_f
    return sharded, replicated


def local_params(cfg, T: int) -> int:
    """Parameters one rank holds at TP size T: P_sharded / T + P_replicated."""
    sharded, replicated = param_counts(cfg)
    return sharded // T + replicated


def comm_items(cfg, T: int, sp: bool, micro_batch: int, dp: int = 1, seq: int | None = None,
               elem: int = 4) -> list[Item]:
    """The collectives of one train step (forward + backward of one micro-batch, plus the DP gradient
    reduction), labelled by where they come from.

    TP (Shoeybi et al. 2019, section 3): per layer and micro-batch 2 all-reduces of b*s*h forward (`g` after
    each row-parallel layer) and 2 backward (`f` before each column-parallel layer); the vocab-parallel
    embedding all-reduces its output once forward; the column-parallel output layer all-reduces the
    gradient of its input once backward; the vocab-parallel cross-entropy all-reduces the max (MAX, b*s
    floats) and the sum of exponentials with the target logit (SUM, 2*b*s floats) forward.

    TP+SP (Korthikanti et al. 2022, section 4.2.2): `g` -> reduce-scatter, `f` -> all-gather along the
    sequence. Per layer, forward: 2 all-gathers + 2 reduce-scatters of b*s*h; backward: for each of the 2
    TP regions the row layer's all-gather of the output gradient, the column layer's re-gather of its saved
    input shard (megatron-lite saves the s/t shard, not the gathered input) and its reduce-scatter of the
    input gradient: 4 all-gathers + 2 reduce-scatters. The embedding reduce-scatters forward (all-gathers
    backward); the output layer all-gathers forward and all-gathers + reduce-scatters backward. The
    TP-replicated parameters (2 LayerNorms x (w, b) and 2 row-parallel biases per layer, the final
    LayerNorm, the position embedding) see only this rank's tokens: their gradients are summed over TP in
    one all-reduce per optimizer step (optim.finalize_model_grads; one step = one micro-batch here).

    Full recompute (cfg.recompute == "full") re-runs the forward collectives of each layer in backward, up
    to the layer's last saved tensor (see below); selective recompute re-runs only the attention core, which
    has none.

    DP: one all-reduce of this rank's P/t local gradients, in DDP buckets (summed here into one item).
    """
    s, b, h, L = seq or cfg.seq_len, micro_batch, cfg.hidden_size, cfg.num_layers
    act = s * b * h * elem
    items: list[Item] = []
    if T > 1:
        if not sp:
            items += [Item("embedding: all-reduce output (fwd)", "all_reduce", T, act, 1),
                      Item("layers: g after row-parallel (fwd, 2/layer)", "all_reduce", T, act, 2 * L),
                      Item("layers: f before column-parallel (bwd, 2/layer)", "all_reduce", T, act, 2 * L),
                      Item("output layer: f, input grad (bwd)", "all_reduce", T, act, 1)]
        else:
            items += [Item("embedding: reduce-scatter (fwd)", "reduce_scatter", T, act, 1),
                      Item("embedding: all-gather grad (bwd)", "all_gather", T, act, 1),
                      Item("layers: all-gather before column (fwd, 2/layer)", "all_gather", T, act, 2 * L),
                      Item("layers: reduce-scatter after row (fwd, 2/layer)", "reduce_scatter", T, act, 2 * L),
                      Item("layers: row grad all-gather + column input re-gather (bwd, 4/layer)",
                           "all_gather", T, act, 4 * L),
                      Item("layers: column input-grad reduce-scatter (bwd, 2/layer)", "reduce_scatter", T, act,
                           2 * L),
                      Item("output layer: all-gather input (fwd)", "all_gather", T, act, 1),
                      Item("output layer: re-gather input (bwd)", "all_gather", T, act, 1),
                      Item("output layer: reduce-scatter input grad (bwd)", "reduce_scatter", T, act, 1),
                      Item("finalize: replicated grads (LayerNorms, row biases, wpe), one coalesced all-reduce",
                           "all_reduce", T, param_counts(cfg)[1] * elem, 1)]
        if getattr(cfg, "recompute", "none") == "full":
            # backward re-runs each layer's forward under torch.utils.checkpoint, which stops as soon as every
            # saved tensor is rebuilt (early stop): the MLP's last linear saves its input, so the final `g`
            # (all-reduce / reduce-scatter) of the layer is not re-issued
            items += ([Item("full recompute: attention g re-run (bwd, 1/layer)", "all_reduce", T, act, L)] if not sp
                      else [Item("full recompute: all-gathers re-run (bwd, 2/layer)", "all_gather", T, act, 2 * L),
                            Item("full recompute: attention reduce-scatter re-run (bwd, 1/layer)",
                                 "reduce_scatter", T, act, L)])
        items += [Item("cross-entropy: MAX of logits (fwd)", "all_reduce", T, s * b * elem, 1),
                  Item("cross-entropy: sum exp + target logit (fwd)", "all_reduce", T, 2 * s * b * elem, 1)]
    if dp > 1:
        items.append(Item("DP: gradient all-reduce of P/t local params", DP_GRADS, dp, local_params(cfg, T) * elem, 1))
    return items


def zero_state_bytes(local: int, dp: int, zero: int, elem: int = 4) -> int:
    """AdamW's two moments on one rank: 2 x elem x P_local, or 1/DP of it under ZeRO-1 (Rajbhandari et al.
    2020, section 5.1, P_os: the optimizer state split N_d ways; with fp32 weights and grads a rank holds
    4P + 4P + 8P/N_d bytes)."""
    return 2 * elem * local // (dp if zero == 1 else 1)


def zero_dp_collectives(padded: int, buckets: int, dp: int, zero: int, ddp_buckets: int = 1,
                        elem: int = 4) -> dict[str, tuple[int, int]]:
    """The DP-group collectives of one optimizer step: op -> (calls, total logical bytes).

    zero=0: DDP's all-reduce of the P/t local gradients (one per DDP bucket). zero=1 (ZeRO section 7):
    a reduce-scatter of the gradients and an all-gather of the updated parameters, one per bucket, each over
    the P/t local elements padded to a multiple of DP per bucket (`padded`), and the grad norm's all-reduce of
    one float. Per rank a ring moves 2(dp-1)/dp of an all-reduced tensor and (dp-1)/dp of a reduce-scattered
    or all-gathered one: the same bytes, padding aside."""
    if dp == 1:
        return {}
    if zero == 0:
        return {"all_reduce": (ddp_buckets, padded * elem)}
    return {"reduce_scatter": (buckets, padded * elem), "all_gather": (buckets, padded * elem), "all_reduce": (1, elem)}


def ring_bytes(op: str, group_size: int, nbytes: int) -> float:
    """Bytes each rank sends with ring algorithms: an all-reduce moves 2(g-1)/g of the tensor, an all-gather
    or reduce-scatter (g-1)/g. Logical bytes count an all-reduce like one all-gather; this does not."""
    frac = (group_size - 1) / group_size
    return nbytes * frac * (2 if op.startswith("all_reduce") else 1)


def theory(cfg, T: int, sp: bool, micro_batch: int, dp: int = 1, seq: int | None = None) -> Counter:
    """Expected collectives of one train step: Counter {(op, group_size, bytes): count}."""
    out = Counter()
    for it in comm_items(cfg, T, sp, micro_batch, dp, seq):
        out[(it.op, it.group_size, it.bytes)] += it.count
    return out


def ring_attention_sends(b, s, kv_heads, head_dim, cp, elem=4) -> dict[str, tuple[int, int]]:
    """Point-to-point sends of ring attention per layer and micro-batch, on each CP rank: phase -> (sends, bytes
    each). `s` is the whole sequence (each rank holds s/cp tokens), `kv_heads` this TP rank's KV heads.

    Forward: the K/V block (K and V of s/cp tokens, one message) goes to the next rank cp-1 times: 2(cp-1) K/V
    tensors of b * kv_heads * (s/cp) * head_dim. Backward: the K/V blocks go around again (cp-1 messages), and so
    do the dK/dV accumulators, in float32 (cp-1 messages; the last one brings a block's gradient home)."""
    block = 2 * b * kv_heads * (s // cp) * head_dim
    return {"forward: K/V blocks": (cp - 1, block * elem), "backward: K/V blocks": (cp - 1, block * elem),
            "backward: dK/dV accumulators (float32)": (cp - 1, block * 4)}


# ---- activation memory per transformer layer ----------------------------------------------------------

def korthikanti_table2(s, b, h, a, t=1, sp=False, recompute="none") -> float:
    """Bytes per layer from Korthikanti et al. 2022, Table 2 (16-bit activations, 1-byte dropout masks).

    none: s*b*h*(34 + 5as/h); TP: s*b*h*(10 + 24/t + 5as/(ht)); TP+SP: s*b*h/t*(34 + 5as/h); selective
    recompute drops the 5as/h term; full recompute keeps only the layer input, 2sbh (/t with SP; section 5)."""
    sbh = s * b * h
    attn = 0 if recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    if t == 1 or sp:
        return sbh / t * (34 + attn)
    return sbh * (10 + 24 / t + attn / t)


def adapted_terms(s, b, h, a, ffn, t=1, sp=False, recompute="none", elem=4) -> dict[str, float]:
    """Table 2 adapted to megatron-lite as run here, term by term (bytes saved for backward, one layer).

    Table 2's 34 sbh (16-bit) are 16 sbh-sized activations of 2 bytes (LayerNorm inputs 2x, QKV input,
    Q, K, V, the attention output = projection input, MLP input, GELU input and output 4x each) plus 2 sbh
    of 1-byte residual-dropout masks; 24/t of them are TP-sharded. The adaptation:
    - `elem`-byte activations (float32: 4 bytes, so 2 x the 16-bit numbers);
    - dropout 0: no masks (Table 2's 2sbh residual masks and as^2b attention mask vanish);
    - SDPA's flash kernel keeps no s x s matrix (the 5as^2b of softmax, its mask and dropout output vanish);
      it saves Q, K, V (views of the fused QKV output, one storage), its output (written in the query's
      [s, b, n, d] memory order, so the [s, b, h] projection input is a view of it: one storage) and the
      log-sum-exp, a*s*b floats: the 5as/h term becomes 4a/h (bytes per sbh);
    - each LayerNorm saves mean and rstd: 2 x 2 x s*b floats (not in Table 2);
    - the MLP width is `ffn` (Table 2 assumes 4h).
    Replicated terms (TP without SP) keep their full size; sequence- or TP-sharded ones are divided by t.
    Selective recompute (attention core checkpointed) drops the log-sum-exp only: the core's inputs (the
    QKV storage) and its output (the projection's input) stay saved outside the checkpoint."""
    rep = t if sp else 1  # sequence-sharded under SP, replicated over TP otherwise
    sbh, sb = s * b * h, s * b
    if recompute == "full":  # torch.utils.checkpoint keeps the block input only
        return {"block input (kept by checkpoint)": elem * sbh / rep}
    terms = {
        "LayerNorm inputs (2 sbh)": elem * 2 * sbh / rep,
        "QKV linear input (sbh)": elem * sbh / rep,
        "MLP fc input (sbh)": elem * sbh / rep,
        "Q, K, V (3 sbh, fused storage)": elem * 3 * sbh / t,
        "attention output = proj input (sbh)": elem * sbh / t,
        "GELU input (sbF)": elem * s * b * ffn / t,
        "GELU output = MLP proj input (sbF)": elem * s * b * ffn / t,
        "LayerNorm mean+rstd (4 sb)": elem * 4 * sb / rep,
    }
    if recompute != "selective":
        terms["SDPA log-sum-exp (asb)"] = elem * a * sb / t
    return terms


def adapted_activation_bytes(s, b, h, a, ffn, t=1, sp=False, recompute="none", elem=4) -> float:
    return sum(adapted_terms(s, b, h, a, ffn, t, sp, recompute, elem).values())


# ---- FLOPs and MFU (PaLM appendix B) -------------------------------------------------------------------

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched in order
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0)]


def peak_tflops(gpu_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def non_embedding_params(cfg) -> int:
    sharded, replicated = param_counts(cfg)
    return sharded + replicated - cfg.padded_vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2) \
        - cfg.seq_len * cfg.hidden_size


def flops_per_token(cfg, seq: int | None = None) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12*L*H*Q*T (N non-embedding params, H heads, Q head
    dim, T sequence length; H*Q = h)."""
    return 6 * non_embedding_params(cfg) + 12 * cfg.num_layers * cfg.hidden_size * (seq or cfg.seq_len)


def mfu(tokens_per_s: float, cfg, peak_tflops_: float, seq: int | None = None) -> float:
    return tokens_per_s * flops_per_token(cfg, seq) / (peak_tflops_ * 1e12)
