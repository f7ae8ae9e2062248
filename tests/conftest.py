import os
import random
import warnings
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Token and corpus caches go to a temporary folder, never the user's ~/.cache."""
    os.environ["POTION_CACHE"] = str(tmp_path_factory.mktemp("potion-cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not here (the tests look for ../shared/data beside the project)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small corpus of random twelve-word lines from a dozen words: the training tests' text."""
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran far away home".split()
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(800)) + "\n")
    return path


@pytest.fixture
def quiet_machine(monkeypatch):
    """One thread (two threads of a tiny model mostly wait for each other), and warnings routed back after main()."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    shown = warnings.showwarning
    yield
    warnings.showwarning = shown  # main() routes warnings to one "potion: warning:" line
