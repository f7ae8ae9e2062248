"""The training loop: batches in, loss down, with evaluation, logs, samples and checkpoints along the way.

`train` sets a run up and `run_loop` runs it. The loop reads as its phases, each a short function below it: stop?,
evaluate and report, checkpoint, one training step, log. What the loop changes from step to step is one
LoopState, and that is what a checkpoint saves (state.json) and what a resumed run starts from.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from potion.config import RunConfig, check_architecture
from potion.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json
from potion.data.tokens import Batches, absolute_data, fixed_batches, prepare
from potion.errors import PotionError
from potion.explain import check_probe
from potion.formats.fileio import atomic_write_text
from potion.formats.run import (
    RunLock,
    RunLog,
    SavedRun,
    check_resumable,
    find_run,
    load,
    new_run_dir,
    refuse_existing,
    remove_leftovers,
    with_vocabulary,
    write_config,
)
from potion.hardware import (
    autocast,
    compiles_by_default,
    keep_freed_memory,
    maybe_compile,
    pick_device,
    pick_dtype,
    set_threads,
)
from potion.model import GPT
from potion.parallel import world as distributed
from potion.parallel.world import gradient_sync, is_main
from potion.train import checkpoint as ckpt
from potion.train.evaluate import bytes_per_token, estimate_loss
from potion.train.interrupt import StopRequest
from potion.train.optim import StepTally, make_optimizer, set_learning_rate
from potion.train.preflight import check_training_fits, check_weights_match
from potion.train.report import Progress, log, report_evaluation, report_window, start_progress, summary

LOG_EVERY = 10  # steps between loss read-backs from the device (on a GPU each one waits for the queued work)


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


def host_read_interval(device: torch.device) -> int:
    """Steps between reads of the non-finite counts: every step on a CPU, where a read costs nothing, so a streak
    stops training at once; on a GPU only when the loss is logged anyway, so steps queue up without waiting."""
    return 1 if device.type == "cpu" else LOG_EVERY


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
    reader: GPT | None = None  # with FSDP, rank 0's whole copy of the weights that samples and probes read


def train(
    config: RunConfig, out: str | Path | SavedRun | None = None, resume: bool = False, quiet: bool = False
) -> dict:
    """Train (or resume) a run; returns the summary that `potion train --json` prints.

    `out` is the run directory (default: a new one under ./runs; on resume, the latest run), or on resume the
    SavedRun the caller has already read.
    """
    started = time.time()
    main = is_main()  # with several processes (torchrun), rank 0 alone writes the run directory and reports
    quiet = quiet or not main
    config = replace(config, data=replace(config.data, data=absolute_data(config.data.data)))
    run_dir = distributed.from_main(lambda: resumed_run_dir(out, config) if resume else Path(out or new_run_dir()))
    if not resume and main:
        refuse_existing(run_dir)
    device = distributed.own_device(pick_device(config.train.device))
    tokenizer, init_weights = fine_tune_source(config, run_dir, resume)
    token_file = distributed.in_turn(lambda: prepare(config.data, tokenizer=tokenizer, quiet=quiet))
    token_file = tokens_as_on_main(config, token_file, quiet)
    config = with_vocabulary(config, token_file.tokenizer)
    data = training_data(config, token_file)
    if not resume:  # a resumed run's weights are checked first, in start()
        check_training_fits(config, device.type)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)  # only now: bad input above leaves nothing behind
    with RunLock(run_dir) if main else contextlib.nullcontext():
        if main:
            if not resume:
                refuse_existing(run_dir)  # another training may have filled it since the first look
            remove_leftovers(run_dir)
        t = start(config, run_dir, device, token_file.tokenizer, data, resume, quiet, started, init_weights)
        try:
            run_loop(t)
        finally:
            t.stop_request.restore()
            t.progress.bar.close()
            if t.run_log is not None:
                t.run_log.close()
    if t.stop_request.is_set():
        log(f"potion: stopped at step {t.state.step} and saved; continue with: potion train --resume --out {run_dir}")
    return summary(t)


def resumed_run_dir(out: str | Path | SavedRun | None, config: RunConfig) -> Path:
    saved = out if isinstance(out, SavedRun) else find_run(out)
    check_resumable(saved.path, saved.config, config)
    return saved.path


def fine_tune_source(config: RunConfig, run_dir: Path, resume: bool) -> tuple[Tokenizer | None, dict | None]:
    """With init_from: the tokenizer the data is tokenized with, and the weights training starts from (none when
    resuming from a checkpoint, which holds its own). Without: nothing; the data's own tokenizer is trained."""
    if not config.train.init_from:
        return None, None
    if resume and ckpt.complete_checkpoints(run_dir):
        return load_tokenizer(run_dir / "tokenizer.json"), None
    source = load(config.train.init_from)
    check_architecture(config.model, source.config.model, config.train.init_from)
    weights = ckpt.model_state(source.model)
    if config.model.positions == "learned":  # a shorter context keeps the first rows of the position table
        weights["position_embedding.weight"] = weights["position_embedding.weight"][: config.model.context_length]
    return source.tokenizer, weights


