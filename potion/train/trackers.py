"""Experiment trackers (train.log_to): the figures of log.jsonl, also sent to TensorBoard, Weights & Biases or
MLflow through the libraries themselves, each an optional extra.

Each tracker is a small class with two methods, `log(metrics, step)` and `close(status)`. They write into the run
directory unless told otherwise: tensorboard/ (TensorBoard's event files), wandb/ (an offline W&B run unless
WANDB_MODE says otherwise; `wandb sync` uploads it) and mlruns/ (an MLflow file store, unless MLFLOW_TRACKING_URI
names another). A resumed run goes on in the same logs: trackers.json keeps the W&B and MLflow run ids.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Protocol

from potion.config import RunConfig
from potion.errors import PotionError, require
from potion.formats.fileio import atomic_write_text

IDS_FILE = "trackers.json"  # {"wandb": run id, "mlflow": run id}: a resumed run continues those runs


class Tracker(Protocol):
    """log: figures by name at a step. close: the run ended, its status "finished", "stopped" (by a signal, saved
    and resumable) or "failed"."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, status: str) -> None: ...


def tracker_names(config: RunConfig) -> list[str]:
    log_to = config.train.log_to
    return log_to.split(",") if log_to else []


def check_installed(config: RunConfig) -> None:
    """Before anything is written: every library that train.log_to names can be imported."""
    for name in tracker_names(config):
        require(name, name, f"train.log_to = {name}")
        if name == "tensorboard":  # torch's writer also checks tensorboard's version
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as e:
                raise PotionError(f'train.log_to = tensorboard: {e}; pip install "potion[tensorboard]"') from None


def open_trackers(config: RunConfig, run_dir: Path, resumed_step: int | None, quiet: bool) -> list[Tracker]:
    """The trackers train.log_to names, opened in run_dir. resumed_step: the step a resumed run continues from
    (what each log keeps of the earlier sessions), None for a new run."""
    ids = read_ids(run_dir) if resumed_step is not None else {}
    before = dict(ids)
    trackers = []
    for name in tracker_names(config):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, config, resumed_step))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, config, ids, quiet))
        else:
            trackers.append(MLflowTracker(run_dir, config, ids))
    if ids != before:
        atomic_write_text(run_dir / IDS_FILE, json.dumps(ids) + "\n")
    return trackers


def read_ids(run_dir: Path) -> dict:
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def flat_config(config: RunConfig) -> dict[str, object]:
    """{"model.n_layer": 6, ...}: the run's config as one level of names, as hyperparameter tables want it."""
    return {f"{section}.{key}": value for section, values in config.to_dict().items() for key, value in values.items()}


class TensorBoardTracker:
    """Event files in run_dir/tensorboard (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, run_dir: Path, config: RunConfig, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides the events the earlier session logged after its checkpoint, as log.jsonl drops them
        purge_step = None if resumed_step is None else resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        if resumed_step is None:
            self.writer.add_text("config", "```\n" + json.dumps(config.to_dict(), indent=2) + "\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # every LOG_EVERY steps at most: a killed run keeps what log.jsonl keeps

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run in run_dir/wandb: offline unless WANDB_MODE says otherwise (`wandb sync` uploads it)."""

    def __init__(self, run_dir: Path, config: RunConfig, ids: dict, quiet: bool):
        import wandb

        ids.setdefault("wandb", secrets.token_hex(4))  # eight characters, as W&B makes its own ids
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "potion"),
            name=run_dir.name,
            id=ids["wandb"],
            resume="allow",  # a resumed run logs on under the same id
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config.to_dict(),
            # console off: W&B would otherwise wrap stderr, where the progress bar and potion's messages go
            settings=wandb.Settings(console="off", silent=quiet),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


class MLflowTracker:
    """An MLflow run in the file store run_dir/mlruns, or where MLFLOW_TRACKING_URI points."""

    def __init__(self, run_dir: Path, config: RunConfig, ids: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 asks for an explicit opt-in to the file store; it keeps the logs as plain files in the run
            # directory, readable without a database or a server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").absolute().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = ids.get("mlflow")
        if not (self.run_id and self.reopened()):
            self.run_id = ids["mlflow"] = self.new_run(run_dir.name, config)

    def reopened(self) -> bool:
        """Whether the saved run is in this store, now running again (a resumed training)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(self.run_id, status="RUNNING")
        except MlflowException:  # another store (MLFLOW_TRACKING_URI changed), or the run was deleted
            return False
        return True

    def new_run(self, name: str, config: RunConfig) -> str:
        """A new run in the experiment MLFLOW_EXPERIMENT_NAME (default: potion), with the config as its
        parameters."""
        from mlflow.entities import Param

        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "potion")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(key, str(value)) for key, value in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(run_id, params=params[i : i + 100])
        return run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED"))
