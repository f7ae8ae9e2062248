"""DATA -> documents -> token file (numpy memmap, cached) -> train/validation splits -> batches.

Conversations (chats JSONL) take their own path, in conversations.py.

A corpus is a list of text files; each file is a document, and documents are joined with the end-of-text
token. Files are read and tokenized in blocks, so a corpus of several GB needs bounded memory. The token file
is cached under a key made of the corpus bytes and the tokenizer, so a second run skips tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import warnings
import weakref
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from potion.config import DataConfig
from potion.data.conversations import ConversationFile, chat_files, prepare_conversations
from potion.data.corpora import cache_root
from potion.data.sources import (  # find_files and read_blocks are imported from here too
    check_not_empty,
    corpus_key,
    find_files,
    iter_documents_blocks,
    publish_folder,
    read_blocks,
    remove_abandoned,
    token_dtype,
)
from potion.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer, tokenizer_from_json, train_tokenizer
from potion.errors import PotionError

PARALLEL_BYTES = 16 << 20  # below this a worker pool costs more than it saves


# ---------------------------------------------------------------- tokenizing into a cached token file


@dataclass
class TokenFile:
    """All tokens of a corpus, documents separated by end-of-text, as a read-only memmap."""

    tokens: np.ndarray
    tokenizer: Tokenizer
    folder: Path

    def span(self) -> TokenSpan:
        """All the tokens, read from the file as they are needed."""
        return TokenSpan(self.folder / "tokens.bin", self.tokens.dtype, 0, len(self.tokens))

    def split(self, val_fraction: float) -> tuple[TokenSpan, TokenSpan]:
        """The training and validation tokens (the last val_fraction), read from the file as they are needed."""
        n = len(self.tokens)
        n_val = int(n * val_fraction)
        path, dtype = self.folder / "tokens.bin", self.tokens.dtype
        return TokenSpan(path, dtype, 0, n - n_val), TokenSpan(path, dtype, n - n_val, n)


class TokenSpan:
    """Tokens start..stop of a token file, read when sliced (os.pread) and never mapped: training reads windows at
    random places, and a mapping keeps every page it has touched resident, so the process would grow toward the
    size of the file; reads go through the kernel's page cache, which it frees when memory is short."""

    def __init__(self, path: Path, dtype: np.dtype, start: int, stop: int):
        self.dtype, self.start, self.stop = np.dtype(dtype), start, stop
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        assert step == 1, "a span is read in contiguous slices"
        size = self.dtype.itemsize
        data = os.pread(self.fd, max(stop - start, 0) * size, (self.start + start) * size)
        return np.frombuffer(data, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


def prepare(
    config: DataConfig, tokenizer: Tokenizer | None = None, data: str | None = None, quiet: bool = False
) -> TokenFile | ConversationFile:
    """Tokenize the corpus (or reuse the cached tokens). Without a tokenizer, one is trained on the corpus.
    Conversations (.jsonl files) become a ConversationFile instead: one row of ids and reply mask each."""
    files = check_not_empty(find_files(data or config.data))
    if chat_files(files):
        return prepare_conversations(config, files, tokenizer, quiet)
    key = corpus_key(files)
    if tokenizer is None:
        tok_key = f"{config.tokenizer}{config.bpe_vocab_size if config.tokenizer == 'bpe' else ''}"
    else:
        tok_key = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]
    folder = cache_root() / "tokens" / f"{key[:24]}-{tok_key}"
    if (folder / "meta.json").is_file():
        try:
            return _open_token_file(folder, tokenizer)
        except (OSError, ValueError, KeyError, PotionError):
            shutil.rmtree(folder, ignore_errors=True)  # a damaged cache is rebuilt, never trusted

    if tokenizer is None:
        if not quiet and config.tokenizer == "bpe":  # a character vocabulary takes one quick pass: nothing to announce
            print(f"potion: training a {config.tokenizer} tokenizer on {len(files)} file(s)", file=sys.stderr)
        tokenizer = train_tokenizer(config.tokenizer, lambda: iter_documents_blocks(files), config.bpe_vocab_size)
    remove_abandoned(folder)
    _write_token_folder(folder, files, tokenizer, quiet)
    return _open_token_file(folder, tokenizer)


