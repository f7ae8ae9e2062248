import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from potion import DataConfig, PotionError
from potion.data.tokens import Batches, find_files, prepare, read_blocks

ROOT = Path(__file__).resolve().parents[1]


def test_directory_glob_and_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first document")
    (tmp_path / "two.md").write_text("second document")
    (tmp_path / ".hidden").write_text("never read")
    assert [p.name for p in find_files(str(tmp_path))] == ["one.txt", "two.md"]
    assert [p.name for p in find_files(str(tmp_path / "**" / "*.txt"))] == ["one.txt"]
    assert find_files(str(tmp_path / "two.md")) == [tmp_path / "two.md"]


def test_documents_are_separated_by_end_of_text_and_cached(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    first = prepare(DataConfig(data=str(tmp_path)), quiet=True)
    tok = first.tokenizer
    assert tok.decode(first.tokens.tolist()) == "hello<|endoftext|>world<|endoftext|>"
    assert first.tokens.dtype == np.uint16
    second = prepare(DataConfig(data=str(tmp_path)), quiet=True)
    assert second.folder == first.folder  # same content and tokenizer: the cached token file is reused
    (tmp_path / "b.txt").write_text("world!")
    assert prepare(DataConfig(data=str(tmp_path)), quiet=True).folder != first.folder


def test_split_is_deterministic_last_part_is_validation(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 10)
    tf = prepare(DataConfig(data=str(tmp_path / "a.txt"), val_fraction=0.1), quiet=True)
    train, val = tf.split(0.1)
    assert len(val) == len(tf.tokens) // 10 and np.array_equal(np.concatenate([train, val]), tf.tokens)


def test_bpe_tokenizer_on_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 50)
    tf = prepare(DataConfig(data=str(tmp_path / "a.txt"), tokenizer="bpe", bpe_vocab_size=300), quiet=True)
    assert tf.tokenizer.kind == "bpe" and tf.tokenizer.vocab_size <= 300
    assert tf.tokenizer.decode(tf.tokens.tolist()).startswith("the quick brown fox")


def test_batches_are_shifted_windows_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    b = Batches(tokens, 8, 4, seed=0)
    x, y = b.next()
    assert x.shape == (4, 8) and bool((y == x + 1).all())
    state = b.state()
    after = b.next()[0]
    b.set_state(state)
    assert bool((b.next()[0] == after).all())


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"abc\x00\x01\x02", "binary file.*offset 3"),
        (b"caf\xc3\xa9 ok \xff\xfe", "not valid UTF-8 at byte offset 9"),
    ],
)
def test_bad_files(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(PotionError, match=message):
        prepare(DataConfig(data=str(f)), quiet=True)


def test_invalid_utf8_offset_across_blocks(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"a" * 10 + "é".encode() + b"b" * 5 + b"\xff")
    with pytest.raises(PotionError, match="offset 17"):
        list(read_blocks(f, block_bytes=11))  # the two-byte 'é' straddles the first block boundary


def test_missing_data_and_empty_glob(tmp_path):
    with pytest.raises(PotionError, match="not a file, a directory"):
        find_files(str(tmp_path / "nope.txt"))
    with pytest.raises(PotionError, match="matches no files"):
        find_files(str(tmp_path / "*.txt"))


def test_corpus_smaller_than_context(tmp_path):
    with pytest.raises(PotionError, match="needs at least"):
        Batches(np.arange(10, dtype=np.uint16), 64, 2, seed=0, split="training")


def test_pydocs_builtin_corpus():
    files = find_files("pydocs")
    assert len(files) > 20
    assert sum(p.stat().st_size for p in files) > 1_000_000


SLOW_TOKENIZING = """
import sys, time
import potion.data.tokens as data
encode = data._encode_item
def slowly(item):  # a block at a time, slowly enough for the test to kill the process in the middle
    time.sleep(0.5)
    return encode(item)
data._encode_item = slowly
data.prepare(data.DataConfig(data=sys.argv[1]), quiet=True)
"""


def test_a_kill_while_tokenizing_leaves_no_cache_that_a_later_run_trusts(tmp_path, monkeypatch):
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away home".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(200_000)))  # 10 MB: 3 blocks
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TOKENIZING, str(corpus)],
        env={**os.environ, "POTION_CACHE": str(cache), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not any(p.stat().st_size for p in cache.glob("tokens/*.tmp*/tokens.bin")) and time.time() < deadline:
        assert process.poll() is None, "tokenizing ended before it could be killed"
        time.sleep(0.01)
    process.kill()  # SIGKILL: nothing runs after it
    process.wait()
    (partial,) = cache.glob("tokens/*.tmp*")
    assert not (partial / "meta.json").exists()
    assert [p for p in (cache / "tokens").iterdir() if p != partial] == []  # nothing under the final name

    monkeypatch.setenv("POTION_CACHE", str(cache))
    again = prepare(DataConfig(data=str(corpus)), quiet=True)
    monkeypatch.setenv("POTION_CACHE", str(tmp_path / "clean"))
    clean = prepare(DataConfig(data=str(corpus)), quiet=True)
    assert len(again.tokens) == corpus.stat().st_size + 1  # every character, then end-of-text
    assert np.array_equal(again.tokens, clean.tokens)
    assert not partial.exists()  # the killed process's leftovers are gone


def resident_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status here (not Linux)")


def test_training_batches_read_the_token_file_without_keeping_it_resident(tmp_path):
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(1 << 20)) * 40)  # 40 MB of tokens
    token_file = prepare(DataConfig(data=str(tmp_path / "a.txt")), quiet=True)
    train, _ = token_file.split(0.1)
    before = resident_file_mb()
    batches = Batches(train, 64, 32, seed=0)
    for _ in range(300):  # 9,600 windows at random places: a mapping would keep megabytes around each resident
        x, y = batches.next()
    assert resident_file_mb() - before < 8
    # the same windows as from the array in memory
    in_memory = Batches(np.asarray(token_file.tokens[: len(train)]), 64, 32, seed=0)
    again = Batches(train, 64, 32, seed=0)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(in_memory.next(), again.next()))


def test_tokenizing_workers_that_cannot_start_fall_back_to_this_process(tmp_path):
    """Worker processes import the main script again; a script read from stdin cannot be, and an unguarded one
    would run again in them. Tokenizing then finishes in the process itself instead of waiting forever."""
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(1 << 20)) * 17)  # 17 MB: workers
    script = (
        "from potion import DataConfig\n"
        "from potion.data.tokens import prepare\n"
        f"print(len(prepare(DataConfig(data={str(tmp_path / 'a.txt')!r}), quiet=True).tokens))\n"
    )
    result = subprocess.run(
        [sys.executable, "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "POTION_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(17 * (1 << 20) + 1)
    assert "the tokenizing worker processes could not start" in result.stderr
