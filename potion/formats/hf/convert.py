"""`potion import` and `potion export`: whole folders in and out, each written under a temporary name and renamed
into place, so an error leaves nothing behind.

    potion import gpt2 --out runs/gpt2          a Hugging Face GPT-2 (folder or name) -> a potion run directory
    potion export runs/tiny --out hf/tiny       a potion run -> a folder transformers loads with from_pretrained
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from potion.formats.fileio import new_folder
from potion.formats.hf.layouts import architecture, hf_config, hf_weights
from potion.formats.run import load, read_log, write_config
from potion.train.checkpoint import model_state, save_tensors

ARCHITECTURE_NAMES = {"gpt2": "GPT2LMHeadModel", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def import_model(source: str | Path, out: str | Path) -> Path:
    """Write a potion run directory (config.json, tokenizer.json, model.safetensors) for a Hugging Face model."""
    run = load(source)
    with new_folder(Path(out)) as folder:
        write_config(folder, run.config)
        (folder / "tokenizer.json").write_text(run.tokenizer.to_json(), encoding="utf-8")
        save_tensors(folder / "model.safetensors", model_state(run.model))
    return Path(out)


def export_model(source: str | Path | None, out: str | Path) -> tuple[Path, str]:
    """Write a transformers folder for a potion run (or any model potion loads); returns it and its architecture.

    The architecture is checked before anything is written: a model with no exact equivalent writes nothing.
    """
    run = load(source)
    config, tokenizer = run.config.model, run.tokenizer
    name = architecture(config)
    with new_folder(Path(out)) as folder:
        weights = hf_weights(model_state(run.model), config, name)
        save_tensors(folder / "model.safetensors", weights, metadata={"format": "pt"})
        write_json(folder / "config.json", hf_config(config, name, tokenizer.eot_id))
        eot = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        write_json(folder / "generation_config.json", eot)
        (folder / "tokenizer.json").write_text(tokenizer.to_hf_json(), encoding="utf-8")
        write_json(folder / "tokenizer_config.json", tokenizer_config(config.context_length, tokenizer))
        (folder / "README.md").write_text(model_card(run, name), encoding="utf-8")
    return Path(out), ARCHITECTURE_NAMES[name]


def write_json(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_config(context_length: int, tokenizer) -> dict:
    """What AutoTokenizer needs beside tokenizer.json (the chat template too); decoding keeps spaces exactly as
    they are."""
    template = tokenizer.chat_template.to_config() if tokenizer.chat_template is not None else {}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.eot_token if tokenizer.kind == "bpe" else "<|endoftext|>",
        "eos_token": tokenizer.eot_token if tokenizer.kind == "bpe" else "<|endoftext|>",
        **template,
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
    }


# ---------------------------------------------------------------- the model card


def model_card(run, name: str) -> str:
    """README.md: what the model is and how it was trained, from the run's own records."""
    c = run.config
    m = c.model
    best = best_evaluation(run.run_dir)
    rows = [
        ("architecture", f"{ARCHITECTURE_NAMES[name]} (exported by potion; same logits as potion's model)"),
        ("parameters", f"{run.model.num_parameters():,}"),
        ("shape", f"{m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.context_length}"),
        ("recipe", f"{m.positions} positions, {m.norm}, {m.mlp_activation}, qk_norm {str(m.qk_norm).lower()}"),
        ("tokenizer", f"{c.data.tokenizer}, {m.vocab_size} tokens"),
    ]
    if c.train.init_from:
        rows.append(("initialised from", f"`{c.train.init_from}`"))
    if c.train.lora_rank:
        adapted = f"LoRA rank {c.train.lora_rank}, alpha {c.train.lora_alpha:g}, on {c.train.lora_targets}"
        rows.append(("fine-tuned with", f"{adapted}; the adapters are merged into these weights"))
    if c.data.data:
        rows.append(("training data", f"`{Path(c.data.data).name}`"))
    if best:
        rows += [
            ("steps", f"{best['step']:,}"),
            ("tokens seen", f"{best['tokens']:,}"),
            ("validation loss", f"{best['val_loss']:.4f} nats per token"),
        ]
        if best.get("val_bits_per_byte") is not None:
            rows.append(("bits per byte", f"{best['val_bits_per_byte']:.4f}"))
    else:
        rows.append(("training", "none recorded in this run directory"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    settings = json.dumps(c.to_dict(), indent=2)
    return (
        f"---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [potion, {name}]\n---\n\n"
        f"# {run.run_dir.name}\n\nA GPT trained with potion and exported for Hugging Face transformers.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```\n\n'
        "The weights are the run's best by validation loss. Its full configuration:\n\n"
        f"```json\n{settings}\n```\n"
    )


def best_evaluation(run_dir: Path) -> dict | None:
    """The evaluation row of log.jsonl with the lowest validation loss (the one model.safetensors holds)."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    rows = [r for r in read_log(log) if r.get("kind") == "eval" and is_number(r.get("val_loss"))]
    return min(rows, key=lambda r: r["val_loss"]) if rows else None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
