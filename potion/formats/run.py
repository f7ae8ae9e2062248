"""The run directory: everything needed to use or continue a model, readable without potion, no pickle.

    config.json          resolved model + data + training config (and the format version)
    tokenizer.json       the tokenizer
    model.safetensors    the weights with the best validation loss so far (what generate and eval use)
    log.jsonl, loss.png  training log and plot
    checkpoints/step-N/  resume state (see checkpoint.py)
    train.lock           held (an OS file lock) while a training runs; it names that process and its host

This module finds, creates, locks and reads run directories, and `load()` resolves one once: commands get the
directory, its config, the model and the tokenizer from that one call.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from potion.config import RunConfig
from potion.data.tokenizer import Tokenizer, load_tokenizer
from potion.errors import PotionError
from potion.formats.fileio import atomic_write, atomic_write_text, is_leftover
from potion.formats.gguf import gguf_run_config, read_gguf
from potion.formats.hf.folder import is_hf_model
from potion.formats.hf.folder import read_model as read_hf_model
from potion.formats.hf.folder import read_run_config as read_hf_config
from potion.formats.hf.hub import model_folder
from potion.model import GPT
from potion.train.checkpoint import load_model_state, load_tensors
from potion.train.preflight import check_weights_match

FORMAT_VERSION = 1
RUNS_DIR = Path("runs")
LOCK_NAME = "train.lock"
# Fields that may differ between a run and its resumption: they change when and how long, not what is learned.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.max_time",
    "train.stop_at_loss",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.sample_tokens",
    "train.device",
    "train.compile",
    "train.parallel",
    "train.probe",
    "train.max_nonfinite_steps",
    "train.log_to",  # a tracker added on resume logs from there on
}
DERIVED_FIELDS = {"model.vocab_size"}  # filled in from the tokenizer, never set by hand


# ---------------------------------------------------------------- finding and creating


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


def refuse_existing(out: Path) -> None:
    """A new run needs an empty (or missing) folder; the lock and temporary files of a killed training do not count."""
    if out.exists() and any(p.name != LOCK_NAME and not is_leftover(p) for p in out.iterdir()):
        raise PotionError(f"run directory '{out}' already exists; pass --resume to continue it or choose another --out")


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files and folders of a process that was killed mid-write (call with the lock held)."""
    checkpoints = run_dir / "checkpoints"
    for p in [*run_dir.glob(".*.tmp*"), *checkpoints.glob(".step-*"), *checkpoints.glob(".trash-*")]:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---------------------------------------------------------------- config.json


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
        raise PotionError(
            f"'{run_dir}' was written by a newer potion (format {version!r}; this one reads up to "
            f"{FORMAT_VERSION}); upgrade potion"
        )
    return RunConfig.from_dict(body, str(path))


def check_resumable(run_dir: Path, saved: RunConfig, config: RunConfig) -> None:
    """Refuse to resume with changes to anything but when and how long training runs."""
    a, b = saved.to_dict(), config.to_dict()
    changed = [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s][k]]
    changed = [f for f in changed if f not in RESUMABLE_CHANGES | DERIVED_FIELDS]
    if changed:
        raise PotionError(
            f"cannot resume '{run_dir}' with a different {', '.join(changed)}; resume with the saved "
            "config (drop those flags) or train into a new --out"
        )


# ---------------------------------------------------------------- resolving a run once


@dataclass(frozen=True)
class SavedRun:
    """A run directory found (default: the latest under ./runs) and its config.json read, once."""

    path: Path
    config: RunConfig


def find_run(path: str | Path | None = None) -> SavedRun:
    path = Path(path) if path is not None else latest_run()
    return SavedRun(path, read_config(path))


@dataclass(frozen=True)
class LoadedRun:
    """A run directory resolved once: where it is, its config, the model and the tokenizer.

    It unpacks as the pair most code wants: `model, tokenizer = potion.load(...)`.
    """

    run_dir: Path
    config: RunConfig
    model: GPT
    tokenizer: Tokenizer

    def __iter__(self):
        return iter((self.model, self.tokenizer))


def load(run_dir: str | Path | None = None, device: str = "cpu") -> LoadedRun:
    """Load a trained model and its tokenizer from a run directory (default: the latest under ./runs), a Hugging
    Face folder (GPT-2 or the Llama family), a GGUF file, or a Hugging Face model name such as `gpt2`."""
    folder = latest_run() if run_dir is None else model_folder(run_dir)
    if is_gguf(folder):
        (config, tokenizer, weights), source = read_gguf(folder), folder
    elif is_hf_model(folder):
        (config, tokenizer, weights), source = read_hf_model(folder), folder
    else:
        (config, tokenizer, weights), source = read_run(folder), folder / "model.safetensors"
    model = GPT.without_weights(config.model)
    load_model_state(model, weights, str(source))
    model.to(device).eval()
    return LoadedRun(folder, config, model, tokenizer)


