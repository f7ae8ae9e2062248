"""The run directory: everything needed to use or continue a model, readable without potion, no pickle.

    config.json          resolved model + data + training config (and the format version)
    tokenizer.json       the tokenizer
    model.safetensors    the weights with the best validation loss so far (what generate and eval use)
    log.jsonl, loss.png  training log and plot
    checkpoints/step-N/  resume state: model.safetensors, optimizer.safetensors, state.json, COMPLETE
    train.lock           while a training runs: its process id and host, so a second one refuses to start

Every file is written under a temporary name, flushed to disk and renamed into place, so a process killed
mid-write leaves the previous version intact. A checkpoint folder gets its name only once all its files are on
disk, and its COMPLETE marker records the sha256 of each file: a checkpoint cut short or corrupted later is
never resumed from; the previous good one is used instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import RunConfig
from .errors import PotionError
from .fileio import atomic_write, atomic_write_text, fsync_dir, is_leftover, sha256_file, write_failed  # noqa: F401
from .model import GPT
from .tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
RUNS_DIR = Path("runs")


# ---------------------------------------------------------------- atomic files


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


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def save_checkpoint(run_dir: Path, step: int, model, optimizers, state: dict, rng_tensors: dict, keep: int) -> Path:
    """Write checkpoints/step-N/ under a temporary name; it becomes visible only once complete.

    state["val_loss"] (the evaluation at this step, if any) lets pruning keep the best checkpoint besides the
    last `keep` ones (keep = 0 keeps all). A failed write leaves the earlier checkpoints as they were.
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        opt_tensors, groups = _flatten_optimizer(optimizers)
        save_tensors(tmp / "model.safetensors", model_state(model))
        save_tensors(tmp / "optimizer.safetensors", {**opt_tensors, **{f"rng.{k}": v for k, v in rng_tensors.items()}})
        atomic_write_text(tmp / "state.json", json.dumps({**state, "step": step, "optimizer_groups": groups}, indent=1))
        hashes = {name: sha256_file(tmp / name) for name in CHECKPOINT_FILES}
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


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files and folders of a process that was killed mid-write (call with the lock held)."""
    for p in [*run_dir.glob(".*.tmp*"), *(run_dir / "checkpoints").glob(".step-*"),
              *(run_dir / "checkpoints").glob(".trash-*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def is_leftover(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp" in path.name


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "COMPLETE").is_file())


def checkpoint_problem(path: Path) -> str | None:
    """Why this checkpoint cannot be trusted (a missing file, a sha256 that does not match), or None."""
    try:
        marker = (path / "COMPLETE").read_text(encoding="utf-8")
        hashes = json.loads(marker)["sha256"] if marker.strip() else {}  # an empty marker: written before hashes
    except (OSError, ValueError, KeyError, TypeError):
        return "its COMPLETE marker is unreadable"
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        if name in hashes and sha256_file(path / name) != hashes[name]:
            return f"{name} does not match its recorded sha256"
    return None


def load_checkpoint(path: Path, model, optimizers) -> tuple[dict, dict]:
    """Restore weights and optimizer; returns (state.json contents, rng tensors)."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PotionError(f"'{path / 'state.json'}' is damaged ({e})") from None
    load_model_state(unwrap(model), load_tensors(path / "model.safetensors"), str(path / "model.safetensors"))
    tensors = load_tensors(path / "optimizer.safetensors")
    rng = {k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}
    _unflatten_optimizer(optimizers, {k: v for k, v in tensors.items() if not k.startswith("rng.")}, state.pop("optimizer_groups"))
    return state, rng


def load_latest_checkpoint(run_dir: Path, model, optimizers) -> tuple[Path, dict, dict] | None:
    """The newest intact checkpoint, restored into model and optimizers; damaged ones are skipped with a warning.

    None when the run has no checkpoint yet; a PotionError when it has some but none is intact.
    """
    checkpoints = complete_checkpoints(run_dir)
    for i, path in enumerate(reversed(checkpoints)):
        problem = checkpoint_problem(path)
        if problem is None:
            return (path, *load_checkpoint(path, model, optimizers))
        older = checkpoints[-i - 2].name if i + 1 < len(checkpoints) else None
        warnings.warn(f"checkpoint '{path}' is damaged ({problem}); "
                      + (f"falling back to {older}" if older else "no older checkpoint is left"))
    if checkpoints:
        raise PotionError(f"no intact checkpoint in '{run_dir / 'checkpoints'}'; train into a new --out "
                          "(or delete that folder to restart this run from step 0)")
    return None


# ---------------------------------------------------------------- one training per run directory

LOCK_NAME = "train.lock"


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), so a reused process id is not mistaken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    now = _process_start_time(pid)
    return not (start_time and now and now != start_time)


def acquire_lock(run_dir: Path) -> Path:
    """Create run_dir/train.lock holding this process's id and host; refuse while another live training holds it.

    A lock left by a process that is gone (killed, machine restarted) is taken over with a warning.
    """
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "start_time": _process_start_time(os.getpid())}
    tmp = run_dir / f".{LOCK_NAME}.tmp{os.getpid()}"
    atomic_write_text(tmp, json.dumps(me))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # fails if the lock exists: two processes can never both succeed
                return path
            except FileExistsError:
                pass
            try:
                holder = json.loads(path.read_text(encoding="utf-8"))
                pid, holder_host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pid, holder_host = None, host  # unreadable: its writer died before finishing it
            if pid is not None and holder_host != host:
                raise PotionError(f"'{run_dir}' is locked by process {pid} on host {holder_host}; if no training "
                                  f"is running there, delete '{path}'")
            if pid is not None and _process_alive(pid, holder.get("start_time")):
                raise PotionError(f"'{run_dir}' is in use by another training (process {pid} on {host}); "
                                  "wait for it to finish or train into another --out")
            warnings.warn(f"taking over '{path}' from process {pid}, which is no longer running")
            path.unlink(missing_ok=True)
        raise PotionError(f"could not lock '{run_dir}': other processes keep taking it")
    finally:
        tmp.unlink(missing_ok=True)


def release_lock(path: Path) -> None:
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
