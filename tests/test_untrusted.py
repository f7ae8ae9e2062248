"""A run directory from a stranger: its config.json is checked against the weights' safetensors header before
anything is allocated, and a tokenizer file that cannot be one is one line."""

import json
import os
import resource
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import save_file
from tiny_settings import TINY

import potion.train.checkpoint as ckpt
from potion.cli import main
from potion.config import ModelConfig, resolve
from potion.errors import PotionError
from potion.formats.fileio import sha256_file
from potion.model import GPT
from potion.train.loop import train
from potion.train.preflight import check_weights_match, expected_tensors, read_header

pytestmark = pytest.mark.usefixtures("quiet_machine")

TINY_RECIPE = dict(positions="rope", norm="rmsnorm", mlp_activation="relu2", qk_norm=True, bias=False)  # tiny's


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("untrusted")
    corpus = folder / "words.txt"
    corpus.write_text("the cat sat on a mat and the dog ran far away home\n" * 400)
    train(resolve("tiny", None, [*TINY, f"data={corpus}", "max_steps=4", "eval_every=2"]), folder / "run", quiet=True)
    return folder / "run"


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, argv, folder):
    before = snapshot(folder)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("potion: error: "), err
    assert snapshot(folder) == before
    return err.strip().removeprefix("potion: error: ")


def edit_config(run, section, **values):
    body = json.loads((run / "config.json").read_text())
    body[section].update(values)
    (run / "config.json").write_text(json.dumps(body))


def commands(run):
    return [["generate", "--model", run], ["eval", "--model", run], ["explain", "a", "--model", run]]


def test_a_config_that_disagrees_with_its_weights_is_one_line(capsys, run):
    edit_config(run, "model", n_embd=64)
    for argv in commands(run):
        assert one_line(capsys, argv, run) == (
            f"'{run / 'model.safetensors'}' does not match config.json: token_embedding.weight has shape [18, 32], "
            "config.json implies [18, 64]"
        )


def test_a_missing_and_an_extra_tensor(capsys, run):
    edit_config(run, "model", tie_embeddings=False)  # implies a head.weight the file does not have
    assert one_line(capsys, ["generate", "--model", run], run) == (
        f"'{run / 'model.safetensors'}' does not match config.json: it has no head.weight, which config.json implies"
    )
    edit_config(run, "model", tie_embeddings=True, qk_norm=False)  # the file has the norms of queries and keys
    assert one_line(capsys, ["eval", "--model", run], run) == (
        f"'{run / 'model.safetensors'}' does not match config.json: it has blocks.0.attn.k_norm.weight, which "
        "config.json does not imply"
    )


def test_100000_layers_of_width_65536_fail_fast_before_any_allocation(capsys, run):
    edit_config(run, "model", n_layer=100_000, n_embd=65_536, n_head=64)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for argv in [*commands(run), ["train", "--resume", "--out", run]]:
        started = time.perf_counter()
        line = one_line(capsys, argv, run)
        assert time.perf_counter() - started < 1.0
        weights = run / "checkpoints" / "step-00000004" if argv[0] == "train" else run  # what resume would load
        assert line == (
            f"'{weights / 'model.safetensors'}' does not match config.json: config.json implies 100,000 layers "
            "(at least 800,000 tensors); the file has 22"
        )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200_000  # KB: no model was built


def test_weights_that_are_not_finite_or_overflow_are_one_line(capsys, run):
    weights = ckpt.load_tensors(run / "model.safetensors")
    damaged = {**weights, "final_norm.weight": weights["final_norm.weight"].clone()}
    damaged["final_norm.weight"][3] = float("inf")  # what one flipped exponent bit does to a 1.0
    ckpt.save_tensors(run / "model.safetensors", damaged)
    for argv in commands(run):
        line = one_line(capsys, argv, run)
        assert line.startswith(f"'{run}") and line.endswith(
            "' is damaged: final_norm.weight holds numbers that are not finite (NaN or inf)"
        )
    huge = {**weights, "final_norm.weight": torch.full_like(weights["final_norm.weight"], 3e38)}  # finite, overflows
    ckpt.save_tensors(run / "model.safetensors", huge)
    assert one_line(capsys, ["generate", "--model", run, "--", "a"], run) == (
        "the model's next-token scores are not finite numbers (NaN or inf): its weights are damaged or too large"
    )
    assert "are not finite numbers (NaN or inf)" in one_line(capsys, ["explain", "a", "--model", run], run)


def test_resume_checks_the_checkpoint_it_would_load(capsys, run):
    # the newest checkpoint's weights come from a wider model; its COMPLETE marker is rewritten to match
    last = ckpt.complete_checkpoints(run)[-1]
    wider = GPT(ModelConfig(vocab_size=18, context_length=32, n_layer=2, n_head=2, n_embd=48, **TINY_RECIPE))
    ckpt.save_tensors(last / "model.safetensors", ckpt.model_state(wider))
    marker = json.loads((last / "COMPLETE").read_text())
    marker["sha256"]["model.safetensors"] = sha256_file(last / "model.safetensors")
    (last / "COMPLETE").write_text(json.dumps(marker))
    line = one_line(capsys, ["train", "--resume", "--out", run, "--max-steps", 6], run)
    assert line == (
        f"'{last / 'model.safetensors'}' does not match config.json: token_embedding.weight has shape [18, 48], "
        "config.json implies [18, 32]"
    )


