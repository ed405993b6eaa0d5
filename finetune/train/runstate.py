"""What a run is made of once prepared (`TrainingRun`), and what it keeps so it can stop and go on: its
checkpoints while it trains, its log, and the signals that stop it.

`Checkpointer` writes the training state (finetune.train.checkpoint) at `save_every` steps, at the end, and when a
signal or a failed evaluation stops the run. While steps are being skipped as non-finite it writes none, so
pruning (`keep_last`) can never delete the last checkpoint written before a run started to diverge; `last`
names the newest one written. Under torchrun every rank takes part in a save (RNG states, FSDP shards are
gathered) and rank 0 writes.

`StepLog`: every `log_every` steps one record (loss and token accuracy over the steps since the last record,
learning rate, gradient norm, samples/s) to the run's recorder (finetune.train.recorder), the returned history and the
progress bar.

`StopOnSignal`: while active, SIGTERM and SIGINT only record the signal; the loop checks it after each step,
saves a checkpoint and exits with status 128 + signal.
"""
from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import dataclass

from finetune import distributed
from finetune.data.stream import Stream
from finetune.data.training import Corpus
from finetune.train.checkpoint import CheckpointError, load_model_tensors, rng_state, save_checkpoint
from finetune.train.guards import TrainingStopped
from finetune.train.optim import optimizer_state_bytes


class Tokenized(tuple):
    """(pairs, examples) of one data set, read and tokenised once."""

    def __new__(cls, pairs, examples):
        return super().__new__(cls, (pairs, examples))


@dataclass
class TrainingRun:
    """What `Engine.prepare` made: the data, the schedule of steps, where a resume starts, the checkpointer, the
    best evaluation so far."""
    data: Corpus | Stream  # the training data (finetune.data.training): examples and batches, or a stream
    eval_set: Tokenized | None  # what evaluations during training use (eval_max_samples: a fixed subset)
    eval_full: Tokenized | None  # the whole evaluation data, for the final evaluation
    total_steps: int
    epochs: int
    start: tuple[int, int]  # (epoch, windows of it already consumed)
    checkpointer: "Checkpointer"
    best: "Best"


class Best:
    """The best evaluation so far by `best_metric` (loss: lower is better, the rest higher: METRIC_DIRECTIONS),
    the checkpoint holding its weights, and the evaluations since it (early stopping). Its state goes into every
    checkpoint, so a resumed run keeps the same best and patience count.

    A value that is not finite (a NaN or infinite loss) is never the best: it counts as an evaluation without
    improvement. The checkpoint is recorded by its folder name, not its path, so a run folder that was moved
    or renamed still resumes and finishes (`load` resolves the name in the current checkpoints folder)."""

    def __init__(self, metric: str | None, patience: int | None = None, threshold: float = 0.0):
        from finetune.evaluate.metrics import METRIC_DIRECTIONS

        self.metric, self.patience, self.threshold = metric, patience, threshold
        self.lower = metric is not None and METRIC_DIRECTIONS[metric] == "min"
        self.value: float | None = None
        self.step: int | None = None
        self.path: str | None = None
        self.since = 0  # evaluations since the best

    def update(self, result: dict, step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.metric is None:
            return False
        value = float(result[self.metric])
        if not math.isfinite(value):
            warnings.warn(f"step {step}: evaluation {self.metric} is {value}: never the best model; it counts as an "
                          "evaluation without improvement", stacklevel=3)
        margin = self.threshold
        better = math.isfinite(value) and (
            self.value is None or (value < self.value - margin if self.lower else value > self.value + margin))
        if better:
            self.value, self.step, self.since = value, step, 0
        else:
            self.since += 1
        return better

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "path": self.path,
                "checkpoint": os.path.basename(os.path.normpath(self.path)) if self.path else None,
                "since": self.since}

    def load(self, state: dict | None, directory: str, resumed_from: str = "") -> None:
        """Restore from a checkpoint's state; the best checkpoint is looked up by name in `directory` (the run's
        checkpoints folder now, wherever the run folder was when it was written), and must be there."""
        if not state:
            return
        self.since, value = state["since"], state["value"]
        if value is None or not math.isfinite(float(value)):
            return  # no best yet (a non-finite one, written before they were refused, is none)
        self.value, self.step = float(value), state["step"]
        name = state.get("checkpoint") or (os.path.basename(os.path.normpath(state["path"])) if state["path"] else None)
        self.path = os.path.join(directory, name) if name else None
        if self.path and not os.path.isdir(self.path):
            raise CheckpointError(f"cannot resume from {resumed_from}: the best evaluation's checkpoint {self.path} "
                                  f"({self.metric} {self.value:.4g} at step {self.step}) is gone, and model/ would "
                                  "need its weights; put that folder back, or start a fresh run")


