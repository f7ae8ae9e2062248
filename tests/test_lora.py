"""LoRA fine-tuning: adapters that start as the base model exactly, merge exactly, are all that trains and all
that a checkpoint keeps, resume exactly, and a LoRA run that every command reads (export: transformers' logits).
"""

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import potion
from potion.cli import main
from potion.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_preset, with_architecture
from potion.data.tokenizer import CharTokenizer
from potion.errors import PotionError
from potion.formats.hf.convert import export_model
from potion.formats.run import read_config, source_config, write_config
from potion.model import GPT, lora
from potion.train import checkpoint as ckpt
from potion.train.loop import train
from potion.train.optim import make_optimizer

LLAMA = dict(positions="rope", norm="rmsnorm", mlp_activation="swiglu", bias=False, tie_embeddings=False)
GPT2 = dict(qkv_bias=True)  # learned positions, LayerNorm, GELU, biases everywhere
SHAPE = dict(context_length=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48)
RUN_SHAPE = dict(SHAPE, n_embd=64, ffn_hidden=128)  # wide enough that rank-2 adapters are a small part of it


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def perturbed(model: GPT, seed: int = 0) -> GPT:
    """Random weights, norms included, large enough that the logits differ clearly from token to token."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def adapted(config: ModelConfig, targets: str = "all", seed: int = 0) -> tuple[GPT, GPT]:
    """A random base GPT, and a copy of it with adapters whose B is random too (as after some training)."""
    base = perturbed(GPT(config), seed)
    model = GPT(config)
    model.load_state_dict(base.state_dict())
    lora.add_adapters(model, targets, rank=4, alpha=8.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_B.weight.normal_(std=0.2)
    return base, model


def ids(config: ModelConfig, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (2, config.context_length), generator=generator)


# ---------------------------------------------------------------- the adapters themselves


@pytest.mark.parametrize("recipe", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_adapters_start_as_the_base_model_exactly(recipe):
    config = ModelConfig(vocab_size=40, **SHAPE, **recipe)
    base = perturbed(GPT(config))
    model = GPT(config)
    model.load_state_dict(base.state_dict())
    lora.add_adapters(model, "all", rank=4, alpha=8.0, dropout_p=0.0)
    x = ids(config)
    for mode in ("train", "eval"):  # training computes q, k and v in one product; evaluation in three
        base.train(mode == "train"), model.train(mode == "train")
        with torch.no_grad():
            assert torch.equal(model(x), base(x)), mode


@pytest.mark.parametrize("recipe", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("targets", ["all", "q,v", "k,o,down"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merged_weights_give_the_adapted_models_logits(recipe, targets, dtype):
    """In float64 the merge is exact to rounding; in float32 (how potion keeps weights) within 1e-5 (the merged
    weights are rounded to float32 once)."""
    config = ModelConfig(vocab_size=40, **SHAPE, **recipe)
    base, model = adapted(config, targets)
    base, model = base.to(dtype), model.to(dtype)
    close = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    x = ids(config)
    with torch.no_grad():
        model.train()  # the training path (one product for q, k and v), dropout 0
        training_logits = model(x)
        model.eval()
        logits = model(x)
        assert (logits - base(x)).abs().max() > 0.1  # the adapters change the model
        torch.testing.assert_close(training_logits, logits, **close)
        plain = GPT(config).to(dtype).eval()
        plain.load_state_dict(lora.merged_state(model))  # the names of a plain GPT, strictly
        torch.testing.assert_close(plain(x), logits, **close)
        lora.merge_adapters(model)
        assert not lora.has_adapters(model) and list(model.state_dict()) == list(plain.state_dict())
        torch.testing.assert_close(model(x), logits, **close)


def test_only_the_adapters_get_gradients_and_optimizer_state():
    config = ModelConfig(vocab_size=40, **SHAPE, **LLAMA)
    _, model = adapted(config, "q,k,v,o,gate,up,down")
    model.train()
    _, loss = model(ids(config), ids(config, seed=2))
    loss.backward()
    named = dict(model.named_parameters())
    trained = {name for name, p in named.items() if p.grad is not None}
    assert trained == {name for name in named if lora.is_adapter(name)} == set(lora.adapter_state(model))
    assert all(not p.requires_grad for name, p in named.items() if not lora.is_adapter(name))
    for optimizer in ("adamw", "muon"):
        optimizers = make_optimizer(model, TrainConfig(optimizer=optimizer), "cpu")
        in_optimizers = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        assert in_optimizers == {id(p) for name, p in named.items() if lora.is_adapter(name)}


def test_a_lora_steps_flops_leave_out_the_frozen_weights_gradients():
    """6 FLOPs per token for each weight a token is multiplied by when it trains, 4 when it is frozen (forward, and
    the gradient of its input only)."""
    config = ModelConfig(vocab_size=40, **SHAPE, **LLAMA)
    base, model = adapted(config)
    multiplied = base.num_parameters() - base.token_embedding.weight.numel() - base.final_norm.weight.numel()
    adapters = sum(t.numel() for t in lora.adapter_state(model).values())
    assert lora.training_flops_per_token(model) == base.training_flops_per_token() - 2 * multiplied + 6 * adapters


# ---------------------------------------------------------------- a LoRA fine-tune


def random_base(folder: Path, text: str) -> Path:
    """A random Llama-shaped run directory with a character tokenizer of text's characters."""
    folder.mkdir()
    tokenizer = CharTokenizer.train([text])
    config = ModelConfig(vocab_size=tokenizer.vocab_size, **RUN_SHAPE, **LLAMA)
    write_config(folder, RunConfig(model=config, data=DataConfig(tokenizer="char")))
    (folder / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    ckpt.save_tensors(folder / "model.safetensors", ckpt.model_state(perturbed(GPT(config), seed=3)))
    return folder


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus):
    """The model the fine-tunes start from."""
    return random_base(tmp_path_factory.mktemp("base") / "base", corpus.read_text())


