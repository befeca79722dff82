"""Experiment trackers: `heads train --report-to tensorboard|wandb|mlflow` sends the records of metrics.jsonl
to the tool a team already uses. Each tracker's package is an optional extra, imported only when asked for.

The JSONL log stays the source: a tracker receives the very records written there, as scalars named
`HEAD/train/loss`, `HEAD/eval/f1`, `HEAD/eval/per_type/PER/f1`, ... at the optimiser step (train records) or
the epoch (eval and epoch records).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from featstore import install_hint
from featstore.errors import ConfigError

# The --report-to choices; "none" keeps only the JSONL log.
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")
TENSORBOARD_DIR = "tensorboard"  # event files go to OUT/tensorboard
# Record fields that say where a value belongs rather than being one.
RECORD_KEYS = ("event", "head", "epoch", "step", "global_step", "heads")


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """A metrics.jsonl record as (step, {tag: value}): numbers only, nested dicts flattened into the tag."""
    event = record["event"]
    step = record["global_step"] if event == "train" else record["epoch"]
    prefix = f"{record['head']}/{event}" if "head" in record else event
    return step, dict(_flatten(prefix, {key: value for key, value in record.items() if key not in RECORD_KEYS}))


def _flatten(prefix: str, values: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(f"{prefix}/{key}", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}/{key}", float(value)


def _require(module: str, tracker: str, product: str) -> Any:
    """The tracker's package, imported only now that it is asked for; ConfigError with its install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"--report-to {tracker} needs {product}: {install_hint(tracker)}") from None


class Tracker:
    """Receives every training record; the base class tracks nothing (--report-to none)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        tensorboard = _require("torch.utils.tensorboard", "tensorboard", "TensorBoard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        self.writer.add_text("config", f"```\n{_as_text(config)}\n```")

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        wandb = _require("wandb", "wandb", "Weights & Biases")
        # project, entity and mode come from the usual WANDB_* environment variables
        self.run = wandb.init(dir=str(out), name=out.name, config=config)

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        self.run.log({**values, "step" if record["event"] == "train" else "epoch": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        mlflow = _require("mlflow", "mlflow", "MLflow")
        self.mlflow = mlflow  # the tracking URI and experiment come from MLFLOW_* environment variables
        self.run = mlflow.start_run(run_name=out.name)
        mlflow.log_params({key: _as_text(value)[:250] for key, value in config.items()})

    def log(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        # MLflow metric names allow letters, digits and _-./ and spaces only
        self.mlflow.log_metrics({tag.replace(":", "_"): value for tag, value in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_TRACKER_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                              "mlflow": MlflowTracker}


def make_tracker(report_to: str, out: Path, config: dict[str, Any]) -> Tracker:
    """The tracker `--report-to` names, given the run's output directory and its configuration."""
    if report_to == "none":
        return Tracker()
    return _TRACKER_CLASSES[report_to](out, config)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)
