"""Weights and resume checkpoints, as safetensors + JSON (never pickle).

    model.safetensors    the weights (a tied output head is stored once, as the token embedding); a LoRA run's
                         with its adapters merged in, so that every command reads it as any model
    adapter.safetensors  a LoRA run's adapters alone, of the same model (potion.model.lora's names)
    checkpoints/step-N/  model.safetensors, optimizer.safetensors (optimizer state and RNG states),
                         state.json (the training loop's state), COMPLETE; a LoRA run's hold adapter.safetensors
                         instead of model.safetensors: only the adapters train, and the frozen weights are
                         train.init_from's, read from there again on resume

A checkpoint folder gets its name only once all its files are on disk, and its COMPLETE marker records the sha256
of each file: a checkpoint cut short or corrupted later is never resumed from; the previous good one is used.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from potion.errors import PotionError
from potion.formats.fileio import atomic_write, atomic_write_text, fsync_dir, sha256_file, write_failed
from potion.model import GPT
from potion.model.lora import adapter_state, has_adapters, merged_state
from potion.parallel.sharded import placed_like, whole_on_main
from potion.parallel.world import gather_objects, is_main, world
from potion.train.preflight import check_optimizer_file, check_weights_match, compare_tensors, read_header

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
ADAPTER_FILE = "adapter.safetensors"


# ---------------------------------------------------------------- safetensors files


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
    """The weights as a plain GPT holds them: a model with LoRA adapters gives its merged weights."""
    gpt = unwrap(model)
    state = merged_state(gpt) if has_adapters(gpt) else gpt.state_dict()
    if gpt.config.tie_embeddings:
        state.pop("head.weight", None)  # the same tensor as token_embedding.weight; stored once
    return state


def load_model_state(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    refuse_nonfinite(state, source)
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    targets = model.state_dict()  # sharded over the processes with FSDP: each takes its part
    state = {k: placed_like(v, targets[k]) if k in targets else v for k, v in state.items()}
    assign = next(model.parameters()).is_meta  # GPT.without_weights: the model takes these tensors as they are
    if assign:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    if assign:
        model.tie_head()
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise PotionError(
            f"'{source}' does not match the model in config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def refuse_nonfinite(state: dict[str, torch.Tensor], source: str) -> None:
    damaged = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if damaged is not None:  # potion never saves such weights: a flipped bit, or a file made to crash its reader
        raise PotionError(f"'{source}' is damaged: {damaged} holds numbers that are not finite (NaN or inf)")


# ---------------------------------------------------------------- LoRA adapters


def trained_state(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """The weights a checkpoint keeps, and their file: a LoRA run's adapters alone (the frozen weights are its
    train.init_from's), else every weight."""
    gpt = unwrap(model)
    if has_adapters(gpt):
        return ADAPTER_FILE, adapter_state(gpt)
    return "model.safetensors", model_state(gpt)


def save_adapters(run_dir: Path, model: torch.nn.Module) -> None:
    """adapter.safetensors beside model.safetensors, for a model with LoRA adapters (nothing otherwise)."""
    gpt = unwrap(model)
    if has_adapters(gpt):
        save_tensors(run_dir / ADAPTER_FILE, adapter_state(gpt))


def load_adapters(model: GPT, path: Path) -> None:
    """Adapters saved by trained_state into a model that has the same ones; the file's names and shapes are
    checked before its tensors are read (a checkpoint may be a stranger's)."""
    expected = {name: tuple(tensor.shape) for name, tensor in adapter_state(model).items()}
    compare_tensors(expected, read_header(path), f"'{path}' does not match config.json", "config.json")
    state = load_tensors(path)
    refuse_nonfinite(state, str(path))
    model.load_state_dict(state, strict=False)  # every adapter is there (compared above); the rest stays


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


def _unflatten_optimizer(
    optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor], groups: list
) -> None:
    for i, opt in enumerate(optimizers):
        params = [p for group in opt.param_groups for p in group["params"]]
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            opt_i, param_id, name = key.split(".", 2)
            if int(opt_i) == i:
                slot = placed_like(value, params[int(param_id)]) if value.dim() else value  # a step count is whole
                state.setdefault(int(param_id), {})[name] = slot
        for g in groups[i]:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups[i]})


