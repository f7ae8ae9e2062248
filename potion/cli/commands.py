"""What each `potion` command does with its parsed arguments: calls into the packages, prints the result."""

from __future__ import annotations

import json
import math
import os
import sys

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


def sampling_config(args, num_samples: int = 1):
    from potion.config import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        num_samples=num_samples,
        decode_dtype=args.decode_dtype,
        draft_tokens=args.draft_tokens,
    )


def cmd_generate(args) -> int:
    from potion.data.tokenizer import checked_text
    from potion.formats.run import load
    from potion.infer.generate import generate_text

    sampling = sampling_config(args, args.num_samples)
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


def cmd_chat(args) -> int:
    from potion.data.tokenizer import checked_text
    from potion.formats.run import load
    from potion.infer.chat import Chat, run_chat

    sampling = sampling_config(args)
    system = checked_text(args.system, "--system") if args.system else None
    model, tokenizer = load(args.model)
    return run_chat(Chat(model, tokenizer, sampling, system=system), as_json=args.json)


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
