"""What a run is made of once prepared (`TrainingRun`), and what `Engine.fit` does at an evaluation and at the
end (its loop stays on one screen): evaluate, keep the best, stop early; write model/, evaluate on all the data."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

from finetune import distributed
from finetune.data.stream import Stream
from finetune.data.training import Corpus
from finetune.train.best import Best
from finetune.train.checkpoint import load_model_tensors
from finetune.train.checkpointer import Checkpointer
from finetune.train.guards import TrainingStopped


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


def subset(data: Tokenized | None, size: int | None, seed: int) -> Tokenized | None:
    """A fixed, seeded subset of `size` examples (in their original order), or the data itself."""
    if data is None or size is None or size >= len(data[0]):
        return data
    keep = sorted(random.Random(seed).sample(range(len(data[0])), size))
    return Tokenized([data[0][i] for i in keep], [data[1][i] for i in keep])


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
