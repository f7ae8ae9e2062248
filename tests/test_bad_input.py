"""Bad input gets one clear line on stderr and exit code 2 (never a traceback), and leaves files on disk alone."""

import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_settings import TINY

from potion.cli import main
from potion.config import resolve
from potion.train.loop import train

training_loop = importlib.import_module("potion.train.loop")  # the module: potion.train is also the function

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("quiet_machine")
SETS = [a for s in TINY for a in ("--set", s)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained character-level model; its vocabulary is the letters of a few English words."""
    folder = tmp_path_factory.mktemp("bad-input")
    corpus = folder / "words.txt"
    corpus.write_text("the cat sat on a mat and the dog ran far away home\n" * 400)
    out = folder / "run"
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        train(resolve("tiny", None, [*TINY, f"data={corpus}", "max_steps=5", "eval_every=5"]), out, quiet=True)
    finally:
        del os.environ["OMP_NUM_THREADS"]
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys, argv, folder=None):
    """Run the command; it must fail with exit 2 and exactly one stderr line, leaving `folder` unchanged."""
    before = snapshot(folder) if folder else None
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("potion: error: "), captured.err
    assert "Traceback" not in captured.err
    if folder:
        assert snapshot(folder) == before
    print(lines[0])  # the exact line a user sees (pytest -s shows them)
    return lines[0]


def train_fails(capsys, tmp_path, data, *more):
    out = tmp_path / "out"
    line = error_line(capsys, ["train", "--data", data, *SETS, "--out", out, "--quiet", *more])
    assert not out.exists()
    return line


def test_empty_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert f"data file '{tmp_path / 'empty.txt'}' is empty" in train_fails(capsys, tmp_path, tmp_path / "empty.txt")


def test_binary_file(capsys, tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    line = train_fails(capsys, tmp_path, tmp_path / "image.png")
    assert f"'{tmp_path / 'image.png'}' looks like a binary file (a NUL byte at byte offset 8)" in line


def test_invalid_utf8_names_file_and_offset(capsys, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("utf-8") * 3 + "na\u00efve\n".encode("latin-1"))
    line = train_fails(capsys, tmp_path, path)
    assert f"'{path}' is not valid UTF-8 at byte offset {len('café au lait'.encode()) * 3 + 3 + 2}" in line


def test_corpus_smaller_than_one_context(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("a short text\n")
    line = train_fails(capsys, tmp_path, tmp_path / "short.txt")
    assert "tokens; a context of 32 needs at least 34" in line and "context_length" in line


def test_glob_matching_nothing(capsys, tmp_path):
    line = train_fails(capsys, tmp_path, tmp_path / "*.nothing")
    assert f"data glob '{tmp_path / '*.nothing'}' matches no files" in line


def test_50_mb_without_a_newline_trains_in_bounded_memory(tmp_path):
    path = tmp_path / "one-line.txt"
    unit = b"abcdefghijklmnopqrstuvwxyz" * 40  # no newline and no space anywhere
    with open(path, "wb") as f:
        for _ in range(50 * (1 << 20) // len(unit)):
            f.write(unit)
    assert path.stat().st_size > 49 * (1 << 20)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "potion",
            "train",
            "--data",
            path,
            *SETS,
            "--max-steps",
            "2",
            "--eval-every",
            "2",
            "--out",
            tmp_path / "run",
            "--quiet",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["steps"] == 2
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest process so far
    print(f"50 MB single line: peak RSS of one potion process {peak_mb:.0f} MB")
    assert peak_mb < 1500


def test_unknown_character_in_the_prompt(capsys, run):
    line = error_line(capsys, ["generate", "the zebra", "--model", run], run)
    assert (
        "character 'z' (U+007A) in the prompt at line 1, column 5 is not in this model's character vocabulary" in line
    )


def test_prompt_longer_than_context_warns_and_keeps_the_last_tokens(capsys, run):
    assert (
        main(["generate", "the cat sat on a mat " * 4, "--model", str(run), "--max-new-tokens", "3", "--seed", "0"])
        == 0
    )
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        "potion: warning: the prompt has 84 tokens; this model's context is 32, so only the last 32 are used"
    )
    print(captured.err.strip())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or positive, got -0.5"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-k", "0"], "--top-k must be at least 1 (leave it out for no limit), got 0"),
        (["--top-k", "-3"], "--top-k must be at least 1 (leave it out for no limit), got -3"),
        (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--top-p", "nan"], "--top-p must be a finite number, got nan"),
        (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1, got -1"),
    ],
)
def test_out_of_range_sampling_values(capsys, run, flags, message):
    assert error_line(capsys, ["generate", "the", "--model", run, *flags], run) == f"potion: error: {message}"


@pytest.mark.parametrize(
    "toml, message",
    [
        (None, "unknown config key 'colour'"),
        (None, "--set n_layer: 'many' is not a valid int"),
        ("[model]\ncolour = 1\n", "[model]: unknown key(s) colour; known keys:"),
        ('[model]\nn_layer = "six"\n', "[model] n_layer: expected int, got str 'six'"),
        ("[train]\nlearning_rate = true\n", "[train] learning_rate: expected float, got bool True"),
        ("[colour]\nred = 1\n", "unknown section(s) ['colour']"),
        ("[model\nn_layer = 2\n", "is not valid TOML"),
    ],
)
def test_unknown_config_keys_and_wrong_types(capsys, tmp_path, toml, message):
    if toml is None:
        extra = ["--set", "colour=blue"] if "colour" in message else ["--set", "n_layer=many"]
    else:
        (tmp_path / "my.toml").write_text(toml)
        extra = ["--config", tmp_path / "my.toml"]
    assert message in train_fails(capsys, tmp_path, "pydocs", *extra)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "learning_rate=nan"], "train.learning_rate must be a finite number, got nan"),
        (["--set", "learning_rate=inf"], "train.learning_rate must be a finite number, got inf"),
        (["--max-time", "nan"], "train.max_time must be a finite number, got nan"),
        (["--set", "beta2=1.5"], "train.beta2 must be in [0, 1), got 1.5"),
        (["--seed", "99999999999999999999"], "train.seed must be between 0 and 2**63 - 1"),
    ],
)
def test_non_finite_and_out_of_range_training_numbers(capsys, tmp_path, flags, message):
    assert message in train_fails(capsys, tmp_path, "pydocs", *flags)


def test_an_evaluation_gone_non_finite_is_neither_probed_nor_sampled(capsys, tmp_path, monkeypatch):
    """Explaining or sampling a model whose loss is NaN would only fail; the non-finite streak check reports it."""
    real = training_loop.estimate_loss
    calls = []

    def nan_after_step_0(*args):
        calls.append(1)
        return real(*args) if len(calls) <= 2 else float("nan")  # step 0 measures both splits

    monkeypatch.setattr(training_loop, "estimate_loss", nan_after_step_0)
    (tmp_path / "words.txt").write_text("the cat sat on a mat and the dog ran far away home\n" * 400)
    probing = ["--set", "sample_tokens=5", "--probe", "the cat", "--max-steps", "10", "--eval-every", "5"]
    code = main([str(a) for a in ["train", "--data", tmp_path / "words.txt", *SETS, *probing, "--out", tmp_path / "o"]])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, err
    assert [p.name for p in (tmp_path / "o" / "probes").iterdir()] == ["step-00000000.json"]


def test_a_model_too_big_for_this_machine_is_refused_before_allocating(capsys, tmp_path):
    huge = ["--set", "n_layer=100000", "--set", "n_embd=65536", "--set", "n_head=64"]
    line = train_fails(capsys, tmp_path, "pydocs", *huge)
    assert "this training needs at least 82.5 PB of memory (5,153,97" in line  # the rest depends on the vocabulary
    assert "weights, 100,000 layers of width 65,536, batch_size 8 x context_length 32) and" in line
    assert line.endswith("is available; make the model or the batch smaller")


@pytest.fixture
def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "copy")
    return tmp_path / "copy"


def test_run_directory_from_a_newer_potion(capsys, copy_of):
    body = json.loads((copy_of / "config.json").read_text())
    (copy_of / "config.json").write_text(json.dumps({**body, "format_version": 99}))
    for argv in (
        ["generate", "--model", copy_of],
        ["eval", "--model", copy_of],
        ["train", "--resume", "--out", copy_of],
    ):
        line = error_line(capsys, argv, copy_of)
        assert f"'{copy_of}' was written by a newer potion (format 99; this one reads up to 1); upgrade potion" in line
    # text from the file is quoted, and the error stays one line whatever it holds (found by tests/test_fuzz_cli.py)
    (copy_of / "config.json").write_text(json.dumps({**body, "format_version": "1\n2"}))
    assert "(format '1\\n2'; this one reads up to 1)" in error_line(capsys, ["generate", "--model", copy_of], copy_of)


def test_corrupt_config_json(capsys, copy_of):
    (copy_of / "config.json").write_text('{"model": {"n_layer": 2,')
    for argv in (["generate", "--model", copy_of], ["train", "--resume", "--out", copy_of]):
        assert f"'{copy_of / 'config.json'}' is damaged" in error_line(capsys, argv, copy_of)


def test_existing_out_without_resume(capsys, run):
    line = error_line(capsys, ["train", "--data", "pydocs", "--out", run, "--quiet"], run)
    assert f"run directory '{run}' already exists; pass --resume to continue it or choose another --out" in line


def test_missing_run_directory(capsys, tmp_path):
    for argv in (
        ["generate", "--model", tmp_path / "nowhere"],
        ["eval", "--model", tmp_path / "nowhere"],
        ["train", "--resume", "--out", tmp_path / "nowhere"],
    ):
        assert f"run directory '{tmp_path / 'nowhere'}' does not exist" in error_line(capsys, argv)
    assert not (tmp_path / "nowhere").exists()


def test_not_a_run_directory(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert "is not a potion run directory (no config.json)" in error_line(
        capsys, ["generate", "--model", tmp_path], tmp_path
    )
