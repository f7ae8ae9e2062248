"""Model names: `--model gpt2` or `--init-from openai-community/gpt2-medium` resolved to a folder on disk.

A path that exists always wins. Otherwise a name shaped like a Hugging Face repository id is looked up in the
local Hugging Face cache first, and downloaded only where the network allows (never with HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import re
from pathlib import Path

from potion.errors import PotionError, require

# owner/name or a bare name, as the Hub spells repository ids; no leading '/', '.' or '~', so paths never match
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
# what potion reads from a model repository: no TensorFlow, Flax or ONNX weights, no optimizer state
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]


def model_folder(spec: str | Path) -> Path:
    """The folder for a --model or --init-from value: the path itself when it exists, else a Hub model's folder."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if not REPO_ID.fullmatch(str(spec)):
        raise PotionError(f"run directory '{spec}' does not exist")
    return hub_snapshot(str(spec))


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of a Hub model, downloading it if it is not cached and the network allows."""
    hub = require("huggingface_hub", "hf", f"'{repo_id}' (a Hugging Face Hub name)")
    constants, snapshot_download = hub.constants, hub.snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, local_files_only=True))
    except Exception:  # not cached (the library's own exception types, which vary between its versions)
        pass
    try:
        if constants.HF_HUB_OFFLINE:
            raise ConnectionError("HF_HUB_OFFLINE is set")
        folder = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PotionError(
            f"'{repo_id}' is neither a folder here nor a model in the Hugging Face cache, and downloading it failed "
            f"({reason[:200]}); on a machine with network run `hf download {repo_id}`, or pass the model's folder"
        ) from None
    if not any(folder.glob("*.safetensors")):  # an older repository with only pickled PyTorch weights
        snapshot_download(repo_id, allow_patterns=["pytorch_model.bin"])
    return folder
