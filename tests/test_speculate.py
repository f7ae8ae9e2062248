"""Speculative decoding: drafts change the speed, never the output."""

import collections

import pytest
import torch
import torch.nn.functional as F

from potion import GPT, ModelConfig, PotionError, SamplingConfig
from potion.infer import generate
from potion.infer.generate import drafts_per_check, generate_tokens
from potion.infer.speculate import (
    DRAFT_TOKENS,
    MAX_ADAPTED_DRAFTS,
    Int4Linear,
    best_draft_count,
    int4_available,
    keep_or_replace,
)

pytestmark = pytest.mark.skipif(not int4_available(), reason="this PyTorch has no CPU kernels for 4-bit weights")


def spread_model(seed: int, vocab_size: int = 60, **architecture) -> GPT:
    """A random model whose next-token scores are far apart, so float rounding never decides a greedy token."""
    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab_size, context_length=24, n_layer=2, n_head=2, n_embd=64, tie_embeddings=False)
    model = GPT(ModelConfig(**{**shape, **architecture})).eval()
    with torch.no_grad():
        model.head.weight.mul_(30)
    return model


def tokens(model, n: int, **options) -> list[int]:
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    options = {"temperature": 0.0, "eot_id": None, **options}
    with torch.inference_mode():
        return [int(t) for t in generate_tokens(model, prompt, n, **options)]


@pytest.fixture
def checks(monkeypatch):
    """Record (drafted, kept) for every check of drafted tokens."""
    seen = []
    real = generate.check

    def spy(logits, drafted, *rest):
        kept, replacement = real(logits, drafted, *rest)
        seen.append((len(drafted), kept))
        return kept, replacement

    monkeypatch.setattr(generate, "check", spy)
    return seen


def test_int4_linear_reads_back_each_group_on_16_levels():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 50)  # 50 rows: padded to the kernel's 64 and cut back
    x = torch.randn(3, 7, 128)
    groups = linear.weight.detach().view(50, 2, 64)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    levels = ((groups - low) / step).round() * step + low
    expected = F.linear(x, levels.view(50, 128), linear.bias)
    got = Int4Linear(linear, 64)(x)
    assert got.shape == (3, 7, 50) and got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()  # bf16 scales and inputs, nothing more
    assert (F.linear(x, linear.weight, linear.bias) - expected).abs().max() > 0.01  # 4 bits are not the weights


@pytest.mark.parametrize("decode_dtype, drafts", [("fp32", 4), ("bf16", 4), ("fp32", None)])
def test_greedy_tokens_are_the_decoders_own_past_the_context(decode_dtype, drafts, checks, monkeypatch):
    model = spread_model(0)
    plain = tokens(model, 60, decode_dtype=decode_dtype, draft_tokens=0)  # 60 > context of 24: refills
    assert not checks
    monkeypatch.setattr(generate, "BF16_DECODE_MIN_BYTES", 1)  # None: speculate as on a big model
    assert tokens(model, 60, decode_dtype=decode_dtype, draft_tokens=drafts) == plain
    assert checks and sum(kept for _, kept in checks) > len(checks)  # drafts were checked, most of them kept
    assert len(set(plain)) > 5


LLAMA_SHAPED = dict(positions="rope", norm="rmsnorm", n_head=4, n_kv_head=2, mlp_activation="swiglu", ffn_hidden=128)


@pytest.mark.parametrize("decode_dtype", ["fp32", "bf16"])
def test_greedy_tokens_of_a_grouped_query_swiglu_model_are_the_decoders_own(decode_dtype, checks, monkeypatch):
    model = spread_model(1, bias=False, **LLAMA_SHAPED)
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():  # greedy by hand: the whole sequence again for every token
        for _ in range(12):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    by_hand = idx[0, 5:].tolist()
    if decode_dtype == "fp32":  # bf16 decode steps may round a close call the other way
        assert tokens(model, 12, decode_dtype=decode_dtype, draft_tokens=0) == by_hand
    monkeypatch.setattr(generate, "BF16_DECODE_MIN_BYTES", 1)
    plain = tokens(model, 12, decode_dtype=decode_dtype, draft_tokens=0)
    assert tokens(model, 12, decode_dtype=decode_dtype, draft_tokens=4) == plain and checks


def test_rejected_drafts_are_rolled_back(monkeypatch, checks):
    model = spread_model(0)
    plain = tokens(model, 60, decode_dtype="fp32", draft_tokens=0)
    stranger = spread_model(0)
    with torch.no_grad():  # a noisy output layer: many of its guesses are wrong, some right
        stranger.head.weight.add_(torch.randn_like(stranger.head.weight) * stranger.head.weight.std())
    monkeypatch.setattr(generate, "drafting_model", lambda model, dtype: stranger.to(dtype))
    assert tokens(model, 60, decode_dtype="fp32", draft_tokens=3) == plain
    assert any(kept < drafted for drafted, kept in checks)
    assert any(kept > 0 for _, kept in checks)  # and, by chance, a few right ones


