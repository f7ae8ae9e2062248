"""The training loop: batches in, loss down, with evaluation, logs, samples and checkpoints along the way."""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import RunConfig
from .data import Batches, absolute_data, fixed_batches, prepare
from .errors import PotionError
from .explain import check_probe, save_probe
from .generate import generate_tokens
from .hardware import autocast, matmul_peak_tflops, maybe_compile, pick_device, pick_dtype, set_threads
from .model import GPT
from .optim import can_skip_on_device, make_optimizer, set_learning_rate

# Fields that may differ between a run and its resumption: they change when and how long, not what is learned.
RESUMABLE_CHANGES = {"train.max_steps", "train.max_time", "train.stop_at_loss", "train.eval_every",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.sample_tokens", "train.device",
                     "train.compile", "train.probe", "train.max_nonfinite_steps"}
LOG_EVERY = 10  # steps between loss read-backs from the device (on a GPU each one waits for the queued work)
PLOT_EVERY_SECONDS = 30  # loss.png is redrawn at most this often (and at the end): drawing costs more than a step


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_snapshot() -> tuple[dict, dict]:
    """(JSON-able states, tensor states) of every random generator the loop touches."""
    py = random.getstate()
    np_state = np.random.get_state()
    json_states = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return json_states, tensors


def rng_restore(json_states: dict, tensors: dict) -> None:
    v, state, gauss = json_states["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = json_states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def config_differences(old: RunConfig, new: RunConfig) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    return [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b[s][k]]


@torch.no_grad()
def estimate_loss(model, batches, device, dtype) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    model.train()
    return float(total) / len(batches)


def sample_text(model, tokenizer, n_tokens: int, seed: int, device) -> str:
    """A short sample from end-of-text, with its own generator so training randomness is untouched."""
    gpt = ckpt.unwrap(model)
    gpt.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[tokenizer.eot_id]], device=device)
    ids = [int(t[0]) for t in generate_tokens(gpt, idx, n_tokens, 0.8, 0, 1.0, generator, tokenizer.eot_id)]
    gpt.train()
    return tokenizer.decode(i for i in ids if i != tokenizer.eot_id)


