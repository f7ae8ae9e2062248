"""`potion export --format gguf`: llama.cpp (through llama-cpp-python) and transformers compute from the file what
potion computes from the run: the same ids for the same text, the same logits, the same greedy tokens."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_hf import VARIED_TEXT, byte_level_bpe, random_run

import potion
from potion.cli import main
from potion.config import ModelConfig
from potion.data.tokenizer import BPETokenizer, CharTokenizer
from potion.infer.generate import generate_tokens

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

PROMPT = "ROMEO: But soft, what light through yonder window breaks?"
LLAMA = dict(positions="rope", norm="rmsnorm", mlp_activation="swiglu", bias=False)
RECIPES = {  # name -> tokenizer, model settings, llama.cpp architecture
    "llama, grouped-query, untied": ("bpe", dict(**LLAMA, n_kv_head=2, tie_embeddings=False, norm_eps=1e-5), "llama"),
    "arcee (relu2), one key/value head, wide heads": (
        "bpe",
        dict(LLAMA, mlp_activation="relu2", n_kv_head=1, head_dim=16),
        "arcee",
    ),
    "llama 3 rope scaling": (
        "bpe",
        dict(**LLAMA, n_kv_head=2, rope_scaling="llama3", rope_original_context=16),
        "llama",
    ),
    "characters (llama)": ("char", dict(**LLAMA, n_kv_head=2), "llama"),
    "gpt2, untied": ("bpe", dict(tie_embeddings=False), "gpt2"),
}
# llama.cpp's CPU GELU reads a float16 table: a few thousandths off the exact curve, where the rest agrees to 1e-5
LOGIT_TOLERANCE = {"llama": 1e-4, "arcee": 1e-4, "gpt2": 1e-2}


@pytest.fixture(scope="module")
def text(shakespeare):
    return shakespeare.read_text(encoding="utf-8")[:50_000]


@pytest.fixture(scope="module")
def tokenizers(text):
    """A byte-level BPE whose merges span what other splits would cut (runs of spaces, digits, punctuation), and
    characters of one to four bytes."""
    varied = "\n".join(VARIED_TEXT * 100)
    return {
        "bpe": BPETokenizer(byte_level_bpe(text[:20_000] + varied, 500)),
        "char": CharTokenizer.train([text, varied]),
    }


def random_model(tmp_path: Path, tokenizer, settings: dict, context: int = 48) -> Path:
    """A run with random weights: 2 layers, 4 heads, n_embd 32 unless settings say otherwise."""
    shape = dict(vocab_size=tokenizer.vocab_size, context_length=context, n_layer=2, n_head=4, n_embd=32)
    return random_run(tmp_path / "run", ModelConfig(**{**shape, **settings}), tokenizer)


def export(run: Path, dtype: str = "f32") -> Path:
    out = run.parent / f"model-{dtype}.gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", dtype, "--out", str(out)]) == 0
    return out


def llama_cpp_model(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # one token per step (batched prompts have crashed llama-cpp-python 0.3.36); float32 keys and values in the
    # cache, where its default float16 would round them
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=64, n_batch=1, logits_all=True, verbose=False, type_k=f32, type_v=f32)


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(new[-1:])
    return new


def potion_greedy(model, ids: list[int], n: int) -> list[int]:
    steps = generate_tokens(
        model, torch.tensor([ids]), n, temperature=0, eot_id=None, decode_dtype="fp32", draft_tokens=0
    )
    return [int(t) for t in torch.cat(list(steps))]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_llama_cpp_tokenizes_computes_and_generates_as_potion(recipe, tokenizers, tmp_path):
    kind, settings, arch = RECIPES[recipe]
    tokenizer = tokenizers[kind]
    run = random_model(tmp_path, tokenizer, settings)
    path = export(run)
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == arch
    types = fields["tokenizer.ggml.token_type"].contents()  # llama.cpp itself forgives an end token typed normal
    assert types[tokenizer.eot_id] == gguf.TokenType.CONTROL and types.count(gguf.TokenType.CONTROL) == 1
    llm = llama_cpp_model(path)
    text = PROMPT + " naïve café, 日本語 🧪"
    ids = tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == text
    assert llm.token_eos() == tokenizer.eot_id and llm.detokenize([tokenizer.eot_id]) == b""  # a control token
    special = kind == "bpe"  # where potion's tokenizer reads <|endoftext|> in a text as the end token, not characters
    for varied in VARIED_TEXT:
        assert llm.tokenize(varied.encode(), add_bos=False, special=special) == tokenizer.encode(varied)
    ours = potion.load(run).model
    greedy = potion_greedy(ours, ids[:12], 20)
    assert llama_cpp_greedy(llm, ids[:12], 20) == greedy
    sequence = ids[:12] + greedy
    with torch.no_grad():
        expected = ours(torch.tensor([sequence]))[0].numpy()
    tolerance = LOGIT_TOLERANCE[arch]
    np.testing.assert_allclose(llama_cpp_logits(llm, sequence), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "settings, context",
    [(dict(**LLAMA, n_kv_head=2, tie_embeddings=False, norm_eps=1e-5, head_dim=16), 48), (dict(), 1024)],
    ids=["llama, grouped-query, untied, wide heads", "gpt2"],  # transformers' GGUF GPT-2 always has 1024 positions
)
def test_transformers_reads_the_same_model_and_tokenizer(settings, context, tokenizers, tmp_path):
    tokenizer = tokenizers["bpe"]
    run = random_model(tmp_path, tokenizer, settings, context)
    path = export(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    idx = torch.randint(0, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, potion.load(run).model(idx), atol=1e-4, rtol=1e-4)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in VARIED_TEXT:
        assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert their_tokenizer.eos_token_id == tokenizer.eot_id


# per dtype: how far a stored number may be from the float32 one, as a fraction of its tensor's largest (half a
# step: float16 keeps 11 significant bits, bfloat16 8; a q8_0 block has 127 steps each side of 0 and a float16
# scale), and the relative root-mean-square error of llama.cpp's logits against potion's (measured: 0.003, 0.02 and
# 0.08, llama.cpp's rounding of the activations included)
QUANTIZED = {"f16": (5e-4, 0.01), "bf16": (4e-3, 0.06), "q8_0": (4.5e-3, 0.2)}


def stored_type(name: str, shape, dtype: str) -> str:
    """What llama.cpp's converter would store: norms, biases and positions in float32; a matrix whose rows are not
    whole q8_0 blocks of 32 numbers in float16."""
    if len(shape) == 1 or name == "position_embd.weight":
        return "F32"
    return "F16" if dtype == "q8_0" and name.endswith("ffn_down.weight") else dtype.upper()


@pytest.mark.parametrize("dtype", list(QUANTIZED))
@pytest.mark.parametrize("recipe", ["llama", "gpt2"])
def test_smaller_types_hold_the_weights_and_give_close_logits(recipe, dtype, tokenizers, tmp_path):
    tokenizer = tokenizers["bpe"]
    settings = dict(**LLAMA, n_kv_head=2) if recipe == "llama" else {}
    run = random_model(tmp_path, tokenizer, dict(settings, n_embd=64, ffn_hidden=80))  # ffn_down's rows: 80 numbers
    path = export(run, dtype)
    exact = {t.name: np.array(t.data) for t in gguf.GGUFReader(export(run, "f32")).tensors}
    step, logit_error = QUANTIZED[dtype]
    for t in gguf.GGUFReader(path).tensors:
        assert t.tensor_type.name == stored_type(t.name, t.shape, dtype), t.name
        stored = gguf.quants.dequantize(t.data, t.tensor_type)
        largest = np.abs(exact[t.name]).max()
        np.testing.assert_allclose(stored, exact[t.name], rtol=0, atol=step * largest * 1.01, err_msg=t.name)
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = potion.load(run).model(torch.tensor([ids]))[0].numpy()
    error = llama_cpp_logits(llama_cpp_model(path), ids) - expected
    assert np.sqrt((error**2).mean()) / expected.std() < logit_error


def test_characters_of_one_byte_each_need_no_merges(text, tmp_path):
    tokenizer = CharTokenizer.train([text])  # Tiny Shakespeare is ASCII: a vocabulary with nothing to merge
    path = export(random_model(tmp_path, tokenizer, dict(**LLAMA, n_kv_head=2)))
    ids = tokenizer.encode(PROMPT)
    llm = llama_cpp_model(path)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == PROMPT


@pytest.mark.parametrize(
    "field, settings",
    [
        ("qk_norm", dict(**LLAMA, qk_norm=True)),
        ("logit_softcap", dict(**LLAMA, logit_softcap=15.0)),
        ("value_embeddings", dict(**LLAMA, value_embeddings=True)),
        ("bias", dict(LLAMA, bias=True)),
        ("qkv_bias", dict(**LLAMA, qkv_bias=True)),
        ("mlp_activation", dict(LLAMA, mlp_activation="gelu")),
        ("norm", dict(norm="rmsnorm")),
        ("n_kv_head", dict(n_kv_head=1)),
        ("head_dim", dict(head_dim=16)),
    ],
)
def test_a_setting_llama_cpp_has_no_equivalent_for_is_one_line_and_writes_nothing(field, settings, tmp_path, capsys):
    run = random_model(tmp_path, CharTokenizer.train(["abc"]), settings)
    out = tmp_path / "model.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"model.{field}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(text, tmp_path, capsys):
    from tokenizers import pre_tokenizers

    tk = byte_level_bpe(text, 300)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # " " before the text: not GPT-2's split
    run = random_model(tmp_path, BPETokenizer(tk), dict(**LLAMA))
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "model.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pre-tokenizer" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_existing_file_is_never_overwritten(tmp_path, capsys):
    run = random_model(tmp_path, CharTokenizer.train(["abc"]), dict(**LLAMA))
    out = tmp_path / "model.gguf"
    out.write_bytes(b"someone's file")
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err
    assert out.read_bytes() == b"someone's file" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "run"]


def test_dtype_belongs_to_gguf(tmp_path, capsys):
    run = random_model(tmp_path, CharTokenizer.train(["abc"]), dict(**LLAMA))
    assert main(["export", str(run), "--dtype", "q8_0", "--out", str(tmp_path / "hf")]) == 2
    assert "--format gguf" in capsys.readouterr().err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("recipe", ["llama, grouped-query, untied"])
def test_potion_reads_its_own_gguf_back_with_the_same_logits(recipe, tokenizers, tmp_path):
    kind, settings, _ = RECIPES[recipe]
    tokenizer = tokenizers[kind]
    run = random_model(tmp_path, tokenizer, settings)
    back = potion.load(export(run))
    ids = tokenizer.encode(PROMPT)
    assert back.tokenizer.encode(PROMPT) == ids and back.tokenizer.eot_id == tokenizer.eot_id
    with torch.no_grad():
        torch.testing.assert_close(back.model(torch.tensor([ids])), potion.load(run).model(torch.tensor([ids])))
