"""A corpus's files: found from a path, a folder, a glob or a built-in name, read as UTF-8 text in blocks, and
hashed into the key of the cache entries made from them (token files, conversations).
"""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from potion.data.corpora import BUILTIN, builtin_path
from potion.errors import PotionError
from potion.formats.fileio import fsync_dir, fsync_file, hash_file, process_exists

BLOCK_BYTES = 4 << 20  # read and tokenize 4 MB at a time


def absolute_data(spec: str) -> str:
    """A local path or glob made absolute, so a run's config.json still finds its data from another folder."""
    if spec in BUILTIN and not Path(spec).exists():
        return spec
    local = os.path.expanduser(spec)
    if Path(local).exists() or any(ch in spec for ch in "*?["):
        return os.path.abspath(local)
    return spec


def find_files(spec: str) -> list[Path]:
    """A file, a directory (its files, recursively), a glob, or a built-in corpus name."""
    if spec in BUILTIN and not Path(spec).exists():
        spec = str(builtin_path(spec))
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise PotionError(f"data directory '{spec}' has no files")
        return files
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise PotionError(f"data glob '{spec}' matches no files")
        return files
    raise PotionError(f"data '{spec}' is not a file, a directory, a glob or a built-in corpus ({', '.join(BUILTIN)})")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """Decode a UTF-8 file block by block; a NUL byte or invalid UTF-8 is an error naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            raw = f.read(block_bytes)
            final = not raw
            nul = raw.find(b"\0")
            if nul >= 0:
                raise PotionError(
                    f"'{path}' looks like a binary file (a NUL byte at byte offset {offset + nul}); "
                    "potion trains on text"
                )
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                pending = len(decoder.getstate()[0]) if not final else 0
                bad = offset - pending + e.start
                raise PotionError(
                    f"'{path}' is not valid UTF-8 at byte offset {max(bad, 0)}; convert it to UTF-8 first"
                ) from None
            offset += len(raw)
            if text:
                yield text
            if final:
                return


def check_not_empty(files: list[Path]) -> list[Path]:
    nonempty = [p for p in files if p.stat().st_size > 0]
    if not nonempty:
        raise PotionError(
            f"data file '{files[0]}' is empty" if len(files) == 1 else f"all {len(files)} data files are empty"
        )
    return nonempty


def corpus_key(files: list[Path]) -> str:
    """sha256 over every file's bytes (and its position in the list): the cache key of the corpus."""
    h = hashlib.sha256()
    for i, p in enumerate(files):
        h.update(f"{i}:{p.stat().st_size}:".encode())
        hash_file(h, p)
    return h.hexdigest()


def iter_documents_blocks(files: list[Path]) -> Iterator[str]:
    for p in files:
        yield from read_blocks(p)


# ---------------------------------------------------------------- cache entries


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def remove_abandoned(folder: Path) -> None:
    """Temporary folders for this cache entry left by processes that were killed (their process is gone)."""
    for tmp in folder.parent.glob(folder.name + ".tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: Path, folder: Path, names: tuple[str, ...]) -> None:
    """A cache entry written in the temporary folder `tmp`, synced and renamed into place once every file is on
    disk: a process killed half-way (or a machine that loses power) leaves only a temporary folder, never an entry
    that a later run would trust."""
    for name in names:
        fsync_file(tmp / name)
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote the same cache entry first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(folder.parent)
