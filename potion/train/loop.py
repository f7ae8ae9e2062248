"""The training loop: batches in, loss down, with evaluation, logs, samples and checkpoints along the way.

`train` sets a run up (setup.training) and `run_loop` runs it. The loop reads as its phases, each a short function
below it: stop?, evaluate and report, checkpoint, one training step, log. What the loop changes from step to step
is one LoopState (state.py), and that is what a checkpoint saves (state.json) and what a resumed run starts from.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from potion.config import RunConfig
from potion.data.chat_batches import ChatBatches, describe
from potion.errors import PotionError
from potion.formats.run import SavedRun
from potion.hardware import autocast
from potion.model import GPT
from potion.parallel import sharded
from potion.parallel import world as distributed
from potion.parallel.world import gradient_sync, is_main
from potion.train import checkpoint as ckpt
from potion.train.evaluate import estimate_loss
from potion.train.optim import set_learning_rate
from potion.train.report import log, report_evaluation, report_window, summary
from potion.train.setup import training
from potion.train.state import LogWindow, Training

LOG_EVERY = 10  # steps between loss read-backs from the device (on a GPU each one waits for the queued work)


def train(
    config: RunConfig, out: str | Path | SavedRun | None = None, resume: bool = False, quiet: bool = False
) -> dict:
    """Train (or resume) a run; returns the summary that `potion train --json` prints.

    `out` is the run directory (default: a new one under ./runs; on resume, the latest run), or on resume the
    SavedRun the caller has already read.
    """
    with training(config, out, resume, quiet) as t:
        note_conversations(t)
        run_loop(t)
    if t.stop_request.is_set():
        log(f"potion: stopped at step {t.state.step} and saved; continue with: potion train --resume --out {t.run_dir}")
    return summary(t)


def host_read_interval(device: torch.device) -> int:
    """Steps between reads of the non-finite counts: every step on a CPU, where a read costs nothing, so a streak
    stops training at once; on a GPU only when the loss is logged anyway, so steps queue up without waiting."""
    return 1 if device.type == "cpu" else LOG_EVERY


def note_conversations(t: Training) -> None:
    """A chat run says at its start what its data costs (conversations cut to the context, the share of padding),
    and log.jsonl keeps it as a row of its own at the first step."""
    if not isinstance(t.batches, ChatBatches):
        return
    facts = t.batches.facts
    if t.run_log is not None and t.resumed_at is None:
        t.run_log.write(kind="data", step=t.state.step, **facts)
    if not t.quiet:
        log(describe(facts, t.config.model.context_length))


# ---------------------------------------------------------------- the loop and its phases


def run_loop(t: Training) -> None:
    while True:
        done = time_to_stop(t)
        if t.state.step != t.resumed_at:  # a resumed run's first step was evaluated and saved before
            val_loss = None
            if eval_due(t, done) or checkpoint_due(t, done):
                read_tally(t)  # fresh counts for the eval row, and for the health check before a checkpoint
            if eval_due(t, done):
                val_loss = evaluate(t)
                done = done or 0 < val_loss <= t.config.train.stop_at_loss
                report(t, done)
            if checkpoint_due(t, done) and healthy(t, val_loss):
                save_checkpoint(t, val_loss)
        if done:
            return
        train_one_step(t)
        log_progress(t)


def time_to_stop(t: Training) -> bool:
    tc = t.config.train
    out_of_time = tc.max_time > 0 and time.time() - t.progress.started >= tc.max_time
    return t.state.step >= tc.max_steps or stop_requested(t, out_of_time)


def stop_requested(t: Training, out_of_time: bool = False) -> bool:
    """Whether a signal (Ctrl-C, SIGTERM, SIGUSR1) or the clock asks this training to stop. The one place the
    stop decision is taken: with several processes (torchrun) the ranks vote here, so that all stop at one step."""
    if distributed.world().launched:
        return distributed.agree_to_stop(t.stop_request, out_of_time)
    return out_of_time or t.stop_request.is_set()


def eval_due(t: Training, done: bool) -> bool:
    return done or t.state.step % t.config.train.eval_every == 0


def checkpoint_due(t: Training, done: bool) -> bool:
    """At every checkpoint_every steps (0: at every evaluation), and at the end."""
    tc = t.config.train
    return done or t.state.step % (tc.checkpoint_every or tc.eval_every) == 0


def healthy(t: Training, val_loss: float | None) -> bool:
    """Nothing unhealthy is checkpointed: no non-finite streak going on, and a finite loss if one was measured."""
    return t.progress.nonfinite_in_a_row == 0 and (val_loss is None or math.isfinite(val_loss))


def read_tally(t: Training) -> None:
    """Read the non-finite counts back from the device; warn when a streak starts, stop when it is too long."""
    streak_before = t.progress.nonfinite_in_a_row
    in_a_row, t.state.log_window.nonfinite, t.state.nonfinite_steps = t.tally.read()
    t.progress.nonfinite_in_a_row = in_a_row
    if in_a_row and not streak_before:
        log(
            f"potion: warning: step {t.state.step - in_a_row}: the loss or gradient norm is not finite; skipping "
            "the optimizer step"
        )
    if in_a_row >= t.config.train.max_nonfinite_steps:
        kept = (
            f"the last checkpoint ({t.last_saved.name}) is untouched: resume from it"
            if t.last_saved
            else "no checkpoint was written"
        )
        raise PotionError(
            f"stopped at step {t.state.step}: {in_a_row} steps in a row had a non-finite (NaN or inf) loss or "
            f"gradient norm, so none was applied; {kept}, or train again with a lower learning_rate"
        )


def evaluate(t: Training) -> float:
    """Measure the fixed evaluation batches; a new best validation loss saves model.safetensors."""
    train_split, val_split = t.eval_sets["train"], t.eval_sets["val"]
    if t.config.train.eval_train_split:
        t.progress.train_loss = distributed.mean(estimate_loss(t.compiled, train_split, t.device, t.dtype))
    else:
        t.progress.train_loss = None
    val_loss = t.progress.val_loss = distributed.mean(estimate_loss(t.compiled, val_split, t.device, t.dtype))
    if val_loss < t.state.best_val_loss:
        t.state.best_val_loss, t.progress.best_step = val_loss, t.state.step
        weights = sharded.whole_on_main(ckpt.model_state(t.model))
        if is_main():
            ckpt.save_tensors(t.run_dir / "model.safetensors", weights)  # a LoRA run's: adapters merged in
            ckpt.save_adapters(t.run_dir, t.model)  # and a LoRA run's adapters alone, beside it
    return val_loss


def report(t: Training, done: bool) -> None:
    """Rank 0 reports the evaluation; with FSDP every rank first helps gather the weights its samples and probe
    read."""
    tc = t.config.train
    reader = t.model
    if t.parallel == "fsdp" and (tc.sample_tokens or tc.probe) and math.isfinite(t.progress.val_loss):
        reader = gathered_copy(t)
    if is_main():
        report_evaluation(t, done, reader)


def gathered_copy(t: Training) -> GPT | None:
    """On rank 0, a whole copy of the sharded weights in its CPU memory (kept from one evaluation to the next)."""
    weights = sharded.whole_on_main(ckpt.model_state(t.model))
    if not is_main():
        return None
    if t.reader is None:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave training's draws alone
            t.reader = GPT(t.config.model)
    ckpt.load_model_state(t.reader, weights, "the gathered weights")
    return t.reader


def save_checkpoint(t: Training, val_loss: float | None) -> None:
    t.state.log_window.loss_sum = float(t.tally.loss_sum)
    saved = {**asdict(t.state), "val_loss": val_loss, "batches": t.batches.state()}
    if distributed.world().launched:  # resuming on another number of processes says what differs
        saved["world_size"] = distributed.world().size
    t.last_saved = ckpt.save_checkpoint(
        t.run_dir, t.state.step, t.model, t.optimizers, saved, t.config.train.keep_checkpoints
    )


def train_one_step(t: Training) -> None:
    """Forward and backward over grad_accum micro-batches, then one optimizer step (dropped if not finite)."""
    tc, state = t.config.train, t.state
    step_started = time.time()
    t.progress.learning_rate = set_learning_rate(t.optimizers, state.step, tc)
    loss = torch.zeros((), device=t.device)
    for i in range(tc.grad_accum):
        x, y = next_batch(t)
        with gradient_sync(t.shared, i == tc.grad_accum - 1):  # several processes average on the last only
            # a new forward: CUDA graphs may reuse the last one's outputs' memory. Only then: the call imports
            # torch's compiler, about a second of an eager run's start
            if t.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(t.device, t.dtype):
                _, micro_loss = t.compiled(x, y)
            (micro_loss / tc.grad_accum).backward()
        loss += micro_loss.detach().float() / tc.grad_accum
    distributed.average_(loss)  # the loss of the whole batch, as one process would have it
    norm = sharded.whole(grad_norm(t.model, tc.grad_clip))
    t.tally.step(loss, norm)  # a NaN or inf is caught before the optimizers can spread it into the weights
    for opt in t.optimizers:
        opt.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += t.config.tokens_per_step
    state.log_window.steps += 1
    if state.step % host_read_interval(t.device) == 0 or state.step % LOG_EVERY == 0:
        read_tally(t)
    t.progress.train_seconds += time.time() - step_started


def next_batch(t: Training) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = t.batches.next()
    if t.device.type == "cuda":  # page-locked memory lets the copy overlap the previous step's work
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)


def grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """Clip (when clip > 0) and return the total gradient norm; NaN/inf gradients make it non-finite."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)


def log_progress(t: Training) -> None:
    """Advance the progress bar; every LOG_EVERY steps, a train row in log.jsonl, and a new window begins."""
    t.progress.bar.update(1)
    if t.state.step % LOG_EVERY == 0:
        if is_main():
            t.progress.window_started = report_window(t)
        t.tally.new_window()
        t.state.log_window = LogWindow()
