"""The `potion` command. It parses arguments and calls the modules; a PotionError becomes one line on stderr
and exit code 2 (`--debug` shows the traceback).

Conventions shared by every command: `--model DIR` is a run directory (default: the latest under ./runs), `--json`
prints one JSON object on stdout and nothing else there, and files are written only where a flag names them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings

from potion.errors import PotionError

# Flags of `potion train` that are config fields, typed by argparse and passed on as typed values.
TRAIN_FIELD_FLAGS = {
    "data": "data.data",
    "max_steps": "train.max_steps",
    "max_time": "train.max_time",
    "eval_every": "train.eval_every",
    "checkpoint_every": "train.checkpoint_every",
    "device": "train.device",
    "seed": "train.seed",
    "probe": "train.probe",
    "init_from": "train.init_from",
}


def print_json(body: dict) -> None:
    """One JSON object on stdout; NaN and infinity, which JSON lacks, become null."""
    finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in body.items()}
    print(json.dumps(finite))


def cmd_train(args) -> int:
    from potion.parallel.session import session
    from potion.train.interrupt import exit_code
    from potion.train.loop import train

    with session() as world:  # one process of several when torchrun started it; rank 0 prints
        config, out = training_config(args)
        summary = train(config, out=out, resume=args.resume, quiet=args.quiet)
    if world.is_main and args.json:
        print_json(summary)
    elif world.is_main:
        print(
            f"trained {summary['steps']} steps ({summary['tokens']:,} tokens) in {summary['seconds']:.0f} s, "
            f"{summary['tokens_per_second']:,.0f} tokens/s; validation loss {summary['val_loss']:.4f}, "
            f"best {summary['best_val_loss']:.4f}\n"
            f"saved to {summary['out']}; try: potion generate --model {summary['out']}"
        )
    return exit_code(summary["stop_signal"])  # a scheduler's signal: not finished, though saved (see interrupt.py)


def training_config(args):
    """The config `potion train` trains with, and where (a SavedRun already read, when resuming)."""
    from potion.config import load_preset, resolve, with_architecture
    from potion.formats.run import find_run, source_config

    values = {key: getattr(args, flag) for flag, key in TRAIN_FIELD_FLAGS.items() if getattr(args, flag) is not None}
    if args.resume:  # start from the run's own config; flags may change only when and how long it trains
        out = find_run(args.out)
        return resolve(args.preset, args.config, args.set, base=out.config, values=values), out
    if args.init_from:  # the architecture and tokenizer of the model it starts from; training settings as given
        source = source_config(args.init_from)
        # GPT-2 was pretrained with dropout; the Llama family without
        default = "gpt2-finetune" if source.model.positions == "learned" else "finetune"
        base = with_architecture(load_preset(args.preset or default), source)
        return resolve(None, args.config, args.set, base=base, values=values), args.out
    return resolve(args.preset or "tiny", args.config, args.set, values=values), args.out


def cmd_generate(args) -> int:
    from potion.config import SamplingConfig
    from potion.data.tokenizer import checked_text
    from potion.formats.run import load
    from potion.infer.generate import generate_text

    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        num_samples=args.num_samples,
        decode_dtype=args.decode_dtype,
        draft_tokens=args.draft_tokens,
    )
    model, tokenizer = load(args.model)
    prompt = checked_text(args.prompt or "", "the prompt")  # before it is echoed: stdout takes only real text
    on_text = None if args.json else stream_to_stdout(prompt, sampling.num_samples)
    samples, speed = generate_text(model, tokenizer, prompt, sampling, on_text)
    if args.json:
        print_json({"samples": [s.__dict__ for s in samples], "tokens_per_second": round(speed, 1)})
    else:
        sys.stdout.write("\n")
    return 0


def stream_to_stdout(prompt: str, num_samples: int):
    """on_text for generate_text: the prompt, then each sample's text as it comes (headed when there are several)."""
    started = set()

    def on_text(i: int, text: str) -> None:
        if i not in started:
            started.add(i)
            header = ("\n" if i else "") + f"--- sample {i + 1} ---\n" if num_samples > 1 else ""
            sys.stdout.write(header + prompt)
        sys.stdout.write(text)
        sys.stdout.flush()

    if num_samples == 1:  # the prompt shows at once, before the first token is ready
        started.add(0)
        sys.stdout.write(prompt)
    return on_text


