"""Built-in corpora: `pydocs` (offline, from the running Python's own documentation) and `shakespeare`."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import sys
import sysconfig
import urllib.request
from pathlib import Path

from potion.errors import PotionError
from potion.formats.fileio import sha256_file

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BUILTIN = ("pydocs", "shakespeare")


def cache_root() -> Path:
    """Where corpora and token files are cached: $POTION_CACHE, else ~/.cache/potion."""
    return Path(os.environ.get("POTION_CACHE") or Path.home() / ".cache" / "potion")


def builtin_path(name: str) -> Path:
    if name == "pydocs":
        return pydocs_dir()
    return shakespeare_file()


def pydocs_dir() -> Path:
    """English prose from this Python's documentation: the pydoc topics and the standard library's docstrings.

    Written once per Python version as one text file per top-level module (each file is one document).
    Sources are parsed with `ast`, never imported, so nothing in the standard library runs.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache_root() / "corpora" / f"pydocs-{version}"
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        from pydoc_data.topics import topics

        topics_text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
        (tmp / "_topics.txt").write_text(topics_text, encoding="utf-8")
    except ImportError:  # some distributions strip pydoc_data; the docstrings are enough
        pass
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name, text in sorted(_module_docstrings(stdlib).items()):
        if len(text) > 200:
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
    (tmp / ".complete").write_text("")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; a copy of ours left behind would only take space
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _module_docstrings(stdlib: Path) -> dict[str, str]:
    """Top-level module name -> its docstrings (module, classes, functions), in source order."""
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}
    found: dict[str, list[str]] = {}
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(p in skip or p.startswith("_") and p != "__init__.py" for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40 and doc not in docs:
                    docs.append(doc)
        if docs:
            found.setdefault(parts[0].removesuffix(".py"), []).extend(docs)
    return {name: "\n\n".join(docs) + "\n" for name, docs in found.items()}


def shakespeare_file() -> Path:
    """Tiny Shakespeare, downloaded once into the cache and checked against its sha256."""
    path = cache_root() / "corpora" / "tinyshakespeare.txt"
    if path.is_file() and sha256_file(path) == SHAKESPEARE_SHA256:
        return path
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            body = response.read()
    except OSError as e:
        raise PotionError(
            f"could not download Tiny Shakespeare ({e.__class__.__name__}: {e}); "
            "pass a local copy instead: --data path/to/tinyshakespeare.txt"
        ) from None
    if hashlib.sha256(body).hexdigest() != SHAKESPEARE_SHA256:
        raise PotionError(
            f"the file downloaded from {SHAKESPEARE_URL} does not match its known sha256; pass a local copy with --data"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(body)
    tmp.replace(path)
    return path
