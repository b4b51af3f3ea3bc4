"""The whole GPT (GPT-2 and Llama family) at T=2 and T=4 (SP on and off) against T=1 from the same seed;
collective counts; shape errors."""
import pytest
import torch

from distributed import run_distributed
from megatron_lite.comm_count import CollectiveCounter
from megatron_lite.model import GPT, GPTConfig, ModelConfigError
from megatron_lite.optim import finalize_model_grads
from megatron_lite.parallel import build_parallel_context
from megatron_lite.tensor_parallel import tp_partition_dim

CFG = dict(vocab_size=200, seq_len=16, num_layers=2, hidden_size=32, num_heads=4, dropout=0.0, seed=7)
# the Llama family: RMSNorm, RoPE with Llama-3 scaling, SwiGLU ([2, F, H] weight), 4 query heads on 4 KV heads
# (so T=4 splits them), untied output layer, QKV biases on (Qwen-style) and MLP biases off
LLAMA = dict(CFG, num_kv_heads=4, ffn_hidden_size=48, norm="rmsnorm", position_embedding="rope", rope_theta=5e5,
             rope_scaling=dict(factor=8.0, original_max_position_embeddings=8), mlp="swiglu", attention_bias=True,
             mlp_bias=False, tie_embeddings=False)
GQA = dict(LLAMA, num_heads=8, num_kv_heads=2, hidden_size=64)  # 4 query heads per KV head: T=1 and 2
B = 3


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CFG["vocab_size"], (B, CFG["seq_len"] + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :3] = -100  # some ignored targets
    return tokens[:, :-1], targets


