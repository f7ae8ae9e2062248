"""The command line end to end, in subprocesses, as a user runs it."""

import json
import math
import os
import subprocess
import sys
from collections import Counter

import pytest

SMALL = [
    "--set",
    "n_layer=2",
    "--set",
    "n_embd=64",
    "--set",
    "n_head=4",
    "--set",
    "context_length=64",
    "--set",
    "batch_size=16",
    "--set",
    "sample_tokens=20",
    "--set",
    "warmup_steps=20",
]


def potion(*args, cwd=None, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "potion", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"potion {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare):
    out = tmp_path_factory.mktemp("runs") / "run"
    # a data path relative to where training ran: eval, run from elsewhere, must still find the validation split
    result = potion(
        "train",
        "--data",
        shakespeare.name,
        *SMALL,
        "--max-steps",
        300,
        "--eval-every",
        100,
        "--out",
        out,
        "--json",
        cwd=shakespeare.parent,
    )
    return out, json.loads(result.stdout)


def unigram_entropy(path):
    counts = Counter(path.read_text(encoding="utf-8"))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_short_run_beats_unigram_entropy(trained, shakespeare):
    out, summary = trained
    assert set(summary) >= {
        "steps",
        "tokens",
        "seconds",
        "tokens_per_second",
        "train_loss",
        "val_loss",
        "best_val_loss",
        "out",
    }
    assert summary["steps"] == 300
    assert summary["val_loss"] < unigram_entropy(shakespeare) - 0.6  # about 3.3 nats -> below 2.7
    for name in ("config.json", "tokenizer.json", "model.safetensors", "log.jsonl", "loss.png"):
        assert (out / name).is_file(), name


def test_generate_same_seed_same_text(trained):
    out, _ = trained
    a = potion("generate", "ROMEO:", "--model", out, "--seed", 1, "--max-new-tokens", 60).stdout
    b = potion("generate", "ROMEO:", "--model", out, "--seed", 1, "--max-new-tokens", 60).stdout
    assert a == b and a.startswith("ROMEO:") and len(a) > 20
    j = json.loads(
        potion("generate", "--model", out, "--seed", 2, "--num-samples", 2, "--max-new-tokens", 30, "--json").stdout
    )
    assert len(j["samples"]) == 2 and j["tokens_per_second"] > 0
    assert all(s["finish_reason"] in ("eot", "length") and s["tokens"] <= 30 for s in j["samples"])


def test_eval_prints_loss_perplexity_bits_per_byte(trained, shakespeare):
    out, summary = trained
    j = json.loads(potion("eval", "--model", out, "--json", cwd=out.parent).stdout)
    assert abs(math.exp(j["loss"]) - j["perplexity"]) < 1e-6 * j["perplexity"]
    assert j["tokens"] > 100_000  # the whole validation split, about 111k characters
    assert abs(j["bits_per_byte"] - j["loss"] / math.log(2)) < 0.05  # Shakespeare is nearly all ASCII
    assert abs(j["loss"] - summary["best_val_loss"]) < 0.15


def test_existing_out_is_refused_without_resume(trained, shakespeare):
    out, _ = trained
    before = (out / "model.safetensors").read_bytes()
    r = potion("train", "--data", shakespeare, "--out", out, check=False)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/file.txt"], "is not a file, a directory"),
        (["train", "--preset", "enormous"], "unknown preset"),
        (["train", "--set", "n_layer=many"], "not a valid int"),
        (["train", "--set", "colour=blue"], "unknown config key"),
        (["generate", "--model", "/nonexistent/run"], "does not exist"),
        (["generate", "--temperature", "-1", "--model", "."], "temperature"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, args, message):
    r = (
        potion(*args, "--out", tmp_path / "o", cwd=tmp_path, check=False)
        if args[0] == "train"
        else potion(*args, cwd=tmp_path, check=False)
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = potion("train", "--data", tmp_path / "empty.txt", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "is empty" in r.stderr and not (tmp_path / "o").exists()


def test_corrupt_run_directory(trained, tmp_path):
    out, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((out / name).read_bytes())
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    r = potion("generate", "--model", broken, check=False)
    assert r.returncode == 2 and "damaged" in r.stderr, r.stderr


def test_debug_shows_traceback(tmp_path):
    r = potion("--debug", "train", "--preset", "enormous", cwd=tmp_path, check=False)
    assert "Traceback" in r.stderr
