import pytest
import torch

from potion import GPT, ModelConfig, PotionError, SamplingConfig, config, generate_text
from potion.data.tokenizer import CharTokenizer
from potion.hardware import DTYPES
from potion.infer import generate
from potion.infer.generate import (
    decode_one_token,
    decoding_dtype,
    decoding_model,
    encode_prompt,
    generate_tokens,
    prefill,
)
from potion.infer.sampling import apply_top_k, apply_top_p, draw, greedy_tokens, sample_next


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    kept = apply_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = apply_top_p(probs.log(), 0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_top_p(probs.log(), 0.4)).tolist() == [[True, False, False, False]]
    # a p too small for float32 (it rounds to 0) still keeps the most likely token: sampling never sees all -inf
    tiny = apply_top_p(probs[:, [2, 0, 1, 3]].log(), 1e-320)
    assert torch.isfinite(tiny).tolist() == [[False, True, False, False]]
    assert sample_next(probs.log(), temperature=1.0, top_k=0, top_p=1e-320).tolist() == [0]


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    assert sample_next(logits, temperature=0.0, top_k=0, top_p=1.0).tolist() == [1, 0]


def test_draws_follow_the_probabilities_and_never_pick_an_impossible_token():
    weights = torch.tensor([[0.0, 3.0, 1.0, 0.0, 4.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-30]])
    generator = torch.Generator().manual_seed(0)
    n = 40000
    drawn = torch.stack([draw(weights, generator) for _ in range(n)])  # (n, 2)
    first = torch.bincount(drawn[:, 0], minlength=7) / n
    assert (first - weights[0] / weights[0].sum()).abs().max() < 0.01
    assert first[[0, 3, 6]].sum() == 0
    assert set(drawn[:, 1].tolist()) == {0}  # 1e-30 against 1: possible, yet not in 40,000 draws
    assert draw(torch.tensor([0.0, 0.0, 2.0]), generator).tolist() == 2  # a single row of unnormalised weights


def test_a_uniform_number_rounded_up_to_the_total_still_draws_a_possible_token(monkeypatch):
    ones = torch.ones
    monkeypatch.setattr(torch, "rand", lambda shape, **options: ones(shape, dtype=options["dtype"]))
    assert draw(torch.tensor([[0.0, 1.0, 0.0]])).tolist() == [1]


def test_greedy_takes_the_first_of_equals_and_refuses_damaged_logits():
    inf = float("inf")
    logits = torch.tensor([[0.5, 2.0, 2.0], [-inf, 1.0, -inf]], dtype=torch.bfloat16)
    assert greedy_tokens(logits).tolist() == [1, 1]  # -inf is a ruled-out token, not damage
    for damage in (float("nan"), inf):
        damaged = logits.clone()
        damaged[1, 2] = damage
        with pytest.raises(PotionError, match="not finite"):
            greedy_tokens(damaged)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature must be 0 (greedy) or positive, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be a finite number, got nan"),
        (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
        (dict(top_p=float("nan")), "top_p must be a finite number, got nan"),
        (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
        (dict(seed=2**64), "seed must be between 0 and 2**63 - 1, got 18446744073709551616"),
        (dict(seed=-1), "seed must be between 0 and 2**63 - 1, got -1"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer, got 2.5"),
        (dict(stop=("ok", 3)), "stop must be a list of strings, got ('ok', 3)"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_k=0), "top_k must be at least 1 (leave it out for no limit), got 0"),
        (dict(top_k=-1), "top_k must be at least 1 (leave it out for no limit), got -1"),
        (dict(max_new_tokens=-1), "max_new_tokens must not be negative, got -1"),
        (dict(num_samples=0), "num_samples must be at least 1, got 0"),
        (dict(decode_dtype="fp16"), "decode_dtype must be one of auto, fp32, bf16, got 'fp16'"),
    ],
)
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(PotionError) as caught:
        SamplingConfig(**kwargs)
    assert str(caught.value) == message
    assert caught.value.setting == next(iter(kwargs))  # the command line swaps in its flag for the setting


def test_sampling_config_lives_with_the_other_configs():
    assert generate.SamplingConfig is config.SamplingConfig
    assert config.DECODE_DTYPES == ("auto", *DTYPES)  # config.py stays torch-free, so it spells the names out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = CharTokenizer.train(["abcdefgh \n"])
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, context_length=16, n_layer=1, n_head=2, n_embd=16)).eval()
    return model, tok


def test_same_seed_same_text(tiny):
    model, tok = tiny
    s = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=7)
    a, _ = generate_text(model, tok, "abc", s)
    b, _ = generate_text(model, tok, "abc", s)
    c, _ = generate_text(model, tok, "abc", SamplingConfig(max_new_tokens=40, temperature=1.0, seed=8))
    assert a[0].text == b[0].text
    assert a[0].text != c[0].text