class Checkpointer:
    def __init__(self, engine, optimizer, scheduler, data_hash: str, log, best: Best | None = None,
                 eval_hash: str | None = None):
        """`data_hash` / `eval_hash`: fingerprints of the training and evaluation data (checked on resume)."""
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.directory = os.path.join(engine.config.output_dir, "checkpoints")
        self.data_hash, self.eval_hash = data_hash, eval_hash
        self.log = log
        self.best = best or Best(None)
        self.last: str | None = None
        self.last_step: int | None = None

    def save(self, epoch: int, window: int) -> str | None:
        """A checkpoint of the state after the current step; (epoch, window) is where a resume picks up."""
        engine, dist = self.engine, self.engine.dist
        rng = distributed.gather_objects(rng_state(), dist)  # every rank's generators
        stream = distributed.gather_objects(engine.stream_position, dist)  # a stream: every rank's position
        # FSDP: gather the full model and optimizer state to rank 0 (collectives: every rank takes part)
        model_state = distributed.full_state_dict(engine.model) if engine.sharded else None
        optimizer_state = distributed.full_optimizer_state(engine.model, self.optimizer) if engine.sharded else None
        path = None
        if dist.is_main:
            progress = {"step": engine.global_step, "epoch": epoch, "window": window,
                        "data_fingerprint": self.data_hash, "eval_fingerprint": self.eval_hash, "fingerprints": 2,
                        "best": self.best.state(),
                        "nonfinite_in_a_row": engine.nonfinite_in_a_row, "world_size": dist.world_size}
            if stream[0] is not None:
                progress["stream"] = stream
            path = save_checkpoint(self.directory, engine.model, self.optimizer, self.scheduler,
                                   engine.precision.scaler, progress, engine.config.to_dict(), engine.config.keep_last,
                                   rng_states=rng, model_state=model_state, optimizer_state=optimizer_state,
                                   protect=[self.best.path])
            self.last = path
        self.last_step = engine.global_step
        distributed.barrier(dist)
        return path

    def periodic(self, epoch: int, window: int, final: bool = False) -> None:
        """At `save_every` steps (and, with `final`, at the end when the last step was not one of them)."""
        every, step = self.engine.config.save_every, self.engine.global_step
        if not every or (step % every if not final else step % every == 0):
            return
        if self.engine.nonfinite_in_a_row:
            self.log(f"step {step}: no checkpoint while steps are non-finite (last good: {self.last})")
            return
        self.save(epoch, window)


class StopOnSignal:
    """While active, SIGTERM and SIGINT only record the signal; `requested()` says which (the same on every rank)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dist):
        self.dist = dist
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self) -> int | None:
        if not self.dist.enabled:
            return self.signum
        return distributed.broadcast_object(self.signum, self.dist)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


class StepLog:
    """Every `log_every` steps: one record (loss and token accuracy over the steps since the last one, samples/s)
    to the run's recorder (metrics.jsonl and the trackers), the history and the progress bar."""

    def __init__(self, engine, total_steps: int):
        from tqdm.auto import tqdm

        self.engine, self.total, self.stats, self.started = engine, total_steps, [], time.perf_counter()
        self.said_state = False
        enabled = engine.config.progress and engine.dist.is_main
        self.bar = tqdm(total=total_steps, initial=engine.global_step, disable=not enabled, desc="train",
                        dynamic_ncols=True)

    def step(self, stats: dict, epoch: int, history: dict) -> None:
        self.stats.append(stats)
        self.bar.update(1)
        step = self.engine.global_step
        if step % self.engine.config.log_every and step != self.total:
            return
        seconds, tokens = time.perf_counter() - self.started, sum(s["tokens"] for s in self.stats)
        samples = sum(s["samples"] for s in self.stats)
        record = {"split": "train", "step": step, "epoch": epoch,
                  "loss": sum(s["loss"] * s["tokens"] for s in self.stats) / tokens,
                  "token_accuracy": sum(s["token_accuracy"] * s["tokens"] for s in self.stats) / tokens,
                  "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                  "skipped_steps": sum(s["skipped"] for s in self.stats),
                  "samples": samples, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                  "samples_per_s_per_rank": samples / seconds / self.engine.dist.world_size,
                  "padding_fraction": self.engine.padding}
        if not self.said_state:  # the optimizer's state exists from its first step on
            state = optimizer_state_bytes(self.engine.optimizer)
            trainable = sum(p.numel() for g in self.engine.optimizer.param_groups for p in g["params"])
            record["optimizer_state_bytes"], self.said_state = state, True
            self.engine.recorder.log(f"optimizer state: {state / 2**20:.1f} MiB, {state / max(1, trainable):.2f} "
                                     "bytes per trainable parameter")
        history["train"].append(record)
        self.engine.recorder.record(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             samples_s=f"{record['samples_per_s']:.1f}")
        self.stats, self.started = [], time.perf_counter()

    def close(self) -> None:
        self.bar.close()