def plot_losses(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="#bbb", lw=1, label="train (batch)")
    if evals:
        measured = [r for r in evals if r.get("train_loss") is not None]
        if measured:
            ax.plot([r["step"] for r in measured], [r["train_loss"] for r in measured], "o-", label="train (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ckpt.atomic_write(run_dir / "loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class StopRequest(threading.Event):
    """Set by the first Ctrl-C: the loop finishes its step, evaluates, saves and stops. A second Ctrl-C aborts."""

    previous = None

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def install_interrupt_handler() -> StopRequest:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        return request

    def on_sigint(signum, frame):
        if request.is_set():
            raise KeyboardInterrupt
        request.set()
        log("\npotion: Ctrl-C: finishing this step, then saving (press Ctrl-C again to abort without saving)")

    request.previous = signal.signal(signal.SIGINT, on_sigint)
    return request


class RunLog:
    """log.jsonl, appended line by line; on resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_through_step: int | None = None):
        self.path = path
        if keep_through_step is not None and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if (row := self.parse(line)) is not None and row["step"] <= keep_through_step]
            ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    @staticmethod
    def parse(line: str) -> dict | None:
        """A row, or None for a line cut short by a killed process."""
        try:
            row = json.loads(line)
        except ValueError:
            return None
        return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None

    def write(self, **row) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def prepare_run_dir(out: Path | None, resume: bool, config: RunConfig) -> tuple[Path, RunConfig]:
    """Pick the run directory; on resume, refuse changes to anything but the resumable fields."""
    if resume:
        if out is None:
            out = ckpt.latest_run()
        saved = ckpt.read_config(out)
        config = replace(config, model=replace(config.model, vocab_size=saved.model.vocab_size))
        changed = [f for f in config_differences(saved, config) if f not in RESUMABLE_CHANGES]
        if changed:
            raise PotionError(
                f"cannot resume '{out}' with a different {', '.join(changed)}; resume with the saved config "
                "(drop those flags) or train into a new --out"
            )
        return out, config
    out = out or ckpt.new_run_dir()
    refuse_existing(out)
    return out, config


def refuse_existing(out: Path) -> None:
    """A new run needs an empty (or missing) folder; the lock and temporary files of a killed training do not count."""
    if out.exists() and any(p.name != ckpt.LOCK_NAME and not ckpt.is_leftover(p) for p in out.iterdir()):
        raise PotionError(f"run directory '{out}' already exists; pass --resume to continue it or choose another --out")


class NonfiniteSteps:
    """Counts, on the device, the steps whose loss or gradient norm is NaN or inf, and has the optimizers drop
    them there (their `found_inf`), so that a step needs no host sync: the loop reads the counts back only now
    and then. Optimizers that cannot drop a step on the device are skipped from the host instead."""

    def __init__(self, device: torch.device, optimizers: list, total: int = 0, since_last_row: int = 0):
        self.optimizers, self.on_device = optimizers, can_skip_on_device(optimizers)
        self.dropped = torch.zeros((), device=device)  # 1.0 while the current step is being dropped
        self.in_a_row, self.since_last_row, self.total = (torch.tensor(float(n), device=device)
                                                           for n in (0, since_last_row, total))
        if self.on_device:
            for opt in optimizers:
                opt.found_inf = self.dropped

    def step(self, finite: torch.Tensor) -> None:
        """Apply the optimizers unless `finite` (a boolean tensor) is false, and count."""
        self.dropped.copy_(~finite)
        if self.on_device or bool(finite):  # bool(): a host sync, only for optimizers without found_inf
            for opt in self.optimizers:
                opt.step()
        self.in_a_row.mul_(self.dropped).add_(self.dropped)
        self.since_last_row.add_(self.dropped)
        self.total.add_(self.dropped)

    def read(self) -> tuple[int, int, int]:
        """(in a row, since the last train row, in all): one host sync."""
        return tuple(int(n) for n in torch.stack([self.in_a_row, self.since_last_row, self.total]).tolist())


def host_read_interval(device: torch.device) -> int:
    """Steps between reads of the non-finite counts: every step on a CPU, where a read costs nothing, so a streak
    stops training at once; on a GPU only when the loss is logged anyway, so steps queue up without waiting."""
    return 1 if device.type == "cpu" else LOG_EVERY


def grad_norm(model, clip: float) -> torch.Tensor:
    """Clip (when clip > 0) and return the total gradient norm; NaN/inf gradients make it non-finite."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)


def train(config: RunConfig, out: str | Path | None = None, resume: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) a run; returns the summary that `potion train --json` prints."""
    started = time.time()
    config = replace(config, data=replace(config.data, data=absolute_data(config.data.data)))
    run_dir, config = prepare_run_dir(Path(out) if out else None, resume, config)
    tc = config.train
    device = pick_device(tc.device)
    token_file = prepare(config.data, quiet=quiet)
    config = replace(config, model=replace(config.model, vocab_size=token_file.tokenizer.vocab_size))
    train_tokens, val_tokens = token_file.split(config.data.val_fraction)
    if tc.probe:
        check_probe(token_file.tokenizer, tc.probe, config.model.context_length)  # fail now, not after the first evaluation
    T = config.model.context_length
    batches = Batches(train_tokens, T, tc.batch_size, tc.seed, "training")
    eval_sets = {
        "train": fixed_batches(train_tokens, T, tc.batch_size, tc.eval_batches, tc.seed + 1, "training"),
        "val": fixed_batches(val_tokens, T, tc.batch_size, tc.eval_batches, tc.seed + 2, "validation"),
    }
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind
    lock = ckpt.acquire_lock(run_dir)
    try:
        if not resume:
            refuse_existing(run_dir)  # another training may have filled it since the first look
        ckpt.remove_leftovers(run_dir)
        return train_locked(config, run_dir, device, token_file.tokenizer, batches, eval_sets, len(train_tokens),
                            resume, quiet, started)
    finally:
        ckpt.release_lock(lock)


def train_locked(config: RunConfig, run_dir: Path, device: torch.device, tokenizer, batches: Batches, eval_sets: dict,
                 n_train_tokens: int, resume: bool, quiet: bool, started: float) -> dict:
    tc = config.train
    dtype = pick_dtype(tc.dtype, device)
    threads = set_threads() if device.type == "cpu" else torch.get_num_threads()
    T = config.model.context_length

    ckpt.write_config(run_dir, config)
    if not (run_dir / "tokenizer.json").is_file():
        ckpt.atomic_write_text(run_dir / "tokenizer.json", tokenizer.to_json())

    seed_everything(tc.seed)
    model = GPT(config.model).to(device)
    optimizers = make_optimizer(model, tc, device.type)
    tokens_per_step = tc.batch_size * tc.grad_accum * T
    step, best_val, tokens_seen, nonfinite_total = 0, math.inf, 0, 0
    loss_sum = torch.zeros((), device=device)  # summed batch losses of the finite steps since the last train row
    window_steps, window_nonfinite = 0, 0
    restored = ckpt.load_latest_checkpoint(run_dir, model, optimizers) if resume else None
    last_saved = restored[0] if restored else None
    if restored:
        _, state, rng = restored
        step, best_val, tokens_seen = state["step"], state["best_val_loss"], state["tokens"]
        nonfinite_total = state.get("nonfinite_steps", 0)
        window = state.get("log_window")
        if window:
            loss_sum.fill_(window[0])
            window_steps, _, window_nonfinite = window[1:]
        batches.set_state(state["batches"])
        rng_restore(state["rng"], rng)
        log(f"potion: resuming {run_dir} from step {step} (best validation loss {best_val:.4f})")
    elif resume:
        log(f"potion: {run_dir} has no checkpoint yet; starting it from step 0")
    run_log = RunLog(run_dir / "log.jsonl", keep_through_step=step if resume else None)
    if not quiet:
        log(f"potion: {model.num_parameters() / 1e6:.2f}M parameters, {n_train_tokens:,} training tokens, "
            f"device {device.type}, {str(dtype).removeprefix('torch.')}, {threads} threads -> {run_dir}")

    compiled = maybe_compile(model, tc.compile, device)
    nonfinite = NonfiniteSteps(device, optimizers, nonfinite_total, window_nonfinite)

    def save_resume_state(val_loss=None):
        nonlocal last_saved
        json_rng, tensor_rng = rng_snapshot()
        state = {"best_val_loss": best_val, "val_loss": val_loss, "tokens": tokens_seen, "batches": batches.state(),
                 "rng": json_rng, "nonfinite_steps": nonfinite_total,
                 "log_window": [float(loss_sum), window_steps, window_steps - window_nonfinite, window_nonfinite]}
        last_saved = ckpt.save_checkpoint(run_dir, step, model, optimizers, state, tensor_rng, tc.keep_checkpoints)

    # model FLOPs utilisation: the model's useful arithmetic per second over the matmul peak measured here
    flops_per_token, peak_tflops = model.training_flops_per_token(), matmul_peak_tflops(device, dtype)
    bar = tqdm(total=tc.max_steps, initial=step, disable=quiet, dynamic_ncols=True, file=sys.stderr, unit="step")
    last_train_loss, last_val = math.nan, math.nan
    window_start, speed = time.time(), 0.0
    last_plot = started  # the first drawing waits until the run has a curve to show
    first_step, train_seconds = step, 0.0  # train_seconds: time in training steps only, evaluation excluded
    nonfinite_run = 0  # non-finite steps in a row, as last read; while > 0 nothing is checkpointed
    read_every = host_read_interval(device)

    def read_nonfinite():
        nonlocal nonfinite_run, window_nonfinite, nonfinite_total
        streak_before = nonfinite_run
        nonfinite_run, window_nonfinite, nonfinite_total = nonfinite.read()
        if nonfinite_run and not streak_before:
            log(f"potion: warning: step {step - nonfinite_run}: the loss or gradient norm is not finite; skipping "
                "the optimizer step")
        if nonfinite_run >= tc.max_nonfinite_steps:
            kept = f"the last checkpoint ({last_saved.name}) is untouched: resume from it" if last_saved else \
                "no checkpoint was written"
            raise PotionError(
                f"stopped at step {step}: {nonfinite_run} steps in a row had a non-finite (NaN or inf) loss or "
                f"gradient norm, so none was applied; {kept}, or train again with a lower learning_rate"
            )

    stop_requested = install_interrupt_handler()
    try:
        while True:
            out_of_time = tc.max_time > 0 and time.time() - started >= tc.max_time
            done = step >= tc.max_steps or out_of_time or stop_requested.is_set()
            resumed_here = step == first_step and restored
            if not resumed_here and (step % tc.eval_every == 0 or done or
                                     (tc.checkpoint_every and step % tc.checkpoint_every == 0)):
                read_nonfinite()  # fresh counts for the eval row and for the "healthy" test before a checkpoint
            if (step % tc.eval_every == 0 or done) and not resumed_here:
                last_train_loss = (estimate_loss(compiled, eval_sets["train"], device, dtype) if tc.eval_train_split
                                   else None)
                last_val = estimate_loss(compiled, eval_sets["val"], device, dtype)
                done = done or 0 < last_val <= tc.stop_at_loss
                improved = last_val < best_val
                if improved:
                    best_val = last_val
                    ckpt.save_tensors(run_dir / "model.safetensors", ckpt.model_state(model))
                run_log.write(kind="eval", step=step, tokens=tokens_seen, train_loss=last_train_loss,
                              val_loss=last_val, best_val_loss=best_val, nonfinite_steps=nonfinite_total,
                              elapsed=round(time.time() - started, 3), train_seconds=round(train_seconds, 3))
                if done or time.time() - last_plot >= PLOT_EVERY_SECONDS:
                    plot_losses(run_dir)
                    last_plot = time.time()
                if tc.probe:  # attention and prediction for one prompt at every evaluation: watch them form
                    save_probe(ckpt.unwrap(model), tokenizer, tc.probe, run_dir, step)
                if not quiet:
                    train_part = f"train loss {last_train_loss:.4f}, " if last_train_loss is not None else ""
                    log(f"step {step}: {train_part}val loss {last_val:.4f}"
                        f"{' (best)' if improved else ''}")
                    if tc.sample_tokens and step > 0:
                        log("  | " + sample_text(model, tokenizer, tc.sample_tokens, tc.seed + step, device)
                            .replace("\n", "\n  | "))
                healthy = nonfinite_run == 0 and math.isfinite(last_val)
                if (step % (tc.checkpoint_every or tc.eval_every) == 0 or done) and healthy:
                    save_resume_state(last_val)
            elif tc.checkpoint_every and step % tc.checkpoint_every == 0 and not resumed_here and nonfinite_run == 0:
                save_resume_state()
            if done:
                break

            step_started = time.time()
            lr = set_learning_rate(optimizers, step, tc)
            step_loss = torch.zeros((), device=device)
            for _ in range(tc.grad_accum):
                x, y = batches.next()
                if device.type == "cuda":  # page-locked memory lets the copy overlap the previous step's work
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, dtype):
                    _, loss = compiled(x, y)
                (loss / tc.grad_accum).backward()
                step_loss += loss.detach().float() / tc.grad_accum
            norm = grad_norm(model, tc.grad_clip)
            finite = torch.isfinite(step_loss) & torch.isfinite(norm)
            nonfinite.step(finite)  # a NaN or inf is caught before the optimizers can spread it into the weights
            loss_sum += torch.where(finite, step_loss, 0.0)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            window_steps += 1
            if step % read_every == 0 or step % LOG_EVERY == 0:
                read_nonfinite()
            train_seconds += time.time() - step_started
            bar.update(1)
            if step % LOG_EVERY == 0:
                window_finite = window_steps - window_nonfinite
                batch_loss = float(loss_sum) / window_finite if window_finite else None
                now = time.time()
                speed = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                mfu = speed * flops_per_token / 1e12 / peak_tflops
                run_log.write(kind="train", step=step, loss=batch_loss, lr=lr, nonfinite_steps=window_nonfinite,
                              tokens_per_second=round(speed), mfu=round(mfu, 4))
                postfix = {"loss": "nan" if batch_loss is None else f"{batch_loss:.3f}", "tok/s": f"{speed:,.0f}",
                           "MFU": f"{100 * mfu:.0f}%"}
                if tc.max_time > 0:
                    postfix["left"] = f"{max(tc.max_time - (now - started), 0):.0f}s"
                bar.set_postfix(postfix, refresh=False)
                loss_sum.zero_()
                nonfinite.since_last_row.zero_()
                window_start, window_steps, window_nonfinite = now, 0, 0
    finally:
        stop_requested.restore()
        bar.close()
        run_log.close()
    if stop_requested.is_set():
        log(f"potion: stopped at step {step} and saved; continue with: potion train --resume --out {run_dir}")

    seconds = time.time() - started
    return {
        "steps": step,
        "tokens": tokens_seen,
        "seconds": round(seconds, 2),
        "tokens_per_second": round((tokens_seen - first_step * tokens_per_step) / seconds, 1) if seconds else 0.0,
        "train_loss": last_train_loss,
        "val_loss": last_val,
        "best_val_loss": best_val,
        "nonfinite_steps": nonfinite_total,
        "parameters": model.num_parameters(),
        "interrupted": stop_requested.is_set(),
        "out": str(run_dir),
    }