def lora_config(base: Path, data: Path, **train_fields) -> RunConfig:
    """The `finetune` preset on base, with LoRA: as `potion train --init-from base --set lora_rank=4` builds it."""
    preset = load_preset("finetune")
    config = with_architecture(preset, source_config(base))
    settings = dict(batch_size=4, eval_every=5, eval_batches=2, sample_tokens=0, learning_rate=1e-2, warmup_steps=1)
    settings |= dict(max_steps=10, checkpoint_every=5, keep_checkpoints=0, compile="off", init_from=str(base))
    settings |= dict(lora_rank=2, lora_alpha=8.0, lora_dropout=0.1)  # dropout: the random states must resume too
    return replace(config, data=DataConfig(data=str(data), tokenizer="char"), train=replace(preset.train, **settings))


@pytest.fixture(scope="module")
def lora_run(base_run, corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    train(lora_config(base_run, corpus), out=run, quiet=True)
    return run


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_lora_run_trains_only_the_adapters_and_its_checkpoints_hold_only_them(lora_run, base_run):
    base, merged = (ckpt.load_tensors(folder / "model.safetensors") for folder in (base_run, lora_run))
    assert merged.keys() == base.keys()
    adapted_projections = [lora.PROJECTIONS[name] for name in ("q", "k", "v", "o")]  # lora_targets' default
    for name in base:  # the adapted projections moved; the feed-forward, embeddings, norms and head are the base's
        adapted_projection = any(f".{p}.weight" in name for p in adapted_projections)
        assert torch.equal(merged[name], base[name]) != adapted_projection, name
    last = ckpt.complete_checkpoints(lora_run)[-1]
    assert sorted(p.name for p in last.iterdir()) == [
        "COMPLETE",
        "adapter.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    adapters = ckpt.load_tensors(last / "adapter.safetensors")
    assert adapters.keys() == ckpt.load_tensors(lora_run / "adapter.safetensors").keys()
    assert all(lora.is_adapter(name) for name in adapters)
    assert len(adapters) == 2 * 4 * 2  # A and B, on 4 projections, in 2 blocks
    with safe_open(last / "optimizer.safetensors", "pt") as f:
        moments = [name for name in f.keys() if name.endswith(".exp_avg")]
    assert len(moments) == len(adapters)  # AdamW keeps moments for the adapters alone
    # a full fine-tune's checkpoint holds the model and two moments per weight: three times model.safetensors
    model_bytes = (lora_run / "model.safetensors").stat().st_size
    assert (last / "adapter.safetensors").stat().st_size < model_bytes / 30
    assert size(last) < model_bytes / 8  # adapters, their moments, the random generators' states


def test_the_merged_model_is_the_adapted_model(lora_run, base_run):
    """model.safetensors (what every command reads) against the base with the run's adapters on it, computed in
    float64: within 1e-5 of the logits' size (float32 rounds an adapted forward pass itself about as much)."""
    config = read_config(lora_run)
    model = potion.load(base_run).model.double()
    tc = config.train
    lora.add_adapters(model, tc.lora_targets, tc.lora_rank, tc.lora_alpha, tc.lora_dropout)
    ckpt.load_adapters(model, lora_run / "adapter.safetensors")
    merged = potion.load(lora_run).model
    x = ids(config.model)
    with torch.no_grad():
        exact = model.eval()(x)
        assert (merged(x).double() - exact).abs().max() < 1e-5 * exact.abs().max()


def test_a_resumed_lora_run_is_the_uninterrupted_one(lora_run, base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    last = ckpt.complete_checkpoints(run)[-1]
    shutil.rmtree(last)  # as if killed after step 5's checkpoint
    train(read_config(run), out=run, resume=True, quiet=True)
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        assert (last / name).read_bytes() == (lora_run / "checkpoints" / last.name / name).read_bytes(), name
    for name in ("adapter.safetensors", "model.safetensors"):
        assert (run / name).read_bytes() == (lora_run / name).read_bytes(), name
    assert eval_rows(run) == eval_rows(lora_run)


def eval_rows(run: Path) -> list[dict]:
    """The eval rows of log.jsonl without their timing fields."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed", "train_seconds")} for r in rows if r["kind"] == "eval"]


def test_every_command_reads_a_lora_run(lora_run, capsys, tmp_path):
    assert main(["generate", "the cat", "--model", str(lora_run), "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert main(["eval", "--model", str(lora_run), "--json"]) == 0
    assert main(["explain", "the cat", "--model", str(lora_run)]) == 0
    capsys.readouterr()
    if importlib.util.find_spec("gguf") is not None:  # the gguf extra: the file holds the merged weights
        gguf_file = tmp_path / "m.gguf"
        assert main(["export", str(lora_run), "--format", "gguf", "--dtype", "f32", "--out", str(gguf_file)]) == 0
        stored = {t.name: t for t in importlib.import_module("gguf").GGUFReader(gguf_file).tensors}
        merged = ckpt.load_tensors(lora_run / "model.safetensors")["blocks.1.attn.value.weight"]
        assert torch.equal(torch.from_numpy(stored["blk.1.attn_v.weight"].data.copy()).view(merged.shape), merged)
    from potion.serve.served import ServedModel

    assert ServedModel(str(lora_run)).run.model.num_parameters() == potion.load(lora_run).model.num_parameters()
    transformers = pytest.importorskip("transformers")
    assert main(["export", str(lora_run), "--out", str(tmp_path / "hf")]) == 0
    assert "LoRA rank 2" in (tmp_path / "hf" / "README.md").read_text()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = potion.load(lora_run).model
    x = ids(ours.config)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), atol=1e-5, rtol=1e-5)


def test_a_moved_base_model_is_one_line_on_resume(base_run, corpus, tmp_path, capsys):
    base = tmp_path / "hf-base"
    export_model(base_run, base)  # a Hugging Face folder, as a downloaded model would be
    run = tmp_path / "run"
    train(lora_config(base, corpus, max_steps=2, checkpoint_every=2, eval_every=2), out=run, quiet=True)
    assert read_config(run).train.init_from == str(base.resolve())
    base.rename(tmp_path / "moved")
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a LoRA run" in err and str(base) in err and "put it back" in err, err


def test_lora_on_conversations_warns_that_the_tokens_added_for_chat_stay_frozen(corpus, tmp_path):
    base = random_base(tmp_path / "base", corpus.read_text() + "user assistant system")  # no ChatML tokens
    chats = tmp_path / "chats.jsonl"
    reply = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"}]
    chats.write_text((json.dumps({"messages": reply}) + "\n") * 40)
    config = lora_config(base, chats, max_steps=0)
    with pytest.warns(UserWarning, match="the 2 tokens added for chat keep their starting rows"):
        train(config, out=tmp_path / "run", quiet=True)


# ---------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "settings, message",
    [
        (["lora_rank=-1"], "train.lora_rank must not be negative"),
        (["lora_rank=4", "lora_targets=q,x"], "lora_targets must be one of q, k, v, o, gate, up, down, all"),
        (["lora_rank=4", "lora_targets=,"], "names no projection"),
        (["lora_rank=4", "lora_alpha=0"], "train.lora_alpha must be positive"),
        (["lora_rank=4", "lora_dropout=1"], "train.lora_dropout must be in [0, 1)"),
        (["lora_rank=4"], "adapts a pretrained model"),  # no --init-from
    ],
)
def test_bad_lora_settings_are_one_line(settings, message, corpus, tmp_path, capsys):
    argv = ["train", "--data", str(corpus), "--out", str(tmp_path / "run"), *sum((["--set", s] for s in settings), [])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_lora_settings_the_model_contradicts_are_one_line(base_run, corpus, tmp_path):
    gelu = replace(lora_config(base_run, corpus), model=ModelConfig(vocab_size=40))
    for config, message in (
        (replace(gelu, train=replace(gelu.train, lora_targets="gate,up")), "has none (mlp_activation = gelu"),
        (replace(gelu, train=replace(gelu.train, parallel="fsdp")), "train.parallel = fsdp"),
    ):
        with pytest.raises(PotionError, match=message.replace("(", r"\(")):
            train(config, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_lora_targets_have_one_spelling():
    assert TrainConfig(lora_targets=" v, q ,q").lora_targets == "q,v"  # in the model's order: resume compares it
    assert TrainConfig(lora_targets="q,all").lora_targets == "all"
    assert lora.chosen_targets("all", ModelConfig()) == ("q", "k", "v", "o", "up", "down")  # GELU: no gate
