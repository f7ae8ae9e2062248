"""Nothing lost: exact resume after a kill, checkpoints that are never half-read, NaN steps skipped, no pickle,
one training per run directory."""

import dataclasses
import errno
import importlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_settings import TINY
from torch.utils._python_dispatch import TorchDispatchMode

import potion.train.checkpoint as ckpt
from potion.config import ModelConfig, resolve
from potion.errors import PotionError
from potion.formats.run import LOCK_NAME, RunLock
from potion.model import GPT
from potion.train import optim as potion_optim
from potion.train.loop import train
from potion.train.optim import make_optimizer
from potion.train.state import LogWindow, LoopState

training_loop = importlib.import_module("potion.train.loop")  # the module: potion.train is also the function
ROOT = Path(__file__).resolve().parents[1]
# One thread: on a small shared machine two threads of a tiny model mostly wait for each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def tiny_config(corpus, *extra):
    return resolve("tiny", None, [*TINY, f"data={corpus}", *extra])


def tiny_training_args(corpus, *args):
    """`potion train` of a tiny model on the test corpus, with more arguments."""
    tiny = [a for s in TINY for a in ("--set", s)]
    return ["train", "--data", str(corpus), *tiny, *map(str, args)]


def tiny_training_argv(corpus, *args):
    """The command line of a tiny training on the test corpus, as a subprocess runs it."""
    return [sys.executable, "-m", "potion", *tiny_training_args(corpus, *args)]


