"""`Checkpointer` writes the training state (finetune.train.checkpoint) at `save_every` steps, at the end, and when
a signal or a failed evaluation stops the run. While steps are being skipped as non-finite it writes none, so
pruning (`keep_last`) can never delete the last checkpoint written before a run started to diverge; `last` names
the newest one written. Under torchrun every rank takes part in a save (RNG states, FSDP shards are gathered) and
rank 0 writes."""
from __future__ import annotations

import os

from finetune import distributed
from finetune.train.best import Best
from finetune.train.checkpoint import rng_state, save_checkpoint


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