def test_stops_at_end_of_text_and_at_max_new_tokens():
    model = spread_model(0)
    plain = tokens(model, 40, decode_dtype="fp32", draft_tokens=0)
    eot = plain[13]
    first = plain.index(eot)
    assert tokens(model, 40, decode_dtype="fp32", draft_tokens=4, eot_id=eot) == plain[: first + 1]
    for n in (0, 1, 7):
        assert tokens(model, n, decode_dtype="fp32", draft_tokens=4) == plain[:n]


def test_a_kept_or_replaced_draft_is_distributed_as_the_decoder_wants():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])  # the drafter favours what the decoder does not
    generator = torch.Generator().manual_seed(0)
    n = 20000
    drafted = torch.multinomial(q, n, replacement=True, generator=generator).tolist()
    counts = collections.Counter()
    for d in drafted:
        replacement = keep_or_replace(p, q, d, generator)
        counts[d if replacement is None else replacement] += 1
    frequencies = torch.tensor([counts[i] / n for i in range(4)])
    assert (frequencies - p).abs().max() < 0.015
    assert (frequencies - q).abs().max() > 0.3


def test_sampled_tokens_follow_the_decoders_distribution(monkeypatch):
    model = spread_model(0, vocab_size=8)
    with torch.no_grad():
        model.head.weight.div_(30 * 4)  # closer scores: every token has a fair chance
    stranger = spread_model(1, vocab_size=8)
    monkeypatch.setattr(generate, "drafting_model", lambda model, dtype: stranger.to(dtype))
    prompt = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        first = model(prompt)[0, -1].softmax(-1)
        after = torch.stack([model(torch.cat((prompt, torch.tensor([[t]])), 1))[0, -1].softmax(-1) for t in range(8)])
        second = first @ after  # the second token's distribution, whatever the first was
        generator = torch.Generator().manual_seed(0)
        counts = collections.Counter()
        runs = 800
        for _ in range(runs):
            out = list(generate_tokens(model, prompt, 2, temperature=1.0, generator=generator, draft_tokens=1))
            counts[int(out[1])] += 1
    frequencies = torch.tensor([counts[i] / runs for i in range(8)])
    assert (frequencies - second).abs().sum() / 2 < 0.08  # total variation: about 0.04 expected from 800 draws


def test_drafts_per_check_follow_the_drafts_kept():
    assert best_draft_count(0, 0) == DRAFT_TOKENS  # nothing seen yet: 9 of 10 kept
    assert best_draft_count(89, 100) == 4
    assert best_draft_count(95, 100) == 6
    assert best_draft_count(200, 200) == MAX_ADAPTED_DRAFTS  # every draft kept: as many as a check takes cheaply
    assert best_draft_count(50, 100) == 1  # half kept: a guess at a time


@pytest.mark.parametrize("drafts", [None, 3])
def test_sampling_with_a_seed_gives_the_same_text_every_time(drafts, monkeypatch):
    monkeypatch.setattr(generate, "BF16_DECODE_MIN_BYTES", 1)
    model = spread_model(0)
    with torch.no_grad():
        model.head.weight.div_(30)
    first, again = (
        tokens(model, 50, temperature=1.0, generator=torch.Generator().manual_seed(5), draft_tokens=drafts)
        for _ in range(2)
    )
    other = tokens(model, 50, temperature=1.0, generator=torch.Generator().manual_seed(6), draft_tokens=drafts)
    assert first == again != other


def test_speculation_is_on_where_reading_weights_dominates(monkeypatch):
    model = spread_model(0)
    assert drafts_per_check(model, 1, None) == 0  # a few hundred KB: a step is all overhead
    monkeypatch.setattr(generate, "BF16_DECODE_MIN_BYTES", 1)
    assert drafts_per_check(model, 1, None) == 4
    assert drafts_per_check(model, 2, None) == 0  # rows of a batch would keep different numbers of drafts
    assert drafts_per_check(model, 1, 0) == 0
    assert drafts_per_check(model, 1, 6) == 6


def test_draft_tokens_out_of_range_is_one_clear_error():
    with pytest.raises(PotionError, match="draft_tokens must be from 0 .off. to 16, got 17"):
        SamplingConfig(draft_tokens=17)
    with pytest.raises(PotionError, match="draft_tokens must be an integer, got 2.0"):
        SamplingConfig(draft_tokens=2.0)
