"""Generation speed at batch 1: prefill tokens/s, and decode tokens/s with the KV cache and without it.

Without the cache every new token reruns the whole context (what a model with no cache must do); with it, a
token costs one position. Cached decoding is timed twice: with fp32 weights (bit-exact with the full forward pass)
and with the bf16 decode weights that `potion generate` uses by default where they are faster; the prompt is
prefilled in fp32 either way, and recomputation runs in fp32, the fastest precision for it on a CPU without bf16
hardware. Decoding is timed over the last --decode tokens before the context is full, so each
new token sees about --context earlier ones in both cases. The model has random weights of a preset's shape
(speed does not depend on what it learned). With --compile, the cached fp32 one-token step is also timed through
torch.compile, with the seconds its compilation took (potion generate does not compile: see docs/benchmarks.md,
"Generation").

Usage (from the project root):
    python benchmarks/generate_speed.py --preset shakespeare-char --context 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import dtype_name, emit, result  # noqa: E402

from potion.config import load_preset  # noqa: E402
from potion.hardware import pick_device, set_threads  # noqa: E402
from potion.infer.generate import decode_one_token, decoding_dtype, decoding_model, prefill  # noqa: E402
from potion.model import GPT  # noqa: E402


@torch.inference_mode()
def decode_seconds(model, prompt: torch.Tensor, n_new: int, use_cache: bool, decoder=None) -> float:
    """Seconds per new token, greedy, after a prompt that leaves room for n_new tokens. decoder: the model (or a
    copy in another precision) that runs the cached one-token steps."""
    decoder = model if decoder is None else decoder
    if use_cache:
        cache = model.new_cache(1)
        logits = prefill(model, prompt, cache)
        cache = cache.to(next(decoder.parameters()).dtype)
    else:
        logits = model(prompt)[:, -1]
    history = prompt
    started = time.perf_counter()
    for _ in range(n_new):
        token = logits.argmax(-1)
        if use_cache:
            logits = decode_one_token(decoder, token, cache)
        else:
            history = torch.cat((history, token[:, None]), dim=1)
            logits = model(history)[:, -1]
    float(logits[0, 0])  # wait for the device
    return (time.perf_counter() - started) / n_new


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="shakespeare-char")
    ap.add_argument("--context", type=int, default=256, help="tokens of context when decoding")
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per repetition")
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="also time a compiled one-token step")
    args = ap.parse_args(argv)

    device = pick_device(args.device)
    threads = set_threads() if device.type == "cpu" else torch.get_num_threads()
    shape = load_preset(args.preset).model
    config = type(shape)(
        **{
            **shape.__dict__,
            "vocab_size": args.vocab_size,
            "dropout": 0.0,
            "context_length": max(shape.context_length, args.context),
        }
    )
    model = GPT(config).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(args.vocab_size, (1, args.context - args.decode), generator=gen).to(device)
    full = torch.randint(args.vocab_size, (1, args.context), generator=gen).to(device)

    @torch.inference_mode()
    def prefill_seconds():
        started = time.perf_counter()
        float(prefill(model, full, model.new_cache(1))[0, 0])
        return time.perf_counter() - started

    prefill_seconds()  # warm-up
    prefill_s = statistics.median(prefill_seconds() for _ in range(args.reps))
    bf16 = decoding_model(model, torch.bfloat16)
    cached, cached_bf16, uncached = [], [], []
    for _ in range(args.reps):  # interleaved, so a slow spell of a shared machine hits all three alike
        cached.append(decode_seconds(model, prompt, args.decode, True))
        cached_bf16.append(decode_seconds(model, prompt, args.decode, True, bf16))
        uncached.append(decode_seconds(model, prompt, args.decode, False))
    cached, cached_bf16, uncached = map(statistics.median, (cached, cached_bf16, uncached))
    compiled_figures = {}
    if args.compile:
        compiled = torch.compile(model)
        started = time.perf_counter()
        decode_seconds(model, prompt, args.decode, True, compiled)  # compiles (a second time once lengths vary)
        compile_s = time.perf_counter() - started - args.decode * cached
        per_token = statistics.median(
            decode_seconds(model, prompt, args.decode, True, compiled) for _ in range(args.reps)
        )
        compiled_figures = {
            "decode_tokens_per_second_cached_compiled_fp32": round(1 / per_token, 1),
            "compile_seconds": round(compile_s, 1),
        }
    emit(
        {
            **result("generate_speed", device, torch.float32, threads),
            "preset": args.preset,
            "parameters": model.num_parameters(),
            "batch": 1,
            "context": args.context,
            "prefill_tokens_per_second": round(args.context / prefill_s, 1),
            "decode_tokens_per_second_cached_fp32": round(1 / cached, 1),
            "decode_tokens_per_second_cached_bf16": round(1 / cached_bf16, 1),
            "decode_tokens_per_second_uncached_fp32": round(1 / uncached, 1),
            "cache_speedup_fp32": round(uncached / cached, 2),
            "cache_speedup_bf16_decode": round(uncached / cached_bf16, 2),
            **compiled_figures,
            "generate_auto_decode_dtype": dtype_name(decoding_dtype(model, "auto")),
        }
    )


if __name__ == "__main__":
    main()
