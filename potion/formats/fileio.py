"""Files made safe: every file potion writes goes through here.

A file is written under a temporary name beside its final one, flushed to disk and renamed into place, so a
process killed mid-write leaves the previous version intact; a failed write (disk full, no permission) becomes
one PotionError naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from potion.errors import PotionError

CHUNK_BYTES = 1 << 24


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's contents durable (before it is renamed into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_failed(path: Path, e: Exception) -> PotionError:
    reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
    hint = "; free some disk space and resume" if isinstance(e, OSError) and e.errno == errno.ENOSPC else ""
    return PotionError(f"could not write '{path}' ({reason}); the files written before are intact{hint}")


def temporary_name(path: Path) -> Path:
    """Where `path` is written before its rename; `is_leftover` recognises it after a kill."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_leftover(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp" in path.name


def process_exists(pid: int) -> bool:
    """Whether process pid is alive on this machine: the owner of a temporary file or a lock may have been killed."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp_path) fills a temporary file beside `path`; it then replaces `path` in one step.

    A failed write removes the temporary file, leaves `path` as it was and raises a PotionError naming the file.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, (OSError, SafetensorError)):
            raise write_failed(path, e) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def hash_file(h: "hashlib._Hash", path: Path) -> None:
    """Feed a file's bytes into a hash, in chunks: a file never has to fit in memory."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    hash_file(h, path)
    return h.hexdigest()


@contextlib.contextmanager
def new_folder(path: Path) -> Iterator[Path]:
    """Fill a temporary folder beside `path`, which becomes `path` in one rename when the block succeeds.

    `path` must not exist or be empty; on any error the temporary folder is removed and nothing is left behind.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PotionError(f"'{path}' already exists; choose another --out or remove it")
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if path.is_dir():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failed(path, e) from e
        raise
    fsync_dir(path.parent)