def tokens_as_on_main(config: RunConfig, token_file, quiet: bool):
    """The token file, made with rank 0's tokenizer: a machine that did not share rank 0's token cache trained its
    own tokenizer, and every process must give each token the same id."""
    if not distributed.world().launched:
        return token_file
    mine = token_file.tokenizer.to_json()
    theirs = distributed.from_main(lambda: mine)
    return token_file if mine == theirs else prepare(config.data, tokenizer=tokenizer_from_json(theirs), quiet=quiet)


def training_data(config: RunConfig, token_file) -> tuple[Batches, dict, int]:
    """The training batches (this process's rows of them), the fixed evaluation batches (whole), and the number
    of training tokens."""
    tc, T = config.train, config.model.context_length
    distributed.check_batch(tc.batch_size)
    train_tokens, val_tokens = token_file.split(config.data.val_fraction)
    if tc.probe:
        check_probe(token_file.tokenizer, tc.probe, T)  # fail now, not after the first evaluation
    batches = Batches(train_tokens, T, tc.batch_size, tc.seed, "training", distributed.my_rows(tc.batch_size))
    eval_sets = {
        "train": fixed_batches(train_tokens, T, tc.batch_size, tc.eval_batches, tc.seed + 1, "training"),
        "val": fixed_batches(val_tokens, T, tc.batch_size, tc.eval_batches, tc.seed + 2, "validation"),
    }
    return batches, eval_sets, len(train_tokens)


def start(
    config: RunConfig,
    run_dir: Path,
    device: torch.device,
    tokenizer: Tokenizer,
    data: tuple,
    resume: bool,
    quiet: bool,
    started: float,
    init_weights: dict | None = None,
) -> Training:
    """Build the model and optimizers, restore a checkpoint if resuming, then write the run's config and tokenizer."""
    tc = config.train
    batches, eval_sets, n_train_tokens = data
    dtype = pick_dtype(tc.dtype, device)
    if device.type == "cpu":
        set_threads()
        keep_freed_memory()
    checkpoint = distributed.from_main(lambda: ckpt.latest_checkpoint(run_dir)) if resume else None
    if resume:
        check_resumed_weights(config, run_dir, checkpoint)
        check_training_fits(config, device.type)
    model, shared, parallel, optimizers = build_model(config, device, dtype, init_weights)
    restored = (checkpoint, *ckpt.load_checkpoint(checkpoint, model, optimizers)) if checkpoint else None
    state = LoopState() if restored is None else resume_from(restored, batches, run_dir, config)
    if is_main():  # only now: a checkpoint that cannot be resumed leaves the run as it was
        write_config(run_dir, config)
        if not (run_dir / "tokenizer.json").is_file():
            atomic_write_text(run_dir / "tokenizer.json", tokenizer.to_json())
    if resume and restored is None:
        log(f"potion: {run_dir} has no checkpoint yet; starting it from step 0")
    progress = start_progress(
        config, model, device, dtype, state.step, started, quiet, n_train_tokens, run_dir, parallel
    )
    compile_model = wants_compile(config, device, dtype, progress.flops_per_token, progress.peak_tflops, state.step)
    cuda_graphs = compile_model and uses_cuda_graphs(device, parallel)
    if compile_model and not quiet:
        log("potion: compiling the model at the first step (a minute or so; --set compile=off skips it)")
    return Training(
        config=config,
        run_dir=run_dir,
        device=device,
        dtype=dtype,
        model=model,
        shared=shared,
        parallel=parallel,
        compiled=maybe_compile(shared, compile_model, cuda_graphs=cuda_graphs),
        cuda_graphs=cuda_graphs,
        optimizers=optimizers,
        tokenizer=tokenizer,
        batches=batches,
        eval_sets={name: [(x[batches.rows], y[batches.rows]) for x, y in split] for name, split in eval_sets.items()},
        val_bytes_per_token=bytes_per_token(tokenizer, eval_sets["val"]),
        run_log=RunLog(run_dir / "log.jsonl", state.step if resume else None) if is_main() else None,
        tally=StepTally(
            device, optimizers, state.nonfinite_steps, state.log_window.nonfinite, state.log_window.loss_sum
        ),
        state=state,
        progress=progress,
        stop_request=distributed.stop_request(),
        resumed_at=state.step if restored else None,
        last_saved=restored[0] if restored else None,
        quiet=quiet,
    )


