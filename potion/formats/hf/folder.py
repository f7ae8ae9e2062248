"""A Hugging Face model folder read as a potion model: config.json, the weights, the tokenizer and its end token.

GPT-2 (gpt2.py) and the Llama family (llama.py: Llama, Mistral, Qwen2, Qwen3) each map their config and weight
names onto potion's one GPT; what the two share (the tokenizer, the run config around the model) is here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from potion.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from potion.config.configs import MAX_BPE_VOCAB
from potion.data.chat import folder_template
from potion.data.tokenizer import EOT, BPETokenizer, Tokenizer, hf_tokenizer
from potion.errors import PotionError
from potion.formats.hf import gpt2, llama
from potion.formats.hf.files import read_json


def is_hf_model(folder: Path) -> bool:
    """A Hugging Face model folder (config.json names a model_type), as opposed to a potion run directory."""
    try:
        body = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and "model_type" in body and "format_version" not in body


def model_config(folder: Path) -> ModelConfig:
    hf = read_json(folder / "config.json")
    if hf.get("model_type") == "gpt2":
        return gpt2.model_config(hf, folder)
    return llama.model_config(hf, folder)


def read_run_config(folder: Path) -> RunConfig:
    """A Hugging Face folder's config.json as a potion run config: no training data, the folder's tokenizer."""
    model = model_config(folder)
    data = DataConfig(data="", tokenizer="bpe", bpe_vocab_size=min(max(model.vocab_size, 257), MAX_BPE_VOCAB))
    return RunConfig(model=model, data=data, train=TrainConfig(init_from=str(folder)))


def read_model(folder: Path) -> tuple[RunConfig, Tokenizer, dict[str, torch.Tensor]]:
    """The run config, tokenizer and potion-named weights of a Hugging Face folder."""
    config = read_run_config(folder)
    tokenizer = read_tokenizer(folder)
    if tokenizer.vocab_size > config.model.vocab_size:  # fewer is fine: Qwen pads its embedding with unused rows
        raise PotionError(
            f"the tokenizer in '{folder}' has {tokenizer.vocab_size} tokens but config.json says vocab_size "
            f"{config.model.vocab_size}"
        )
    if config.model.positions == "learned":
        weights = gpt2.to_potion(gpt2.read_weights(folder, config.model), config.model)
    else:
        weights = llama.read_weights(folder, config.model)
    return config, tokenizer, weights


def read_tokenizer(folder: Path) -> BPETokenizer:
    """tokenizer.json when the folder has one, else GPT-2's vocab.json + merges.txt; the end token from
    generation_config.json, config.json or tokenizer_config.json, in that order."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise PotionError(f"'{folder}' has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
        return gpt2.gpt2_tokenizer(vocab, merges)
    text = path.read_text(encoding="utf-8")
    tokenizer = hf_tokenizer(text, end_token(folder, json.loads(text)), str(path))
    tokenizer.chat_template = folder_template(folder)
    return tokenizer


def end_token(folder: Path, tokenizer_json: dict) -> str:
    """The name of the token that ends a generation: the model's eos, or <|endoftext|> where it names none."""
    ids = {token.get("id"): token.get("content") for token in tokenizer_json.get("added_tokens", []) or []}
    for name in ("generation_config.json", "config.json"):
        body = read_json(folder / name) if (folder / name).is_file() else {}
        eos = body.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int) and ids.get(eos):
            return ids[eos]
    if (folder / "tokenizer_config.json").is_file():
        eos = read_json(folder / "tokenizer_config.json").get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos:
            return eos
    return EOT
