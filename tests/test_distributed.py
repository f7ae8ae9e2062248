"""Training on several processes, started by torchrun as a user starts it (CPU, gloo, 2 processes): the same
learning as one process, checkpoints that move between 1 and 2 processes, one writer, one error line, one stop."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_settings import TINY

import potion.train.checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = Path(__file__).with_name("distributed_launch.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
# fp32: the comparisons below are of float rounding, and bf16 autocast would widen them a hundredfold
RUN = [*TINY, "dtype=fp32", "optimizer=adamw", "grad_accum=2", "checkpoint_every=10", "keep_checkpoints=0"]
STEPS = ["--max-steps", "30", "--eval-every", "10", "--quiet"]
LOSS_TOLERANCE = 1e-4  # relative: a batch's mean over 8 rows against the mean of two means over 4
WEIGHT_TOLERANCE = 1e-3  # absolute, after 30 AdamW steps of 2 micro-batches (measured: at most 2e-4)


def train_args(corpus, out, *extra, settings=RUN):
    sets = [a for s in settings for a in ("--set", s)]
    return ["train", "--data", str(corpus), *sets, *STEPS, "--out", str(out), *map(str, extra)]


def one_process(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "potion", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300
    )
    if check and result.returncode:
        raise AssertionError(f"potion {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def torchrun(*args, env=None, logs=None, check=True, script=None):
    """`torchrun --standalone --nproc_per_node=2 -m potion ARGS` (torchrun picks a free port itself); with
    `logs`, each rank's stdout and stderr go to files under it; `script` runs that file instead of -m potion."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if logs is not None:
        command += ["--redirects", "3", "--log-dir", str(logs)]
    command += [str(script)] if script else ["-m", "potion"]
    result = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=300
    )
    if check and result.returncode:
        raise AssertionError(f"torchrun {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


def rank_output(logs: Path, rank: int, stream: str) -> str:
    (path,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def log_rows(run_dir):
    """(kind, step, loss) of every row of log.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r["loss"] if r["kind"] == "train" else r["val_loss"]) for r in rows]


def assert_same_learning(run, reference, loss_tolerance=LOSS_TOLERANCE, weight_tolerance=WEIGHT_TOLERANCE):
    rows, expected = log_rows(run), log_rows(reference)
    assert [r[:2] for r in rows] == [r[:2] for r in expected]
    for (kind, step, loss), (_, _, want) in zip(rows, expected):
        assert loss == pytest.approx(want, rel=loss_tolerance), f"{kind} loss at step {step}"
    for name in ("model.safetensors", "checkpoints/step-00000030/model.safetensors"):
        ours, theirs = load_file(run / name), load_file(reference / name)
        assert ours.keys() == theirs.keys()
        worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        assert worst <= weight_tolerance, f"{name}: weights differ by {worst}"


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one(corpus, runs):
    """The reference: one process, global batch 8, 30 steps."""
    one_process(*train_args(corpus, runs / "one"))
    return runs / "one"


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    return tmp_path_factory.mktemp("audit")


@pytest.fixture(scope="module")
def two(corpus, runs, audited):
    """Two processes with DDP, through the launcher that records what each process writes."""
    logs = runs / "two-logs"
    torchrun(
        *train_args(corpus, runs / "two", "--set", "parallel=ddp"),
        env={"POTION_TEST_AUDIT": str(audited)},
        logs=logs,
        script=LAUNCH,
    )
    return runs / "two", logs


# ---------------------------------------------------------------- the same learning, any number of processes


def test_two_processes_with_ddp_learn_what_one_does(one, two):
    run, _ = two
    assert_same_learning(run, one)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["batch_size"] == 8 and config["train"]["parallel"] == "ddp"  # the global batch
    state = json.loads((run / "checkpoints/step-00000030/state.json").read_text())
    assert state["world_size"] == 2 and state["tokens"] == 30 * 2 * 8 * 32  # steps, micro-batches, rows, tokens


def test_two_processes_with_fsdp_learn_what_one_does(corpus, runs, one):
    torchrun(*train_args(corpus, runs / "fsdp", "--set", "parallel=fsdp"))
    assert_same_learning(runs / "fsdp", one)


def test_muon_under_fsdp_gathers_whole_matrices(corpus, runs):
    """Muon orthogonalises whole matrices, gathered from the shards. The runs are fp32, Newton-Schulz included, so
    the two agree as AdamW's do (in bf16, Newton-Schulz turns the 1e-7 differences of summing in another order
    into 1e-3 a step, and 30 steps into anything up to 6e-2); a shard put back in the wrong place would be far
    outside the tolerance."""
    muon = [s for s in RUN if not s.startswith(("optimizer", "grad_accum"))] + ["optimizer=muon"]
    one_process(*train_args(corpus, runs / "muon-one", settings=muon))
    torchrun(*train_args(corpus, runs / "muon-fsdp", "--set", "parallel=fsdp", settings=muon))
    assert_same_learning(runs / "muon-fsdp", runs / "muon-one")


# ---------------------------------------------------------------- checkpoints between 1 and 2 processes


def resumed_from_step_20(source: Path, copy: Path) -> Path:
    """A copy of a finished run with its last checkpoint gone: resuming it retrains steps 20 to 30."""
    shutil.copytree(source, copy)
    shutil.rmtree(copy / "checkpoints/step-00000030")
    return copy


def test_a_two_process_checkpoint_continues_in_one_process(corpus, runs, one, two):
    run = resumed_from_step_20(two[0], runs / "two-then-one")
    result = one_process(*train_args(corpus, run), "--resume")
    assert f"resuming {run} from step 20" in result.stderr
    assert "saved by 2 process(es) and continues on 1" in result.stderr
    assert_same_learning(run, one)


def test_a_one_process_checkpoint_continues_on_two_with_fsdp(corpus, runs, one):
    run = resumed_from_step_20(one, runs / "one-then-two")
    result = torchrun(*train_args(corpus, run, "--set", "parallel=fsdp"), "--resume")
    assert "saved by 1 process(es) and continues on 2" in result.stderr
    assert_same_learning(run, one)


def test_resuming_on_the_same_two_processes_is_exact(corpus, runs):
    """With dropout, so each rank's own random generators have to come back too."""
    settings = [*RUN, "dropout=0.1"]
    torchrun(*train_args(corpus, runs / "dropout", settings=settings))
    run = resumed_from_step_20(runs / "dropout", runs / "dropout-resumed")
    torchrun(*train_args(corpus, run, settings=settings), "--resume")
    for name in ("model.safetensors", "checkpoints/step-00000030/model.safetensors"):
        assert (run / name).read_bytes() == (runs / "dropout" / name).read_bytes()
    assert log_rows(run) == log_rows(runs / "dropout")


# ---------------------------------------------------------------- one writer


def test_only_rank_0_writes_into_the_run_directory(two, audited):
    run, logs = two
    inside = str(run.resolve())
    written = {rank: (audited / f"rank-{rank}.txt").read_text().splitlines() for rank in (0, 1)}
    assert any(path.startswith(inside) for path in written[0])  # the audit sees rank 0's writes: it can fail
    assert [path for path in written[1] if path.startswith(inside)] == []
    assert rank_output(logs, 1, "stderr") == "" and rank_output(logs, 1, "stdout") == ""
    assert "trained 30 steps" in rank_output(logs, 0, "stdout")


# ---------------------------------------------------------------- faults and stops


def test_an_error_on_rank_1_ends_the_job_with_one_line(corpus, runs):
    logs = runs / "fault-logs"
    started = time.monotonic()
    result = torchrun(
        *train_args(corpus, runs / "fault"),
        env={"POTION_TEST_FAIL_RANK": "1"},
        logs=logs,
        script=LAUNCH,
        check=False,
    )
    assert time.monotonic() - started < 60  # no rank waits on a collective for its timeout
    line = "potion: error: rank 1 of 2: a fault planted by the test at step 5\n"
    assert rank_output(logs, 1, "stderr") == line
    assert rank_output(logs, 0, "stderr") == ""
    # torchrun names rank 1 as the root cause, with potion's exit code; its own report and exit code (1) follow
    root_cause = result.stderr.split("Root Cause")[1]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 2", root_cause), result.stderr[-2000:]
    assert result.returncode != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failing", [0, 1])
def test_under_a_plain_launcher_an_error_is_one_line_and_exit_code_2(corpus, runs, failing):
    """Any launcher that sets torchrun's variables (Slurm's srun, mpirun): each process is a `potion train`."""
    job = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    job["POTION_TEST_FAIL_RANK"] = str(failing)
    args = [sys.executable, str(LAUNCH), *train_args(corpus, runs / f"plain-{failing}")]
    processes = [
        subprocess.Popen(
            args, env={**ENV, **job, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True
        )
        for r in (0, 1)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [2, 2]
    prefix = f"rank {failing} of 2: " if failing else ""
    assert "".join(errors) == f"potion: error: {prefix}a fault planted by the test at step 5\n"


def test_sigterm_stops_both_ranks_at_one_step_and_saves_once(corpus, runs):
    """A scheduler's SIGTERM to torchrun: torchrun passes it on, the ranks agree on a step, rank 0 saves there."""
    run = runs / "stopped"
    many = ["--max-steps", "5000", "--eval-every", "1000"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "potion"]
    process = subprocess.Popen(
        [*command, *train_args(corpus, run), *many],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (run / "log.jsonl").is_file() or "train" not in (run / "log.jsonl").read_text():
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    stopped = re.findall(r"stopped at step (\d+) and saved", err)
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0])
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-00000000", f"step-{step:08d}"]
    assert err.count("SIGTERM: finishing this step, then saving") == 1
    torch_state = json.loads((run / f"checkpoints/step-{step:08d}/state.json").read_text())
    assert torch_state["step"] == step and torch_state["world_size"] == 2


# ---------------------------------------------------------------- the pieces, in this process


def test_the_ranks_rows_put_together_are_the_one_process_batch(corpus, monkeypatch):
    import numpy as np

    from potion.data.tokens import Batches
    from potion.parallel import world as distributed

    tokens = np.arange(5000, dtype=np.uint16)
    alone = Batches(tokens, 16, 8, seed=3)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_world", distributed.World(rank, 2, rank, 2, "gloo"))
        parts.append(Batches(tokens, 16, 8, seed=3, rows=distributed.my_rows(8)))
    for _ in range(3):
        x, y = alone.next()
        (x0, y0), (x1, y1) = parts[0].next(), parts[1].next()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert parts[0].state() == parts[1].state() == alone.state()  # one data order, saved once


def test_a_batch_that_does_not_split_evenly_and_an_unknown_parallel_are_one_line(monkeypatch):
    from potion.config import resolve
    from potion.errors import PotionError
    from potion.parallel import world as distributed

    monkeypatch.setattr(distributed, "_world", distributed.World(0, 3, 0, 3, "gloo"))
    with pytest.raises(PotionError, match=r"batch_size \(8\) must be divisible by the number of processes \(3\)"):
        distributed.check_batch(8)
    with pytest.raises(PotionError, match="parallel must be one of auto, ddp, fsdp"):
        resolve("tiny", None, ["parallel=zero3"])


def test_auto_picks_ddp_while_a_copy_fits_and_fsdp_beyond(monkeypatch):
    from potion.parallel import world as distributed

    model = torch.nn.Linear(1000, 1000)  # 1M weights: 16 MB of weights, gradients and AdamW moments
    monkeypatch.setattr(distributed, "device_memory", lambda device: 64e6)
    assert distributed.choose_parallel("auto", model, torch.device("cpu")) == "ddp"
    monkeypatch.setattr(distributed, "device_memory", lambda device: 20e6)
    assert distributed.choose_parallel("auto", model, torch.device("cpu")) == "fsdp"
    assert distributed.choose_parallel("ddp", model, torch.device("cpu")) == "ddp"