def wants_compile(
    config: RunConfig, device: torch.device, dtype: torch.dtype, flops_per_token: int, peak_tflops: float, step: int
) -> bool:
    """compile = "on" or "off" as set; "auto" as hardware.compiles_by_default finds for the steps still to run."""
    tc = config.train
    if tc.compile != "auto":
        return tc.compile == "on"
    tokens = (tc.max_steps - step) * config.tokens_per_step * distributed.world().size
    return compiles_by_default(device, dtype, tokens * flops_per_token, peak_tflops, tc.max_time)


def uses_cuda_graphs(device: torch.device, parallel: str) -> bool:
    """Compiled steps replay as CUDA graphs on one GPU; with several processes the gradient hooks of DDP and FSDP2
    run between the kernels, outside any graph."""
    return device.type == "cuda" and not parallel


def build_model(config: RunConfig, device: torch.device, dtype: torch.dtype, init_weights: dict | None) -> tuple:
    """(the model, the model as the processes share it, ddp | fsdp | "", the optimizers). Every process builds the
    same weights from the same seed (and files); then each draws its own dropout."""
    torch.manual_seed(config.train.seed)  # the initial weights, and dropout's draws from here on
    model = GPT(config.model)
    if init_weights is not None:
        ckpt.load_model_state(model, init_weights, config.train.init_from)
    model.to(device)
    if distributed.world().rank:
        torch.manual_seed(config.train.seed + distributed.world().rank)
    shared, parallel = distributed.parallelize(model, config.train.parallel, device, dtype)
    return model, shared, parallel, make_optimizer(model, config.train, device.type)


def check_resumed_weights(config: RunConfig, run_dir: Path, checkpoint: Path | None) -> None:
    """Before the model is allocated: a resumed run's config.json (perhaps a stranger's) against the weights it
    would load (or those it would replace, when it has no checkpoint yet)."""
    weights = checkpoint / "model.safetensors" if checkpoint else run_dir / "model.safetensors"
    if weights.is_file():
        check_weights_match(config.model, weights)


def resume_from(restored: tuple, batches: Batches, run_dir: Path, config: RunConfig) -> LoopState:
    """The loop state of a restored checkpoint, with the data order and random generators where it left them."""
    path, saved, rng = restored
    try:
        state = LoopState.from_dict(saved)
        batches.set_state(saved["batches"])
        own_generators = ckpt.restore_rng(rng)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # numpy's and torch's own checks, and ours
        raise PotionError(f"'{path / 'state.json'}' cannot be resumed from ({type(e).__name__}: {e})") from None
    if not own_generators:  # a rank the saving run did not have: its own dropout draws, as a new run's
        torch.manual_seed(config.train.seed + distributed.world().rank + state.step)
    log(f"potion: resuming {run_dir} from step {state.step} (best validation loss {state.best_val_loss:.4f})")
    saved_by, now = saved.get("world_size", 1), distributed.world().size
    if saved_by != now:
        dropout = ", and dropout draws differently" if config.model.dropout > 0 else ""
        log(
            f"potion: warning: {path.name} was saved by {saved_by} process(es) and continues on {now}: the same "
            f"tokens at every step, the same numbers up to float rounding, not bit for bit{dropout}"
        )
    return state


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
        weights = distributed.whole_on_main(ckpt.model_state(t.model))
        if is_main():
            ckpt.save_tensors(t.run_dir / "model.safetensors", weights)
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
    weights = distributed.whole_on_main(ckpt.model_state(t.model))
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
    norm = distributed.whole(grad_norm(t.model, tc.grad_clip))
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