def potion(*args, check=True, timeout=300):
    result = subprocess.run(
        [sys.executable, "-m", "potion", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"potion {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def eval_rows(run_dir):
    """The eval rows of log.jsonl without their timing fields."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed", "train_seconds")} for r in rows if r["kind"] == "eval"]


def train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["nonfinite_steps"]) for r in rows if r["kind"] == "train"]


def latest_step(run_dir):
    steps = ckpt.complete_checkpoints(run_dir)
    return int(steps[-1].name.removeprefix("step-")) if steps else -1


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- exact resume


KILL_RUN = [
    "--max-steps",
    150,
    "--eval-every",
    25,
    "--checkpoint-every",
    2,
    "--set",
    "keep_checkpoints=2",
    "--set",
    "dropout=0.1",
    "--quiet",
]  # dropout: the torch RNG has to be restored too


def test_sigkill_at_random_moments_then_resume_is_byte_identical(corpus, tmp_path):
    reference = tmp_path / "reference"
    potion("train", "--data", corpus, *sum((["--set", s] for s in TINY), []), *KILL_RUN, "--out", reference)

    run = tmp_path / "killed"
    rng = random.Random(4)
    kills, kills_after_a_checkpoint, finished, mid_write = 0, 0, False, 0
    while kills < 6:
        resume = ["--resume"] if (run / "config.json").is_file() else []
        args = tiny_training_argv(corpus, *KILL_RUN, "--out", run, *resume)
        before = latest_step(run)
        process = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # The first kill lands at a random moment of start-up; the others a random time after the new process
        # has written its first checkpoint (on a busy machine start-up alone can take seconds).
        if kills:
            while latest_step(run) <= before and process.poll() is None:
                time.sleep(0.02)
        time.sleep(rng.uniform(0.5, 2.0) if kills == 0 else rng.uniform(0.0, 0.6))
        if process.poll() is not None:
            stderr = process.stderr.read()
            process.stderr.close()
            assert process.returncode == 0, stderr
            finished = True
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        kills += 1
        mid_write += bool(list((run / "checkpoints").glob(".step-*"))) if (run / "checkpoints").is_dir() else 0
        kills_after_a_checkpoint += latest_step(run) > before
    assert kills >= 5 and kills_after_a_checkpoint >= 4
    print(f"{kills} kills, {mid_write} during a checkpoint write")
    if not finished:
        potion(
            "train",
            "--data",
            corpus,
            *sum((["--set", s] for s in TINY), []),
            *KILL_RUN,
            "--out",
            run,
            *(["--resume"] if (run / "config.json").is_file() else []),
        )
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    last = ckpt.complete_checkpoints(run)[-1]
    assert last.name == "step-00000150"
    assert (last / "model.safetensors").read_bytes() == (
        ckpt.complete_checkpoints(reference)[-1] / "model.safetensors"
    ).read_bytes()
    assert eval_rows(run) == eval_rows(reference)
    assert train_losses(run) == train_losses(reference)
    assert not (run / LOCK_NAME).exists()
    assert not list((run / "checkpoints").glob(".*"))  # leftovers of killed writes were cleaned up


PREEMPTED_RUN = ["--max-steps", 200, "--eval-every", 50, "--checkpoint-every", 1000, "--set", "dropout=0.1", "--quiet"]


def logged_step(run_dir):
    """The step of the newest train row in log.jsonl (one every 10 steps), or -1."""
    path = run_dir / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [json.loads(line) for line in lines if line.endswith("}")]
    return max((r["step"] for r in rows if r["kind"] == "train"), default=-1)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    reference = tmp_path_factory.mktemp("uninterrupted") / "run"
    potion(*tiny_training_args(corpus, *PREEMPTED_RUN, "--out", reference))
    return reference


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_saves_at_that_step_and_resume_is_byte_identical(corpus, uninterrupted, tmp_path, signum):
    reference = uninterrupted
    run = tmp_path / "preempted"
    process = subprocess.Popen(
        tiny_training_argv(corpus, *PREEMPTED_RUN, "--out", run),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    while logged_step(run) < 30 and process.poll() is None:  # well into training, far from a checkpoint
        time.sleep(0.02)
    process.send_signal(signum)
    out, err = (b.decode() for b in process.communicate(timeout=120))
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err  # not finished, though saved: a scheduler must not take it for done
    assert f"potion: {name}: finishing this step, then saving (send {name} again to abort without saving)" in err
    stopped = int(re.search(r"stopped at step (\d+) and saved", err).group(1))
    assert 30 <= stopped < 200 and f"continue with: potion train --resume --out {run}" in err
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-00000000", f"step-{stopped:08d}"]
    assert "Traceback" not in err and "trained" in out

    resumed = potion(*tiny_training_args(corpus, *PREEMPTED_RUN, "--out", run, "--resume"))
    assert f"resuming {run} from step {stopped}" in resumed.stderr
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    last = ckpt.complete_checkpoints(run)[-1]
    assert last.name == "step-00000200"
    assert (last / "model.safetensors").read_bytes() == (
        ckpt.complete_checkpoints(reference)[-1] / "model.safetensors"
    ).read_bytes()
    assert train_losses(run) == train_losses(reference)


def test_a_second_stop_signal_aborts_without_saving():
    from potion.train.interrupt import Aborted, StopRequest, exit_code

    request = StopRequest.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # handled between two bytecodes of this thread: at once
        assert request.is_set() and request.signal_name == "SIGTERM"
        with pytest.raises(Aborted) as aborted:
            os.kill(os.getpid(), signal.SIGUSR1)
        assert aborted.value.exit_code == 128 + signal.SIGUSR1
    finally:
        request.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert [exit_code(s) for s in (None, "SIGINT", "SIGTERM", "SIGUSR1")] == [0, 0, 143, 138]


def test_damaged_checkpoints_are_skipped_and_resume_reproduces_the_run(corpus, tmp_path, capsys):
    config = tiny_config(corpus, "max_steps=30", "eval_every=10", "checkpoint_every=5", "keep_checkpoints=4")
    reference = tmp_path / "reference"
    train(config, reference, quiet=True)
    run = tmp_path / "run"
    train(config, run, quiet=True)
    steps = ckpt.complete_checkpoints(run)
    assert [p.name for p in steps] == [f"step-{s:08d}" for s in (15, 20, 25, 30)]

    # the newest checkpoint has a flipped byte, the one before it is cut short, and a killed write left a folder
    data = bytearray((steps[-1] / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (steps[-1] / "model.safetensors").write_bytes(bytes(data))
    optimizer = steps[-2] / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    leftover = run / "checkpoints" / ".step-00000035.tmp99999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"kind": "eval", "step": 3')  # a line cut short by a kill

    with pytest.warns(UserWarning) as caught:
        train(config, run, resume=True, quiet=True)
    messages = [str(w.message) for w in caught]
    assert any(
        "step-00000030" in m and "does not match its recorded sha256" in m and "falling back to step-00000025" in m
        for m in messages
    ), messages
    assert any(
        "step-00000025" in m and "optimizer.safetensors" in m and "falling back to step-00000020" in m for m in messages
    ), messages
    assert "resuming" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert eval_rows(run) == eval_rows(reference)
    assert not leftover.exists()


def test_all_checkpoints_damaged_is_a_clear_error(corpus, tmp_path):
    config = tiny_config(corpus, "max_steps=10", "eval_every=5", "keep_checkpoints=2")
    train(config, tmp_path / "run", quiet=True)
    for step in ckpt.complete_checkpoints(tmp_path / "run"):
        (step / "state.json").write_text("{}")
    with pytest.warns(UserWarning), pytest.raises(PotionError, match="no intact checkpoint"):
        train(config, tmp_path / "run", resume=True, quiet=True)


def test_keeps_last_n_and_the_best(tmp_path):
    root = tmp_path / "checkpoints"
    paths = []
    for step, loss in ((5, 3.0), (10, 1.0), (15, 2.0), (20, None), (25, 1.5)):
        p = root / f"step-{step:08d}"
        p.mkdir(parents=True)
        (p / "state.json").write_text(json.dumps({"val_loss": loss}))
        paths.append(p)
    assert [p.name for p in ckpt.prunable(paths, 2)] == ["step-00000005", "step-00000015"]
    assert ckpt.prunable(paths, 0) == []


def test_resume_refuses_changed_config_but_allows_steps_and_cadence(corpus, tmp_path):
    run = tmp_path / "run"
    tiny = sum((["--set", s] for s in TINY), [])
    potion("train", "--data", corpus, *tiny, "--max-steps", 10, "--eval-every", 5, "--out", run, "--quiet")
    before = snapshot(run)
    r = potion("train", "--resume", "--out", run, "--set", "n_layer=3", "--set", "learning_rate=0.01", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "model.n_layer" in line and "train.learning_rate" in line, line
    assert snapshot(run) == before
    potion("train", "--resume", "--out", run, "--max-steps", 15, "--eval-every", 3, "--set", "max_time=600", "--quiet")
    assert ckpt.complete_checkpoints(run)[-1].name == "step-00000015"


class Compiled(torch.nn.Module):
    """What torch.compile returns, as far as state dicts go: the model under `_orig_mod`."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model


def test_checkpoints_of_a_compiled_model_load_uncompiled_and_back(tmp_path):
    config = ModelConfig(vocab_size=20, context_length=16, n_layer=2, n_head=2, n_embd=32)
    from potion.config import TrainConfig

    torch.manual_seed(0)
    plain = GPT(config)
    compiled = Compiled(plain)
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    saved = ckpt.save_checkpoint(tmp_path, 1, compiled, make_optimizer(plain, TrainConfig(), "cpu"), {}, 2)
    assert not [k for k in load_file(str(saved / "model.safetensors")) if "_orig_mod" in k]

    torch.manual_seed(1)
    fresh = GPT(config)
    ckpt.load_checkpoint(saved, fresh, make_optimizer(fresh, TrainConfig(), "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), plain.state_dict().values()))

    torch.manual_seed(2)
    back = Compiled(GPT(config))
    ckpt.load_model_state(back._orig_mod, compiled.state_dict(), "prefixed")  # `_orig_mod.` names load too
    assert all(torch.equal(a, b) for a, b in zip(back._orig_mod.state_dict().values(), plain.state_dict().values()))
    torch.manual_seed(3)
    back = Compiled(GPT(config))
    ckpt.load_checkpoint(saved, back, make_optimizer(back._orig_mod, TrainConfig(), "cpu"))
    assert all(torch.equal(a, b) for a, b in zip(back._orig_mod.state_dict().values(), plain.state_dict().values()))


# ---------------------------------------------------------------- failed writes, NaN


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(corpus, tmp_path, monkeypatch, capsys):
    real_save = ckpt.save_file

    def save_file(tensors, filename, metadata=None):
        if "step-00000010" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    from potion.cli import main

    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(corpus),
            *sum((["--set", s] for s in TINY), []),
            "--max-steps",
            "20",
            "--eval-every",
            "5",
            "--out",
            str(run),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err == (
        f"potion: error: could not write '{run / 'checkpoints' / 'step-00000010'}' (No space left on "
        "device); the files written before are intact; free some disk space and resume"
    ), err
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-00000000", "step-00000005"]
    assert ckpt.checkpoint_problem(run / "checkpoints" / "step-00000005") is None
    assert not list((run / "checkpoints").glob(".*")) and not (run / LOCK_NAME).exists()

    monkeypatch.setattr(ckpt, "save_file", real_save)  # space freed: the run resumes from step 5
    assert train(tiny_config(corpus, "max_steps=20", "eval_every=5"), run, resume=True, quiet=True)["steps"] == 20


def nan_loss_at(monkeypatch, training_calls):
    real_forward = GPT.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in training_calls:
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", forward)


# On a CPU the loop reads the non-finite counts after every step; on a GPU only every 10 steps: both are tested
# here, and the host-side skip that an AdamW without a fused kernel (so without found_inf) needs.
@pytest.mark.parametrize("read_every, fused", [(1, True), (10, True), (1, False)])
def test_a_nan_step_is_skipped_and_counted(corpus, tmp_path, monkeypatch, read_every, fused):
    monkeypatch.setattr(training_loop, "host_read_interval", lambda device: read_every)
    monkeypatch.setattr(potion_optim, "has_fused_adamw", lambda device_type: fused)
    nan_loss_at(monkeypatch, {7, 8})
    summary = train(tiny_config(corpus, "max_steps=20", "eval_every=10"), tmp_path / "run", quiet=True)
    assert summary["steps"] == 20 and summary["nonfinite_steps"] == 2
    assert train_losses(tmp_path / "run")[0][2] == 2  # the train row of steps 1-10 counts them
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "run" / "model.safetensors")).values())


@pytest.mark.parametrize(
    "read_every, stopped", [(1, "stopped at step 16: 4 steps"), (10, "stopped at step 20: 8 steps")]
)
def test_nan_weights_stop_training_and_leave_the_last_checkpoint(corpus, tmp_path, monkeypatch, read_every, stopped):
    monkeypatch.setattr(training_loop, "host_read_interval", lambda device: read_every)
    run = tmp_path / "run"
    first = next(iter(GPT(ModelConfig(vocab_size=20, context_length=8, n_layer=1, n_head=1, n_embd=8)).state_dict()))
    real_forward = GPT.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        if self.training:
            calls[0] += 1
            if calls[0] == 13:  # step 13 (counting from 1): every weight of the first matrix becomes NaN
                with torch.no_grad():
                    self.state_dict()[first].fill_(float("nan"))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)
    with pytest.raises(
        PotionError,
        match=stopped + r" in a row had a non-finite .*"
        r"the last checkpoint \(step-00000010\) is untouched",
    ):
        train(tiny_config(corpus, "max_steps=40", "eval_every=5", "max_nonfinite_steps=4"), run, quiet=True)
    last = ckpt.complete_checkpoints(run)[-1]
    assert last.name == "step-00000010" and ckpt.checkpoint_problem(last) is None
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "model.safetensors")).values())
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "model.safetensors")).values())
    assert not (run / LOCK_NAME).exists()


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (float(), bool(), .item()): each one is a host sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)
        return func(*args, **(kwargs or {}))


