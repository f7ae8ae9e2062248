"""The run directory: everything needed to use or continue a model, readable without potion, no pickle.

    config.json          resolved model + data + training config (and the format version)
    tokenizer.json       the tokenizer
    model.safetensors    the weights with the best validation loss so far (what generate and eval use)
    log.jsonl, loss.png  training log and plot
    checkpoints/step-N/  resume state: model.safetensors, optimizer.safetensors, state.json, COMPLETE

Every file is written under a temporary name, flushed to disk and renamed into place, so a process killed
mid-write leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import PotionError
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
RUNS_DIR = Path("runs")


# ---------------------------------------------------------------- atomic files


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) fills a temporary file beside `path`; it then replaces `path` in one step."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PotionError(f"'{path}' is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PotionError(f"'{path}' is damaged and cannot be read ({e})") from None


# ---------------------------------------------------------------- model weights


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside a torch.compile wrapper, so saved names never carry `_orig_mod.`."""
    return getattr(model, "_orig_mod", model)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gpt = unwrap(model)
    state = gpt.state_dict()
    if gpt.config.tie_embeddings:
        state.pop("head.weight", None)  # the same tensor as token_embedding.weight; stored once
    return state


def load_model_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise PotionError(f"'{source}' does not match the model in config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")


# ---------------------------------------------------------------- run directories


def new_run_dir(base: Path = RUNS_DIR) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (stamp if i == 0 else f"{stamp}-{i}")
        if not path.exists():
            return path
    raise PotionError(f"could not find a free run directory name under '{base}'")


def latest_run(base: Path = RUNS_DIR) -> Path:
    runs = [p for p in base.glob("*") if (p / "model.safetensors").is_file()] if base.is_dir() else []
    if not runs:
        raise PotionError(f"no trained model found under '{base}/'; train one with `potion train` or pass --model DIR")
    return max(runs, key=lambda p: (p / "model.safetensors").stat().st_mtime)


def write_config(run_dir: Path, config: RunConfig) -> None:
    body = {"format_version": FORMAT_VERSION, **config.to_dict()}
    atomic_write_text(run_dir / "config.json", json.dumps(body, indent=2) + "\n")


def read_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise PotionError(f"run directory '{run_dir}' does not exist")
    if not path.is_file():
        raise PotionError(f"'{run_dir}' is not a potion run directory (no config.json)")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PotionError(f"'{path}' is damaged ({e})") from None
    if not isinstance(body, dict):
        raise PotionError(f"'{path}' is damaged (not a JSON object)")
    version = body.pop("format_version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PotionError(f"'{run_dir}' was written by a newer potion (format {version}; this one reads up to {FORMAT_VERSION}); upgrade potion")
    return RunConfig.from_dict(body, str(path))


def load(run_dir: str | Path | None = None, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """Load a trained model and its tokenizer from a run directory (default: the latest under ./runs)."""
    run_dir = Path(run_dir) if run_dir is not None else latest_run()
    config = read_config(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    if tokenizer.vocab_size != config.model.vocab_size:
        raise PotionError(
            f"'{run_dir}/tokenizer.json' has {tokenizer.vocab_size} tokens but the model expects {config.model.vocab_size}: "
            "the tokenizer does not belong to this model"
        )
    model = GPT(config.model)
    load_model_state(model, load_tensors(run_dir / "model.safetensors"), str(run_dir / "model.safetensors"))
    model.to(device).eval()
    return model, tokenizer


# ---------------------------------------------------------------- resume checkpoints


def _flatten_optimizer(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list]:
    tensors, groups = {}, []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        for param_id, slots in sd["state"].items():
            for name, value in slots.items():
                tensors[f"{i}.{param_id}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
        groups.append(sd["param_groups"])
    return tensors, groups


def _unflatten_optimizer(optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], groups: list) -> None:
    for i, opt in enumerate(optimizers):
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            opt_i, param_id, name = key.split(".", 2)
            if int(opt_i) == i:
                state.setdefault(int(param_id), {})[name] = value
        for g in groups[i]:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups[i]})


def save_checkpoint(run_dir: Path, step: int, model, optimizers, state: dict, rng_tensors: dict, keep: int) -> Path:
    """Write checkpoints/step-N/ under a temporary name; it becomes visible only once complete."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    opt_tensors, groups = _flatten_optimizer(optimizers)
    save_tensors(tmp / "model.safetensors", model_state(model))
    save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **{f"rng.{k}": v for k, v in rng_tensors.items()}})
    atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step, "optimizer_groups": groups}, indent=1))
    atomic_write_text(tmp / "COMPLETE", "")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in complete_checkpoints(run_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file())


def load_checkpoint(path: Path, model, optimizers) -> tuple[dict, dict]:
    """Restore weights and optimizer; returns (state.json contents, rng tensors)."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    load_model_state(unwrap(model), load_tensors(path / "model.safetensors"), str(path / "model.safetensors"))
    tensors = load_tensors(path / "optimizer.safetensors")
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    _unflatten_optimizer(optimizers, {k: v for k, v in tensors.items() if not k.startswith("rng.")}, state.pop("optimizer_groups"))
    return state, rng
