"""The run recorder: metrics.jsonl always, and the trackers `report_to` names (TensorBoard, MLflow, W&B), each read
back through its own client; a tracker that fails never loses the run; `on_evaluate` sees every evaluation."""
import json
import os

import pytest
from conftest import RUN_DATA as DATA
from conftest import RUN_EVAL as EVAL
from conftest import short_run as eight_steps

from finetune import Engine, TrainConfig
from finetune.models import tiny_bart
from finetune.train.recorder import numbers


def cfg(out, **kw):
    return eight_steps(out, **{"max_steps": 4, **kw})


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_numbers_flatten_a_record_under_its_split():
    record = {"split": "eval", "step": 4, "loss": 1.5, "n": 6, "by_edit_distance": {"1": {"n": 2}}, "note": "text"}
    assert numbers(record) == {"eval/loss": 1.5, "eval/n": 6.0, "eval/by_edit_distance.1.n": 2.0}
    assert numbers({**record, "final": True})["final_eval/loss"] == 1.5  # the final evaluation under its own name


def test_on_evaluate_sees_every_evaluation_and_the_log_holds_train_eval_and_events(tmp_path):
    seen = []
    history = Engine(*tiny_bart(), cfg(tmp_path, best_metric="loss")).fit(
        DATA, eval=EVAL, on_evaluate=lambda engine, result: seen.append((engine.global_step, result["loss"])))
    assert [step for step, _ in seen] == [2, 4, 4]  # two during training, then the final one
    assert seen[-1][1] == history["final_eval"]["loss"]
    splits = [r["split"] for r in records(tmp_path)]
    assert splits.count("train") == 4 and splits.count("eval") == 3 and "event" in splits


class Broken:
    name = "broken"
    closed = []

    def __init__(self, output_dir, config):
        self.calls = 0

    def write(self, record):
        raise OSError("disk full")

    def close(self):
        Broken.closed.append(self)


def test_a_sink_that_fails_while_writing_never_loses_the_run(tmp_path, monkeypatch):
    import finetune.train.recorder as recorder

    monkeypatch.setitem(recorder.SINK_CLASSES, "tensorboard", Broken)
    engine = Engine(*tiny_bart(), cfg(tmp_path, report_to=["tensorboard"]))
    with pytest.warns(UserWarning, match="report_to 'broken' failed while writing.*metrics.jsonl keeps them all"):
        history = engine.fit(DATA, eval=EVAL)
    assert len(history["train"]) == 4 and os.path.isdir(tmp_path / "model")
    assert len([r for r in records(tmp_path) if r["split"] == "train"]) == 4
    assert len(Broken.closed) == 1  # the dropped tracker's run was ended, once


@pytest.mark.parametrize("tracker, variables", [
    ("mlflow", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
    ("wandb", {"WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9"})])
def test_an_unreachable_tracking_server_fails_before_the_first_step_naming_it(tmp_path, monkeypatch, tracker,
                                                                              variables):
    import time

    pytest.importorskip(tracker)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    engine = Engine(*tiny_bart(), cfg(tmp_path, report_to=[tracker]))
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"=http://127\.0\.0\.1:9: no server answers at 127\.0\.0\.1:9"):
        engine.fit(DATA, eval=EVAL)
    assert time.monotonic() - started < 60  # a hang guard: the clients' own retries take minutes
    assert engine.global_step == 0


def test_a_sink_that_cannot_start_stops_before_the_first_step(tmp_path, monkeypatch):
    import finetune.train.recorder as recorder

    class NoStart:
        name = "nostart"

        def __init__(self, output_dir, config):
            raise ImportError("No module named 'mlflow'")

    monkeypatch.setitem(recorder.SINK_CLASSES, "mlflow", NoStart)
    engine = Engine(*tiny_bart(), cfg(tmp_path, report_to=["mlflow"]))
    with pytest.raises(ImportError, match=r"report_to=\['mlflow'\] needs the mlflow package: pip install"):
        engine.fit(DATA, eval=EVAL)
    assert engine.global_step == 0 and not os.path.exists(tmp_path / "metrics.jsonl")


def test_unknown_tracker_is_refused():
    with pytest.raises(ValueError, match="report_to.*known trackers: 'tensorboard', 'mlflow', 'wandb'"):
        TrainConfig(report_to=["comet"])


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Engine(*tiny_bart(), cfg(tmp_path, report_to=["tensorboard"])).fit(DATA, eval=EVAL)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/loss", "eval/exact_match"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_mlflow_run_reads_back_through_its_client(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    history = Engine(*tiny_bart(), cfg(tmp_path, report_to=["mlflow"], best_metric="loss")).fit(DATA, eval=EVAL)
    client = MlflowClient(tracking_uri="sqlite:///" + str(tmp_path / "mlflow.db"))
    experiment = client.get_experiment_by_name("finetune")
    (run,) = client.search_runs([experiment.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(r["step"], r["loss"]) for r in history["train"]]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final_eval/loss")] == [4]
    assert run.data.params["lr"] == "0.003" and run.info.status == "FINISHED"


def wandb_history(run_file):
    """The history rows of an offline W&B run, read from its transaction log (`run-*.wandb`: W&B's LevelDB-style
    log of its own protobuf `Record`s; wandb 0.31 ships no Python reader of it)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, pending = open(run_file, "rb").read(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            chunks.append(pending)
    rows = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_run_reads_back_through_its_own_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    history = Engine(*tiny_bart(), cfg(tmp_path, report_to=["wandb"])).fit(DATA, eval=EVAL)
    (run_dir,) = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    (log,) = [f for f in os.listdir(tmp_path / "wandb" / run_dir) if f.endswith(".wandb")]
    rows = wandb_history(tmp_path / "wandb" / run_dir / log)
    train = [(row["_step"], row["train/loss"]) for row in rows if "train/loss" in row]
    assert train == [(r["step"], pytest.approx(r["loss"])) for r in history["train"]]
    assert [row["_step"] for row in rows if "eval/loss" in row] == [2, 4]  # W&B merges a step's records
