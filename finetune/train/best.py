"""The best evaluation so far, its checkpoint, and early stopping's patience."""
from __future__ import annotations

import math
import os
import warnings

from finetune.train.checkpoint import CheckpointError


class Best:
    """The best evaluation so far by `best_metric` (loss: lower is better, the rest higher: METRIC_DIRECTIONS),
    the checkpoint holding its weights, and the evaluations since it (early stopping). Its state goes into every
    checkpoint, so a resumed run keeps the same best and patience count.

    A value that is not finite (a NaN or infinite loss) is never the best: it counts as an evaluation without
    improvement. A collapsed evaluation (one prediction for nearly every input: finetune.evaluate.metrics) never
    replaces a healthy best, and a healthy one always replaces a collapsed best. The checkpoint is recorded by its
    folder name, not its path, so a run folder that was moved
    or renamed still resumes and finishes (`load` resolves the name in the current checkpoints folder)."""

    def __init__(self, metric: str | None, patience: int | None = None, threshold: float = 0.0):
        from finetune.evaluate.metrics import METRIC_DIRECTIONS

        self.metric, self.patience, self.threshold = metric, patience, threshold
        self.lower = metric is not None and METRIC_DIRECTIONS[metric] == "min"
        self.value: float | None = None
        self.step: int | None = None
        self.path: str | None = None
        self.since = 0  # evaluations since the best
        self.collapsed = False  # the best so far was a collapsed evaluation

    def update(self, result: dict, step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        if self.metric is None:
            return False
        value = float(result[self.metric])
        if not math.isfinite(value):
            warnings.warn(f"step {step}: evaluation {self.metric} is {value}: never the best model; it counts as an "
                          "evaluation without improvement", stacklevel=3)
        margin, collapsed = self.threshold, bool(result.get("collapsed"))
        if self.value is not None and collapsed != self.collapsed:
            better = math.isfinite(value) and self.collapsed  # health first: then the metric
        else:
            better = math.isfinite(value) and (
                self.value is None or (value < self.value - margin if self.lower else value > self.value + margin))
        if better:
            self.value, self.step, self.since, self.collapsed = value, step, 0, collapsed
        else:
            self.since += 1
        return better

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.since >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step, "path": self.path,
                "checkpoint": os.path.basename(os.path.normpath(self.path)) if self.path else None,
                "since": self.since, "collapsed": self.collapsed}

    def load(self, state: dict | None, directory: str, resumed_from: str = "") -> None:
        """Restore from a checkpoint's state; the best checkpoint is looked up by name in `directory` (the run's
        checkpoints folder now, wherever the run folder was when it was written), and must be there."""
        if not state:
            return
        self.since, value = state["since"], state["value"]
        if value is None or not math.isfinite(float(value)):
            return  # no best yet (a non-finite one, written before they were refused, is none)
        self.value, self.step, self.collapsed = float(value), state["step"], bool(state.get("collapsed", False))
        name = state.get("checkpoint") or (os.path.basename(os.path.normpath(state["path"])) if state["path"] else None)
        self.path = os.path.join(directory, name) if name else None
        if self.path and not os.path.isdir(self.path):
            raise CheckpointError(f"cannot resume from {resumed_from}: the best evaluation's checkpoint {self.path} "
                                  f"({self.metric} {self.value:.4g} at step {self.step}) is gone, and model/ would "
                                  "need its weights; put that folder back, or start a fresh run")
