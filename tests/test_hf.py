"""Hugging Face interop, checked against transformers itself (CPU, float32, no downloads).

GPT-2 folders made by transformers load in potion with the same logits, cache or not, and the same greedy tokens;
potion runs exported load in transformers with the same logits; tokenizers give the same ids both ways.
"""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import potion
from potion.cli import main
from potion.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from potion.data.tokenizer import CharTokenizer
from potion.errors import PotionError
from potion.formats.hf.convert import export_model, import_model
from potion.formats.run import write_config
from potion.infer.generate import generate_tokens
from potion.train.checkpoint import model_state, save_tensors
from potion.train.loop import train

transformers = pytest.importorskip("transformers")

# Text that exercises a byte-level BPE: Unicode, emoji, runs of spaces, tabs and newlines, the end-of-text token.
VARIED_TEXT = [
    "Sarah lies still on the bed, feeling tired.",
    "  leading spaces,   runs of spaces   and trailing ones   ",
    "line one\n\n\nline four\r\n\ttabbed\t\tline",
    "naïve café, Ünïcödé, 日本語のテキスト, Ελληνικά, עברית",
    "emoji 🧪🧙‍♀️👩🏽‍🔬 and symbols ∑∫≠ ©®",
    "first document<|endoftext|>second document",
    "<|endoftext|><|endoftext|> end<|endoftext|>",
    "numbers 1234567890 3.14159 and punctuation!?;:'\"()[]{}",
    "",
]


@pytest.fixture(scope="module")
def corpus(shakespeare):
    return shakespeare.read_text(encoding="utf-8")[:300_000]


def byte_level_bpe(text: str, vocab_size: int) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([text], trainer=trainer)
    return tk


def gpt2_folder(folder: Path, text: str, vocab_size: int = 300, seed: int = 0, **config) -> Path:
    """A random GPT-2 saved by transformers, with GPT-2's two tokenizer files (vocab.json, merges.txt)."""
    folder.mkdir(parents=True)
    tk = byte_level_bpe(text, vocab_size)
    tk.model.save(str(folder))
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(vocab_size=tk.get_vocab_size(), bos_token_id=0, eos_token_id=0, **config)
    model = transformers.GPT2LMHeadModel(hf_config)
    with torch.no_grad():  # biases and norms away from their 0 and 1 starts, so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


GPT2_SHAPES = {
    "odd-sizes": dict(n_positions=100, n_embd=60, n_layer=3, n_head=5),  # head size 12, context not a multiple of 64
    "untied": dict(n_positions=37, n_embd=48, n_layer=2, n_head=4, tie_word_embeddings=False),
    "wide-mlp": dict(n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=96),
}


@pytest.fixture(scope="module", params=list(GPT2_SHAPES))
def gpt2_pair(request, tmp_path_factory, corpus):
    """A GPT-2 folder, potion's model loaded from it, and transformers' own model of it."""
    folder = gpt2_folder(tmp_path_factory.mktemp("gpt2") / "model", corpus, **GPT2_SHAPES[request.param])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, potion.load(folder), theirs


# ---------------------------------------------------------------- GPT-2 in


def test_gpt2_logits_match_transformers(gpt2_pair):
    _, run, theirs = gpt2_pair
    torch.manual_seed(1)
    T = run.config.model.context_length
    idx = torch.randint(0, run.config.model.vocab_size, (3, T))
    with torch.no_grad():
        torch.testing.assert_close(run.model(idx), theirs(idx).logits)


