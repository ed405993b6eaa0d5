"""`StepLog`: every `log_every` steps one record (loss and token accuracy over the steps since the last record,
learning rate, gradient norm, samples/s) to the run's recorder (finetune.train.recorder), the returned history and
the progress bar. Evaluations during training are left out of the samples/s (`paused`)."""
from __future__ import annotations

import contextlib
import time

from finetune.train.optim import optimizer_state_bytes


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

    @contextlib.contextmanager
    def paused(self):
        """Time spent in the block (an evaluation) is left out of the current window's samples/s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def close(self) -> None:
        self.bar.close()
