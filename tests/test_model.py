import pytest
import torch

from potion import GPT, ModelConfig


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
