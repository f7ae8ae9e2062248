"""What a training run shows and writes as it goes: the progress bar, the rows of log.jsonl, loss.png, the probe,
a line and a sample at every evaluation, and the summary at the end. The loop's phases call these; nothing here
changes what is learned.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from potion.config import RunConfig
from potion.data.tokenizer import Tokenizer
from potion.explain import save_probe
from potion.formats.run import plot_losses
from potion.hardware import matmul_peak
from potion.infer.generate import generate_tokens
from potion.model import GPT
from potion.parallel.world import is_main, world
from potion.train.evaluate import bits_per_byte
from potion.train.state import Progress, Training

PLOT_EVERY_SECONDS = 30  # loss.png is redrawn at most this often (and at the end): drawing costs more than a step
RATE_SMOOTHING = 0.3  # the weight of the latest window in the seconds per step that "left=" is reckoned from
# The figures of log.jsonl's rows that train.log_to's trackers are sent, as "train/loss", "eval/val_loss", ...
TRACKED = {"train": ("loss", "lr", "tokens_per_second", "mfu"), "eval": ("train_loss", "val_loss", "val_bits_per_byte")}


def log(message: str) -> None:
    """A line on the terminal; with several processes, rank 0's only."""
    if is_main():
        tqdm.write(message, file=sys.stderr)


def start_progress(
    config: RunConfig,
    model: GPT,
    device: torch.device,
    dtype: torch.dtype,
    first_step: int,
    started: float,
    quiet: bool,
    train_tokens: int,
    run_dir: Path,
    parallel: str = "",
) -> Progress:
    """Say what is about to train (and the matmul peak its MFU is of), and start the progress bar where the run
    stands."""
    processes, peak = world().size, matmul_peak(device, dtype)
    if not quiet:
        shared = f", {processes} processes ({parallel}, {world().backend})" if parallel else ""
        log(
            f"potion: {model.num_parameters() / 1e6:.2f}M parameters, {train_tokens:,} training tokens, device "
            f"{device.type}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads{shared}; MFU of "
            f"{peak}{' per device' if parallel else ''} -> {run_dir}"
        )
    bar = tqdm(
        total=config.train.max_steps,
        initial=first_step,
        disable=quiet,
        dynamic_ncols=True,
        file=sys.stderr,
        unit="step",
    )
    return Progress(
        started=started,
        first_step=first_step,
        bar=bar,
        flops_per_token=model.training_flops_per_token(),
        peak=peak,
        processes=processes,
        last_plot=started,
    )  # the first plot: a curve


def report_evaluation(t: Training, done: bool, reader: GPT | None = None) -> None:
    """The eval row of log.jsonl, loss.png now and then, the probe, and a line and a sample on the terminal.
    `reader` is the model the probe and the sample read (default: the training's own)."""
    reader = t.model if reader is None else reader
    reader_device = next(reader.parameters()).device
    tc, state, progress = t.config.train, t.state, t.progress
    train_loss, val_loss = progress.train_loss, progress.val_loss
    write_row(
        t,
        kind="eval",
        step=state.step,
        tokens=state.tokens,
        train_loss=train_loss,
        val_loss=val_loss,
        val_bits_per_byte=bits_per_byte(val_loss, t.val_bytes_per_token),
        best_val_loss=state.best_val_loss,
        nonfinite_steps=state.nonfinite_steps,
        elapsed=round(time.time() - progress.started, 3),
        train_seconds=round(progress.train_seconds, 3),
    )
    if done or time.time() - progress.last_plot >= PLOT_EVERY_SECONDS:
        plot_losses(t.run_dir, t.run_log.rows())
        progress.last_plot = time.time()
    finite = math.isfinite(val_loss)  # a model gone NaN has nothing to show; the non-finite streak stops it
    if tc.probe and finite:  # attention and prediction for one prompt at every evaluation: watch them form
        save_probe(reader, t.tokenizer, tc.probe, t.run_dir, state.step)
    if t.quiet:
        return
    train_part = f"train loss {train_loss:.4f}, " if train_loss is not None else ""
    best = " (best)" if progress.best_step == state.step else ""
    log(f"step {state.step}: {train_part}val loss {val_loss:.4f}{best}")
    if tc.sample_tokens and state.step > 0 and finite:
        sample = sample_text(reader, t.tokenizer, tc.sample_tokens, tc.seed + state.step, reader_device)
        log("  | " + sample.replace("\n", "\n  | "))


