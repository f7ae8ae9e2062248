"""The `potion` command. It parses arguments and calls the modules; a PotionError becomes one line on stderr
and exit code 2 (`--debug` shows the traceback)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from .errors import PotionError


def _finite(x):
    return x if isinstance(x, (int, str, bool)) or (isinstance(x, float) and math.isfinite(x)) else None


def cmd_train(args) -> int:
    from .checkpoint import latest_run, read_config
    from .config import resolve
    from .train import train

    overrides = list(args.set)
    for flag, key in (("data", "data.data"), ("max_steps", "train.max_steps"), ("max_time", "train.max_time"),
                      ("eval_every", "train.eval_every"), ("checkpoint_every", "train.checkpoint_every"),
                      ("device", "train.device"), ("seed", "train.seed"), ("probe", "train.probe")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    out = args.out
    if args.resume:  # start from the run's own config; flags may change only what RESUMABLE_CHANGES allows
        out = out or latest_run()
        config = resolve(args.preset, args.config, overrides, base=read_config(Path(out)))
    else:
        config = resolve(args.preset or "tiny", args.config, overrides)
    summary = train(config, out=out, resume=args.resume, quiet=args.quiet)
    if args.json:
        print(json.dumps({k: _finite(v) for k, v in summary.items()}))
    else:
        print(f"trained {summary['steps']} steps ({summary['tokens']:,} tokens) in {summary['seconds']:.0f} s, "
              f"{summary['tokens_per_second']:,.0f} tokens/s; validation loss {summary['val_loss']:.4f}, "
              f"best {summary['best_val_loss']:.4f}\nsaved to {summary['out']}; try: potion generate --model {summary['out']}")
    return 0


def cmd_generate(args) -> int:
    from .checkpoint import load
    from .generate import SamplingConfig, generate_text

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), num_samples=args.num_samples,
                              decode_dtype=args.decode_dtype)
    model, tokenizer = load(args.model)
    prompt = args.prompt or ""

    def stream(i, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    on_text = None
    if not args.json:
        if sampling.num_samples > 1:
            def on_text(i, text, printed=set()):
                if i not in printed:
                    printed.add(i)
                    sys.stdout.write(("\n" if i else "") + f"--- sample {i + 1} ---\n" + prompt)
                stream(i, text)
        else:
            sys.stdout.write(prompt)
            on_text = stream
    samples, speed = generate_text(model, tokenizer, prompt, sampling, on_text)
    if args.json:
        print(json.dumps({"samples": [s.__dict__ for s in samples], "tokens_per_second": round(speed, 1)}))
    else:
        sys.stdout.write("\n")
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import load, read_config
    from .data import prepare
    from .evaluate import evaluate

    run_dir = Path(args.model) if args.model else None
    model, tokenizer = load(run_dir)
    if run_dir is None:
        from .checkpoint import latest_run

        run_dir = latest_run()
    config = read_config(run_dir)
    token_file = prepare(config.data, tokenizer=tokenizer, data=args.data, quiet=args.json)
    tokens = token_file.tokens if args.data else token_file.split(config.data.val_fraction)[1]
    result = evaluate(model, tokenizer, tokens, quiet=args.json)
    if args.json:
        print(json.dumps(result))
    else:
        split = f"'{args.data}'" if args.data else "the validation split"
        print(f"{split}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
              f"bits per byte {result['bits_per_byte']:.4f} over {result['tokens']:,} tokens")
    return 0


def cmd_explain(args) -> int:
    from .checkpoint import latest_run, load
    from .explain import explain
    from .explanation import load_probes, save_json
    from .explain_text import render_text, use_color

    run_dir = Path(args.model) if args.model else latest_run()
    model, tokenizer = load(run_dir)
    e = explain(model, args.prompt, tokenizer, token=args.token, layer=args.layer, head=args.head, top_k=args.top_k,
                expect=args.expect)
    written = []
    if args.json:
        save_json(e, args.json)
        written.append(args.json)
    if args.html:
        from .explain_html import save_html

        save_html(e, args.html, probes=load_probes(run_dir))
        written.append(args.html)
    if args.png:
        from .explain_plot import save_png

        save_png(e, args.png)
        written.append(args.png)
    sys.stdout.write(render_text(e, color=use_color(sys.stdout)))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_presets(args) -> int:
    from .config import load_preset, preset_names

    for name in preset_names():
        m = load_preset(name).model
        print(f"{name:18s} {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.context_length}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potion", description="Train a small GPT on your own text, sample from it, look inside.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (default: the tiny preset on the built-in pydocs corpus)")
    t.add_argument("--data", help="a file, directory, glob, or built-in corpus: pydocs (default), shakespeare")
    t.add_argument("--preset", help="tiny (default), shakespeare-char, gpt2, ... (see `potion presets`)")
    t.add_argument("--config", help="a TOML file with [model], [data], [train] tables")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field")
    t.add_argument("--out", help="run directory (default: a new folder under ./runs)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (default: the latest run)")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--max-time", type=float, help="wall-clock budget in seconds; then evaluate, save and stop")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    t.add_argument("--seed", type=int)
    t.add_argument("--probe", metavar="TEXT", help="save the explain data for TEXT at every evaluation (RUN/probes/step-N.json)")
    t.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar or samples")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text from a trained model")
    g.add_argument("prompt", nargs="?", default="")
    g.add_argument("--model", help="run directory (default: the latest under ./runs)")
    g.add_argument("--max-new-tokens", type=int, default=500)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, help="draw only from the k most likely tokens (default: no limit)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when this text appears")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int)
    g.add_argument("--decode-dtype", default="auto", metavar="auto|fp32|bf16",
                   help="weights for the one-token steps: bf16 halves the bytes read per token (auto: where that is "
                        "faster); fp32 matches the full forward pass exactly")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained model")
    e.add_argument("--model", help="run directory (default: the latest under ./runs)")
    e.add_argument("--data", help="text to evaluate on (default: the model's validation split)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("explain", help="look inside one prediction: attention, logit lens, what mattered")
    x.add_argument("prompt", help="the text whose next-token prediction is explained")
    x.add_argument("--model", help="run directory (default: the latest under ./runs)")
    x.add_argument("--token", type=int, default=-1, metavar="INDEX",
                   help="the token whose attention is explained, 0-based (default: -1, the last)")
    x.add_argument("--layer", type=int, metavar="L", help="the layer shown in detail, 0-based (default: the last)")
    x.add_argument("--head", type=int, metavar="H", help="the head shown in detail, 0-based (default: the most focused)")
    x.add_argument("--top-k", type=int, default=5, metavar="K", help="candidates and keys listed (default: 5)")
    x.add_argument("--expect", metavar="TEXT", help="the continuation you expected: its rank, and what mattered for it")
    x.add_argument("--html", metavar="FILE", help="write one self-contained page (works offline)")
    x.add_argument("--png", metavar="FILE", help="write attention heatmaps as a PNG image")
    x.add_argument("--json", metavar="FILE", help="write all the numbers as JSON")
    x.set_defaults(func=cmd_explain)

    p = sub.add_parser("presets", help="list the built-in presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"potion: warning: {message}", file=sys.stderr)
    try:
        return args.func(args)
    except PotionError as e:
        if args.debug:
            raise
        print(f"potion: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npotion: interrupted", file=sys.stderr)
        return 130
