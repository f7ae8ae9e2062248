"""Setting a run up: its directory, device, data, model and optimizers, a checkpoint restored when resuming, and
the run's files written; then, when the loop is done, closing what it opened. `training` does it all around the
loop, as a `with` block.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from potion.config import RunConfig, check_architecture
from potion.data.chat_batches import chat_training_data
from potion.data.conversations import ConversationFile, is_chat_data
from potion.data.sources import absolute_data
from potion.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json
from potion.data.tokens import Batches, fixed_batches, prepare
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
from potion.hardware import compiles_by_default, keep_freed_memory, maybe_compile, pick_device, pick_dtype, set_threads
from potion.model import GPT, lora
from potion.parallel import world as distributed
from potion.parallel.world import is_main
from potion.train import checkpoint as ckpt
from potion.train.evaluate import bytes_per_token
from potion.train.optim import StepTally, make_optimizer
from potion.train.preflight import check_training_fits, check_weights_match
from potion.train.report import log, start_progress
from potion.train.state import LoopState, Training
from potion.train.trackers import check_installed, open_trackers
from potion.train.vocab import chat_vocabulary


@contextlib.contextmanager
def training(
    config: RunConfig, out: str | Path | SavedRun | None = None, resume: bool = False, quiet: bool = False
) -> Iterator[Training]:
    """A run set up (or resumed) and locked for the loop; on leaving, its signal handlers, progress bar, log and
    trackers are closed. Bad input is refused before anything is written."""
    started = time.time()
    check_installed(config)  # a tracker's library is an extra: missing, nothing has started
    main = is_main()  # with several processes (torchrun), rank 0 alone writes the run directory and reports
    quiet = quiet or not main
    config = replace(config, data=replace(config.data, data=absolute_data(config.data.data)))
    config = with_absolute_base(config)
    check_lora(config)
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
        status = "failed"
        try:
            yield t
            status = "stopped" if t.stop_request.is_set() else "finished"
        except KeyboardInterrupt:  # a second stop signal: aborted, resumable from the last checkpoint
            status = "stopped"
            raise
        finally:
            finish(t, status)


def finish(t: Training, status: str) -> None:
    """Close what the run opened. A tracker that fails to close is a warning: an error may be on its way up, and
    the others still close."""
    t.stop_request.restore()
    t.progress.bar.close()
    if t.run_log is not None:
        t.run_log.close()
    for tracker in t.trackers:
        try:
            tracker.close(status)
        except Exception as e:
            log(f"potion: warning: closing {type(tracker).__name__} failed ({type(e).__name__}: {e})")


def resumed_run_dir(out: str | Path | SavedRun | None, config: RunConfig) -> Path:
    saved = out if isinstance(out, SavedRun) else find_run(out)
    check_resumable(saved.path, saved.config, config)
    return saved.path


def fine_tune_source(config: RunConfig, run_dir: Path, resume: bool) -> tuple[Tokenizer | None, dict | None]:
    """With init_from: the tokenizer the data is tokenized with, and the weights training starts from (none when
    resuming from a checkpoint, which holds its own). Without: nothing; the data's own tokenizer is trained."""
    if not config.train.init_from:
        return None, None
    lora_rank = config.train.lora_rank  # a LoRA run's checkpoints hold adapters alone: the base is read again
    if resume and ckpt.complete_checkpoints(run_dir) and not lora_rank:
        return load_tokenizer(run_dir / "tokenizer.json"), None
    if resume and lora_rank:
        check_base_is_there(config.train.init_from, run_dir)
    source = load(config.train.init_from)
    # the vocabulary follows the tokenizer, which conversations may give ChatML's tokens (chat_vocabulary)
    ours = replace(config.model, vocab_size=source.config.model.vocab_size)
    check_architecture(ours, source.config.model, config.train.init_from)
    weights = ckpt.model_state(source.model)
    if config.model.positions == "learned":  # a shorter context keeps the first rows of the position table
        weights["position_embedding.weight"] = weights["position_embedding.weight"][: config.model.context_length]
    if is_chat_data(config.data.data):
        tokenizer, weights = chat_vocabulary(source.tokenizer, weights)
        added = tokenizer.vocab_size - source.tokenizer.vocab_size
        if lora_rank and added:
            warnings.warn(
                f"LoRA keeps the token embedding and the output head frozen: the {added} tokens added for chat keep "
                "their starting rows (the mean of the others); to train them, fine-tune every weight (lora_rank = 0)"
            )
        return tokenizer, weights
    return source.tokenizer, weights


def with_absolute_base(config: RunConfig) -> RunConfig:
    """A LoRA run's init_from as an absolute path when it is one: every resume reads the frozen weights there
    again, from whatever folder it is run in."""
    spec = config.train.init_from
    if not config.train.lora_rank or not spec or not Path(spec).expanduser().exists():
        return config  # also a Hugging Face model name, found in the cache
    return replace(config, train=replace(config.train, init_from=str(Path(spec).expanduser().resolve())))


def check_lora(config: RunConfig) -> None:
    """The LoRA settings that a TrainConfig cannot judge alone: adapters need a pretrained model, with the
    projections they name, whole on each process."""
    tc, m = config.train, config.model
    if not tc.lora_rank:
        return
    if not tc.init_from:
        raise PotionError(
            "train.lora_rank adapts a pretrained model: name it with --init-from (a run, a GGUF file, a Hugging Face "
            "folder or name), or set lora_rank = 0 to train every weight"
        )
    if "gate" in lora.chosen_targets(tc.lora_targets, m) and "gate" not in lora.available_targets(m):
        raise PotionError(
            f"train.lora_targets names gate, but this model's feed-forward has none (mlp_activation = "
            f"{m.mlp_activation}; only swiglu has a gate); leave gate out"
        )
    if tc.parallel == "fsdp":
        raise PotionError("train.parallel = fsdp shards weights that LoRA keeps frozen and whole: use ddp or auto")


