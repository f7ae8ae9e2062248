"""Llama-family Hugging Face folders read by potion compute what transformers computes: golden tests on tiny random
Llama (grouped-query, llama3 rope scaling, biases), Mistral (sliding window), Qwen2 (q/k/v biases, a padded
vocabulary) and Qwen3 (per-head q/k norms, wide heads) models built offline."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import potion  # noqa: E402
from potion.cli import main  # noqa: E402
from potion.infer.generate import generate_tokens  # noqa: E402

SHAPE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=64)
FAMILY = {
    "llama, grouped-query, tied": (
        "LlamaConfig",
        dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=50000.0),
    ),
    "llama 3 rope scaling, biases, untied": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral, sliding window": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=32, tie_word_embeddings=False),
    ),
    "qwen2, q/k/v biases, padded vocabulary": (
        "Qwen2Config",
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, vocab_pad=24),
    ),
    "qwen3, q/k norms, wide heads, padded vocabulary": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, vocab_pad=8),
    ),
}


@pytest.fixture(scope="module")
def tokenizer_json(shakespeare) -> str:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([shakespeare.read_text(encoding="utf-8")[:50_000]], trainer=trainer)
    return tk.to_str()


def hf_folder(tmp_path, name: str, tokenizer_json: str):
    """A tiny random model of the family saved as transformers saves it, with a tokenizer whose end token is
    <|im_end|>, named by generation_config.json."""
    config_class, settings = FAMILY[name]
    settings = dict(settings)
    vocab = json.loads(tokenizer_json)
    n_tokens = len(vocab["model"]["vocab"]) + sum(
        t["id"] >= len(vocab["model"]["vocab"]) for t in vocab["added_tokens"]
    )
    config = getattr(transformers, config_class)(
        vocab_size=n_tokens + settings.pop("vocab_pad", 0), **SHAPE, **settings
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # large enough that greedy choices are clear, not near-ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    im_end = next(t["id"] for t in vocab["added_tokens"] if t["content"] == "<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": im_end}), encoding="utf-8")
    return folder, model


@pytest.mark.parametrize("name", list(FAMILY))
def test_potion_computes_the_same_logits_and_greedy_tokens_as_transformers(name, tmp_path, tokenizer_json):
    folder, theirs = hf_folder(tmp_path, name, tokenizer_json)
    ours = potion.load(folder)
    assert ours.tokenizer.eot_token == "<|im_end|>"
    idx = torch.randint(0, ours.tokenizer.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(idx), theirs(idx).logits, atol=1e-4, rtol=1e-4)
        prompt = idx[:1, :6]
        expected = theirs.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20, do_sample=False
        )[:, 6:]
    greedy = generate_tokens(ours.model, prompt, 20, temperature=0, eot_id=None, decode_dtype="fp32", draft_tokens=0)
    assert torch.stack(list(greedy), dim=1).tolist() == expected.tolist()


def test_mistral_context_is_cut_to_its_sliding_window(tmp_path, tokenizer_json):
    folder, _ = hf_folder(tmp_path, "mistral, sliding window", tokenizer_json)
    assert potion.load(folder).config.model.context_length == 32


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "falcon"}, "potion reads gpt2, llama, mistral, qwen2, qwen3"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
        ({"vocab_size": 10**12}, "vocab_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"hidden_size": 64}, "do not match its config.json"),
    ],
)
def test_a_config_json_that_potion_cannot_honour_is_one_line(change, message, tmp_path, tokenizer_json, capsys):
    folder, _ = hf_folder(tmp_path, "llama, grouped-query, tied", tokenizer_json)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # transformers' own progress bars while saving
    assert main(["generate", "hello", "--model", str(folder), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_folder_chat_template_is_read_kept_and_exported(tmp_path, tokenizer_json):
    """tokenizer_config.json's list of named templates (the "default" one chats), chat_template.jinja before it,
    and potion export writes the template where transformers reads it."""
    folder, _ = hf_folder(tmp_path, "llama, grouped-query, tied", tokenizer_json)
    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": "{{ 'default' }}"}]
    config = {"chat_template": named, "eos_token": {"content": "<|im_end|>"}, "bos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    template = potion.load(folder).tokenizer.chat_template
    assert template.source == "{{ 'default' }}"
    assert template.special_tokens == {"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>"}
    chatml = "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(chatml, encoding="utf-8")
    run = potion.load(folder)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert (
        run.tokenizer.chat_template.render(messages)
        == "<|endoftext|>user: Hi<|im_end|><|endoftext|>assistant: Hello<|im_end|>"
    )
    assert main(["export", str(folder), "--out", str(tmp_path / "out")]) == 0
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.apply_chat_template(messages, tokenize=False) == run.tokenizer.chat_template.render(messages)
