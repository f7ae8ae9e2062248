import copy

import pytest
import torch

from potion import GPT, ModelConfig
from potion.model import (
    Dropout,
    ReluSquared,
    RMSNormFunction,
    attention_with_dropout,
    causal_attention,
    fuse_projections,
    gelu_by_sigmoid,
    keep_mask,
)


def small_config(**kw):
    base = dict(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


VARIANTS = [
    {},
    {"positions": "rope"},
    {"norm": "rmsnorm", "mlp_activation": "relu2", "bias": False},
    {"qk_norm": True, "positions": "rope", "tie_embeddings": False, "logit_softcap": 15.0, "value_embeddings": True},
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
    trace = []
    fast, explicit = model(idx), model(idx, trace=trace)
    assert torch.allclose(fast, explicit, atol=1e-5)
    assert len(trace) == 2
    weights = trace[0]["weights"]  # (B, H, T, T)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 16), atol=1e-6)
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
    assert not hasattr(fused.blocks[0].attn, "query") and fused.blocks[0].attn.fused_qkv.out_features == 48
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


def test_relu_squared_gradient():
    h = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ReluSquared.apply, (h,))
    torch.testing.assert_close(ReluSquared.apply(h), torch.relu(h) ** 2)


def test_rms_norm_function_is_rms_norm_and_its_gradient():
    x = torch.randn(4, 6, 8, dtype=torch.float64).transpose(0, 1).requires_grad_()  # not contiguous, as a q view
    gain = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(RMSNormFunction.apply, (x, gain, 1e-6))
    torch.testing.assert_close(RMSNormFunction.apply(x, gain, 1e-6), torch.nn.functional.rms_norm(x, (8,), gain, 1e-6))


def test_rms_norm_function_in_bf16_sums_the_gain_gradient_in_fp32():
    torch.manual_seed(0)
    x, grad = torch.randn(64, 32, 128).bfloat16(), torch.randn(64, 32, 128).bfloat16()
    gain = torch.rand(128) + 0.5
    exact = [x.float().requires_grad_(), gain.clone().requires_grad_()]  # the same inputs, all in fp32
    torch.autograd.backward(torch.nn.functional.rms_norm(exact[0], (128,), exact[1], 1e-6), grad.float())
    low = [x.clone().requires_grad_(), gain.clone().requires_grad_()]
    out = RMSNormFunction.apply(*low, 1e-6)
    out.backward(grad)
    assert out.dtype == low[0].grad.dtype == torch.bfloat16 and low[1].grad.dtype == torch.float32
    expected = torch.nn.functional.rms_norm(x.float(), (128,), gain, 1e-6)
    torch.testing.assert_close(out.float(), expected, atol=0.02, rtol=0.01)
    torch.testing.assert_close(low[0].grad.float(), exact[0].grad, atol=0.02, rtol=0.01)
    # a sum over 2,048 rows in fp32: a bf16 gain (rms_norm's own gradient under autocast) is ~0.3 off here
    torch.testing.assert_close(low[1].grad, exact[1].grad, atol=1e-3, rtol=1e-4)


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


def test_dropout_drops_each_number_with_probability_p():
    torch.manual_seed(3)
    kept = keep_mask((400, 500), 0.2, "cpu")
    assert kept.dtype == torch.uint8 and set(kept.unique().tolist()) == {0, 1}
    assert abs(kept.float().mean().item() - 0.8) < 0.005
    assert not torch.equal(kept, keep_mask((400, 500), 0.2, "cpu"))  # fresh draws each time


@pytest.mark.parametrize("rows", [128, 5])  # the 12 queries in one block, or in blocks of 5, 5 and 2
def test_attention_with_dropout_is_causal_and_unbiased(rows):
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    exact = causal_attention(q, k, v, 0.0)
    draws = torch.stack([attention_with_dropout(q, k, v, 0.3, rows) for _ in range(4000)])
    standard_error = draws.std(0) / 4000**0.5
    assert ((draws.mean(0) - exact).abs() < 5 * standard_error + 1e-6).all()  # on average, attention without dropout
    assert draws.std(0).mean() > 0.1  # and each draw really drops weights
    later = k.clone()
    later[:, :, 6:] += 1.0
    torch.manual_seed(5)
    a = attention_with_dropout(q, k, v, 0.3, rows)
    torch.manual_seed(5)
    b = attention_with_dropout(q, later, v, 0.3, rows)
    torch.testing.assert_close(a[:, :, :6], b[:, :, :6])  # no token sees a later one
    assert not torch.allclose(a[:, :, 6:], b[:, :, 6:])


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


def test_dropout_scales_the_kept_numbers_and_is_off_in_eval():
    torch.manual_seed(8)
    dropout, x = Dropout(0.25), torch.randn(300, 400)
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert dropout.eval()(x) is x


def test_estimate_loss_groups_small_batches_without_changing_the_mean():
    from potion.evaluate import EVAL_PASS_TOKENS, estimate_loss

    torch.manual_seed(6)
    model = GPT(small_config()).eval()
    rows = EVAL_PASS_TOKENS // 16 // 2  # two batches to a forward pass, and an odd one left over
    batches = [(torch.randint(0, 50, (rows, 16)), torch.randint(0, 50, (rows, 16))) for _ in range(5)]
    one_by_one = sum(float(model(x, y)[1]) for x, y in batches) / len(batches)
    assert estimate_loss(model, batches, torch.device("cpu"), torch.float32) == pytest.approx(one_by_one, rel=1e-6)


def test_gelu_written_with_a_sigmoid_is_gelu_with_tanh():
    h = torch.linspace(-12, 12, 10_001, dtype=torch.float64)
    torch.testing.assert_close(gelu_by_sigmoid(h), torch.nn.functional.gelu(h, approximate="tanh"), rtol=0, atol=1e-12)