@pytest.mark.parametrize("decode_dtype", ["fp32", "bf16"])
def test_max_tokens_and_generation_past_the_context(tiny, decode_dtype):
    model, tok = tiny
    s = SamplingConfig(max_new_tokens=50, temperature=1.0, seed=1, decode_dtype=decode_dtype)  # 50 > context of 16
    (sample,), _ = generate_text(_never_eot(model, tok), tok, "ab", s)
    assert sample.tokens == 50 and sample.finish_reason == "length"


def _never_eot(model, tok):
    class NoEOT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, *a, **k):
            logits = self.inner(*a, **k)
            logits[..., tok.eot_id] = float("-inf")
            return logits

        def new_cache(self, b, length=None):
            return self.inner.new_cache(b, length)

    return NoEOT()


def test_stops_at_end_of_text(tiny):
    model, tok = tiny

    class AlwaysEOT(torch.nn.Module):
        config = model.config

        def forward(self, idx, cache=None, last_only=False):
            out = torch.zeros(idx.size(0), 1 if last_only else idx.size(1), tok.vocab_size)
            out[..., tok.eot_id] = 10.0
            if cache is not None:
                cache.advance(idx.size(1))
            return out

        def new_cache(self, b, length=None):
            return model.new_cache(b, length)

    wrapped = AlwaysEOT()
    wrapped.dummy = torch.nn.Parameter(torch.zeros(1))
    (sample,), _ = generate_text(wrapped, tok, "ab", SamplingConfig(max_new_tokens=20, temperature=0))
    assert sample.finish_reason == "eot" and sample.tokens == 0 and sample.text == ""


def test_stop_string_cuts_text(tiny):
    model, tok = tiny
    s = SamplingConfig(max_new_tokens=200, temperature=1.0, seed=3)
    (free,), _ = generate_text(_never_eot(model, tok), tok, "a", s)
    stop = free.text[5:7]
    streamed = []
    (cut,), _ = generate_text(
        _never_eot(model, tok),
        tok,
        "a",
        SamplingConfig(max_new_tokens=200, temperature=1.0, seed=3, stop=(stop,)),
        on_text=lambda i, t: streamed.append(t),
    )
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert "".join(streamed) == cut.text  # the stop string itself is never streamed


def test_prompt_longer_than_context_keeps_the_end(tiny):
    _, tok = tiny
    with pytest.warns(UserWarning, match="only the last 16"):
        ids = encode_prompt(tok, "abcdefgh" * 4, 16)
    assert tok.decode(ids) == ("abcdefgh" * 4)[-16:]
    assert encode_prompt(tok, "", 16) == [tok.eot_id]


def test_auto_decodes_in_bf16_only_where_reading_weights_dominates(tiny, monkeypatch):
    model, _ = tiny
    assert decoding_dtype(model, "auto") == torch.float32  # a few KB of weights: a step is all overhead
    monkeypatch.setattr(generate, "BF16_DECODE_MIN_BYTES", 1)
    assert decoding_dtype(model, "auto") == torch.bfloat16
    assert decoding_dtype(model, "fp32") == torch.float32


def test_bf16_decode_steps_follow_the_fp32_forward_pass():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, context_length=32, n_layer=2, n_head=2, n_embd=32, positions="rope")).eval()
    idx = torch.randint(0, 50, (1, 20))
    with torch.inference_mode():
        full = model(idx)
        cache = model.new_cache(1)
        prefill(model, idx[:, :8], cache)  # the prompt in fp32, then the one-token steps through a bf16 copy
        decoder, cache = decoding_model(model, torch.bfloat16), cache.to(torch.bfloat16)
        steps = torch.stack([decode_one_token(decoder, idx[:, t], cache) for t in range(8, 19)], 1).float()
    assert cache.length == 19 and next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    error = (steps - full[:, 8:19]).abs().max()
    assert 0 < error < 0.02 * full.abs().max()  # bf16 rounding, nothing more


@pytest.mark.parametrize("temperature, draft_tokens", [(0.0, 0), (1.0, 0), (0.0, 3), (1.0, 3)])
def test_a_padded_embedding_s_extra_rows_are_never_drawn(temperature, draft_tokens):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, context_length=32, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    with torch.no_grad():
        model.head.weight[30:] += 5.0 * model.blocks[0].mlp.down.weight.new_ones(10, 32)  # padding rows that win
    idx = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        anything = generate_tokens(model.eval(), idx, 20, temperature=temperature, eot_id=None, draft_tokens=0)
        assert max(int(t) for t in anything) >= 30  # the padding rows would be drawn
        limited = generate_tokens(
            model, idx, 20, temperature=temperature, eot_id=None, vocab_size=30, draft_tokens=draft_tokens
        )
        assert max(int(t) for t in limited) < 30
