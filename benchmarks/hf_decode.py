"""Decode speed on GPT-2 124M-shaped weights: potion against Hugging Face transformers' `generate`, same weights.

A random GPT2LMHeadModel of GPT-2 small's shape (12 layers, 12 heads, 768 wide, 1024 context, 50,257 tokens) is
saved by transformers with a byte-level BPE tokenizer, then loaded by potion from that folder (its GPT-2 import)
and by transformers. Each repetition, interleaved so a slow spell hits every contender alike, generates
--new-tokens greedy tokens at batch 1 after a --prompt-tokens prompt (prefill included in the time), with:
  - potion's default (`potion generate`: bf16 decode weights where this machine makes that faster, and
    speculative decoding where it pays: a 4-bit copy drafts a few tokens, the bf16 decoder checks them at once),
  - the same without drafts (--draft-tokens 0),
  - potion's exact fp32 mode (--decode-dtype fp32: fp32 checks, the same tokens as transformers),
  - transformers' `generate` in fp32.
Prints one JSON line: the machine, medians of tokens/s, the ratios, and whether the greedy tokens agree.

Usage (from the project root):
    python benchmarks/hf_decode.py                      # 5 repetitions, a few minutes on two cores
    python benchmarks/hf_decode.py --keep /tmp/gpt2     # also keep the model folder, to try potion's commands on
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from machine import dtype_name, emit, result  # noqa: E402

import potion  # noqa: E402
from potion.hardware import set_threads  # noqa: E402
from potion.infer.generate import decoding_dtype, drafts_per_check, generate_tokens  # noqa: E402

SHAKESPEARE = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
GPT2_VOCAB = 50257


def save_tokenizer(folder: Path, text: str) -> None:
    """GPT-2's two tokenizer files for a byte-level BPE learned on `text`, padded with unused tokens to GPT-2's
    50,257 (the end-of-text token last, as in GPT-2's own vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=8192, initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator([text], trainer=trainer)
    tk.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), GPT2_VOCAB - 1)})
    vocab["<|endoftext|>"] = GPT2_VOCAB - 1
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


def gpt2_small_folder(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "potion " * 10000
    save_tokenizer(folder, text)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB)).save_pretrained(folder)
    return folder


@torch.inference_mode()
def potion_tokens(
    model, prompt: torch.Tensor, n: int, decode_dtype: str, draft_tokens: int | None = None
) -> tuple[list[int], float]:
    started = time.perf_counter()
    steps = generate_tokens(
        model, prompt, n, temperature=0, eot_id=None, decode_dtype=decode_dtype, draft_tokens=draft_tokens
    )
    tokens = [int(t) for t in steps]
    return tokens, time.perf_counter() - started


@torch.inference_mode()
def transformers_tokens(model, prompt: torch.Tensor, n: int) -> tuple[list[int], float]:
    started = time.perf_counter()
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, prompt.size(1) :].tolist(), time.perf_counter() - started


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="write the GPT-2 folder here and keep it")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    threads = set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = gpt2_small_folder(args.keep or Path(tmp) / "gpt2")
        ours = potion.load(folder).model
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.pad_token_id = GPT2_VOCAB - 1
    prompt = torch.randint(GPT2_VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    runs = {
        "potion_default": lambda: potion_tokens(ours, prompt, n, "auto"),
        "potion_default_without_drafts": lambda: potion_tokens(ours, prompt, n, "auto", draft_tokens=0),
        "potion_fp32": lambda: potion_tokens(ours, prompt, n, "fp32"),
        "transformers_fp32": lambda: transformers_tokens(theirs, prompt, n),
    }
    for run in runs.values():  # warm-up: first-call allocations and kernel choices
        run()
    seconds = {name: [] for name in runs}
    tokens = {}
    for _ in range(args.reps):
        for name, run in runs.items():
            tokens[name], took = run()
            seconds[name].append(took)
    speed = {name: n / statistics.median(s) for name, s in seconds.items()}
    emit(
        {
            **result("hf_decode", "cpu", torch.float32, threads),
            "model": "GPT-2 124M shape (random weights)",
            "parameters": ours.num_parameters(),
            "batch": 1,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": n,
            "reps": args.reps,
            **{f"{name}_tokens_per_second": round(s, 2) for name, s in speed.items()},
            "potion_default_decode_dtype": dtype_name(decoding_dtype(ours, "auto")),
            "potion_default_draft_tokens": drafts_per_check(ours, 1, None),
            "default_vs_transformers": round(speed["potion_default"] / speed["transformers_fp32"], 2),
            "without_drafts_vs_transformers": round(
                speed["potion_default_without_drafts"] / speed["transformers_fp32"], 2
            ),
            "fp32_vs_transformers": round(speed["potion_fp32"] / speed["transformers_fp32"], 2),
            "fp32_greedy_tokens_identical": tokens["potion_fp32"] == tokens["transformers_fp32"],
            "default_greedy_tokens_identical": tokens["potion_default"] == tokens["transformers_fp32"],
            "without_drafts_greedy_tokens_identical": tokens["potion_default_without_drafts"]
            == tokens["transformers_fp32"],
        }
    )


if __name__ == "__main__":
    main()
