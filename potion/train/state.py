"""The training loop's state as named objects: LoopState is what a checkpoint saves (state.json) and what a resumed
run starts from; Progress is what the loop times and reports; Training is one run being trained, the one object
that the loop's phases and the reports work with.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from potion.config import RunConfig
from potion.data.tokenizer import Tokenizer
from potion.data.tokens import Batches
from potion.formats.run import RunLog
from potion.hardware import MatmulPeak
from potion.model import GPT
from potion.train.interrupt import StopRequest
from potion.train.optim import StepTally
from potion.train.trackers import Tracker

# ---------------------------------------------------------------- the state a checkpoint saves


@dataclass
class LogWindow:
    """The steps since the last `train` row of log.jsonl: what that row averages over."""

    steps: int = 0
    nonfinite: int = 0  # of those, the steps dropped for a NaN or inf
    loss_sum: float = 0.0  # the finite steps' summed batch losses (tallied on the device; copied here when saved)


@dataclass
class LoopState:
    """Everything the loop changes from step to step that a resumed run needs back: a checkpoint's state.json."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float = math.inf
    nonfinite_steps: int = 0  # in all
    log_window: LogWindow = field(default_factory=LogWindow)

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        """The state in a checkpoint's state.json; a ValueError says which field is missing or of the wrong kind."""
        window = saved.get("log_window") or {}
        if isinstance(window, list) and len(window) == 4:  # written before the window had names: sum, steps, ...
            window = {"loss_sum": window[0], "steps": window[1], "nonfinite": window[3]}
        if not isinstance(window, dict) or set(window) - {"steps", "nonfinite", "loss_sum"}:
            raise ValueError(f"log_window is {window!r}")
        missing = {"step", "tokens", "best_val_loss"} - set(saved)
        if missing:
            raise ValueError(f"it has no {', '.join(sorted(missing))}")
        state = cls(
            saved["step"], saved["tokens"], saved["best_val_loss"], saved.get("nonfinite_steps", 0), LogWindow(**window)
        )
        counts = [state.step, state.tokens, state.nonfinite_steps, state.log_window.steps, state.log_window.nonfinite]
        if not all(type(n) is int and n >= 0 for n in counts):
            raise ValueError(f"a step or token count is not a whole number: {counts}")
        for name, value in (("best_val_loss", state.best_val_loss), ("loss_sum", state.log_window.loss_sum)):
            if type(value) not in (int, float) or math.isnan(value):
                raise ValueError(f"{name} is {value!r}")
        return state


# ---------------------------------------------------------------- what is timed and reported (not saved)


@dataclass
class Progress:
    """What the loop times and reports; not saved (a resumed run starts its clocks again)."""

    started: float
    first_step: int
    bar: tqdm
    flops_per_token: int
    peak: MatmulPeak  # of one device, measured here: model FLOPs utilisation (MFU) is relative to it
    processes: int = 1  # tokens/s counts all the processes' devices, and so does the peak MFU divides by
    train_seconds: float = 0.0  # time in training steps only, evaluation excluded
    window_started: float = field(default_factory=time.time)
    seconds_per_step: float | None = None  # wall clock, evaluations included, smoothed over the recent windows
    last_plot: float = 0.0
    learning_rate: float = 0.0
    nonfinite_in_a_row: int = 0  # as last read; while > 0 nothing is checkpointed
    best_step: int | None = None  # the step whose evaluation set the best validation loss in this session
    train_loss: float | None = math.nan  # of the last evaluation
    val_loss: float = math.nan

    @property
    def peak_tflops(self) -> float:
        return self.peak.tflops * self.processes


# ---------------------------------------------------------------- one run being trained


@dataclass
class Training:
    """One run being trained: what the phases work with. Only `state` changes what is learned and is saved."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    model: GPT
    shared: torch.nn.Module  # the model as the processes share it: DDP around it, or sharded by FSDP2, or itself
    parallel: str  # ddp | fsdp | "" (one process)
    compiled: torch.nn.Module  # the model as the steps call it (torch.compile'd or `shared` itself)
    cuda_graphs: bool  # compiled steps replay as CUDA graphs
    optimizers: list
    tokenizer: Tokenizer
    batches: Batches
    eval_sets: dict
    val_bytes_per_token: float  # turns the validation loss into bits per byte
    run_log: RunLog | None  # rank 0's only
    tally: StepTally
    state: LoopState
    progress: Progress
    stop_request: StopRequest
    resumed_at: int | None  # the step of the checkpoint resumed from: evaluated and saved already
    last_saved: Path | None  # the newest checkpoint
    quiet: bool
    trackers: list[Tracker] = field(default_factory=list)  # train.log_to's, rank 0's only
    reader: GPT | None = None  # with FSDP, rank 0's whole copy of the weights that samples and probes read
