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

from megatron_lite import metrics

DP_GRADS = "all_reduce (DP grads)"  # the data-parallel gradient reduction, summed over DDP's buckets


ELEM = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Item:
    label: str
    op: str
    group_size: int
    bytes: int
    count: int
    dtype: str = "float32"


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
               dtype: str = "float32") -> list[Item]:
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

    `dtype`: the activations' (bfloat16 under bf16 autocast, where every activation collective moves bf16:
    megatron-lite casts a column-parallel layer's input and the embedding's partial sums before they travel);
    the cross-entropy's per-token statistics and the gradients stay float32, as in Megatron.
    """
    s, b, h, L = seq or cfg.seq_len, micro_batch, cfg.hidden_size, cfg.num_layers
    act, f32 = s * b * h * ELEM[dtype], 4

    def A(label, op, count):  # an activation collective
        return Item(label, op, T, act, count, dtype)
    items: list[Item] = []
    if T > 1:
        if not sp:
            items += [A("embedding: all-reduce output (fwd)", "all_reduce", 1),
                      A("layers: g after row-parallel (fwd, 2/layer)", "all_reduce", 2 * L),
                      A("layers: f before column-parallel (bwd, 2/layer)", "all_reduce", 2 * L),
                      A("output layer: f, input grad (bwd)", "all_reduce", 1)]
        else:
            items += [A("embedding: reduce-scatter (fwd)", "reduce_scatter", 1),
                      A("embedding: all-gather grad (bwd)", "all_gather", 1),
                      A("layers: all-gather before column (fwd, 2/layer)", "all_gather", 2 * L),
                      A("layers: reduce-scatter after row (fwd, 2/layer)", "reduce_scatter", 2 * L),
                      A("layers: row grad all-gather + column input re-gather (bwd, 4/layer)", "all_gather", 4 * L),
                      A("layers: column input-grad reduce-scatter (bwd, 2/layer)", "reduce_scatter", 2 * L),
                      A("output layer: all-gather input (fwd)", "all_gather", 1),
                      A("output layer: re-gather input (bwd)", "all_gather", 1),
                      A("output layer: reduce-scatter input grad (bwd)", "reduce_scatter", 1),
                      Item("finalize: replicated grads (LayerNorms, row biases, wpe), one coalesced all-reduce",
                           "all_reduce", T, param_counts(cfg)[1] * f32, 1)]
        if getattr(cfg, "recompute", "none") == "full":
            # backward re-runs each layer's forward under torch.utils.checkpoint, which stops as soon as every
            # saved tensor is rebuilt (early stop): the MLP's last linear saves its input, so the final `g`
            # (all-reduce / reduce-scatter) of the layer is not re-issued
            items += ([A("full recompute: attention g re-run (bwd, 1/layer)", "all_reduce", L)] if not sp
                      else [A("full recompute: all-gathers re-run (bwd, 2/layer)", "all_gather", 2 * L),
                            A("full recompute: attention reduce-scatter re-run (bwd, 1/layer)", "reduce_scatter", L)])
        items += [Item("cross-entropy: MAX of logits (fwd)", "all_reduce", T, s * b * f32, 1),
                  Item("cross-entropy: sum exp + target logit (fwd)", "all_reduce", T, 2 * s * b * f32, 1)]
    if dp > 1:
        items.append(Item("DP: gradient all-reduce of P/t local params", DP_GRADS, dp, local_params(cfg, T) * f32, 1))
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
    the P/t local elements padded to a multiple of lcm(DP, 128) per bucket (`padded`), and the grad norm's all-reduce of
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


def theory(cfg, T: int, sp: bool, micro_batch: int, dp: int = 1, seq: int | None = None,
           dtype: str = "float32") -> Counter:
    """Expected collectives of one train step: Counter {(op, group_size, bytes, dtype): count}."""
    out = Counter()
    for it in comm_items(cfg, T, sp, micro_batch, dp, seq, dtype):
        out[(it.op, it.group_size, it.bytes, it.dtype)] += it.count
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


def adapted_terms(s, b, h, a, ffn, t=1, sp=False, recompute="none", elem=4, dtype=None) -> dict[str, float]:
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
    QKV storage) and its output (the projection's input) stay saved outside the checkpoint.

    `dtype="bfloat16"`: bf16 autocast with float32 weights, as megatron-lite runs it. The matmuls' inputs and
    outputs are bf16 (2 bytes; a column-parallel layer casts its input before saving it), while the residual
    stream (the LayerNorm inputs), the LayerNorm statistics and the log-sum-exp stay float32, and autocast's
    bf16 weight copies count as weights, not activations."""
    low = elem if dtype is None else ELEM[dtype]  # the matmul activations
    f32 = elem if dtype is None else 4  # residual stream, norm statistics, log-sum-exp
    rep = t if sp else 1  # sequence-sharded under SP, replicated over TP otherwise
    sbh, sb = s * b * h, s * b
    if recompute == "full":  # torch.utils.checkpoint keeps the block input only
        return {"block input (kept by checkpoint)": f32 * sbh / rep}
    terms = {
        "LayerNorm inputs (2 sbh)": f32 * 2 * sbh / rep,
        "QKV linear input (sbh)": low * sbh / rep,
        "MLP fc input (sbh)": low * sbh / rep,
        "Q, K, V (3 sbh, fused storage)": low * 3 * sbh / t,
        "attention output = proj input (sbh)": low * sbh / t,
        "GELU input (sbF)": low * s * b * ffn / t,
        "GELU output = MLP proj input (sbF)": low * s * b * ffn / t,
        "LayerNorm mean+rstd (4 sb)": f32 * 4 * sb / rep,
    }
    if recompute != "selective":
        terms["SDPA log-sum-exp (asb)"] = f32 * a * sb / t
    return terms


def adapted_activation_bytes(s, b, h, a, ffn, t=1, sp=False, recompute="none", elem=4, dtype=None) -> float:
    return sum(adapted_terms(s, b, h, a, ffn, t, sp, recompute, elem, dtype).values())


# ---- FLOPs and MFU (PaLM appendix B) -------------------------------------------------------------------

def peak_tflops(gpu_name: str) -> float | None:
    """Dense bf16 peak in TFLOP/s (megatron_lite.metrics' device table, which the training log's MFU uses)."""
    return metrics.peak_tflops(gpu_name)


def non_embedding_params(cfg) -> int:
    sharded, replicated = param_counts(cfg)
    return sharded + replicated - cfg.padded_vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2) \
        - cfg.seq_len * cfg.hidden_size