def test_gpt2_logits_match_with_the_kv_cache(gpt2_pair):
    _, run, theirs = gpt2_pair
    torch.manual_seed(2)
    T = run.config.model.context_length
    idx = torch.randint(0, run.config.model.vocab_size, (2, T))
    cache = run.model.new_cache(2)
    with torch.no_grad():
        expected = theirs(idx).logits
        prefill = run.model(idx[:, : T // 2], cache=cache)
        steps = [run.model(idx[:, t : t + 1], cache=cache) for t in range(T // 2, T)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), expected)


def test_gpt2_greedy_tokens_match_transformers_generate(gpt2_pair):
    _, run, theirs = gpt2_pair
    prompt = torch.tensor([run.tokenizer.encode("ROMEO: What say")])
    n = min(50, run.config.model.context_length - prompt.size(1))
    with torch.no_grad():
        ours = torch.stack(
            list(generate_tokens(run.model, prompt, n, temperature=0, eot_id=None, decode_dtype="fp32")), dim=1
        )
        expected = hf_greedy(theirs, prompt, n)
    assert ours.tolist() == expected.tolist()


def hf_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' generate, greedy, exactly n new tokens (no stop at end of text), the prompt all attended."""
    mask = torch.ones_like(prompt)  # without it, transformers would mask any prompt token equal to the pad id
    out = model.generate(
        prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[:, prompt.size(1) :]


def test_gpt2_tokenizer_gives_transformers_ids(gpt2_pair):
    folder, run, _ = gpt2_pair
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in VARIED_TEXT:
        ids = run.tokenizer.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert run.tokenizer.decode(ids) == text
    assert run.tokenizer.eot_id == theirs.convert_tokens_to_ids("<|endoftext|>")


def test_import_writes_a_run_directory_that_loads_alike(gpt2_pair, tmp_path):
    folder, run, _ = gpt2_pair
    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 0
    imported = potion.load(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["format_version"] >= 1
    idx = torch.randint(0, run.config.model.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(imported.model(idx), run.model(idx))
    assert imported.tokenizer.encode(VARIED_TEXT[3]) == run.tokenizer.encode(VARIED_TEXT[3])


# ---------------------------------------------------------------- untrusted GPT-2 folders


def test_a_config_that_disagrees_with_the_weights_is_one_line(tmp_path, corpus, capsys):
    folder = gpt2_folder(tmp_path / "m", corpus, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 100_000, "n_embd": 65_536}))
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "do not match its config.json: wte.weight has shape [300, 32], config.json implies [300, 65536]" in err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_runs_code_is_never_run(tmp_path, corpus):
    folder = gpt2_folder(tmp_path / "m", corpus, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": Exploit()}, f)
    with pytest.raises(PotionError, match="cannot be read safely"):
        potion.load(folder)
    assert not marker.exists()


def test_pytorch_model_bin_loads_with_weights_only(tmp_path, corpus):
    folder = gpt2_folder(tmp_path / "m", corpus, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    expected = potion.load(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    idx = torch.randint(0, expected.config.model.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.equal(potion.load(folder).model(idx), expected.model(idx))


def offline_cache(monkeypatch, folder: Path) -> None:
    """huggingface_hub reads its environment once, on import: set what its calls look at now."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_model_name_resolves_through_the_hugging_face_cache(tmp_path, corpus, monkeypatch):
    folder = gpt2_folder(tmp_path / "m", corpus, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--someone--tiny-gpt2" / "snapshots" / ("a" * 40)
    snapshot.parent.mkdir(parents=True)
    folder.rename(snapshot)
    (hub / "models--someone--tiny-gpt2" / "refs").mkdir()
    (hub / "models--someone--tiny-gpt2" / "refs" / "main").write_text("a" * 40)
    offline_cache(monkeypatch, hub)
    monkeypatch.chdir(tmp_path)
    assert potion.load("someone/tiny-gpt2").run_dir == snapshot


def test_a_model_name_neither_cached_nor_downloadable_is_one_line(tmp_path, monkeypatch, capsys):
    offline_cache(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "someone/not-here", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hf download someone/not-here" in err


def test_eval_of_a_gpt2_folder_needs_data(gpt2_pair, tmp_path, corpus, capsys):
    folder, _, _ = gpt2_pair
    assert main(["eval", "--model", str(folder)]) == 2
    assert "has no validation split; pass --data FILE" in capsys.readouterr().err
    (tmp_path / "text.txt").write_text(corpus[:5000], encoding="utf-8")
    assert main(["eval", "--model", str(folder), "--data", str(tmp_path / "text.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_byte"] > 0


def test_explain_works_on_a_gpt2_folder(gpt2_pair, capsys):
    folder, run, _ = gpt2_pair
    assert main(["explain", "Sarah lies still on the bed, feeling", "--model", str(folder), "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["tokens"]) == len(run.tokenizer.encode("Sarah lies still on the bed, feeling"))
    assert len(body["head_averages"]) == run.config.model.n_layer
    assert len(body["heads"]) == run.config.model.n_layer * run.config.model.n_head


# ---------------------------------------------------------------- potion out


def random_run(folder: Path, model: ModelConfig, tokenizer, seed: int = 0) -> Path:
    """A run directory holding random weights (every norm and bias perturbed too), as a trained run would."""
    folder.mkdir(parents=True)
    config = RunConfig(model=model, data=DataConfig(data="text.txt", tokenizer=tokenizer.kind))
    write_config(folder, config)
    (folder / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    torch.manual_seed(seed)
    gpt = potion.GPT(model)
    with torch.no_grad():
        for p in gpt.parameters():  # large enough that the greedy choices are clear, not near-ties
            p.add_(torch.randn_like(p) * 0.3)
    save_tensors(folder / "model.safetensors", model_state(gpt))
    return folder


EXPORTABLE = {
    "tiny (Qwen3)": dict(
        positions="rope", norm="rmsnorm", mlp_activation="relu2", qk_norm=True, bias=False, tie_embeddings=True
    ),
    "rope without qk-norm, biases (Llama)": dict(
        positions="rope", norm="rmsnorm", mlp_activation="relu2", qk_norm=False, bias=True, tie_embeddings=False
    ),
    "grouped-query SwiGLU, biases (Llama)": dict(
        positions="rope", norm="rmsnorm", mlp_activation="swiglu", ffn_hidden=50, n_kv_head=1, bias=True
    ),
    "grouped-query SwiGLU with qk-norm (Qwen3)": dict(
        positions="rope", norm="rmsnorm", mlp_activation="swiglu", n_kv_head=1, qk_norm=True, bias=False
    ),
    "gpt2 recipe, no biases, untied (GPT-2)": dict(bias=False, tie_embeddings=False),
    "gpt2 recipe (GPT-2)": dict(),
}


@pytest.mark.parametrize("recipe", list(EXPORTABLE))
def test_export_gives_transformers_the_same_logits_and_greedy_tokens(recipe, tmp_path, corpus):
    tokenizer = CharTokenizer.train([corpus])
    shape = dict(vocab_size=tokenizer.vocab_size, context_length=40, n_layer=2, n_head=3, n_embd=36, mlp_ratio=3)
    run = random_run(tmp_path / "run", ModelConfig(**shape, **EXPORTABLE[recipe]), tokenizer)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = potion.load(run)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours.model(idx), atol=1e-4, rtol=1e-4)
        prompt = idx[:1, :8]
        expected = hf_greedy(theirs, prompt, 30)
    greedy = generate_tokens(ours.model, prompt, 30, temperature=0, eot_id=None, decode_dtype="fp32")
    assert torch.stack(list(greedy), dim=1).tolist() == expected.tolist()


def test_exported_char_tokenizer_gives_potions_ids(tmp_path, corpus):
    tokenizer = CharTokenizer.train([corpus])
    run = random_run(tmp_path / "run", ModelConfig(**small_model(tokenizer)), tokenizer)
    export_model(run, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = corpus[1000:4000]
    assert theirs(text)["input_ids"] == tokenizer.encode(text)
    assert theirs.decode(tokenizer.encode(text)) == text
    assert theirs.eos_token_id == tokenizer.eot_id


def small_model(tokenizer) -> dict:
    return dict(vocab_size=tokenizer.vocab_size, context_length=16, n_layer=1, n_head=2, n_embd=16)


@pytest.mark.parametrize(
    "field, settings",
    [
        ("logit_softcap", dict(logit_softcap=15.0)),
        ("value_embeddings", dict(value_embeddings=True)),
        ("mlp_activation", dict(positions="rope", norm="rmsnorm", mlp_activation="gelu")),
        ("norm", dict(norm="rmsnorm")),
        ("n_kv_head", dict(n_kv_head=1)),
        ("bias", dict(positions="rope", norm="rmsnorm", mlp_activation="relu2", qk_norm=True, bias=True)),
    ],
)
def test_export_refuses_what_no_architecture_computes_and_writes_nothing(field, settings, tmp_path, capsys):
    tokenizer = CharTokenizer.train(["abc"])
    run = random_run(tmp_path / "run", ModelConfig(**small_model(tokenizer), **settings), tokenizer)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"model.{field}" in err
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_export_never_overwrites(tmp_path, capsys):
    tokenizer = CharTokenizer.train(["abc"])
    run = random_run(tmp_path / "run", ModelConfig(**small_model(tokenizer)), tokenizer)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["mine.txt"]


# ---------------------------------------------------------------- fine-tuning


def fine_tune(source, data: Path, out: Path, **train_fields) -> dict:
    settings = dict(batch_size=4, eval_every=2, eval_batches=2, sample_tokens=0, learning_rate=1e-3, warmup_steps=1)
    base = potion.config.load_preset("gpt2-finetune")
    config = potion.config.with_architecture(base, potion.formats.run.source_config(source))
    config = RunConfig(
        model=config.model,
        data=DataConfig(data=str(data), tokenizer=config.data.tokenizer, bpe_vocab_size=config.data.bpe_vocab_size),
        train=TrainConfig(**{**vars(base.train), **settings, **train_fields, "init_from": str(source)}),
    )
    return train(config, out=out, quiet=True)


def test_fine_tune_an_imported_gpt2_lowers_the_loss_and_resumes_exactly(tmp_path, corpus):
    folder = gpt2_folder(tmp_path / "m", corpus, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    import_model(folder, tmp_path / "imported")
    data = tmp_path / "data.txt"
    data.write_text(corpus[:60_000], encoding="utf-8")
    runs = {name: tmp_path / name for name in ("whole", "split")}
    for run in runs.values():
        summary = fine_tune(tmp_path / "imported", data, run, max_steps=6, checkpoint_every=2, keep_checkpoints=3)
    assert summary["best_val_loss"] < first_val_loss(runs["whole"])

    last = Path("checkpoints") / "step-00000006" / "model.safetensors"
    shutil.rmtree(runs["split"] / last.parent)  # as if killed after step 4's checkpoint
    train(potion.formats.run.read_config(runs["split"]), out=runs["split"], resume=True, quiet=True)
    assert (runs["split"] / last).read_bytes() == (runs["whole"] / last).read_bytes()


def first_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in rows if r["kind"] == "eval")


def test_init_from_refuses_a_contradicting_model_field(tmp_path, corpus, capsys):
    folder = gpt2_folder(tmp_path / "m", corpus, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    data = tmp_path / "data.txt"
    data.write_text(corpus[:20_000], encoding="utf-8")
    argv = ["train", "--init-from", str(folder), "--data", str(data), "--out", str(tmp_path / "run")]
    assert main([*argv, "--set", "n_layer=3"]) == 2
    assert "model.n_layer = 3 contradicts the model in --init-from" in capsys.readouterr().err
    assert main([*argv, "--set", "context_length=64"]) == 2
    assert "choose at most 32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