def forge_optimizer_file(checkpoint, tensors):
    """Replace a checkpoint's optimizer state and rewrite its COMPLETE marker to match, as a stranger could."""
    ckpt.save_tensors(checkpoint / "optimizer.safetensors", tensors)
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["sha256"]["optimizer.safetensors"] = sha256_file(checkpoint / "optimizer.safetensors")
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def test_resume_checks_the_optimizer_file(capsys, run):
    last = ckpt.complete_checkpoints(run)[-1]
    tensors = ckpt.load_tensors(last / "optimizer.safetensors")
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    forge_optimizer_file(last, {**tensors, name: torch.zeros(3, 3)})
    line = one_line(capsys, ["train", "--resume", "--out", run, "--max-steps", 6], run)
    assert line.startswith(f"'{last / 'optimizer.safetensors'}' does not match this run's model: {name} is F32 [3, 3]")
    # a slot renamed (one flipped bit in the header) would be a KeyError in AdamW's next step
    adamw = next(k for k in tensors if k.startswith("0.") and k.endswith(".exp_avg"))
    renamed = {(k.replace("exp_avg", "exp_avh") if k == adamw else k): v for k, v in tensors.items()}
    forge_optimizer_file(last, renamed)
    line = one_line(capsys, ["train", "--resume", "--out", run, "--max-steps", 6], run)
    assert "does not match this run's optimizer: weight " in line
    assert line.endswith("['exp_avg_sq', 'exp_avh', 'step']; it keeps ['exp_avg', 'exp_avg_sq', 'step']")


def test_a_rope_context_beyond_what_the_weights_justify(tmp_path):
    config = ModelConfig(vocab_size=20, context_length=64, n_layer=2, n_head=2, n_embd=32, positions="rope")
    path = tmp_path / "model.safetensors"
    ckpt.save_tensors(path, ckpt.model_state(GPT(config)))
    check_weights_match(config, path)  # agrees
    huge = ModelConfig(vocab_size=20, context_length=2**40, n_layer=2, n_head=2, n_embd=32, positions="rope")
    with pytest.raises(PotionError) as refused:
        check_weights_match(huge, path)
    assert str(refused.value).endswith(
        "its context_length of 1,099,511,627,776 would need 633.3 TB for rope tables and the key/value cache; "
        "weights of 104.4 KB allow at most 268.4 MB"
    )


@pytest.mark.parametrize(
    "header, why",
    [
        (b"\xff" * 8, "its header claims 18,446,744,073,709,551,615 bytes"),
        (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
        (b"abc", "shorter than a safetensors header"),
    ],
)
def test_a_damaged_header_is_read_without_trusting_it(tmp_path, header, why):
    (tmp_path / "x.safetensors").write_bytes(header)
    with pytest.raises(PotionError, match=f"'{tmp_path / 'x.safetensors'}' is damaged and cannot be read \\({why}\\)"):
        read_header(tmp_path / "x.safetensors")


def test_a_header_whose_bytes_do_not_fit_the_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    path.write_bytes(path.read_bytes()[:-1])  # cut short by one byte
    with pytest.raises(PotionError, match=r"the bytes of w \(0..64\) do not fit its shape \[4, 4\] or the file"):
        read_header(path)


def test_shapes_of_a_20_terabyte_model_cost_no_memory():
    config = ModelConfig(vocab_size=50257, context_length=1 << 20, n_layer=100, n_head=64, n_embd=65536)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shapes = expected_tensors(config)
    assert shapes["blocks.99.mlp.up.weight"] == (4 * 65536, 65536) and "head.weight" not in shapes
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"type": "potion-char", "chars": ["a", "b"', "is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ('{"type": "potion-char", "chars": []}', 'has no character vocabulary ("chars" must be a non-empty list)'),
        ('{"type": "potion-char", "chars": ["a", "b", "a"]}', "the character 'a' is in the vocabulary twice"),
        ('{"type": "potion-char", "chars": ["a", 7]}', "the vocabulary entry 7 is not a single character"),
        ('{"type": "potion-char", "chars": ["a", "bc"]}', "the vocabulary entry 'bc' is not a single character"),
        ('{"type": "potion-char", "chars": "abc"}', "has no character vocabulary"),
        ('{"model": {"type": "BPE", "vocab": 5}}', "is not a readable tokenizer"),
    ],
)
def test_a_tokenizer_that_cannot_be_one_is_one_line(capsys, run, text, message):
    (run / "tokenizer.json").write_text(text)
    assert message in one_line(capsys, ["generate", "--model", run], run)


def test_a_tokenizer_of_another_size_or_not_utf8(capsys, run):
    body = json.loads((run / "tokenizer.json").read_text())
    (run / "tokenizer.json").write_text(json.dumps({**body, "chars": body["chars"] + ["Z"]}))
    assert "has 19 tokens but the model expects 18" in one_line(capsys, ["generate", "--model", run], run)
    (run / "tokenizer.json").write_bytes(b'{"type": "potion-char", "chars": ["\xff"]}')
    assert "is damaged (not UTF-8 text" in one_line(capsys, ["eval", "--model", run], run)


def test_a_run_trained_here_passes_its_own_checks(trained):
    config = json.loads((trained / "config.json").read_text())["model"]
    check_weights_match(ModelConfig(**config), trained / "model.safetensors")
    for checkpoint in ckpt.complete_checkpoints(trained):
        check_weights_match(ModelConfig(**config), checkpoint / "model.safetensors")
    assert os.path.getsize(trained / "model.safetensors") > 0


def test_a_damaged_log_is_plotted_without_its_damaged_rows(capsys, run):
    with open(run / "log.jsonl", "a") as f:  # a key and a value with a flipped bit, and a row of another kind
        f.write('{"kind": "eval", "step": 3, "val_lo3s": 2.5}\n{"kind": "eval", "step": 4, "val_loss": "2.#"}\n')
        f.write('{"kind": "train", "step": 4, "loss": Infinity}\n')
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "6", "--quiet"]) == 0, capsys.readouterr().err
    assert (run / "loss.png").stat().st_size > 0