def test_training_steps_do_not_read_back_from_the_device(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(training_loop, "host_read_interval", lambda device: 10)  # what a GPU gets
    monkeypatch.setattr(potion_optim, "read_for_free", lambda flag: False)  # and Muon's rule for a GPU
    counted_reads = []  # the non-finite counts come back in one .tolist(), which the dispatch mode cannot see
    real_read = potion_optim.StepTally.read
    monkeypatch.setattr(potion_optim.StepTally, "read", lambda self: counted_reads.append(1) or real_read(self))
    with HostReads() as reads:
        train(tiny_config(corpus, "max_steps=60", "eval_every=1000"), tmp_path / "run", quiet=True)
    # 60 steps, evaluated at the start and the end: the loss is read back every 10 steps, never once per step
    assert reads.count + len(counted_reads) < 30, (reads.count, len(counted_reads))


# ---------------------------------------------------------------- no pickle


def test_no_pickle_in_potion():
    for path in (ROOT / "potion").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "torch.save" not in text, path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_never_run(corpus, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(corpus, "max_steps=5", "eval_every=5"), run, quiet=True)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    for name in (
        "model.bin",
        "pytorch_model.bin",
        "model.pt",
        "optimizer.pt",
        "checkpoints/step-00000005/rng.pkl",
        "training_args.bin",
    ):
        (run / name).write_bytes(payload)
    from potion import load

    loaded = load(run)  # resolves the run once: its folder, config, model and tokenizer
    model, tokenizer = loaded
    assert loaded.run_dir == run and loaded.config.model == model.config and tokenizer is loaded.tokenizer
    potion("generate", "--model", run, "--max-new-tokens", 5, "--seed", 0)
    potion("eval", "--model", run)
    train(tiny_config(corpus, "max_steps=10", "eval_every=5"), run, resume=True, quiet=True)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # where a .bin must be read, weights_only refuses it too
        torch.load(run / "model.bin", weights_only=True)
    assert not marker.exists()


# ---------------------------------------------------------------- one training per run directory


def test_a_second_training_on_the_same_run_directory_refuses(corpus, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        tiny_training_argv(corpus, "--max-steps", 100000, "--eval-every", 1000, "--out", run, "--quiet"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (run / "config.json").is_file() and time.time() < deadline:
            time.sleep(0.2)
        lock = json.loads((run / LOCK_NAME).read_text())
        assert lock["pid"] == first.pid and lock["host"]
        r = potion("train", "--resume", "--out", run, "--quiet", check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip() == (
            f"potion: error: '{run}' is in use by another training (process {first.pid} on "
            f"{lock['host']}); wait for it to finish or train into another --out"
        )
        assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_held_by_the_kernel_and_released_when_its_holder_is_killed(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):  # a lock is per open file: a second one fails even in the same process
        with pytest.raises(PotionError, match=rf"in use by another training \(process {os.getpid()} on "):
            RunLock(run).__enter__()
    assert not (run / LOCK_NAME).exists()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from potion.formats.run import RunLock; RunLock(__import__('pathlib').Path({str(run)!r}))"
            ".__enter__(); print('locked', flush=True); __import__('time').sleep(600)",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PotionError, match=f"process {holder.pid} on "):
            RunLock(run).__enter__()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with pytest.warns(UserWarning, match=f"taking over .* from process {holder.pid}, which is no longer running"):
        with RunLock(run):  # the kernel let go of the killed holder's lock at once; its file is taken over
            assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_dead_process_is_taken_over(corpus, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    from potion.cli import main

    code = main(
        [
            "train",
            "--data",
            str(corpus),
            *sum((["--set", s] for s in TINY), []),
            "--max-steps",
            "5",
            "--eval-every",
            "5",
            "--out",
            str(run),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert (
        f"potion: warning: taking over '{run / LOCK_NAME}' from process {dead.pid}, which is no longer running" in err
    )
    assert not (run / LOCK_NAME).exists()
    # a lock cut short (its writer killed mid-write) is stale too
    (run / LOCK_NAME).write_text('{"pid": 12')
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "10", "--quiet"]) == 0


def test_validation_only_evaluations_leave_training_unchanged(corpus, tmp_path):
    both = train(tiny_config(corpus, "max_steps=10", "eval_every=5"), out=tmp_path / "both", quiet=True)
    val_only = train(
        tiny_config(corpus, "max_steps=10", "eval_every=5", "eval_train_split=false"), out=tmp_path / "val", quiet=True
    )
    evals = [
        json.loads(line)
        for line in (tmp_path / "val" / "log.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "eval"
    ]
    assert [r["step"] for r in evals] == [0, 5, 10] and all(r["train_loss"] is None for r in evals)
    assert val_only["val_loss"] == both["val_loss"] and both["train_loss"] is not None
    assert (tmp_path / "val" / "loss.png").stat().st_size > 0


def test_loop_state_round_trips_through_state_json_and_reads_the_older_window_list():
    state = LoopState(step=40, tokens=4096, best_val_loss=1.5, nonfinite_steps=3)
    state.log_window = LogWindow(steps=7, nonfinite=1, loss_sum=12.25)
    saved = json.loads(json.dumps({**dataclasses.asdict(state), "val_loss": None}))
    assert LoopState.from_dict(saved) == state
    older = {**saved, "log_window": [12.25, 7, 6, 1]}  # sum, steps, finite steps, non-finite steps
    assert LoopState.from_dict(older) == state