def rng_states() -> dict[str, torch.Tensor]:
    """The states of torch's random generators (CPU, and each CUDA device; one process of several: its own
    device's): dropout draws from them."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and world().launched:
        states[f"cuda_{torch.cuda.current_device()}"] = torch.cuda.get_rng_state()
    elif torch.cuda.is_available():
        states.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def gathered_rng_states() -> dict[str, torch.Tensor]:
    """Every process's generators, for rank 0 to save: its own as rng.NAME, rank r's as rng.rankR.NAME."""
    everyone = gather_objects(rng_states())
    if everyone is None:
        return {}
    named = {f"rng.{k}": v for k, v in everyone[0].items()}
    for rank, states in enumerate(everyone[1:], 1):
        named.update({f"rng.rank{rank}.{k}": v for k, v in states.items()})
    return named


def restore_rng(states: dict[str, torch.Tensor]) -> bool:
    """Restore this process's generators; False when the checkpoint has none for it (a rank that the run that
    saved it did not have)."""
    rank = world().rank
    if rank:
        prefix = f"rank{rank}."
        states = {k.removeprefix(prefix): v for k, v in states.items() if k.startswith(prefix)}
        if "torch_cpu" not in states:
            return False
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and world().launched:
        own = states.get(f"cuda_{torch.cuda.current_device()}")
        if own is not None:
            torch.cuda.set_rng_state(own)
    elif cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


def save_checkpoint(run_dir: Path, step: int, model, optimizers, state: dict, keep: int) -> Path:
    """Write checkpoints/step-N/ (weights, optimizers, random generators, the loop's `state`) under a temporary
    name; it becomes visible only once complete.

    state["val_loss"] (the evaluation at this step, if any) lets pruning keep the best checkpoint besides the
    last `keep` ones (keep = 0 keeps all). A failed write leaves the earlier checkpoints as they were.
    With several processes every one takes part in gathering the weights, the optimizer state and the generators'
    states whole, and rank 0 writes them.
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    opt_tensors, groups = _flatten_optimizer(optimizers)
    weights_file, weights = trained_state(model)
    weights, opt_tensors, rng = whole_on_main(weights), whole_on_main(opt_tensors), gathered_rng_states()
    if not is_main():
        return final
    tmp = root / f".step-{step:08d}.tmp{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_tensors(tmp / weights_file, weights)
        save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **rng})
        atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step, "optimizer_groups": groups}, indent=1))
        hashes = {name: sha256_file(tmp / name) for name in checkpoint_files(tmp)}
        atomic_write_text(tmp / "COMPLETE", json.dumps({"sha256": hashes}, indent=1))
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except (OSError, PotionError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e.__cause__ if isinstance(e, PotionError) else e
        if not isinstance(cause, (OSError, SafetensorError)):
            raise
        raise write_failed(final, cause) from cause  # name the checkpoint, not its temporary folder
    for old in prunable(complete_checkpoints(run_dir), keep):
        _remove(old)
    return final


def _remove(folder: Path) -> None:
    """Rename first, then delete: a process killed half-way never leaves a half-deleted step-N behind."""
    trash = folder.with_name(f".trash-{folder.name}.{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prunable(checkpoints: list[Path], keep: int) -> list[Path]:
    """All but the last `keep` checkpoints and the one with the lowest validation loss."""
    if not keep or len(checkpoints) <= keep:
        return []
    losses = {}
    for p in checkpoints:
        try:
            loss = json.loads((p / "state.json").read_text(encoding="utf-8")).get("val_loss")
        except (OSError, ValueError):
            continue
        if isinstance(loss, (int, float)) and loss == loss:
            losses[p] = loss
    best = min(losses, key=losses.get) if losses else None
    return [p for p in checkpoints[:-keep] if p != best]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file())


def checkpoint_files(path: Path) -> tuple[str, ...]:
    """The files of a checkpoint: a LoRA run's hold adapter.safetensors where others hold model.safetensors."""
    weights = ADAPTER_FILE if (path / ADAPTER_FILE).is_file() else "model.safetensors"
    return (weights, *CHECKPOINT_FILES[1:])


def checkpoint_problem(path: Path) -> str | None:
    """Why this checkpoint cannot be trusted (a missing file, a sha256 that does not match), or None."""
    try:
        marker = (path / "COMPLETE").read_text(encoding="utf-8")
        hashes = json.loads(marker)["sha256"] if marker.strip() else {}  # an empty marker: written before hashes
    except (OSError, ValueError, KeyError, TypeError):
        return "its COMPLETE marker is unreadable"
    for name in checkpoint_files(path):
        if not (path / name).is_file():
            return f"{name} is missing"
        if name in hashes and sha256_file(path / name) != hashes[name]:
            return f"{name} does not match its recorded sha256"
    return None


def load_checkpoint(path: Path, model, optimizers) -> tuple[dict, dict]:
    """Restore weights and optimizer; returns (state.json contents, rng tensors).

    A checkpoint can come from a stranger with a COMPLETE marker that matches it, so its files are checked
    against this run's model before they are read (the model itself was built from the checked config).
    """
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PotionError(f"'{path / 'state.json'}' is damaged ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("optimizer_groups"), list):
        raise PotionError(f"'{path / 'state.json'}' is damaged (no optimizer_groups)")
    gpt, weights = unwrap(model), path / "model.safetensors"
    if not has_adapters(gpt):
        check_weights_match(gpt.config, weights)
    check_optimizer_file(path / "optimizer.safetensors", optimizers)
    if has_adapters(gpt):
        load_adapters(gpt, path / ADAPTER_FILE)
    else:
        load_model_state(gpt, load_tensors(weights), str(weights))
    tensors = load_tensors(path / "optimizer.safetensors")
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    optimizer_tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    try:
        _unflatten_optimizer(optimizers, optimizer_tensors, state.pop("optimizer_groups"))
    except (KeyError, IndexError, TypeError, ValueError) as e:  # torch's own checks of the groups, and ours
        raise PotionError(f"'{path / 'state.json'}' does not match this run's optimizer ({e})") from None
    return state, rng


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint; damaged ones are skipped with a warning.

    None when the run has no checkpoint yet; a PotionError when it has some but none is intact.
    """
    checkpoints = complete_checkpoints(run_dir)
    for i, path in enumerate(reversed(checkpoints)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        older = checkpoints[-i - 2].name if i + 1 < len(checkpoints) else None
        warnings.warn(
            f"checkpoint '{path}' is damaged ({problem}); "
            + (f"falling back to {older}" if older else "no older checkpoint is left")
        )
    if checkpoints:
        raise PotionError(
            f"no intact checkpoint in '{run_dir / 'checkpoints'}'; train into a new --out "
            "(or delete that folder to restart this run from step 0)"
        )
    return None


def load_latest_checkpoint(run_dir: Path, model, optimizers) -> tuple[Path, dict, dict] | None:
    """The newest intact checkpoint (see latest_checkpoint), restored into model and optimizers."""
    path = latest_checkpoint(run_dir)
    return None if path is None else (path, *load_checkpoint(path, model, optimizers))