def check_base_is_there(spec: str, run_dir: Path) -> None:
    path = Path(spec).expanduser()
    if (path.is_absolute() or path.suffix.lower() == ".gguf") and not path.exists():
        raise PotionError(
            f"'{run_dir}' is a LoRA run: its checkpoints hold only the adapters, and its base model '{spec}' "
            "(train.init_from in config.json) is not there any more; put it back to resume, or train into a new --out"
        )


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
    if isinstance(token_file, ConversationFile):  # one conversation a row, the loss on its replies alone
        return chat_training_data(train_tokens, val_tokens, T, tc, distributed.my_rows(tc.batch_size))
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
    batches, eval_sets, n_train_tokens = data
    dtype = pick_dtype(config.train.dtype, device)
    if device.type == "cpu":
        set_threads()
        keep_freed_memory()
    model, shared, parallel, optimizers, restored = build_or_restore(
        config, run_dir, device, dtype, resume, init_weights
    )
    state = LoopState() if restored is None else resume_from(restored, batches, run_dir, config)
    if is_main():  # only now: a checkpoint that cannot be resumed leaves the run as it was
        write_run_files(run_dir, config, tokenizer)
    progress = start_progress(
        config, model, device, dtype, state.step, started, quiet, n_train_tokens, run_dir, parallel
    )
    if config.train.lora_rank:
        describe_adapters(model, config, progress, quiet)
    compile_model = wants_compile(config, device, dtype, progress.flops_per_token, progress.peak_tflops, state.step)
    cuda_graphs = compile_model and uses_cuda_graphs(device, parallel)
    if compile_model and not quiet:
        log("potion: compiling the model at the first step (a minute or so; --set compile=off skips it)")
    main = is_main()
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
        run_log=RunLog(run_dir / "log.jsonl", state.step if resume else None) if main else None,
        tally=StepTally(
            device, optimizers, state.nonfinite_steps, state.log_window.nonfinite, state.log_window.loss_sum
        ),
        state=state,
        progress=progress,
        stop_request=distributed.stop_request(),
        resumed_at=state.step if restored else None,
        last_saved=restored[0] if restored else None,
        quiet=quiet,
        trackers=open_trackers(config, run_dir, state.step if resume else None, quiet) if main else [],
    )


def describe_adapters(model: GPT, config: RunConfig, progress, quiet: bool) -> None:
    """Say what a LoRA run trains, and count its FLOPs as a LoRA step computes them (MFU, and whether to compile)."""
    progress.flops_per_token = lora.training_flops_per_token(model)
    if not quiet:
        tc = config.train
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        where = "every projection" if tc.lora_targets == "all" else tc.lora_targets
        log(
            f"potion: LoRA rank {tc.lora_rank} (alpha {tc.lora_alpha:g}) on {where} of every block: {trained:,} "
            f"adapter weights train, the model's {model.num_parameters() - trained:,} stay frozen"
        )


def write_run_files(run_dir: Path, config: RunConfig, tokenizer: Tokenizer) -> None:
    """config.json (a resumed run's too: when and how long it trains may have changed), and tokenizer.json."""
    write_config(run_dir, config)
    if not (run_dir / "tokenizer.json").is_file():
        atomic_write_text(run_dir / "tokenizer.json", tokenizer.to_json())


def build_or_restore(
    config: RunConfig, run_dir: Path, device: torch.device, dtype: torch.dtype, resume: bool, init_weights: dict | None
) -> tuple:
    """build_model's four, and when resuming from a checkpoint (path, saved state, random generator states) with
    the weights and optimizer states loaded (else None)."""
    checkpoint = distributed.from_main(lambda: ckpt.latest_checkpoint(run_dir)) if resume else None
    if resume:
        check_resumed_weights(config, run_dir, checkpoint)
        check_training_fits(config, device.type)
        if checkpoint is None:
            log(f"potion: {run_dir} has no checkpoint yet; starting it from step 0")
    model, shared, parallel, optimizers = build_model(config, device, dtype, init_weights)
    restored = (checkpoint, *ckpt.load_checkpoint(checkpoint, model, optimizers)) if checkpoint else None
    return model, shared, parallel, optimizers, restored


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
    tc = config.train
    torch.manual_seed(tc.seed)  # the initial weights, and dropout's draws from here on
    if init_weights is None:
        model = GPT(config.model)
    else:  # the weights read become the model's own: no random ones drawn to be overwritten, no second copy
        model = GPT.without_weights(config.model)
        ckpt.load_model_state(model, init_weights, tc.init_from)
    if tc.lora_rank:  # every weight freezes; the adapters beside the chosen projections are all that trains
        lora.add_adapters(model, tc.lora_targets, tc.lora_rank, tc.lora_alpha, tc.lora_dropout)
    model.to(device)
    if distributed.world().rank:
        torch.manual_seed(tc.seed + distributed.world().rank)
    shared, parallel = distributed.parallelize(model, "ddp" if tc.lora_rank else tc.parallel, device, dtype)
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
