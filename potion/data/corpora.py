"""Built-in corpora: `pydocs` (offline, from the running Python's own documentation), `pydocs-chat` (conversations
about the standard library, answered from the same docstrings) and `shakespeare`."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import urllib.request
from pathlib import Path

from potion.errors import PotionError
from potion.formats.fileio import sha256_file

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BUILTIN = ("pydocs", "pydocs-chat", "shakespeare")
CHAT_VERSION = 1  # of the way pydocs-chat's conversations are written: a change writes them again


def cache_root() -> Path:
    """Where corpora and token files are cached: $POTION_CACHE, else ~/.cache/potion."""
    return Path(os.environ.get("POTION_CACHE") or Path.home() / ".cache" / "potion")


def builtin_path(name: str) -> Path:
    if name == "pydocs":
        return pydocs_dir()
    if name == "pydocs-chat":
        return pydocs_chat_dir()
    return shakespeare_file()


def pydocs_dir() -> Path:
    """English prose from this Python's documentation: the pydoc topics and the standard library's docstrings.

    Written once per Python version as one text file per top-level module (each file is one document).
    Sources are parsed with `ast`, never imported, so nothing in the standard library runs.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return built_once(cache_root() / "corpora" / f"pydocs-{version}", write_pydocs)


def write_pydocs(folder: Path) -> None:
    try:
        from pydoc_data.topics import topics

        topics_text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
        (folder / "_topics.txt").write_text(topics_text, encoding="utf-8")
    except ImportError:  # some distributions strip pydoc_data; the docstrings are enough
        pass
    for name, text in sorted(_module_docstrings(stdlib_dir()).items()):
        if len(text) > 200:
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def built_once(folder: Path, write) -> Path:
    """folder, written by write(tmp) into a temporary folder and renamed into place the first time it is asked for
    (a process killed half-way leaves only the temporary folder)."""
    if (folder / ".complete").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    write(tmp)
    (tmp / ".complete").write_text("")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first; a copy of ours left behind would only take space
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def public_modules(stdlib: Path):
    """(dotted module name, its parsed source) for the public modules of the standard library, parsed with
    `ast`, never imported, so nothing in it runs."""
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if any(p in skip or p.startswith("_") and p != "__init__.py" for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        dotted = [p.removesuffix(".py") for p in parts]
        yield ".".join(dotted[:-1] if dotted[-1] == "__init__" else dotted), tree


def _module_docstrings(stdlib: Path) -> dict[str, str]:
    """Top-level module name -> its docstrings (module, classes, functions), in source order."""
    found: dict[str, list[str]] = {}
    for name, tree in public_modules(stdlib):
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40 and doc not in docs:
                    docs.append(doc)
        if docs:
            found.setdefault(name.partition(".")[0], []).extend(docs)
    return {name: "\n\n".join(docs) + "\n" for name, docs in found.items()}


# ---------------------------------------------------------------- pydocs-chat

QUESTIONS = (
    "What does {name} do?",
    "What is {name} for?",
    "Can you explain {name}?",
    "Tell me what {name} does.",
    "In Python, what does {name} do?",
    "What's the purpose of {name}?",
    "I'm reading code that calls {name}. What does it do?",
    "Briefly, what does {name} do?",
)
CLASS_QUESTIONS = ("What is {name}?", "What is the {short} class in {module} for?", "Explain the {name} class.")
USAGE = "How do I call {name}?"  # answered with the signature first
FOLLOW_UPS = ("And {name}?", "What about {name}?", "And what does {name} do?")
SYSTEMS = (
    "You are a helpful assistant who answers questions about Python's standard library.",
    "Answer in a sentence or two, from the Python documentation.",
    "You are an expert Python programmer. Be brief.",
)


def pydocs_chat_dir() -> Path:
    """Conversations about this Python's standard library, as chats JSONL: a question about a function, class or
    method ("What does json.dumps do?", in several phrasings, sometimes after a system message, sometimes with a
    follow-up), answered with the first paragraph of its docstring. Written once per Python version, shuffled
    with a fixed seed, so the validation split (the last conversations) is a spread of held-out names."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return built_once(cache_root() / "corpora" / f"pydocs-chat-{version}-v{CHAT_VERSION}", write_pydocs_chat)


def write_pydocs_chat(folder: Path) -> None:
    rng = random.Random(0)
    entries = documented_names(stdlib_dir())
    rng.shuffle(entries)
    with open(folder / "pydocs-chat.jsonl", "w", encoding="utf-8") as f:
        i = 0
        while i < len(entries):
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
            messages += question_and_answer(entries[i], rng)
            i += 1
            if i < len(entries) and rng.random() < 0.2:  # a second question in the same conversation
                follow_up = question_and_answer(entries[i], rng)
                follow_up[0]["content"] = rng.choice(FOLLOW_UPS).format(name=entries[i]["name"])
                messages, i = messages + follow_up, i + 1
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def question_and_answer(entry: dict, rng: random.Random) -> list[dict]:
    name, answer = entry["name"], entry["summary"]
    if entry["kind"] == "class":
        module, _, short = name.rpartition(".")
        question = rng.choice(CLASS_QUESTIONS).format(name=name, short=short, module=module)
    elif rng.random() < 0.15:
        question, answer = USAGE.format(name=name), f"Call it as `{entry['signature']}`. {answer}"
    else:
        question = rng.choice(QUESTIONS).format(name=name)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def documented_names(stdlib: Path) -> list[dict]:
    """The public functions, classes and methods of the standard library whose docstring opens with a summary
    that reads as an answer: {"name", "kind", "signature", "summary"}, sorted by name."""
    found = {}
    for module, tree in public_modules(stdlib):
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                add_entry(found, f"{module}.{node.name}", node)
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for method in node.body:
                    if isinstance(method, ast.FunctionDef) and not method.name.startswith("_"):
                        add_entry(found, f"{module}.{node.name}.{method.name}", method, is_method=True)
    return [found[name] for name in sorted(found)]


def add_entry(found: dict, name: str, node, is_method: bool = False) -> None:
    summary = docstring_summary(ast.get_docstring(node) or "", node.name)
    if summary is None:
        return
    kind = "class" if isinstance(node, ast.ClassDef) else "function"
    signature = ""
    if kind == "function":
        args = node.args
        if is_method and args.posonlyargs + args.args:  # self or cls is not what a caller passes
            args = ast.arguments(**{**vars(args), **positional_without_first(args)})
        signature = f"{name}({ast.unparse(args)})"
    found[name] = {"name": name, "kind": kind, "signature": signature, "summary": summary}


def positional_without_first(args: ast.arguments) -> dict:
    if args.posonlyargs:
        return {"posonlyargs": args.posonlyargs[1:]}
    return {"args": args.args[1:]}


def docstring_summary(doc: str, short_name: str) -> str | None:
    """The first paragraph of a docstring on one line, when it reads as an answer: not a signature line, not an
    example, not a lead-in to a list, of a sentence or a few."""
    summary = " ".join(doc.split("\n\n")[0].split())
    if not 20 <= len(summary) <= 400 or ">>>" in summary or summary.endswith(":"):
        return None
    if summary.startswith((f"{short_name}(", "Deprecated", "DEPRECATED")):
        return None
    return summary


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
