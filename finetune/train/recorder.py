"""What a run records, in one place: its messages, its records and events, and the trackers that receive them.

A `Recorder` belongs to one run (`Engine.prepare` makes it; `Engine.evaluate` outside a run uses a plain one). It
writes every record to `OUTPUT_DIR/metrics.jsonl` and hands the same record to each sink chosen by
`TrainConfig.report_to`:

    tensorboard   every number as a scalar `split/name` in OUTPUT_DIR/tensorboard (torch.utils.tensorboard)
    mlflow        a run in the tracking store (MLFLOW_TRACKING_URI, else a local SQLite store OUTPUT_DIR/mlflow.db;
                  MLflow 3 keeps its plain-file store in maintenance mode): the config as parameters, every number
                  as a metric `split/name` at the step
    wandb         a Weights & Biases run (offline unless WANDB_MODE says otherwise, files under OUTPUT_DIR/wandb):
                  the config, every number as `split/name` at the step

A record is a flat dict with `split` ("train", "eval", "event") and `step`. A sink is a small object with
`write(record)` and `close()`; one that cannot be imported or started is an error before the first step (with
the install command), and one that fails while writing is dropped with a warning: the run and metrics.jsonl
go on. Only rank 0 records.
"""
from __future__ import annotations

import json
import os
import time
import warnings

from finetune.checks import is_number

SINKS = ("tensorboard", "mlflow", "wandb")
INSTALL = {"tensorboard": "pip install -e '.[tensorboard]'", "mlflow": "pip install -e '.[mlflow]'",
           "wandb": "pip install -e '.[wandb]'"}


REACH_TIMEOUT_S = 5.0  # a tracking server that does not accept a connection in this time is reported, not waited for


def check_reachable(url: str, setting: str) -> None:
    """A tracker's server must accept a TCP connection within REACH_TIMEOUT_S: its client would otherwise retry for
    minutes before the first step. ConnectionError naming the setting and the URL."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as err:
        raise ConnectionError(f"{setting}={url}: no server answers at {parsed.hostname}:{port} within "
                              f"{REACH_TIMEOUT_S:g} s ({err.strerror or err}); start it, correct {setting}, or leave "
                              "the tracker out of report_to") from None


def numbers(record: dict) -> dict[str, float]:
    """The record's numbers (not step or epoch) as `split/name` (the final evaluation's: `final_eval/name`);
    nested mappings flattened with '.'."""
    split, out = "final_eval" if record.get("final") else record.get("split", "train"), {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif is_number(value):
            out[f"{split}/{prefix}"] = float(value)

    for key, value in record.items():
        if key not in ("split", "step", "epoch"):
            walk(key, value)
    return out


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, output_dir: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, record.get("step", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    name = "mlflow"

    def __init__(self, output_dir: str, config: dict):
        import mlflow

        self.mlflow = mlflow
        os.makedirs(output_dir, exist_ok=True)
        local = os.path.abspath(output_dir)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(local, "mlflow.db")
        check_reachable(uri, "MLFLOW_TRACKING_URI")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "finetune")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location="file:" + os.path.join(local, "mlartifacts"))
        self.run_id = self.client.create_run(experiment_id, run_name=os.path.basename(
            os.path.abspath(output_dir))).info.run_id
        params = [mlflow.entities.Param(k, str(v)[:500]) for k, v in sorted(config.items())]
        self.client.log_batch(self.run_id, params=params)
        self.uri = uri

    def write(self, record: dict) -> None:
        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [self.mlflow.entities.Metric(k, v, now, step) for k, v in numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    name = "wandb"

    def __init__(self, output_dir: str, config: dict):
        import wandb

        os.makedirs(output_dir, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode == "online":
            check_reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), "WANDB_BASE_URL")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "finetune"), dir=output_dir, config=config,
                              mode=mode, reinit="create_new")

    def write(self, record: dict) -> None:
        values = numbers(record)
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


SINK_CLASSES = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink, "wandb": WandbSink}


class Recorder:
    """The run's messages (printed with `progress`), records (metrics.jsonl and every sink) and events."""

    def __init__(self, output_dir: str, is_main: bool = True, progress: bool = True, report_to=(),
                 config: dict | None = None):
        self.output_dir, self.is_main, self.progress = output_dir, is_main, progress
        self.sinks = []
        if not is_main:
            return
        for name in report_to:
            try:
                self.sinks.append(SINK_CLASSES[name](output_dir, dict(config or {})))
            except ImportError as err:
                self.close()
                raise ImportError(f"report_to=[{name!r}] needs the {name} package: {INSTALL[name]}") from err
            except Exception as err:
                self.close()
                raise RuntimeError(f"report_to=[{name!r}]: the {name} tracker could not start ({type(err).__name__}:"
                                   f" {err}); fix its settings or leave it out of report_to") from err

    def log(self, message: str) -> None:
        if self.progress and self.is_main:
            print(message, flush=True)

    def record(self, record: dict) -> None:
        """One record to metrics.jsonl and to every sink (a sink that fails is dropped with a warning)."""
        if not self.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for sink in list(self.sinks):
            try:
                sink.write(record)
            except Exception as err:  # a tracker's failure never loses the run: metrics.jsonl has every record
                self.sinks.remove(sink)
                try:
                    sink.close()  # its run ends (marked finished) with what it had
                except Exception:
                    pass
                warnings.warn(f"report_to {sink.name!r} failed while writing ({type(err).__name__}: {err}); it gets no "
                              "more records this run, metrics.jsonl keeps them all", stacklevel=2)

    def event(self, event: str, step: int, **fields) -> None:
        self.record({"split": "event", "event": event, "step": step, **fields})

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:
                warnings.warn(f"report_to {sink.name!r} failed to close ({type(err).__name__}: {err})", stacklevel=2)
        self.sinks = []