# --------------------------------------------------------------------------------------------------------------
# What `Engine.fit` does at an evaluation and at the end (its loop stays on one screen)


def evaluate_during_fit(engine, run: TrainingRun, history: dict, position, on_evaluate=None) -> bool:
    """Every rank evaluates its share of the batches (greedy by default, on the evaluation subset; under FSDP
    every rank runs them all, rank 0 only keeping the figures); every rank then updates the best-so-far alike, and the best evaluation's weights are kept as a checkpoint pruning never
    deletes. An evaluation that fails first saves the training, then stops the run saying where it is.
    Returns True when early stopping ends the run."""
    cfg, saver, result = engine.config, run.checkpointer, None
    if engine.dist.is_main or (engine.dist.enabled and not engine.sharded):
        try:
            result = engine.evaluate(run.eval_set, num_beams=cfg.eval_num_beams)
        except Exception as err:
            saved = [saver.save(*position)] if not engine.dist.enabled else []
            saved += [engine.save_outputs()] if cfg.save_model and engine.dist.is_main else []
            raise TrainingStopped(f"evaluation at step {engine.global_step} failed ({type(err).__name__}: {err}); "
                                  f"the training up to here is saved: {', '.join(filter(None, saved)) or 'nothing'}"
                                  ) from err
    result = distributed.broadcast_object(result, engine.dist) if engine.dist.enabled else result
    history["eval"].append(result)
    engine.model.train()
    if on_evaluate is not None:
        on_evaluate(engine, result)
    best = run.best
    if best.update(result, engine.global_step):
        best.path = os.path.join(saver.directory, f"step-{engine.global_step:08d}")
        saver.save(*position)
        engine.recorder.log(f"step {engine.global_step}: best {best.metric} so far, {best.value:.4g}; weights kept in "
                  f"{best.path}")
    if not best.stop:
        return False
    so_far = f"best {best.value:.4g} at step {best.step}" if best.path else "no finite value yet"
    reason = (f"early stopping at step {engine.global_step}: {best.metric} has not improved by more than "
              f"{best.threshold:g} in {best.since} evaluations ({so_far})")
    engine.recorder.log(reason)
    engine.recorder.event("early_stopping", engine.global_step, reason=reason)
    history["stopped_early"] = reason
    return True

def finish(engine, run: TrainingRun, history: dict, position, on_evaluate=None) -> None:
    """model/ (the best evaluation's weights when best_metric is set; the last checkpoint keeps the last
    ones), then the final evaluation on all the evaluation data with the configured beams."""
    cfg, saver, best = engine.config, run.checkpointer, run.best
    if best.path:
        if saver.last_step != engine.global_step:
            saver.save(*position)  # the last weights, before model/ takes the best ones
        load_model_tensors(best.path, engine.model)
        engine.recorder.log(f"model/ holds the best evaluation's weights (step {best.step}, {best.metric} "
                  f"{best.value:.4g}); the last weights (step {engine.global_step}) are in {saver.last}")
        engine.recorder.event("best_model", best.step, path=best.path, last_checkpoint=saver.last,
                              **{best.metric: best.value})
        history["best"] = best.state()
    if cfg.save_model:
        # under FSDP the shards are gathered first: a collective, so every rank takes part
        state = distributed.full_state_dict(engine.model) if engine.sharded else None
        if engine.dist.is_main:
            engine.recorder.log(f"model saved to {engine.save_outputs(state)}")
    last_eval = history["eval"][-1] if history["eval"] else None
    repeat = last_eval is not None and last_eval["step"] == engine.global_step and not best.path and \
        run.eval_set is run.eval_full and cfg.eval_num_beams == cfg.num_beams
    everyone = engine.dist.enabled and not engine.sharded  # DDP: the ranks share the batches
    if run.eval_full is not None and (engine.dist.is_main or everyone) and not repeat:
        final = engine.evaluate(run.eval_full, predictions_file="eval_predictions.jsonl", final=True)
        history["final_eval"] = final
        if on_evaluate is not None:
            on_evaluate(engine, final)
    distributed.barrier(engine.dist)


def subset(data: Tokenized | None, size: int | None, seed: int) -> Tokenized | None:
    """A fixed, seeded subset of `size` examples (in their original order), or the data itself."""
    if data is None or size is None or size >= len(data[0]):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data[0])), size))
    return Tokenized([data[0][i] for i in keep], [data[1][i] for i in keep])
