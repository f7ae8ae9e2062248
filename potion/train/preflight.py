"""Checks before anything is allocated: a run directory may come from a stranger.

A config.json can say anything (100,000 layers of width 65,536), so a model is never built from it until its
weights file agrees: the safetensors header (an 8-byte length, then JSON naming every tensor's dtype, shape and
byte range) is read on its own, without the tensors, and every tensor the config implies must be there with that
shape and a floating-point dtype, and nothing else. The shapes a config implies come from the model itself built
on the meta device, which allocates nothing; a config with more layers than the file has tensors for is refused
before even that (building 100,000 layers of Python objects takes minutes, memory or not).
Memory that the weights do not hold (rope tables, a sequence's key/value cache) is bounded as well.

`check_weights_match` is for any folder of weights described by a config: a run, a checkpoint, an import.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from potion.config import ModelConfig, RunConfig
from potion.errors import PotionError
from potion.hardware import available_memory
from potion.model.shapes import Shapes
from potion.train.optim import state_slots

MAX_HEADER_BYTES = 64 << 20  # GPT-2 small's header is about 15 KB; a header this big is not a model potion wrote
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
TENSORS_PER_BLOCK = 8  # at least: query, key, value, proj, up, down and two norms, whatever the config
EXTRA_MEMORY_FLOOR = 256 << 20  # bytes beyond the weights a small model may always use (rope tables, KV cache)


# ---------------------------------------------------------------- the safetensors header


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, checked against the file's size; no tensor read."""
    if not path.is_file():
        raise PotionError(f"'{path}' is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise damaged(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise damaged(path, f"its header claims {length:,} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise damaged(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    return {name: tensor_entry(path, name, entry, data_bytes) for name, entry in header.items()}


def tensor_entry(path: Path, name: str, entry, data_bytes: int) -> tuple[str, tuple[int, ...]]:
    """One header entry as (dtype, shape), once its byte range is inside the file and fits its shape."""
    if not isinstance(entry, dict):
        raise damaged(path, f"the header entry of {name} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise damaged(path, f"{name} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise damaged(path, f"{name} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise damaged(path, f"{name} has malformed data offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise damaged(path, f"the bytes of {name} ({begin}..{end}) do not fit its shape {shape} or the file")
    return dtype, tuple(shape)


def damaged(path: Path, why: str) -> PotionError:
    return PotionError(f"'{path}' is damaged and cannot be read ({why})")


# ---------------------------------------------------------------- what a config implies


def minimum_weights(config: ModelConfig) -> int:
    """A lower bound on the numbers a model of this config stores, by arithmetic alone."""
    return config.n_layer * Shapes.of(config).block_parameters() + config.vocab_size * config.n_embd


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of what a model of this config stores (a tied head once, as the token embedding).

    The model is built on the meta device: shapes without memory. Call it once the config's size is known to be
    sane (check_weights_match does): building 100,000 layers of Python objects would take minutes.
    """
    from potion.model import GPT  # the model imports config only; importing it here keeps this module light to load

    with torch.device("meta"):
        model = GPT(config)
    state = model.state_dict()
    if config.tie_embeddings:
        state.pop("head.weight", None)
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def unstored_bytes(config: ModelConfig) -> int:
    """Memory a model needs beyond its weights: rope tables at load, one sequence's key/value cache in generation
    (both float32). Nothing in the weights bounds the context of a rope model, so this bounds it."""
    shapes = Shapes.of(config)
    rope_tables = 2 * config.context_length * shapes.head_dim // 2 if config.positions == "rope" else 0
    return 4 * rope_tables + shapes.cache_bytes(batch_size=1, element_size=4)


# ---------------------------------------------------------------- config against weights


def check_weights_match(config: ModelConfig, path: Path, config_name: str = "config.json") -> None:
    """Raise one PotionError naming the first disagreement between `config` and the weights file at `path`.

    `config_name` is how the message calls the config (the file a user would look at).
    """
    header = read_header(path)
    stored = sum(math.prod(shape) for _, shape in header.values())
    mismatch = f"'{path}' does not match {config_name}"
    if config.n_layer * TENSORS_PER_BLOCK > len(header):  # refused before building that many layers, even on meta
        raise PotionError(
            f"{mismatch}: {config_name} implies {config.n_layer:,} layers (at least "
            f"{config.n_layer * TENSORS_PER_BLOCK:,} tensors); the file has {len(header):,}"
        )
    compare_tensors(expected_tensors(config), header, mismatch, config_name)
    extra, allowed = unstored_bytes(config), max(4 * stored, EXTRA_MEMORY_FLOOR)
    if extra > allowed:
        raise PotionError(
            f"{mismatch}: its context_length of {config.context_length:,} would need {human_bytes(extra)} for "
            f"rope tables and the key/value cache; weights of {human_bytes(4 * stored)} allow at most "
            f"{human_bytes(allowed)}"
        )


def compare_tensors(
    expected: dict[str, tuple[int, ...]],
    header: dict[str, tuple[str, tuple[int, ...]]],
    mismatch: str,
    config_name: str,
) -> None:
    """The first tensor missing, of another shape, not floating point, or not expected, as one PotionError."""
    for name, shape in expected.items():
        if name not in header:
            raise PotionError(f"{mismatch}: it has no {name}, which {config_name} implies")
        dtype, found = header[name]
        if found != shape:
            raise PotionError(f"{mismatch}: {name} has shape {list(found)}, {config_name} implies {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise PotionError(f"{mismatch}: {name} has dtype {dtype}; weights are floating point")
    unexpected = [name for name in header if name not in expected]
    if unexpected:
        raise PotionError(f"{mismatch}: it has {unexpected[0]}, which {config_name} does not imply")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- a checkpoint's optimizer file


def check_optimizer_file(path: Path, optimizers: list[torch.optim.Optimizer]) -> None:
    """optimizer.safetensors against the optimizers it will be loaded into: each state tensor belongs to one of
    their parameters, has the shape its slot needs (the parameter's, or a scalar step count), and each parameter
    has the slots its optimizer reads; the random generators' states have the sizes torch expects."""
    header = read_header(path)
    check_rng_states(path, {name: entry for name, entry in header.items() if name.startswith("rng.")})
    params = [[p for group in opt.param_groups for p in group["params"]] for opt in optimizers]
    slots: dict[tuple[int, int], set[str]] = {}
    for name, (dtype, shape) in header.items():
        if name.startswith("rng."):
            continue
        parts = name.split(".", 2)
        index = [int(p) if p.isdigit() else -1 for p in parts[:2]]
        if len(parts) < 3 or not 0 <= index[0] < len(params) or not 0 <= index[1] < len(params[index[0]]):
            raise PotionError(f"'{path}' does not match this run's model: it has {name}, which belongs to no weight")
        want = () if parts[2] == "step" else tuple(params[index[0]][index[1]].shape)
        if dtype not in FLOAT_DTYPES or shape != want:
            raise PotionError(
                f"'{path}' does not match this run's model: {name} is {dtype} {list(shape)}; it should be a "
                f"float of shape {list(want)}"
            )
        slots.setdefault((index[0], index[1]), set()).add(parts[2])
    for (i, j), names in slots.items():
        if names != state_slots(optimizers[i]):
            raise PotionError(
                f"'{path}' does not match this run's optimizer: weight {j} of optimizer {i} has the state "
                f"{sorted(names)}; it keeps {sorted(state_slots(optimizers[i]))}"
            )


def check_rng_states(path: Path, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """The CPU generator's state (and any CUDA ones) as bytes of the size torch's generators have."""
    if "rng.torch_cpu" not in header:
        raise PotionError(f"'{path}' does not match this run: it has no rng.torch_cpu")
    cpu_shape = tuple(torch.get_rng_state().shape)
    for name, (dtype, shape) in header.items():
        name = re.sub(r"^rng\.rank\d+\.", "rng.", name)  # the generators of rank r of a run of several processes
        if dtype != "U8" or not (name == "rng.torch_cpu" and shape == cpu_shape or name.startswith("rng.cuda_")):
            raise PotionError(f"'{path}' does not match this run: {name} is not a random generator's state")


# ---------------------------------------------------------------- memory for a training


def training_bytes(config: RunConfig, device_type: str) -> int:
    """A lower bound on the host memory a training takes: the weights (built here before they move to a device)
    and the fixed evaluation batches; on a CPU also gradients, AdamW's two moments and the activations."""
    m, tc = config.model, config.train
    weights = minimum_weights(m)
    eval_batches = 2 * tc.eval_batches * tc.batch_size * (m.context_length + 1) * 8  # int64 tokens, two splits
    if device_type != "cpu":
        return 4 * weights + eval_batches
    activations = 4 * tc.batch_size * m.context_length * (2 * m.vocab_size + 4 * m.n_layer * m.n_embd)
    return 16 * weights + eval_batches + activations


def check_training_fits(config: RunConfig, device_type: str) -> None:
    """Refuse, before allocating, a training that cannot fit in this machine's memory."""
    need, available = training_bytes(config, device_type), available_memory()
    if available is not None and need > available:
        m = config.model
        raise PotionError(
            f"this training needs at least {human_bytes(need)} of memory ({minimum_weights(m):,} weights, "
            f"{m.n_layer:,} layers of width {m.n_embd:,}, batch_size {config.train.batch_size:,} x context_length "
            f"{m.context_length:,}) and {human_bytes(available)} is available; make the model or the batch smaller"
        )
