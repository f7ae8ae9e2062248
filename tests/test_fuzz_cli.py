"""No input ends in a traceback: the `potion` command, driven in-process with generated flag values, --set pairs,
prompts (any Unicode, control characters, lone surrogates, very long) and damaged run directories (cut short,
bit-flipped, swapped, deleted or edited files), either succeeds (exit 0) or prints one `potion: error:` line
(exit 2); and a command that only reads a run directory leaves its files byte-identical.

CI runs a fixed (derandomized) few hundred examples. For a longer, random search:

    POTION_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz_cli.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from potion.cli import main
from potion.config import SECTIONS, resolve
from potion.formats.fileio import sha256_file
from potion.train.loop import train

FUZZ_EXAMPLES = int(os.environ.get("POTION_FUZZ_EXAMPLES", "0"))


def fuzz_settings(ci_examples: int):
    """ci_examples, the same ones every run, in CI; POTION_FUZZ_EXAMPLES random ones when it is set."""
    return settings(
        max_examples=FUZZ_EXAMPLES or ci_examples,
        derandomize=not FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


TINY = [
    "n_layer=1",
    "n_embd=16",
    "n_head=2",
    "context_length=16",
    "batch_size=4",
    "eval_batches=1",
    "eval_every=2",
    "sample_tokens=0",
    "warmup_steps=1",
    "max_time=0",
]
CORPUS = "the cat sat on a mat and the dog ran far away home\n" * 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny character-level run with a model, two checkpoints and a log: what the damage is done to."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "words.txt").write_text(CORPUS)
    torch.set_num_threads(1)
    train(resolve("tiny", None, [*TINY, f"data={folder / 'words.txt'}", "max_steps=2"]), folder / "run", quiet=True)
    return folder / "run"


# ---------------------------------------------------------------- running the command


def run_potion(argv: list[str]) -> tuple[int, str, str]:
    """potion's main() in this process: (exit code, stdout, stderr). Any exception but a clean exit fails the test."""
    # like a terminal's: stdout takes only text that encodes as UTF-8; stderr escapes what does not
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    shown = warnings.showwarning
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        warnings.showwarning = shown  # main() routes warnings to one "potion: warning:" line
    return code, written(out), written(err)


def written(stream: io.TextIOWrapper) -> str:
    stream.flush()
    return stream.buffer.getvalue().decode("utf-8")


