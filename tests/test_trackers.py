"""train.log_to: TensorBoard, Weights & Biases (offline) and MLflow get the figures of log.jsonl at the same steps,
read back here with each library's own reader; a resumed run goes on in the same logs; a missing library is one
error line before anything is written."""

import importlib.util
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from tiny_settings import TINY

from potion.cli import main
from potion.config import TrainConfig, resolve
from potion.errors import PotionError
from potion.train import checkpoint as ckpt
from potion.train.loop import train

LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALLED = [name for name, module in LIBRARIES.items() if importlib.util.find_spec(module) is not None]


def needs(name):
    return pytest.mark.skipif(name not in INSTALLED, reason=f'{name} is not installed (pip install "potion[{name}]")')


@pytest.fixture(scope="module")
def tracked_run(corpus, tmp_path_factory):
    """A tiny run to step 30 logged to every tracker installed here; then, as if it had been killed after logging
    step 30 but before saving it, resumed from step 20's checkpoint to step 30 again."""
    if not INSTALLED:
        pytest.skip("none of tensorboard, wandb, mlflow is installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("tracked") / "run"
    settings = [*TINY, f"data={corpus}", "max_steps=30", "eval_every=10", "keep_checkpoints=3"]
    config = resolve("tiny", None, [*settings, f"log_to={','.join(INSTALLED)}"])
    with pytest.MonkeyPatch.context() as env:  # W&B's own settings, cache and debug logs: not the user's home
        home = tmp_path_factory.mktemp("wandb-home")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "XDG_CACHE_HOME"):
            env.setenv(name, str(home / name.lower()))
        first = train(config, run, quiet=True)
        first_rows = log_rows(run)
        shutil.rmtree(ckpt.complete_checkpoints(run)[-1])  # step 30's checkpoint never was
        second = train(config, run, resume=True, quiet=True)
    torch.set_num_threads(threads)
    assert first["steps"] == second["steps"] == 30
    return run, first_rows, log_rows(run)


def log_rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def figures(rows, kind, key):
    """(step, value) of log.jsonl's rows of one kind."""
    return [(r["step"], r[key]) for r in rows if r["kind"] == kind]


def same(logged, expected):
    """The same steps, with the same values up to float32 (TensorBoard's)."""
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)
    return True


@needs("tensorboard")
def test_tensorboard_reads_the_logged_figures_and_a_resumed_run_replaces_what_followed_its_checkpoint(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, rows = tracked_run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # the resumed writer's purge step hides the first session's step 30
    for tag, kind, key in [("train/loss", "train", "loss"), ("train/lr", "train", "lr"), ("train/mfu", "train", "mfu")]:
        assert same([(e.step, e.value) for e in events.Scalars(tag)], figures(rows, kind, key)), tag
    assert [e.step for e in events.Scalars("eval/val_loss")] == [0, 10, 20, 30]
    assert same([(e.step, e.value) for e in events.Scalars("eval/val_loss")], figures(rows, "eval", "val_loss"))
    assert [e.step for e in events.Scalars("train/tokens_per_second")] == [10, 20, 30]


def wandb_records(path):
    """The records of a .wandb file, parsed with W&B's own protobuf schema: the file is a LevelDB-style log of
    32 KiB blocks after a 7-byte header, each record cut into chunks with a 7-byte head (crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a chunk head is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeroed padding
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path):
    """{step: {key: value}} of the history rows of a .wandb file, and whether the run's exit was recorded."""
    records = wandb_records(path)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
    return history, any(r.WhichOneof("record_type") == "exit" for r in records)


@needs("wandb")
def test_wandb_offline_run_holds_the_logged_figures_and_a_resumed_run_continues_its_id(tracked_run):
    run, first_rows, rows = tracked_run
    ids = json.loads((run / "trackers.json").read_text())
    sessions = sorted(run.glob("wandb/offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith("-" + ids["wandb"]) for s in sessions)  # one run, twice
    (first, first_exited), (second, second_exited) = (wandb_history(s / f"run-{ids['wandb']}.wandb") for s in sessions)
    assert first_exited and second_exited  # each session finished its run
    for key, kind, name in [("train/loss", "train", "loss"), ("eval/val_loss", "eval", "val_loss")]:
        assert same([(step, h[key]) for step, h in first.items() if key in h], figures(first_rows, kind, name))
    assert sorted(second) == [30]  # the resumed session logged on from its checkpoint
    assert second[30]["train/loss"] == pytest.approx(figures(rows, "train", "loss")[-1][1])
    assert {"train/lr", "train/tokens_per_second", "train/mfu", "eval/val_bits_per_byte"} <= set(second[30])


@needs("mlflow")
def test_mlflow_file_store_holds_the_logged_figures_in_one_run_across_the_resume(tracked_run):
    from mlflow.tracking import MlflowClient

    run, _, rows = tracked_run
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]
    found = client.get_run(run_id)
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    assert found.data.params["model.n_layer"] == "2" and found.data.params["train.log_to"] == ",".join(INSTALLED)
    history = client.get_metric_history(run_id, "train/loss")
    # MLflow keeps every value: step 30 of the first session and of the resumed one; the latest is log.jsonl's
    assert [m.step for m in history] == [10, 20, 30, 30]
    assert history[-1].value == pytest.approx(figures(rows, "train", "loss")[-1][1])
    val = client.get_metric_history(run_id, "eval/val_loss")
    assert same([(m.step, m.value) for m in val][-1:], figures(rows, "eval", "val_loss")[-1:])


@pytest.mark.parametrize("name", list(LIBRARIES))
def test_a_missing_library_is_one_error_line_naming_its_extra_before_anything_is_written(
    name, corpus, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, LIBRARIES[name], None)  # as if it were not installed: importing it fails
    out, cache = tmp_path / "run", Path(os.environ["POTION_CACHE"])
    cached = sorted(cache.rglob("*"))
    tiny = [a for s in TINY for a in ("--set", s)]
    code = main(["train", "--data", str(corpus), *tiny, "--set", f"log_to={name}", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("potion: error: "), err
    assert f'pip install "potion[{name}]"' in err[0]
    assert not out.exists() and sorted(cache.rglob("*")) == cached  # not even the corpus's tokens


def test_log_to_takes_the_trackers_by_name_one_or_several():
    assert TrainConfig(log_to=" tensorboard, wandb,tensorboard").log_to == "tensorboard,wandb"
    assert TrainConfig().log_to == ""
    with pytest.raises(PotionError, match="log_to must be one of tensorboard, wandb, mlflow; got 'comet'"):
        TrainConfig(log_to="wandb,comet")
