import copy

import pytest
import torch

from potion import GPT, ModelConfig
from potion.kernels.activations import swiglu_reference
from potion.model import Shapes
from potion.model.attention import fuse_projections
from potion.model.record import recording


def small_config(**kw):
    base = dict(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = [
    {},
    {"positions": "rope"},
    {"norm": "rmsnorm", "mlp_activation": "relu2", "bias": False},
    {"qk_norm": True, "positions": "rope", "tie_embeddings": False, "logit_softcap": 15.0, "value_embeddings": True},
    {"n_head": 4, "n_kv_head": 2, "mlp_activation": "swiglu", "positions": "rope", "norm": "rmsnorm", "bias": False},
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_later_tokens_never_change_earlier_logits(variant):
    torch.manual_seed(0)
    model = GPT(small_config(**variant)).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 7) % 50
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)  # the change is visible where it should be


@pytest.mark.parametrize("variant", VARIANTS)
def test_explicit_attention_equals_sdpa(variant):
    torch.manual_seed(1)
    model = GPT(small_config(**variant)).eval()
    idx = torch.randint(0, 50, (2, 16))
    fast = model(idx)
    with recording(model) as trace:
        explicit = model(idx)
    assert torch.allclose(fast, explicit, atol=1e-5)
    assert len(trace) == 2
    weights = trace[0]["weights"]  # (B, H, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(2, model.config.n_head, 16), atol=1e-6)
    assert torch.all(weights.triu(diagonal=1) == 0)  # no token looks at a later one


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_decoding_equals_full_recomputation(positions):
    torch.manual_seed(2)
    model = GPT(small_config(positions=positions)).eval()
    idx = torch.randint(0, 50, (2, 14))
    full = model(idx)
    cache = model.new_cache(2)
    steps = [model(idx[:, :6], cache=cache)[:, -1]]  # prefill 6 tokens, then one at a time
    for t in range(6, 14):
        steps.append(model(idx[:, t : t + 1], cache=cache)[:, -1])
    assert torch.allclose(torch.stack(steps[:-1], 1), full[:, 5:13], atol=1e-5)
    assert torch.allclose(steps[-1], full[:, 13], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_projections_compute_the_same_function(variant):
    torch.manual_seed(3)
    model = GPT(small_config(**variant)).eval()
    fused = copy.deepcopy(model)
    fuse_projections(fused)
    shapes = Shapes.of(model.config)
    assert not hasattr(fused.blocks[0].attn, "query")
    assert fused.blocks[0].attn.fused_qkv.out_features == shapes.q_dim + 2 * shapes.kv_dim
    idx = torch.randint(0, 50, (2, 12))
    torch.testing.assert_close(fused(idx), model(idx))
    cache = fused.new_cache(2)
    fused(idx[:, :9], cache=cache)
    torch.testing.assert_close(fused(idx[:, 9:], cache=cache), model(idx)[:, 9:])


@pytest.mark.parametrize("variant", [*VARIANTS, {"bias": True, "qk_norm": True, "positions": "rope"}])
def test_training_projections_give_the_named_products_and_their_gradients(variant):
    """While training, query, key and value come from one product against the three weights side by side."""
    torch.manual_seed(5)
    model = GPT(small_config(**variant))
    idx, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    grads = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model.zero_grad()
        _, loss = model(idx, targets)
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["train"][0], grads["eval"][0])
    for name, grad in grads["eval"][1].items():
        torch.testing.assert_close(grads["train"][1][name], grad, msg=name)
    assert grads["eval"][1]["blocks.0.attn.key.weight"].abs().sum() > 0


def test_chunked_prefill_with_cache_matches():
    torch.manual_seed(3)
    model = GPT(small_config(positions="rope")).eval()
    idx = torch.randint(0, 50, (1, 12))
    cache = model.new_cache(1)
    model(idx[:, :5], cache=cache)
    chunk = model(idx[:, 5:], cache=cache)  # every position of the second chunk, not only the last
    assert chunk.shape == (1, 7, 50) and cache.length == 12
    assert torch.allclose(chunk, model(idx)[:, 5:], atol=1e-5)


def test_last_only_reads_out_the_last_position():
    torch.manual_seed(4)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 50, (2, 9))
    cache = model.new_cache(2)
    last = model(idx, cache=cache, last_only=True)
    assert last.shape == (2, 1, 50) and cache.length == 9
    assert torch.equal(last, model(idx, last_only=True))
    assert torch.allclose(last[:, 0], model(idx)[:, -1], atol=1e-6)
    cache.reset()
    assert cache.length == 0
    assert torch.equal(model(idx, cache=cache, last_only=True), last)  # a reset cache refills from position 0


def test_parameter_count_and_gpt2_init():
    model = GPT(ModelConfig())  # GPT-2 small
    assert 124_000_000 < model.num_parameters() < 124_600_000
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(proj_std - 0.02 / (2 * 12) ** 0.5) < 5e-4  # scaled residual projections


