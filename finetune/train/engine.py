"""Engine: fit / evaluate / generate / overfit_batch, and the one training step they share.

The training step is `Engine.train_step`, read top to bottom:

    count the target tokens of the whole accumulation window
    for each micro-batch: forward + loss (finetune.train.loss.TrainingLoss) / window tokens -> backward
    (first step) check that every trainable tensor got a gradient
    unscale -> clip -> optimizer step, skipped on a non-finite loss (finetune.train.precision) -> schedule -> zero grads

`Engine.prepare` does everything before the first step (read and tokenise the data, build the optimizer and
schedule, resume); `fit` is prepare + the loop over windows + logging, checkpoints (finetune.train.run) and
the saved model. A custom loop, a benchmark or a test calls `prepare` and then `train_step` on windows it
makes (`windows`), exactly as `fit` does.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import warnings

import numpy as np
import torch
from torch import nn

from finetune import distributed
from finetune.data import corpus, feed
from finetune.data.batching import describe_batches
from finetune.data.collate import IGNORE_INDEX, Collator, PackedCollator, pairs_in
from finetune.data.noise import NoiseConfig
from finetune.data.training import open_training_data
from finetune.evaluate import evaluation
from finetune.methods.freeze import trainable_report
from finetune.models import (MAX_KEYS, check_length, enable_activation_checkpointing, enable_packing,
                             freeze_unused_pooler, resolve_special_tokens, use_float32_attention)
from finetune.store.export import save_model_folder, save_outputs
from finetune.store.outputs import RunLock, claim_for_fresh_run
from finetune.train.best import Best
from finetune.train.checkpoint import find_checkpoint, load_checkpoint
from finetune.train.checkpointer import Checkpointer
from finetune.train.config import TrainConfig
from finetune.train.guards import (TrainingStopped, check_device, check_engine_arguments, check_evaluation_settings,
                                   check_gradients, check_overfit_arguments, count_nonfinite)
from finetune.train.loss import TrainingLoss
from finetune.train.optim import (Recipe, build_optimizer, build_scheduler, describe_groups, param_groups,
                                  training_recipe)
from finetune.train.precision import Precision
from finetune.train.recorder import Recorder
from finetune.train.run import Tokenized, TrainingRun, evaluate_during_fit, finish, subset
from finetune.train.signals import StopOnSignal
from finetune.train.steplog import StepLog


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Engine:
    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig | None = None,
                 noise: NoiseConfig | None = None):
        check_engine_arguments(model, tokenizer, config, noise)
        self.config = cfg = config or TrainConfig()
        cfg.validate()  # fields may have been changed after the config was made
        self.noise = noise  # BART-style corruption of training sources, fresh each epoch
        self.tokenizer = tokenizer
        self.device = check_device(cfg.device)
        self.dist = distributed.init_from_env(self.device.type == "cuda", cfg.dist_timeout_s)  # torchrun
        self.recorder = Recorder(cfg.output_dir, self.dist.is_main, cfg.progress)  # prepare() opens the trackers
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.precision = Precision(cfg.precision, self.device, model)
        for name in ("max_source_length", "max_target_length", "max_new_tokens"):
            check_length(model, name, getattr(cfg, name), f"TrainConfig.{name}")
        self.tokens = resolve_special_tokens(model, tokenizer)
        freeze_unused_pooler(model, self.recorder.log)
        self.model = model.to(self.device)
        self.precision.apply_to(self.model)  # layers with a compute dtype of their own compute in the precision's
        self._choose_attention()  # float32 attention under CPU bf16 (finetune/models/attention.py)
        if cfg.pack:
            enable_packing(self.model)
            self.recorder.log("pack: each micro-batch trains as one padding-free row (TrainConfig.pack)")
        self.train_model, self.sharded = self.model, False  # under torchrun: the DDP wrapper / FSDP-sharded model
        self.collate = Collator(self.tokens.pad, self.tokens.decoder_start)  # evaluation, checks; training unless pack
        self.packed_collate = PackedCollator(self.tokens.pad, self.tokens.decoder_start) if cfg.pack else None
        self.loss = TrainingLoss(self.model, self.precision, cfg.fused_loss)
        self.optimizer = self.scheduler = None
        # steps taken; non-finite steps skipped in a row; padding share of the epoch's batches (finetune.data.batching)
        self.global_step, self.nonfinite_in_a_row, self.padding = 0, 0, None
        self.stream_position = None  # a streamed run: where a resume after the last window picks up
        self._checked_gradients = False

    @property
    def train_collate(self):
        """The collator of training micro-batches: packed rows under TrainConfig.pack, else `collate`."""
        return self.packed_collate or self.collate

    def _choose_attention(self) -> None:
        why = self.precision.float32_attention(self.config.attention_fp32)
        if why is None:
            return
        if use_float32_attention(self.model):
            self.recorder.log(f"attention: sequences of up to {MAX_KEYS} keys attend in float32 under bf16 autocast "
                              f"({why}; TrainConfig.attention_fp32)")
        elif self.config.attention_fp32:
            found = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            warnings.warn(f"TrainConfig.attention_fp32=True: this model's attention ({found!r}) is not transformers' "
                          "'sdpa' attention; it is left as it is", stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # before the first step

    def prepare(self, train, eval=None, resume: str | None = None) -> TrainingRun:
        """Read and tokenise the data, wrap the model for torchrun, build the optimizer and schedule, resume.

        Everything here fails before a step runs: a bad data file (training or evaluation), a missing or
        corrupt checkpoint, patterns that match nothing, a model with nothing to train.
        """
        cfg, world = self.config, self.dist.world_size
        set_seed(cfg.seed)
        resume_path = find_checkpoint(os.path.join(cfg.output_dir, "checkpoints"), resume) if resume else None
        data = open_training_data(train, self.tokenizer, cfg, self.tokens.decoder_start, self.dist)
        self.recorder.log(f"train: {data.description}")
        eval_full = self._tokenized(eval, "eval") if eval is not None else None
        eval_set = subset(eval_full, cfg.eval_max_samples, cfg.seed)
        steps_per_epoch, total_steps, epochs = data.schedule()
        check_evaluation_settings(cfg, eval is not None, total_steps, sharded=cfg.fsdp and self.dist.enabled)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
        if cfg.grad_checkpointing:
            self.enable_checkpointing()
        self.model.train()
        self.recorder.log(str(trainable_report(self.model)))
        if self.train_model is self.model and not self.sharded:  # not wrapped by an earlier prepare
            self.train_model, self.sharded = distributed.wrap(self.model, self.dist, cfg.fsdp, self.device)
        self.loss = TrainingLoss(self.model, self.precision, cfg.fused_loss, self.sharded)
        self.build_optimizer(total_steps, warmup)
        self.recorder.log(f"{total_steps} optimizer steps ({epochs} epoch(s) of {steps_per_epoch}), warm-up {warmup}, "
                          f"batch {describe_batches(cfg)} x "
                          f"accumulation {cfg.grad_accum} x {world} process(es), "
                          f"{self.precision}, {self.loss.reason}, device {self.device}")
        data_hash, eval_hash = data.fingerprint, eval_full[1].fingerprint if eval_full is not None else None
        best = Best(cfg.best_metric, cfg.early_stopping_patience, cfg.early_stopping_threshold)
        checkpointer = Checkpointer(self, self.optimizer, self.scheduler, data_hash, self.recorder.log, best, eval_hash)
        self.global_step, self.nonfinite_in_a_row, start = 0, 0, (0, 0)
        if resume_path:
            state = load_checkpoint(resume_path, self.model, self.optimizer, self.scheduler, self.precision.scaler,
                                    cfg.to_dict(), data_hash, rank=self.dist.rank, world_size=world,
                                    fsdp=self.sharded, eval_hash=eval_hash)
            self.global_step, start = state["step"], (state["epoch"], state["window"])
            self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
            data.resume(state, self.dist.rank)
            self._checked_gradients = True
            best.load(state.get("best"), checkpointer.directory, resume_path)
            checkpointer.last, checkpointer.last_step = resume_path, self.global_step
            if self.dist.is_main:
                print(f"resumed from {resume_path} at step {self.global_step}", flush=True)
        self.recorder.close()  # the trackers of an earlier run, if any
        self.recorder = Recorder(cfg.output_dir, self.dist.is_main, cfg.progress, cfg.report_to, cfg.to_dict())
        return TrainingRun(data, eval_set, eval_full, total_steps, epochs, start, checkpointer, best)

    def build_optimizer(self, total_steps: int, warmup_steps: int, lr: float | None = None,
                        schedule: str | None = None, weight_decay: float | None = None):
        """The optimizer (TrainConfig.optimizer, else the family's: finetune.train.optim) over the trainable tensors, in
        decay / no-decay and learning-rate groups, and its schedule."""
        cfg = self.config
        recipe = self.recipe()  # unset optimizer / lr / schedule: the family's recipe, and the log says so
        lr = recipe.lr if lr is None else lr
        groups = param_groups(self.model, cfg.weight_decay if weight_decay is None else weight_decay, cfg.no_decay,
                              cfg.lr_overrides, lr)
        self.recorder.log(f"optimizer {recipe.describe()}; {describe_groups(groups, lr)}")
        self.optimizer = build_optimizer(recipe.optimizer, self.model, groups, lr, cfg.betas, cfg.eps)
        self.scheduler = build_scheduler(self.optimizer, total_steps, warmup_steps, schedule or recipe.schedule)
        return self.optimizer, self.scheduler

    def recipe(self) -> Recipe:
        """The optimizer, peak learning rate and schedule this run trains with (TrainConfig's, else the family's
        recipe: finetune.train.optim.training_recipe)."""
        cfg = self.config
        return training_recipe(self.model, cfg.optimizer, cfg.lr, cfg.schedule)

    def compile(self, **options) -> None:
        """`torch.compile` the module `train_step` runs (under torchrun, after `prepare`: the DDP / FSDP wrapper);
        evaluation, generation and saving keep the plain model."""
        if self.dist.enabled and self.train_model is self.model and not self.sharded:
            raise RuntimeError("Engine.compile: under torchrun, call it after prepare(), which wraps the model for "
                               "DDP / FSDP (a compiled unwrapped model would not synchronise gradients)")
        if self.config.pack:
            raise ValueError("Engine.compile: TrainConfig.pack makes every micro-batch a row of another length and "
                             "attention a loop over its pairs, which torch.compile would recompile each step; "
                             "use pack=False to compile")
        self.train_model = torch.compile(self.train_model, **options)

    def enable_checkpointing(self):
        """Non-reentrant activation checkpointing (finetune.models.enable_activation_checkpointing)."""
        enable_activation_checkpointing(self.model)

    def windows(self, run: TrainingRun, epoch: int):
        """(index, window) of one epoch: `grad_accum` collated micro-batches each (this rank's share of every
        global batch), from where a resume picks up, until the run's last step (finetune.data.feed: collated off
        the training thread). Sets `padding` and, for a stream, `stream_position` (where a resume after the
        window just yielded picks up)."""
        steps = run.total_steps - self.global_step  # counted when the epoch starts, before the producer runs ahead
        noised = feed.noiser(self.noise, self.tokenizer, self.config.seed)
        for index, window, state in feed.windows(run.data, epoch, run.start, steps, self.train_collate, noised,
                                                 self.recorder.log, self.config.prefetch):
            self.padding, self.stream_position = state["padding"], state["position"]
            yield index, window

    # ------------------------------------------------------------------------------------------
    # the training step

    def train_step(self, window: list[dict]) -> dict:
        """One optimizer step over a window of `grad_accum` micro-batches (after `prepare` or `build_optimizer`)."""
        cfg, model, world = self.config, self.train_model, self.dist.world_size
        local = [sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window), sum(pairs_in(b) for b in window)]
        # over every rank (under max_tokens the ranks' batches hold different numbers of pairs)
        window_tokens, window_samples = (int(v) for v in distributed.all_sum(local, self.dist, self.device))
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for i, batch in enumerate(window):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with distributed.accumulation_sync(model, self.dist, self.sharded, last=i == len(window) - 1):
                batch_loss, batch_correct = self.loss(model, batch, cfg.label_smoothing)
                # normalised over the whole window on every rank: k x b == k*b, and N ranks x b == N*b
                # (DDP averages gradients over ranks, hence the factor `world`)
                self.precision.backward(batch_loss * world / window_tokens)
            loss_sum += batch_loss.detach()
            correct += batch_correct
        loss_total, correct_total = distributed.all_sum([float(loss_sum), float(correct)], self.dist, self.device)
        loss_value = loss_total / window_tokens

        if not self._checked_gradients:  # after the first backward
            check_gradients(self.model)
            self._checked_gradients = True
        self.precision.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        skipped, diverging = self.precision.step(self.optimizer, loss_value, grad_norm)
        self.nonfinite_in_a_row = count_nonfinite(self.nonfinite_in_a_row, diverging, loss_value, self.global_step,
                                                  self.config.max_nonfinite_steps)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"step": self.global_step, "loss": loss_value, "token_accuracy": correct_total / window_tokens,
                "lr": lr, "grad_norm": grad_norm, "skipped": skipped, "tokens": window_tokens,
                "samples": window_samples}

    # ------------------------------------------------------------------------------------------
    # fit: prepare, then the loop

    def fit(self, train, eval=None, resume: str | bool | None = None, on_step=None, on_evaluate=None) -> dict:
        """Train on `train` (a .jsonl/.json/.tsv/.csv/.parquet file, a folder of them, "hf:PATH", a datasets.Dataset
        or IterableDataset, or a list of (source, target): finetune.data.corpus, finetune.data.stream); evaluate on
        `eval`.

        `resume="latest"` (or True, or a checkpoint folder) continues exactly where a run stopped. SIGTERM /
        SIGINT finish the current step, write a checkpoint and exit with status 128 + signal number.
        `on_step(engine, stats)` is called after every step, `on_evaluate(engine, result)` after every
        evaluation (hooks; `report_to` names the trackers the run records to itself). The output folder is locked
        for this process and, for a fresh run, must not hold another run's outputs (`overwrite_output_dir`).
        """
        resume = {True: "latest", False: None}.get(resume, resume) if isinstance(resume, bool) else resume
        if resume is not None and not isinstance(resume, (str, os.PathLike)):
            raise TypeError(f"fit: resume must be 'latest', a checkpoint folder or None, got {type(resume).__name__}")
        with RunLock(self.config.output_dir) if self.dist.is_main else contextlib.nullcontext():
            if resume is None and self.dist.is_main:
                removed = claim_for_fresh_run(self.config.output_dir, self.config.overwrite_output_dir)
                if removed:
                    self.recorder.log(f"overwrite_output_dir: removed the earlier run's {', '.join(removed)}")
            run = self.prepare(train, eval, os.fspath(resume) if resume else None)
            try:
                return self._loop(run, on_step, on_evaluate)
            finally:
                self.recorder.close()  # the trackers' runs end with this one, however it ends

    def _loop(self, run: TrainingRun, on_step, on_evaluate) -> dict:
        cfg, history, saver = self.config, {"train": [], "eval": []}, run.checkpointer
        log = StepLog(self, run.total_steps)
        position, stop = run.start, False  # (epoch, windows of it consumed): where a resume would pick up
        with StopOnSignal(self.dist) as signals, contextlib.ExitStack() as feeds:  # feeds: their threads stop with us
            for epoch in range(run.start[0], run.epochs):
                for index, window in feeds.enter_context(contextlib.closing(self.windows(run, epoch))):
                    try:
                        stats = self.train_step(window)
                    except TrainingStopped as err:
                        log.close()
                        raise TrainingStopped(f"{err} Last checkpoint written before that: "
                                              f"{saver.last or 'none (set save_every to keep some)'}") from None
                    position = (epoch, index + 1)
                    log.step(stats, epoch, history)
                    if on_step is not None:
                        on_step(self, stats)
                    signum = signals.requested()
                    if signum is not None:
                        path = saver.save(*position)
                        log.close()
                        if self.dist.is_main:
                            print(f"\nstopped by signal {signum} after step {self.global_step}; checkpoint: {path}\n"
                                  "resume with engine.fit(..., resume='latest')", flush=True)
                        raise SystemExit(128 + signum)
                    if run.eval_set is not None and cfg.eval_every and self.global_step % cfg.eval_every == 0:
                        with log.paused():  # samples/s counts training only
                            stop = evaluate_during_fit(self, run, history, position, on_evaluate)
                    saver.periodic(*position)  # after the evaluation: the checkpoint holds its bookkeeping
                    if stop:
                        break
                if run.eval_set is not None and not cfg.eval_every and not stop:
                    with log.paused():
                        stop = evaluate_during_fit(self, run, history, position, on_evaluate)
                if stop:
                    break
        log.close()
        saver.periodic(*position, final=True)
        finish(self, run, history, position, on_evaluate)
        return history

    def save_outputs(self, state: dict | None = None) -> str:
        """OUTPUT_DIR/model (a plain transformers checkpoint) and what the method's layers write beside it
        (finetune.store.export.save_outputs). `state`: a full state dict gathered from FSDP shards."""
        return save_outputs(self.model, self.tokenizer, self.config.output_dir, state, self.recorder.log,
                            extras=not self.sharded, merged=self.config.save_merged)

    # ------------------------------------------------------------------------------------------
    # evaluation and generation

    def evaluate(self, data, num_beams: int | None = None, max_new_tokens: int | None = None,
                 predictions_file: str | None = "eval_predictions.jsonl", final: bool = False) -> dict:
        """Teacher-forced loss, then generation metrics: exact match, accuracy by edit distance, ROUGE-1/2/L, BLEU
        and chrF (finetune.evaluate.evaluation). Predictions are written next to metrics.jsonl in the output folder."""
        data = data if isinstance(data, Tokenized) else self._tokenized(data, "eval")
        return evaluation.evaluate(self, data, num_beams, max_new_tokens, predictions_file, final)

    def generate(self, texts: list[str], num_beams: int | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Generate one output per input text (greedy when num_beams=1, beam search otherwise)."""
        return evaluation.generate(self, texts, num_beams, max_new_tokens)

    def check(self, train, new_parameters=(), steps: int = 200, eval=None):
        """The recipe's preflight on this model and data, as a table of PASS / WARN / FAIL (finetune.train.preflight):
        the evaluation data and settings, special tokens, one batch decoded, truncation, parameter groups,
        gradients, overfitting one batch, and different outputs for different inputs. Runs the training checks
        on a copy of the model."""
        from finetune.train.preflight import check

        return check(self, train, new_parameters, steps, eval)

    def overfit_batch(self, pairs, steps: int = 200, lr: float | None = None) -> list[dict]:
        """Train repeatedly on one batch (all of `pairs`), constant learning rate, no weight decay.

        The check to run before a long job: loss should approach zero and token accuracy reach 100% within a
        few hundred steps. It changes the model's weights. Returns the per-step loss and token accuracy.
        """
        check_overfit_arguments(steps, lr)
        _, examples = self._tokenized(pairs, "overfit batch")
        window = [self.train_collate(examples)]
        self.model.train()
        self.build_optimizer(steps, 0, lr=lr, schedule="constant", weight_decay=0.0)
        history = []
        for step in range(steps):
            stats = self.train_step(window)
            history.append({"step": step, "loss": stats["loss"], "token_accuracy": stats["token_accuracy"]})
        return history

    # ------------------------------------------------------------------------------------------
    # files and data

    def save(self, path: str, state_dict: dict | None = None) -> str:
        """The model as a plain transformers checkpoint (every wrapped layer in its plain form) plus the tokenizer,
        into `path`, swapped in atomically: at every instant `path` holds a complete model (finetune.store.export)."""
        return save_model_folder(self.model, self.tokenizer, path, state_dict, self.recorder.log)

    def _tokenized(self, data, name: str) -> Tokenized:
        """Read and tokenise once (finetune.data.corpus: in worker processes and cached on disk, for files)."""
        what = {"train": "training data", "eval": "evaluation data"}.get(name, name)
        pairs, examples = corpus.load(data, self.tokenizer, self.config, self.tokens.decoder_start, what, self.dist)
        self.recorder.log(f"{name}: {examples.report} ({examples.origin})")
        return Tokenized(pairs, examples)
