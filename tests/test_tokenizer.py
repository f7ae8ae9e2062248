import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potion import PotionError
from potion.data.tokenizer import EOT, BPETokenizer, CharTokenizer, tokenizer_from_json

CORPUS = ["The cat sat on the mat.\nThe dog sat too. ", "Überraschung! 東京 🐍 naïve café", "hello world " * 20]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS, vocab_size=300)


def test_char_round_trip_and_json():
    tok = CharTokenizer.train(CORPUS)
    text = "The cat 東京 🐍"
    assert tok.decode(tok.encode(text)) == text
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(text) == tok.encode(text)
    assert tok.decode([tok.eot_id]) == EOT
    assert tok.vocab_size == len(set("".join(CORPUS))) + 1


def test_char_unknown_character_names_it_and_where():
    tok = CharTokenizer.train(["abc\nabc"])
    with pytest.raises(PotionError, match=r"'z'.*line 2, column 3"):
        tok.encode("abc\nabz", source="the prompt")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_json_and_eot(bpe):
    again = tokenizer_from_json(bpe.to_json())
    assert again.encode("hello world") == bpe.encode("hello world")
    assert again.eot_id == bpe.eot_id
    assert bpe.decode([bpe.eot_id]) == EOT


def test_byte_lengths_count_utf8_bytes(bpe):
    text = "naïve 東京 🐍 hello"
    for tok in (bpe, CharTokenizer.train(CORPUS)):
        lengths = tok.token_byte_lengths()
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_bad_tokenizer_json():
    with pytest.raises(PotionError):
        tokenizer_from_json("{not json")
    with pytest.raises(PotionError):
        tokenizer_from_json('{"something": 1}')
