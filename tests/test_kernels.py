"""Each fast kernel against its plain PyTorch reference (potion.kernels)."""

import pytest
import torch

from potion.kernels.activations import (
    ReluSquared,
    gelu_by_sigmoid,
    gelu_reference,
    gelu_tanh,
    relu_squared_reference,
    swiglu,
    swiglu_reference,
)
from potion.kernels.attention import (
    attention_steps,
    attention_with_dropout,
    cached_attention,
    causal_attention,
    per_query_head,
)
from potion.kernels.dropout import dropout, keep_mask
from potion.kernels.norms import RMSNormFunction, rms_norm, rms_norm_reference


def qkv(n_head=4, n_kv_head=4, T=12, D=8, T_k=None, dtype=torch.float32):
    T_k = T_k or T
    q = torch.randn(2, n_head, T, D, dtype=dtype)
    return q, torch.randn(2, n_kv_head, T_k, D, dtype=dtype), torch.randn(2, n_kv_head, T_k, D, dtype=dtype)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_causal_attention_equals_the_reference(n_kv_head):
    torch.manual_seed(0)
    q, k, v = qkv(n_kv_head=n_kv_head)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0), attention_steps(q, k, v)["context"])
    # grouped-query attention is multi-head attention with each key/value head repeated for its query heads
    mha = causal_attention(q, per_query_head(k, 4), per_query_head(v, 4), 0.0)
    torch.testing.assert_close(causal_attention(q, k, v, 0.0), mha)


@pytest.mark.parametrize("n_kv_head", [4, 2])
@pytest.mark.parametrize("T", [1, 5])
def test_cached_attention_equals_the_reference(n_kv_head, T):
    torch.manual_seed(1)
    q, k, v = qkv(n_kv_head=n_kv_head, T=T, T_k=9)
    torch.testing.assert_close(cached_attention(q, k, v, 9 - T), attention_steps(q, k, v, 9 - T)["context"])


def test_attention_steps_weights_are_causal_rows_that_sum_to_one():
    steps = attention_steps(*qkv(n_kv_head=2))
    w = steps["weights"]
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 12))
    assert torch.all(w.triu(diagonal=1) == 0)
    assert steps["key"].shape == steps["query"].shape  # keys as each query head reads them


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_grouped_attention_with_dropout_equals_repeated_heads_under_the_same_draws(n_kv_head):
    torch.manual_seed(2)
    q, k, v = qkv(n_kv_head=n_kv_head)
    torch.manual_seed(3)
    grouped = attention_with_dropout(q, k, v, 0.3, rows=5)
    torch.manual_seed(3)
    repeated = attention_with_dropout(q, per_query_head(k, 4), per_query_head(v, 4), 0.3, rows=5)
    torch.testing.assert_close(grouped, repeated)


def test_swiglu_equals_its_reference_and_gradient():
    gate, up = (torch.randn(5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))
    assert torch.autograd.gradcheck(swiglu, (gate, up))


def test_gelu_and_relu_squared_equal_their_references():
    h = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh(h), gelu_reference(h))
    torch.testing.assert_close(ReluSquared.apply(h), relu_squared_reference(h))


def test_rms_norm_equals_its_reference_with_and_without_gradients():
    x, gain = torch.randn(3, 5, 16), torch.rand(16) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, gain, 1e-6), rms_norm_reference(x, gain, 1e-6))
    torch.testing.assert_close(rms_norm(x.requires_grad_(), gain, 1e-6), rms_norm_reference(x, gain, 1e-6))


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


def test_dropout_scales_the_kept_numbers_and_is_off_in_eval():
    torch.manual_seed(8)
    x = torch.randn(300, 400)
    y = dropout(x, 0.25, training=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert dropout(x, 0.25, training=False) is x


def test_gelu_written_with_a_sigmoid_is_gelu_with_tanh():
    h = torch.linspace(-12, 12, 10_001, dtype=torch.float64)
    torch.testing.assert_close(gelu_by_sigmoid(h), torch.nn.functional.gelu(h, approximate="tanh"), rtol=0, atol=1e-12)
