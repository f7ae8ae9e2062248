"""Reading a Hugging Face model folder's files as untrusted input: JSON, safetensors (shapes from the header alone,
before anything is allocated), sharded weights, and a pickled pytorch_model.bin only through torch's restricted
unpickler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from potion.errors import PotionError


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise PotionError(f"'{path}' is missing")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PotionError(f"'{path}' is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise PotionError(f"'{path}' is not a JSON object")
    return body


def close_to(value, wanted: float) -> bool:
    return isinstance(value, (int, float)) and math.isclose(value, wanted)


def weight_files(folder: Path) -> list[Path]:
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PotionError(f"'{index}' has no weight_map of tensor names to files")
        return [folder / Path(name).name for name in sorted(set(weight_map.values()))]
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise PotionError(f"'{folder}' has no weights (model.safetensors or pytorch_model.bin)")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # the library's own error types; the file is damaged or not safetensors
        raise PotionError(f"'{path}' is not a readable safetensors file ({e})") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise PotionError(f"'{path}' is not a readable safetensors file ({e})") from None


def read_pickled(path: Path) -> dict[str, torch.Tensor]:
    """pytorch_model.bin with torch's restricted unpickler: tensors and plain containers only, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers: never runs a stranger's code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PotionError(f"'{path}' cannot be read safely as weights ({first[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PotionError(f"'{path}' does not hold a dictionary of tensors")
    return state


def read_tensors(folder: Path, check) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files, after check({name: shape}) has passed: from the safetensors
    headers alone where the files are safetensors, so a config that claims more than the files hold allocates
    nothing."""
    files = weight_files(folder)
    if files[0].suffix == ".safetensors":
        check({name: shape for path in files for name, shape in safetensors_shapes(path).items()})
        return {name: t for path in files for name, t in read_safetensors(path).items()}
    tensors = read_pickled(files[0])
    check({name: tuple(t.shape) for name, t in tensors.items()})
    return tensors


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], folder: Path) -> None:
    """The tensors found are exactly the ones expected, each of its expected shape."""
    where = f"the weights in '{folder}' do not match its config.json"
    for name, shape in expected.items():
        if name not in found:
            raise PotionError(f"{where}: {name} is missing")
        if tuple(found[name]) != shape:
            raise PotionError(f"{where}: {name} has shape {list(found[name])}, config.json implies {list(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise PotionError(f"{where}: {extra[0]} is not part of the model config.json describes")
