"""The model a server serves: loaded once, named, and loaded again when a run that is still training saves new
weights (training writes model.safetensors by rename at each better evaluation, so a page left open on a
training run shows the model as it learns)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from potion.errors import PotionError
from potion.formats.hf.folder import is_hf_model
from potion.formats.run import LoadedRun, load

RELOAD_CHECK_SECONDS = 2.0  # how often the weights file's modification time is looked at


def model_id(spec: str | None, run_dir: Path) -> str:
    """The name clients use for the model: a folder's own name, or a Hugging Face id as given."""
    if spec is None:
        return run_dir.name
    path = Path(spec).expanduser()
    return path.resolve().name if path.exists() else str(spec)


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    try:
        info = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size) if info else None


class ServedModel:
    """The loaded run and its name. `current()` is called on the model thread only, so a reload never races a
    forward pass; a request already generating keeps the model it started with."""

    def __init__(self, spec: str | None = None, device: str = "cpu"):
        self.spec, self.device = spec, device
        self.run: LoadedRun = load(spec, device)
        self.id = model_id(spec, self.run.run_dir)
        folder = self.run.run_dir
        is_run = folder.is_dir() and not is_hf_model(folder)  # not a Hugging Face folder or a GGUF file
        self.weights = folder / "model.safetensors" if is_run else None  # a run, which may be training
        self.stamp = file_stamp(self.weights)
        self.created = int(self.stamp[0] // 10**9) if self.stamp else int(time.time())
        self.checked = time.monotonic()

    @property
    def is_run(self) -> bool:
        """A potion run directory (which has a training log and may still be training), not a Hugging Face folder."""
        return self.weights is not None

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def config(self):
        return self.run.model.config

    def names(self) -> set[str]:
        """What a request's `model` field may say: the id, or the --model value as typed."""
        return {self.id} | ({str(self.spec)} if self.spec is not None else set())

    def current(self) -> LoadedRun:
        """The run, loaded again first if its weights changed on disk (checked every RELOAD_CHECK_SECONDS)."""
        now = time.monotonic()
        if self.weights is None or now - self.checked < RELOAD_CHECK_SECONDS:
            return self.run
        self.checked = now
        stamp = file_stamp(self.weights)
        if stamp is None or stamp == self.stamp:
            return self.run
        self.stamp = stamp  # a file that fails to load is not retried until it changes again
        try:
            run = load(self.run.run_dir, self.device)
        except PotionError as e:
            print(f"potion: warning: keeping the loaded weights: {e}", file=sys.stderr)
            return self.run
        if run.model.config != self.run.model.config:  # requests were tokenized for the model being served
            print(
                f"potion: warning: '{self.run.run_dir}' now holds a model of another shape; restart potion serve "
                "to serve it",
                file=sys.stderr,
            )
            return self.run
        self.run = run
        return run