def check_outcome(argv: list[str]) -> int:
    code, out, err = run_potion(argv)
    lines = err.strip("\n").splitlines()
    if code == 0:
        assert "potion: error" not in err, err
    else:
        assert code == 2, f"exit code {code}: {err[-2000:]}"
        assert lines and lines[-1].startswith("potion: error: "), err[-2000:]
        assert sum(line.startswith("potion: error") for line in lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert all(line.startswith("potion: ") or not line.strip() for line in lines), err[-2000:]  # nothing but potion's
    event(f"{argv[0]}: " + ("ok" if code == 0 else re.sub(r"'?/tmp/\S+", "PATH", lines[-1][15:])[:50]))
    return code


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def copy_of(run: Path):
    with tempfile.TemporaryDirectory(prefix="potion-fuzz-") as tmp:
        shutil.copytree(run, Path(tmp) / "run")
        yield Path(tmp) / "run"


# ---------------------------------------------------------------- what is generated

# any code point, with the troublesome ones often: control characters, a NUL, lone surrogates (command-line bytes
# that are not UTF-8 arrive as those), a byte-order mark, right-to-left override, combining marks, emoji
NASTY = st.sampled_from(["\udcff", "\ud800", "\x00", "\r", "\x1b[31m", "\ufeff", "\u202e", "e\u0301", "😀", "\n"])
VOCABULARY = st.sampled_from(sorted(set(CORPUS)))
ANY_TEXT = st.lists(st.one_of(st.characters(exclude_categories=()), NASTY), max_size=40).map("".join)
MOSTLY_KNOWN = st.lists(st.one_of(VOCABULARY, VOCABULARY, VOCABULARY, NASTY), max_size=60).map("".join)
LONG_TEXT = st.builds(lambda unit, n: unit * n, st.text(VOCABULARY, min_size=1, max_size=5), st.integers(100, 3000))
PROMPTS = st.one_of(st.just(""), ANY_TEXT, st.text(VOCABULARY, max_size=80), MOSTLY_KNOWN, LONG_TEXT)
GOOD_PROMPTS = st.text(VOCABULARY, min_size=1, max_size=40)  # often, so that most examples get as far as the model
PROMPTS = st.one_of(PROMPTS, GOOD_PROMPTS, GOOD_PROMPTS, GOOD_PROMPTS)
SPECIAL_FLOATS = st.sampled_from(["nan", "inf", "-inf", "-0.0", "1e308", "1e-320", "-1", "0", "1", "0.5"])
FLOATS = st.one_of(SPECIAL_FLOATS, st.floats(allow_nan=True, allow_infinity=True).map(repr))
SMALL_INTS = st.integers(-3, 6).map(str)
INTS = st.one_of(SMALL_INTS, st.sampled_from(["0", str(2**63), str(-(2**63)), str(10**30), "-1"]))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


def flag(name: str, sensible, wild=None) -> st.SearchStrategy:
    """Nothing, or --name=VALUE (one argument, so that a value starting with '-' is a value): a sensible value
    twice as often as a wild one, so that most examples get past the checks and run."""
    wild = ANY_TEXT if wild is None else wild
    value = st.one_of(sensible, sensible, wild).map(lambda v: [f"{name}={v}"])
    return st.one_of(st.just([]), st.just([]), value)


def flags(*options) -> st.SearchStrategy:
    return st.tuples(*options).map(lambda parts: [a for part in parts for a in part])


def between(low: int, high: int) -> st.SearchStrategy:
    return st.integers(low, high).map(str)


KNOWN_TEXT = st.text(VOCABULARY, min_size=1, max_size=20)
GENERATE_FLAGS = flags(
    flag("--max-new-tokens", between(0, 12), between(-2, 12)),
    flag("--temperature", st.floats(0, 3).map(repr), FLOATS),
    flag("--top-k", between(1, 30), INTS),
    flag("--top-p", st.floats(0.01, 1).map(repr), FLOATS),
    flag("--seed", between(0, 2**63 - 1), INTS),
    flag("--num-samples", between(1, 2), between(-1, 2)),
    flag("--stop", KNOWN_TEXT),
    flag("--decode-dtype", st.sampled_from(["auto", "fp32", "bf16"]), st.sampled_from(["fp16", ""])),
    st.sampled_from([[], ["--json"]]),
)
EXPLAIN_FLAGS = flags(
    flag("--token", between(-1, 0), INTS),  # the tiny model: one layer, two heads
    flag("--layer", between(0, 0), INTS),
    flag("--head", between(0, 1), INTS),
    flag("--top-k", between(1, 10), INTS),
    flag("--expect", KNOWN_TEXT),
    st.sampled_from([[], ["--json"]]),
)


@st.composite
def read_commands(draw, run: Path) -> list[str]:
    command = draw(st.sampled_from(["generate", "explain", "eval"]))
    if command == "generate":
        return ["generate", "--model", str(run), *draw(GENERATE_FLAGS), "--", draw(PROMPTS)]
    if command == "explain":
        return ["explain", "--model", str(run), *draw(EXPLAIN_FLAGS), "--", draw(GOOD_PROMPTS | PROMPTS)]
    data = draw(st.one_of(st.none(), PROMPTS))
    if data is None:
        return ["eval", "--model", str(run), "--json"]
    (run.parent / "eval.txt").write_text(data, encoding="utf-8", errors="surrogatepass")
    return ["eval", "--model", str(run), "--data", str(run.parent / "eval.txt"), "--json"]


# ---------------------------------------------------------------- damage


def damage_choices(run: Path, with_checkpoints: bool) -> list[str]:
    files = [str(p.relative_to(run)) for p in sorted(run.rglob("*")) if p.is_file()]
    return files if with_checkpoints else [f for f in files if not f.startswith("checkpoints/")]


@st.composite
def damage(draw, run: Path, with_checkpoints: bool = False):
    """One of: nothing, a file cut short, a flipped bit, two files swapped, a file deleted, a config.json value
    replaced, a file's bytes replaced. Applied to `run` in place; returns a description."""
    kinds = ["truncate", "flip", "swap", "delete", "config", "replace"] + (["state"] if with_checkpoints else [])
    kind = draw(st.sampled_from(kinds) | st.just("none"))
    files = damage_choices(run, with_checkpoints)
    name = draw(st.sampled_from(files))
    path = run / name
    if kind == "truncate":
        size = path.stat().st_size
        path.write_bytes(path.read_bytes()[: draw(st.integers(0, max(size - 1, 0)))])
    elif kind == "flip":
        data = bytearray(path.read_bytes())
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            path.write_bytes(bytes(data))
    elif kind == "swap":
        other = run / draw(st.sampled_from(files))
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
    elif kind == "delete":
        path.unlink()
    elif kind == "config":
        body = json.loads((run / "config.json").read_text())
        section = draw(st.sampled_from(["model", "data", "train", "format_version", "extra"]))
        if section in ("format_version", "extra"):
            body[section] = draw(JSON_VALUES)
        else:
            key = draw(st.sampled_from([k for k in body[section] if k != "data"] + ["unknown"]))
            body[section][key] = draw(st.one_of(JSON_VALUES, st.integers(-5, 100_000)))
        (run / "config.json").write_text(json.dumps(body))
    elif kind == "replace":
        path.write_bytes(draw(st.binary(max_size=200)))
    elif kind == "state" and with_checkpoints:
        path = sorted(run.glob("checkpoints/step-*/state.json"))[-1]
        body = json.loads(path.read_text())
        body[draw(st.sampled_from([*body, "unknown"]))] = draw(st.one_of(JSON_VALUES, st.integers(-5, 100)))
        path.write_text(json.dumps(body))
    if with_checkpoints and path.parent.name.startswith("step-") and draw(st.booleans()):
        forge_marker(path.parent)  # as a stranger's run would be: damaged, with a marker that agrees
    return f"{kind} {name}"


def forge_marker(checkpoint: Path) -> None:
    hashes = {p.name: sha256_file(p) for p in checkpoint.iterdir() if p.name != "COMPLETE" and p.is_file()}
    (checkpoint / "COMPLETE").write_text(json.dumps({"sha256": hashes}))


# ---------------------------------------------------------------- the properties


@fuzz_settings(ci_examples=300)
@given(data=st.data())
def test_reading_a_run_never_ends_in_a_traceback(trained, data):
    with copy_of(trained) as run:
        data.draw(damage(run), label="damage")
        before = snapshot(run)
        check_outcome(data.draw(read_commands(run), label="argv"))
        assert snapshot(run) == before  # generate, eval and explain never write into a run directory


# Fields whose large values only make a run long, not wrong: kept small so that an example takes a moment.
SLOW_WHEN_LARGE = {"sample_tokens", "grad_accum", "eval_batches", "batch_size", "context_length", "n_layer"}
SLOW_WHEN_LARGE |= {"n_embd", "mlp_ratio", "max_steps", "eval_every", "checkpoint_every", "warmup_steps"}
NOT_GENERATED = {"data", "compile", "vocab_size"}  # the corpus is the test's own; compiling takes a minute


CHOICES = {
    "positions": ["learned", "rope"],
    "norm": ["layernorm", "rmsnorm"],
    "mlp_activation": ["gelu", "relu2"],
    "tokenizer": ["char", "bpe"],
    "schedule": ["cosine", "wsd"],
    "optimizer": ["adamw", "muon"],
    "device": ["auto", "cpu", "cuda"],
    "dtype": ["auto", "bf16", "fp32"],
}


def set_values(section: str, f) -> st.SearchStrategy:
    """KEY=VALUE for one field: a value of its type and in a sensible range twice as often as an extreme one
    (NaN, infinities, 2**63, negative numbers) and now and then text that is not of its type at all."""
    small = f.name in SLOW_WHEN_LARGE
    sensible = {
        "int": between(1, 3 if small else 8),
        "float": st.floats(0, 1).map(repr),
        "bool": st.sampled_from(["true", "false"]),
        "str": st.sampled_from(CHOICES[f.name]) if f.name in CHOICES else KNOWN_TEXT,
    }[f.type]
    extreme = {
        "int": SMALL_INTS if small else INTS,
        "float": FLOATS,
        "bool": st.sampled_from(["yes", "0", "maybe", ""]),
        "str": st.sampled_from(sorted({c for cs in CHOICES.values() for c in cs})),
    }[f.type]
    key = st.sampled_from([f.name, f"{section}.{f.name}"])
    value = st.one_of(sensible, sensible, sensible, extreme, extreme, ANY_TEXT)
    return st.tuples(key, value).map(lambda kv: f"{kv[0]}={kv[1]}")


SET_PAIRS = st.one_of(
    [set_values(s, f) for s, klass in SECTIONS.items() for f in fields(klass) if f.name not in NOT_GENERATED]
    + [ANY_TEXT]  # not KEY=VALUE at all, or an unknown key
)
TRAIN_FLAGS = flags(
    flag("--eval-every", between(1, 3), SMALL_INTS),
    flag("--checkpoint-every", between(0, 3), SMALL_INTS),
    flag("--seed", between(0, 2**63 - 1), INTS),
    flag("--max-time", st.sampled_from(["0", "1e308", "600"]), st.sampled_from(["nan", "inf", "-1"])),
    flag("--probe", GOOD_PROMPTS, PROMPTS),
    flag("--device", st.sampled_from(["auto", "cpu"]), st.sampled_from(["cuda", "mps"])),
)


@fuzz_settings(ci_examples=100)
@given(sets=st.lists(SET_PAIRS, max_size=4), more=TRAIN_FLAGS, steps=st.integers(0, 2))
def test_training_with_any_settings_never_ends_in_a_traceback(trained, sets, more, steps):
    corpus = trained.parent / "words.txt"
    with tempfile.TemporaryDirectory(prefix="potion-fuzz-") as tmp:
        argv = ["train", "--data", str(corpus), *[a for s in TINY for a in ("--set", s)]]
        argv += [*[a for s in sets for a in ("--set", s)], *more, "--max-steps", str(steps), "--quiet"]
        check_outcome([*argv, "--out", str(Path(tmp) / "run")])


@fuzz_settings(ci_examples=100)
@given(data=st.data(), steps=st.integers(0, 4))
def test_resuming_a_damaged_run_never_ends_in_a_traceback(trained, data, steps):
    with copy_of(trained) as run:
        data.draw(damage(run, with_checkpoints=True), label="damage")
        before = snapshot(run)
        code = check_outcome(["train", "--resume", "--out", str(run), "--max-steps", str(steps), "--quiet"])
        if code == 2:  # refused: the run directory is as it was
            assert snapshot(run) == before