def train_steps(model, steps=4, finalize=True):
    """AdamW steps; `finalize=False` leaves out finalize_model_grads (the SP-replicated gradients' TP sum)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses, grads = [], None
    for step in range(steps):
        tokens, targets = batch(step)
        loss = model(tokens, targets)
        loss.backward()
        if finalize:
            finalize_model_grads(model)
        if step == 0:
            grads = model.full_state(grads=True)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _equivalence_worker():
    for cfg in (CFG, LLAMA, GQA):
        ref_ctx = build_parallel_context(1)
        ref_model = GPT(GPTConfig(**cfg), ref_ctx)
        ref_weights = ref_model.full_state()
        ref_losses, ref_grads = train_steps(ref_model)
        for T in [t for t in (2, 4) if GPTConfig(**cfg).num_kv_heads % t == 0]:
            ctx = build_parallel_context(T)
            for sp in (False, True):
                model = GPT(GPTConfig(**cfg, sequence_parallel=sp), ctx)
                tag = f"{cfg.get('norm', 'gpt2')} kv={model.config.num_kv_heads} T={T} sp={sp}"
                for name, w in model.full_state().items():  # the same seed gives the same model at every T
                    assert torch.equal(w, ref_weights[name]), f"{tag}: initial {name} differs from T=1"
                losses, grads = train_steps(model)
                assert abs(losses[0] - ref_losses[0]) / ref_losses[0] < 1e-6, f"{tag}: loss {losses[0]} vs {ref_losses[0]}"
                assert grads.keys() == ref_grads.keys()
                for name, g in grads.items():
                    assert g.shape == ref_grads[name].shape, f"{tag} {name}: shape"
                    err = rel_err(g, ref_grads[name])
                    assert err < 1e-5, f"{tag} {name}: gradient relative error {err:.2e}"
                for step, (a, b) in enumerate(zip(losses, ref_losses)):
                    assert abs(a - b) / b < 1e-5, f"{tag}: loss after {step} AdamW steps {a} vs {b}"


def test_gpt_and_llama_at_T_2_and_4_equal_T_1_loss_grads_and_adamw_steps():
    run_distributed(_equivalence_worker, 4)


def _replicated_grad_sum_worker():
    ref_grads = train_steps(GPT(GPTConfig(**CFG), build_parallel_context(1)), steps=1)[1]
    model = GPT(GPTConfig(**CFG, sequence_parallel=True), build_parallel_context(2))
    grads = train_steps(model, steps=1, finalize=False)[1]  # what a step without the TP sum would see
    wrong = [n for n, g in grads.items() if rel_err(g, ref_grads[n]) > 1e-5]
    replicated = [n for n, p in model.named_parameters() if tp_partition_dim(p) is None]
    assert sorted(wrong) == sorted(replicated), wrong
    assert any("ln_1" in n for n in wrong) and any("proj.bias" in n for n in wrong) and "wpe.weight" in wrong


def test_removing_sp_replicated_grad_reduction_breaks_layernorm_and_bias_grads():
    run_distributed(_replicated_grad_sum_worker, 2)


def _collectives_worker():
    S, H = CFG["seq_len"], CFG["hidden_size"]
    for T in (2, 4):
        ctx = build_parallel_context(T)
        for sp in (False, True):
            model = GPT(GPTConfig(**CFG, sequence_parallel=sp), ctx)
            blk = model.blocks[0]
            x = torch.randn(S // T if sp else S, B, H, requires_grad=True)
            with CollectiveCounter() as fwd:
                y = blk(x, model.rng)
            with CollectiveCounter() as bwd:
                y.sum().backward()
            act = S * B * H * 4  # bytes of one full [s, b, h] float32 activation
            if not sp:  # Shoeybi et al.: g twice forward, f twice backward
                assert [(c.op, c.bytes) for c in fwd.calls] == [("all_reduce", act)] * 2
                assert [(c.op, c.bytes) for c in bwd.calls] == [("all_reduce", act)] * 2
            else:  # Korthikanti et al.: all-gather before, reduce-scatter after each TP region
                assert [(c.op, c.bytes) for c in fwd.calls] == [("all_gather", act), ("reduce_scatter", act)] * 2
                acts = [(c.op, c.bytes) for c in bwd.calls if c.bytes == act]
                # backward, per region: the row layer's all-gather of the output gradient, then the column
                # layer's re-gather of its saved input shard and reduce-scatter of the input gradient
                assert acts == [("all_gather", act), ("all_gather", act), ("reduce_scatter", act)] * 2, acts
                # and no per-parameter all-reduce: finalize_model_grads sums the replicated parameters' gradients
                # once per optimizer step (tests/test_zero.py counts it)
                assert [c for c in bwd.calls if c.bytes != act] == []
            assert all(c.group_size == T for c in fwd.calls + bwd.calls)


def test_block_issues_exactly_the_megatron_collectives():
    run_distributed(_collectives_worker, 4)


@pytest.mark.parametrize("kw, T, match", [
    (dict(num_heads=6, hidden_size=36), 4, r"num_heads=6 and model.num_kv_heads=6 must both be divisible by "
                                           r"parallel.tp=4: .* valid tp: 1, 2, 3, 6"),
    (dict(num_heads=8, num_kv_heads=2), 4, r"num_heads=8 and model.num_kv_heads=2 must both be divisible by "
                                          r"parallel.tp=4: .* valid tp: 1, 2$"),
    (dict(num_heads=4, num_kv_heads=3), 1, r"num_kv_heads=3 does not divide model.num_heads=4"),
    (dict(norm="batchnorm"), 1, r"model.norm='batchnorm' must be one of layernorm, rmsnorm"),
    (dict(position_embedding="rope", rope_scaling=dict(rope_type="yarn")), 1, r"rope_type='yarn' is not supported"),
    (dict(hidden_size=30, num_heads=4), 1, r"hidden_size=30 is not divisible by model.num_heads=4"),
    (dict(ffn_hidden_size=66), 4, r"ffn_hidden_size=66 is not divisible by parallel.tp=4"),
    (dict(seq_len=18, sequence_parallel=True), 4, r"seq_len=18 is not divisible by parallel.tp=4"),
])
def test_bad_shapes_are_named_before_any_collective(kw, T, match):
    cfg = GPTConfig(**{**CFG, **kw})
    with pytest.raises(ModelConfigError, match=match):
        cfg.validate(T)


def test_padding_is_independent_of_T_and_never_changes_the_loss():
    assert GPTConfig(vocab_size=200).padded_vocab_size == 256
    ctx = _single_process_context()
    torch.manual_seed(0)
    tokens, targets = batch(0)
    small = GPT(GPTConfig(**CFG), ctx)
    wider = GPT(GPTConfig(**CFG, vocab_pad_multiple=512), ctx)
    with torch.no_grad():  # same real rows; the extra padding rows are left random
        wider.wte.weight[: CFG["vocab_size"]].copy_(small.wte.weight[: CFG["vocab_size"]])
        for (_, a), (_, b) in zip(small.named_parameters(), wider.named_parameters()):
            if a.shape == b.shape:
                b.copy_(a)
    assert torch.allclose(small(tokens, targets), wider(tokens, targets), rtol=1e-6, atol=0)


def _single_process_context():
    from megatron_lite.parallel import init_distributed
    init_distributed()
    return build_parallel_context(1)


def _recompute_worker():
    """Recomputation replays the dropout streams: same loss and gradients as storing activations."""
    for T, sp in ((1, False), (2, False), (2, True)):
        ctx = build_parallel_context(T)
        results = {}
        for mode in ("none", "selective", "full"):
            model = GPT(GPTConfig(**{**CFG, "dropout": 0.1}, sequence_parallel=sp, recompute=mode), ctx)
            tokens, targets = batch(0)
            loss = model(tokens, targets)
            loss.backward()
            results[mode] = (loss.item(), model.full_state(grads=True))
        ref_loss, ref_grads = results["none"]
        for mode in ("selective", "full"):
            loss, grads = results[mode]
            assert loss == ref_loss, f"T={T} sp={sp} {mode}: loss {loss} vs {ref_loss}"
            for name, g in grads.items():
                assert torch.equal(g, ref_grads[name]), f"T={T} sp={sp} {mode}: gradient of {name} differs"
        # and dropout is live: without it the loss is another
        assert model.eval()(*batch(0)).item() != ref_loss


def test_recompute_reproduces_dropout_masks_exactly():
    run_distributed(_recompute_worker, 2)