def cmd_eval(args) -> int:
    from potion.data.tokens import prepare
    from potion.formats.run import load
    from potion.train.evaluate import evaluate

    run = load(args.model)
    if not (args.data or run.config.data.data):
        raise PotionError(f"'{run.run_dir}' was not trained here, so it has no validation split; pass --data FILE")
    token_file = prepare(run.config.data, tokenizer=run.tokenizer, data=args.data, quiet=args.json)
    tokens = token_file.span() if args.data else token_file.split(run.config.data.val_fraction)[1]
    result = evaluate(run.model, run.tokenizer, tokens, quiet=args.json)
    if args.json:
        print_json(result)
    else:
        split = f"'{args.data}'" if args.data else "the validation split"
        print(
            f"{split}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
            f"bits per byte {result['bits_per_byte']:.4f} over {result['tokens']:,} tokens"
        )
    return 0


def cmd_explain(args) -> int:
    from potion.explain import explain, load_probes, render_text, save_html, save_json, save_png, use_color
    from potion.formats.run import load

    run = load(args.model)
    e = explain(
        run.model,
        args.prompt,
        run.tokenizer,
        token=args.token,
        layer=args.layer,
        head=args.head,
        top_k=args.top_k,
        expect=args.expect,
    )
    written = []
    if args.json_out:
        save_json(e, args.json_out)
        written.append(args.json_out)
    if args.html:
        save_html(e, args.html, probes=load_probes(run.run_dir))
        written.append(args.html)
    if args.png:
        save_png(e, args.png)
        written.append(args.png)
    if args.json:  # stdout carries the one JSON object and nothing else, so it can be piped to a parser
        print(e.to_json())
        return 0
    sys.stdout.write(render_text(e, color=use_color(sys.stdout)))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_import(args) -> int:
    from potion.formats.hf.convert import import_model

    out = import_model(args.source, args.out)
    print(f"wrote {out}; try: potion generate --model {out}")
    return 0


def cmd_export(args) -> int:
    if args.format == "gguf":
        from potion.formats.gguf_export import export_gguf

        out, architecture = export_gguf(args.model, args.out, args.dtype or "f16")
        print(f"wrote {out} ({architecture}, {args.dtype or 'f16'}); run it with llama.cpp: llama-cli -m {out}")
        return 0
    if args.dtype is not None:
        raise PotionError("--dtype applies to --format gguf; a Hugging Face folder holds float32 weights")
    from potion.formats.hf.convert import export_model

    out, architecture = export_model(args.model, args.out)
    print(f"wrote {out} ({architecture}); load it with transformers' AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def cmd_serve(args) -> int:
    from potion.serve import serve

    return serve(args.model, args.host, args.port, args.api_key or os.environ.get("POTION_API_KEY") or None)


def cmd_presets(args) -> int:
    from potion.config import load_preset, preset_names
    from potion.model.shapes import Shapes

    for name in preset_names():
        m = load_preset(name).model
        shapes = Shapes.of(m)
        heads = f"{m.n_head} heads" + (f" sharing {shapes.n_kv_head} key/value heads" if shapes.groups > 1 else "")
        mlp = f", {m.mlp_activation} {shapes.ffn_hidden}"
        print(f"{name:18s} {m.n_layer} layers, {heads}, {m.n_embd} wide{mlp}, context {m.context_length}")
    return 0


# ---------------------------------------------------------------- arguments


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


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a trained model")
    g.add_argument("prompt", nargs="?", default="")
    add_model_option(g)
    g.add_argument("--max-new-tokens", type=int, default=500)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, help="draw only from the k most likely tokens (default: no limit)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears")
    g.add_argument("--num-samples", type=int, default=1)
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
    g.add_argument("--json", action="store_true", help="print the samples as one JSON object")
    g.set_defaults(func=cmd_generate)


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
    for add in (add_train, add_generate, add_eval, add_explain, add_import, add_export, add_serve):
        add(sub)
    sub.add_parser("presets", help="list the built-in presets").set_defaults(func=cmd_presets)
    return parser


def with_flag(error: PotionError, args: argparse.Namespace) -> str:
    """The error's message, with the setting it names written as the flag the user typed (temperature ->
    --temperature) when this command has that flag."""
    message, setting = str(error), error.setting
    if setting is None or setting not in vars(args):
        return message
    return re.sub(rf"\b{re.escape(setting)}\b", "--" + setting.replace("_", "-"), message, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"potion: warning: {message}", file=sys.stderr)
    try:
        return args.func(args)
    except PotionError as e:
        if args.debug:
            raise
        message = " ".join(with_flag(e, args).splitlines())  # one line, whatever text from a file it quotes
        print(f"potion: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a second Ctrl-C (or SIGTERM) during training, or one outside it
        print("\npotion: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