def _write_token_folder(folder: Path, files: list[Path], tokenizer: Tokenizer, quiet: bool) -> None:
    """Tokenize into a temporary folder beside `folder` and rename it into place once every file is on disk: a
    process killed half-way (or a machine that loses power) leaves only a temporary folder, never a cache entry
    that a later run would trust."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n_tokens = _tokenize_to_file(files, tokenizer, tmp / "tokens.bin", quiet)
    save_tokenizer(tokenizer, tmp / "tokenizer.json")
    meta = {
        "n_tokens": n_tokens,
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "files": [str(p) for p in files],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    publish_folder(tmp, folder, ("tokens.bin", "tokenizer.json", "meta.json"))


def _open_token_file(folder: Path, tokenizer: Tokenizer | None) -> TokenFile:
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = tokenizer or load_tokenizer(folder / "tokenizer.json")
    dtype = np.dtype(meta["dtype"])
    if (folder / "tokens.bin").stat().st_size != meta["n_tokens"] * dtype.itemsize:
        raise ValueError("token file size does not match its metadata")
    tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    return TokenFile(tokens, tokenizer, folder)


def _work_items(files: list[Path]) -> Iterator[tuple[str, str, bool]]:
    """(text, source, ends_document) in blocks of about BLOCK_BYTES, cut at a line or space where possible."""
    for p in files:
        carry = ""
        for block in read_blocks(p):
            text = carry + block
            cut = max(text.rfind("\n"), text.rfind(" "))
            if cut <= 0:
                cut = len(text) - 1
            carry = text[cut + 1 :]
            yield text[: cut + 1], str(p), False
        yield carry, str(p), True


_worker_tokenizer = None


def _init_worker(tokenizer_json: str):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_from_json(tokenizer_json)


def _encode_item(item: tuple[str, str, bool]) -> tuple[np.ndarray, int]:
    text, source, ends_document = item
    ids = _worker_tokenizer.encode_array(text, source)
    if ends_document:
        ids = np.append(ids, _worker_tokenizer.eot_id)
    return ids.astype(token_dtype(_worker_tokenizer.vocab_size)), len(text.encode("utf-8"))


def _tokenize_to_file(files: list[Path], tokenizer: Tokenizer, out: Path, quiet: bool) -> int:
    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=quiet or total_bytes < PARALLEL_BYTES
    )
    workers = min(os.cpu_count() or 1, 8)
    try:
        if total_bytes < PARALLEL_BYTES or workers == 1:
            return _write_tokens(out, _encoded_here(files, tokenizer), bar)
        try:
            return _write_tokens(out, _encoded_in_workers(files, tokenizer, workers), bar)
        except BrokenProcessPool:
            warnings.warn(
                "the tokenizing worker processes could not start (they import the main script again: a script "
                'that trains with potion should run it under `if __name__ == "__main__":`); tokenizing in this '
                "process instead"
            )
            bar.reset()
            return _write_tokens(out, _encoded_here(files, tokenizer), bar)
    finally:
        bar.close()


def _write_tokens(out: Path, encoded: Iterator[tuple[np.ndarray, int]], bar: tqdm) -> int:
    n = 0
    with open(out, "wb") as f:  # from the start: a retry in this process overwrites what the workers wrote
        for ids, n_bytes in encoded:
            ids.tofile(f)
            n += len(ids)
            bar.update(n_bytes)
    return n


def _encoded_here(files: list[Path], tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, int]]:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    return map(_encode_item, _work_items(files))


def _encoded_in_workers(files: list[Path], tokenizer: Tokenizer, workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """The blocks encoded by `workers` processes, in order. At most two blocks per worker are in flight, so the
    text is read only as fast as it is tokenized, never all ahead into memory."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy a torch runtime with live threads
    with ProcessPoolExecutor(workers, ctx, initializer=_init_worker, initargs=(tokenizer.to_json(),)) as pool:
        pending: deque = deque()
        for item in _work_items(files):
            pending.append(pool.submit(_encode_item, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------- batches


class Batches:
    """Random windows of context_length + 1 tokens; the order is a seeded generator whose state can be saved.

    One process of several draws every batch whole, as one process would, and keeps only its `rows` of it: all
    processes follow the same order, whatever their number.
    """

    def __init__(
        self, tokens, context_length: int, batch_size: int, seed: int, split: str = "train", rows: slice = slice(None)
    ):
        """tokens: an array or a TokenSpan (anything with len() and contiguous slices)."""
        if len(tokens) < context_length + 2:
            raise PotionError(
                f"the {split} split has {len(tokens)} tokens; a context of {context_length} needs at least "
                f"{context_length + 2}. Use more text or a smaller context (--set context_length=...)"
            )
        self.tokens, self.window = tokens, context_length + 1
        self.n_windows = len(tokens) - context_length
        self.batch_size, self.rows = batch_size, rows
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, self.n_windows, size=self.batch_size)[self.rows]
        rows = np.stack([self.tokens[s : s + self.window] for s in starts.tolist()])  # (B, T+1)
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def fixed_batches(tokens: np.ndarray, context_length: int, batch_size: int, count: int, seed: int, split: str):
    """The same `count` batches every time: evaluation compares like with like across steps."""
    source = Batches(tokens, context_length, batch_size, seed, split)
    return [source.next() for _ in range(count)]


def sequential_windows(tokens: np.ndarray, context_length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping windows covering the tokens, for a full evaluation pass."""
    for start in range(0, len(tokens) - 1, context_length):
        chunk = np.asarray(tokens[start : start + context_length + 1], dtype=np.int64)
        if len(chunk) >= 2:
            yield chunk[:-1], chunk[1:]