def is_gguf(path: Path) -> bool:
    """A GGUF file (llama.cpp's format), as opposed to a run directory or a Hugging Face folder."""
    return path.is_file() and path.suffix.lower() == ".gguf"


def source_config(spec: str | Path) -> RunConfig:
    """The config of a run directory, Hugging Face folder, GGUF file or model name, without reading its weights."""
    folder = model_folder(spec)
    if is_gguf(folder):
        return gguf_run_config(folder)
    return read_hf_config(folder) if is_hf_model(folder) else read_config(folder)


def read_run(folder: Path) -> tuple[RunConfig, Tokenizer, dict]:
    """A potion run directory's config, tokenizer and weights, checked to belong together."""
    config = read_config(folder)
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if tokenizer.vocab_size != config.model.vocab_size:
        raise PotionError(
            f"'{folder}/tokenizer.json' has {tokenizer.vocab_size} tokens but the model expects "
            f"{config.model.vocab_size}: the tokenizer does not belong to this model"
        )
    check_weights_match(config.model, folder / "model.safetensors")  # before the model is allocated
    return config, tokenizer, load_tensors(folder / "model.safetensors")


def with_vocabulary(config: RunConfig, tokenizer: Tokenizer) -> RunConfig:
    return replace(config, model=replace(config.model, vocab_size=tokenizer.vocab_size))


# ---------------------------------------------------------------- one training per run directory


class RunLock:
    """train.lock: an OS file lock (the kernel releases it when the process dies, however it dies), and inside
    it the holder's process id and host, so that a second training can say who holds it."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.fd = run_dir, run_dir / LOCK_NAME, None

    def __enter__(self) -> RunLock:
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self.held_elsewhere() from None
            if self.still_the_file(fd):
                self.fd = fd
                self.take_over(fd)
                return self
            os.close(fd)  # its holder removed it as we opened it: lock the new one
        raise PotionError(f"could not lock '{self.run_dir}': other processes keep taking it")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then retries on a fresh file
        os.close(self.fd)

    def still_the_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def take_over(self, fd: int) -> None:
        """Write this process into the lock; a holder named there died without removing it."""
        previous = self.holder(os.read(fd, 4096))
        if previous:
            warnings.warn(f"taking over '{self.path}' from process {previous[0]}, which is no longer running")
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)

    @staticmethod
    def holder(text: bytes) -> tuple[int, str] | None:
        """(process id, host) written in a lock, or None for an empty one or one cut short by a kill."""
        try:
            body = json.loads(text)
            return int(body["pid"]), str(body["host"])
        except (ValueError, KeyError, TypeError):
            return None

    def held_elsewhere(self) -> PotionError:
        try:
            pid, host = self.holder(self.path.read_bytes()) or ("unknown", socket.gethostname())
        except OSError:
            pid, host = "unknown", socket.gethostname()
        if host != socket.gethostname():
            return PotionError(
                f"'{self.run_dir}' is locked by process {pid} on host {host}; wait for that training "
                "to finish or train into another --out"
            )
        return PotionError(
            f"'{self.run_dir}' is in use by another training (process {pid} on {host}); wait for it "
            "to finish or train into another --out"
        )


# ---------------------------------------------------------------- log.jsonl and loss.png


class RunLog:
    """log.jsonl, appended line by line; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = path
        if keep_through_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if (row := self.parse(line)) is not None and row["step"] <= keep_through_step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    @staticmethod
    def parse(line: str) -> dict | None:
        """A row, or None for a line cut short by a killed process."""
        try:
            row = json.loads(line)
        except ValueError:
            return None
        return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None

    def rows(self) -> list[dict]:
        return read_log(self.path)

    def write(self, **row) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_log(path: Path) -> list[dict]:
    """The rows of a log.jsonl, skipping a line cut short by a killed process."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [row for line in lines if (row := RunLog.parse(line)) is not None]


def loss_points(rows: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    """(step, loss) of the rows of one kind whose loss is a finite number: a row from a log that was edited or
    damaged is left out, not plotted."""
    return [
        (r["step"], r[key])
        for r in rows
        if r.get("kind") == kind and type(r.get(key)) in (int, float) and math.isfinite(r[key])
    ]


def plot_losses(run_dir: Path, rows: list[dict]) -> None:
    """loss.png: the batch losses, and the train and validation losses of every evaluation. Without matplotlib (an
    extra) there is no picture, said once: the numbers are all in log.jsonl."""
    try:
        import matplotlib
    except ImportError:
        warn_once('loss.png is not drawn: matplotlib is not installed (pip install "potion[plot]")')
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, key, style, label in (
        ("train", "loss", dict(color="#bbb", lw=1), "train (batch)"),
        ("eval", "train_loss", dict(marker="o"), "train (eval)"),
        ("eval", "val_loss", dict(marker="o"), "validation"),
    ):
        points = loss_points(rows, kind, key)
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(run_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


@functools.cache
def warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)