def test_zero_init_options():
    model = GPT(small_config(zero_init_proj=True, zero_init_head=True, tie_embeddings=False))
    assert model.blocks[0].mlp.down.weight.abs().sum() == 0
    assert model.head.weight.abs().sum() == 0


def test_sequence_longer_than_context_is_refused():
    model = GPT(small_config())
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_cpu_attention_under_bf16_autocast_follows_the_fp32_result(dropout):
    torch.manual_seed(6)
    model = GPT(small_config(positions="rope", norm="rmsnorm", qk_norm=True, dropout=dropout))
    idx = torch.randint(0, 50, (2, 16))
    torch.manual_seed(7)
    loss32 = model(idx, idx)[1]
    torch.manual_seed(7)  # the same dropout draws
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(idx, idx)[1]
    loss16.backward()
    assert abs(loss16.item() - loss32.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_estimate_loss_groups_small_batches_without_changing_the_mean():
    from potion.train.evaluate import EVAL_PASS_TOKENS, estimate_loss

    torch.manual_seed(6)
    model = GPT(small_config()).eval()
    rows = EVAL_PASS_TOKENS // 16 // 2  # two batches to a forward pass, and an odd one left over
    batches = [(torch.randint(0, 50, (rows, 16)), torch.randint(0, 50, (rows, 16))) for _ in range(5)]
    one_by_one = sum(float(model(x, y)[1]) for x, y in batches) / len(batches)
    assert estimate_loss(model, batches, torch.device("cpu"), torch.float32) == pytest.approx(one_by_one, rel=1e-6)


def with_weights_of(config: ModelConfig, source: GPT) -> GPT:
    model = GPT(config).eval()
    model.load_state_dict(source.state_dict())
    return model


def test_n_kv_head_equal_to_n_head_is_multi_head_attention_exactly():
    torch.manual_seed(9)
    today = GPT(small_config(positions="rope", dropout=0.1)).eval()
    explicit = with_weights_of(small_config(positions="rope", dropout=0.1, n_kv_head=2), today)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(today(idx), explicit(idx))
    today.train(), explicit.train()
    torch.manual_seed(10)
    a = today(idx, idx)[1]
    torch.manual_seed(10)
    assert torch.equal(a, explicit(idx, idx)[1])  # the same dropout draws, the same loss


@pytest.mark.parametrize("n_kv_head", [2, 1])  # grouped-query and multi-query attention
def test_grouped_query_attention_is_multi_head_attention_with_repeated_key_value_heads(n_kv_head):
    torch.manual_seed(11)
    config = small_config(positions="rope", n_head=4, n_kv_head=n_kv_head, qk_norm=True, bias=True)
    grouped = GPT(config).eval()
    mha = GPT(small_config(positions="rope", n_head=4, qk_norm=True, bias=True)).eval()
    state, D, repeat = grouped.state_dict(), 4, 4 // n_kv_head
    for name in list(state):
        if ".attn.key." in name or ".attn.value." in name:  # (H_kv * D, ...) -> (H * D, ...), each head repeated
            heads = state[name].view(n_kv_head, D, *state[name].shape[1:])
            state[name] = heads.repeat_interleave(repeat, dim=0).reshape(4 * D, *state[name].shape[1:])
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(grouped(idx), mha(idx))
    cache = grouped.new_cache(2)
    assert cache.layers[0].key.shape == (2, n_kv_head, 16, D) == Shapes.of(config).cache_shape(2)
    grouped(idx[:, :10], cache=cache)
    torch.testing.assert_close(grouped(idx[:, 10:], cache=cache), mha(idx)[:, 10:])  # the cache holds only KV heads
    with recording(grouped) as records:
        torch.testing.assert_close(grouped(idx), mha(idx))
    assert records[0]["key"].shape == (2, 4, 16, D)  # explain reads keys per query head


def test_swiglu_feed_forward_equals_a_hand_written_reference():
    torch.manual_seed(12)
    config = small_config(mlp_activation="swiglu", ffn_hidden=24, bias=False, norm="rmsnorm")
    mlp = GPT(config).blocks[0].mlp
    assert (mlp.gate.weight.shape, mlp.up.weight.shape, mlp.down.weight.shape) == ((24, 16), (24, 16), (16, 24))
    x = torch.randn(2, 5, 16)
    by_hand = (torch.nn.functional.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), by_hand)
    torch.testing.assert_close(mlp(x), swiglu_reference(mlp.gate(x), mlp.up(x)) @ mlp.down.weight.T)


@pytest.mark.parametrize(
    "variant",
    [*VARIANTS, {"n_head": 4, "n_kv_head": 1, "mlp_activation": "swiglu", "ffn_hidden": 40}, {"ffn_hidden": 20}],
)
def test_shapes_count_every_parameter_of_a_block(variant):
    config = small_config(**variant)
    block = GPT(config).blocks[0]
    assert Shapes.of(config).block_parameters(config.qk_norm) == sum(p.numel() for p in block.parameters())