def sample_text(model: GPT, tokenizer: Tokenizer, n_tokens: int, seed: int, device: torch.device) -> str:
    """A short sample from end-of-text, with its own generator so training randomness is untouched."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[tokenizer.eot_id]], device=device)
    steps = generate_tokens(
        model, idx, n_tokens, temperature=0.8, top_k=0, top_p=1.0, generator=generator, eot_id=tokenizer.eot_id
    )
    ids = [int(token[0]) for token in steps]
    model.train()
    return tokenizer.decode(i for i in ids if i != tokenizer.eot_id)


def report_window(t: Training) -> float:
    """The train row of log.jsonl for the steps since the last one, and the progress bar's figures; returns the
    time the window ends at."""
    progress, window, tc = t.progress, t.state.log_window, t.config.train
    finite = window.steps - window.nonfinite
    batch_loss = float(t.tally.loss_sum) / finite if finite else None
    now = time.time()
    seconds = max(now - progress.window_started, 1e-9)
    speed = window.steps * t.config.tokens_per_step / seconds
    mfu = speed * progress.flops_per_token / 1e12 / progress.peak_tflops
    write_row(
        t,
        kind="train",
        step=t.state.step,
        loss=batch_loss,
        lr=progress.learning_rate,
        nonfinite_steps=window.nonfinite,
        tokens_per_second=round(speed),
        mfu=round(mfu, 4),
        peak_tflops=round(progress.peak_tflops, 4),  # what mfu is of: the matmul peak of all the processes' devices
        peak_matmul_size=progress.peak.size,
    )
    if window.steps:
        progress.seconds_per_step = smoothed(progress.seconds_per_step, seconds / window.steps)
    left = time_left(t.state.step, tc.max_steps, progress.seconds_per_step or 0.0, now - progress.started, tc.max_time)
    postfix = {
        "loss": "nan" if batch_loss is None else f"{batch_loss:.3f}",
        "tok/s": f"{speed:,.0f}",
        "MFU": f"{100 * mfu:.0f}%",
        "left": tqdm.format_interval(left),
    }
    progress.bar.set_postfix(postfix, refresh=False)
    return now


def smoothed(average: float | None, latest: float, weight: float = RATE_SMOOTHING) -> float:
    """An exponential moving average: steady against one slow window (an evaluation, a checkpoint), quick to
    follow a lasting change."""
    return latest if average is None else weight * latest + (1 - weight) * average


def time_left(step: int, max_steps: int, seconds_per_step: float, elapsed: float, max_time: float) -> float:
    """Seconds until training ends: the steps still to run at seconds_per_step, or what max_time leaves of its
    budget (when set) if that ends first."""
    by_steps = max(max_steps - step, 0) * seconds_per_step
    return min(by_steps, max(max_time - elapsed, 0.0)) if max_time > 0 else by_steps


def write_row(t: Training, **row) -> None:
    """A row of log.jsonl, and its TRACKED figures to train.log_to's trackers at the same step."""
    t.run_log.write(**row)
    if not t.trackers:
        return
    kind = row["kind"]
    metrics = {
        f"{kind}/{key}": float(row[key])
        for key in TRACKED[kind]  # None (no finite step) and NaN stay in log.jsonl, which the non-finite count explains
        if type(row.get(key)) in (int, float) and math.isfinite(row[key])
    }
    for tracker in t.trackers:
        tracker.log(metrics, row["step"])


def summary(t: Training) -> dict:
    seconds = time.time() - t.progress.started
    new_tokens = t.state.tokens - t.progress.first_step * t.config.tokens_per_step
    return {
        "steps": t.state.step,
        "tokens": t.state.tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds else 0.0,
        "train_loss": t.progress.train_loss,
        "val_loss": t.progress.val_loss,
        "best_val_loss": t.state.best_val_loss,
        "nonfinite_steps": t.state.nonfinite_steps,
        "parameters": t.model.num_parameters(),
        "matmul_peak": {  # what MFU is of: the best of a square matmul on one device, at the size that reached it
            "tflops": round(t.progress.peak.tflops, 4),
            "size": t.progress.peak.size,
            "dtype": t.progress.peak.dtype,
            "devices": t.progress.processes,
        },
        "interrupted": t.stop_request.is_set(),
        "stop_signal": t.stop_request.signal_name,
        "out": str(t.run_dir),
    }
