"""The `potion` command's arguments: one parser, a subcommand each, usage errors as one line."""

from __future__ import annotations

import argparse

from potion.cli.commands import (
    cmd_chat,
    cmd_eval,
    cmd_explain,
    cmd_export,
    cmd_generate,
    cmd_import,
    cmd_presets,
    cmd_serve,
    cmd_train,
)

MODEL_HELP = (
    "run directory, Hugging Face folder (GPT-2, Llama, Mistral, Qwen2, Qwen3), .gguf file or model name (default: the "
    "latest run)"
)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP)


def add_train(sub) -> None:
    t = sub.add_parser("train", help="train a model (default: the tiny preset on the built-in pydocs corpus)")
    t.add_argument("--data", help="a file, directory, glob, or built-in corpus: pydocs (default), shakespeare")
    t.add_argument("--preset", help="tiny (default), shakespeare-char, gpt2, ... (see `potion presets`)")
    t.add_argument("--config", help="a TOML file with [model], [data], [train] tables")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    t.add_argument("--out", help="run directory (default: a new folder under ./runs)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (default: the latest run)")
    t.add_argument(
        "--init-from",
        metavar="MODEL",
        help="fine-tune: start from this run, Hugging Face folder, .gguf file or model name (its architecture and "
        "tokenizer; default preset gpt2-finetune for GPT-2-shaped models, else finetune)",
    )
    t.add_argument("--max-steps", type=int)
    t.add_argument("--max-time", type=float, help="wall-clock budget in seconds; then evaluate, save and stop")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    t.add_argument("--seed", type=int)
    t.add_argument(
        "--probe", metavar="TEXT", help="save the explain data for TEXT at every evaluation (RUN/probes/step-N.json)"
    )
    t.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar or samples")
    t.set_defaults(func=cmd_train)


def add_sampling_options(g, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """The flags that say how tokens are drawn and when a text stops (generate's and chat's)."""
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help=f"0: greedy (default: {temperature})")
    g.add_argument("--top-k", type=int, help="draw only from the k most likely tokens (default: no limit)")
    g.add_argument("--top-p", type=float, default=top_p)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears")
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--decode-dtype",
        default="auto",
        metavar="auto|fp32|bf16",
        help="weights for the one-token steps: bf16 halves the bytes read per token (auto: where that is "
        "faster); fp32 matches the full forward pass exactly",
    )
    g.add_argument(
        "--draft-tokens",
        type=int,
        metavar="N",
        help="speculative decoding: a 4-bit copy of the model drafts N tokens, checked in one pass; the text is "
        "the same (default: 4 where that is faster, a CPU and a big model; 0: off)",
    )


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a trained model")
    g.add_argument("prompt", nargs="?", default="")
    add_model_option(g)
    add_sampling_options(g, max_new_tokens=500, temperature=0.8, top_p=1.0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--json", action="store_true", help="print the samples as one JSON object")
    g.set_defaults(func=cmd_generate)


def add_chat(sub) -> None:
    c = sub.add_parser(
        "chat", help="talk with a chat model: a REPL on a terminal, one reply per input line from a pipe"
    )
    add_model_option(c)
    c.add_argument("--system", metavar="TEXT", help="the system message (default: the chat template's own, if any)")
    add_sampling_options(c, max_new_tokens=512, temperature=0.7, top_p=0.9)
    c.add_argument("--json", action="store_true", help="one JSON object per reply (reply, finish_reason, tokens)")
    c.set_defaults(func=cmd_chat)


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained model")
    add_model_option(e)
    e.add_argument("--data", help="text to evaluate on (default: the model's validation split)")
    e.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    e.set_defaults(func=cmd_eval)


def add_explain(sub) -> None:
    x = sub.add_parser("explain", help="look inside one prediction: attention, logit lens, what mattered")
    x.add_argument("prompt", help="the text whose next-token prediction is explained")
    add_model_option(x)
    x.add_argument(
        "--token",
        type=int,
        default=-1,
        metavar="INDEX",
        help="the token whose attention is explained, 0-based (default: -1, the last)",
    )
    x.add_argument("--layer", type=int, metavar="L", help="the layer shown in detail, 0-based (default: the last)")
    x.add_argument(
        "--head", type=int, metavar="H", help="the head shown in detail, 0-based (default: the most focused)"
    )
    x.add_argument("--top-k", type=int, default=5, metavar="K", help="candidates and keys listed (default: 5)")
    x.add_argument("--expect", metavar="TEXT", help="the continuation you expected: its rank, and what mattered for it")
    x.add_argument("--html", metavar="FILE", help="write one self-contained page (works offline)")
    x.add_argument("--png", metavar="FILE", help="write attention heatmaps as a PNG image")
    x.add_argument("--json-out", metavar="FILE", help="write all the numbers as JSON")
    x.add_argument("--json", action="store_true", help="print all the numbers as one JSON object instead of the text")
    x.set_defaults(func=cmd_explain)


def add_import(sub) -> None:
    i = sub.add_parser("import", help="write a potion run directory for a Hugging Face GPT-2 (folder or name)")
    i.add_argument(
        "source",
        metavar="MODEL",
        help="a Hugging Face folder (GPT-2, Llama, Mistral, Qwen2, Qwen3), or a name such as gpt2",
    )
    i.add_argument("--out", required=True, help="the run directory to write (must not exist)")
    i.set_defaults(func=cmd_import)


def add_export(sub) -> None:
    e = sub.add_parser(
        "export", help="write a folder that Hugging Face transformers loads, or a GGUF file that llama.cpp runs"
    )
    e.add_argument("model", nargs="?", metavar="RUN", help="the run directory (default: the latest under ./runs)")
    e.add_argument("--out", required=True, help="the folder (hf) or file (gguf) to write (must not exist)")
    e.add_argument(
        "--format", choices=("hf", "gguf"), default="hf", help="hf: a transformers folder (default); gguf: one file"
    )
    e.add_argument(
        "--dtype", choices=("f32", "f16", "bf16", "q8_0"), help="gguf only: the matrices' type (default: f16)"
    )
    e.set_defaults(func=cmd_export)


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible API and a live page that looks inside the model")
    add_model_option(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    s.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every API request (default: $POTION_API_KEY; none)",
    )
    s.set_defaults(func=cmd_serve)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other error (its subcommands' parsers too)."""

    def error(self, message: str):
        self.exit(2, f"potion: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="potion", description="Train a small GPT on your own text, sample from it, look inside.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_generate, add_chat, add_eval, add_explain, add_import, add_export, add_serve):
        add(sub)
    sub.add_parser("presets", help="list the built-in presets").set_defaults(func=cmd_presets)
    return parser
