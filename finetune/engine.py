"""Engine: fit / evaluate / generate / overfit_batch.

The training step is `Engine._step`, read top to bottom:

    count the target tokens of the whole accumulation window
    for each micro-batch: autocast forward -> summed token loss / window tokens -> backward
      (`_forward_loss`: output layer + cross-entropy fused block by block, see finetune/loss.py)
    (first step) check that every trainable tensor got a gradient
    unscale (fp16) -> clip -> optimizer step (skipped on a non-finite loss) -> schedule -> zero grads

Everything else here prepares data for it or reports what it did.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings

import numpy as np
import torch
from torch import nn

from . import distributed
from .checkpoint import data_fingerprint, find_checkpoint, load_checkpoint, rng_state, save_checkpoint
from .config import TrainConfig
from .data import Collator, Example, LengthGroupedBatches, read_pairs, tokenize_pairs
from .export import save_plain
from .freeze import trainable_report
from .lora import lora_layers, save_adapter
from .loss import capture_hidden, fusable_head, fused_head_loss, token_loss
from .masks import IGNORE_INDEX
from .metrics import GenerationMetrics
from .models import is_t5_family, resolve_special_tokens
from .noise import NoiseConfig, add_noise
from .optim import build_adamw, build_scheduler, describe_groups, param_groups
from .outputs import OutputDirError, RunLock, claim_for_fresh_run, replace_dir


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# What the model gets. The batch also holds `decoder_attention_mask`, but the decoder does not need it: with
# right padding, the causal mask already keeps every real position from seeing the pads after it, and the
# pads' own outputs are ignored by the loss (-100). Passing it only costs time (attention can no longer
# take its causal fast path); tests/test_engine.py checks that the logits at every target position agree.
MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")


class TrainingStopped(RuntimeError):
    """Training cannot go on: what is wrong is in the message."""


class Engine:
    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig | None = None,
                 noise: NoiseConfig | None = None):
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"Engine: model must be a transformers seq2seq model (an nn.Module with a .config), got "
                            f"{type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"Engine: tokenizer must be the model's transformers tokenizer, got {type(tokenizer).__name__}")
        if config is not None and not isinstance(config, TrainConfig):
            raise TypeError(f"Engine: config must be a TrainConfig (e.g. TrainConfig(**values)), got "
                            f"{type(config).__name__}")
        if noise is not None and not isinstance(noise, NoiseConfig):
            raise TypeError(f"Engine: noise must be a NoiseConfig or None, got {type(noise).__name__}")
        self.config = config or TrainConfig()
        self.config.validate()  # fields may have been changed after the config was made
        self.noise = noise  # BART-style corruption of training sources, fresh each epoch
        self.tokenizer = tokenizer
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device={self.config.device!r}: no CUDA device is available here (this torch "
                             f"build: {torch.__version__}); use device='cpu' or leave it None")
        self.dist = distributed.init_from_env(self.device.type == "cuda", self.config.dist_timeout_s)  # torchrun
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self._check_precision(model)
        self._check_lengths(model)
        self.tokens = resolve_special_tokens(model, tokenizer)
        _freeze_unused_pooler(model, self._log)
        self.model = model.to(self.device)
        self.train_model = self.model  # the DistributedDataParallel wrapper under torchrun
        self.collate = Collator(self.tokens.pad, self.tokens.decoder_start)
        self.scaler = torch.amp.GradScaler("cuda") if self.config.precision == "fp16" else None
        self.global_step = 0
        self._fsdp = False
        self._checked_gradients = False
        self._fused_ok: bool | None = None  # None: the fused loss is not checked against the logits yet
        self._nonfinite_in_a_row = 0
        self._last_checkpoint: str | None = None

    # ------------------------------------------------------------------------------------------
    # set-up

    def _check_precision(self, model):
        precision, kind = self.config.precision, self.device.type
        if precision == "fp16" and kind != "cuda":
            raise ValueError("precision='fp16' needs a CUDA device (fp16 autocast with a loss scaler); "
                             "on CPU use precision='bf16' or 'fp32'")
        if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16': this GPU does not support bfloat16; use 'fp16' or 'fp32'")
        if precision == "fp16" and is_t5_family(model):
            warnings.warn("precision='fp16' with a T5-family model: T5's activations overflow float16 and the loss "
                          "turns to NaN; precision='bf16' is the safe choice", stacklevel=3)

    def _check_lengths(self, model):
        """Sequences longer than a model's learned position table crash deep inside it: say so up front."""
        for name in ("max_source_length", "max_target_length", "max_new_tokens"):
            _check_length(model, name, getattr(self.config, name), f"TrainConfig.{name}")

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _tokenized(self, data, name: str) -> "_Tokenized":
        cfg = self.config
        pairs = read_pairs(data, cfg.source_field, cfg.target_field)
        examples, report = tokenize_pairs(pairs, self.tokenizer, cfg.max_source_length, cfg.max_target_length,
                                          self.tokens.decoder_start)
        self._log(f"{name}: {report}")
        return _Tokenized(pairs, examples)

    def _noised(self, example: Example, epoch: int, index: int) -> Example:
        """The training source corrupted by `self.noise`, seeded by (seed, epoch, index): resumable."""
        if self.noise is None or not self.noise.active:
            return example
        source = add_noise(example.input_ids, self.noise, self.tokenizer, seed=[self.config.seed, epoch, index])
        return Example(source, example.labels)

    def _to_device(self, batch):
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _enable_checkpointing(self):
        """Non-reentrant activation checkpointing: it works when the inputs of the checkpointed blocks do not
        require grad (frozen embeddings, int8 bases), where the reentrant variant silently drops gradients."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False

    def _build_optimizer(self, total_steps: int, warmup_steps: int, lr: float | None = None,
                         schedule: str | None = None, weight_decay: float | None = None):
        cfg = self.config
        lr = cfg.lr if lr is None else lr
        wd = cfg.weight_decay if weight_decay is None else weight_decay
        groups = param_groups(self.model, wd, cfg.no_decay, cfg.lr_overrides)
        self._log(describe_groups(groups, lr))
        optimizer = build_adamw(self.model, groups, lr, cfg.betas, cfg.eps)
        scheduler = build_scheduler(optimizer, total_steps, warmup_steps, schedule or cfg.schedule)
        return groups, optimizer, scheduler

    def _log(self, message: str):
        if self.config.progress and self.dist.is_main:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------
    # the training step

    def _step(self, window, optimizer, scheduler) -> dict:
        """One optimizer step over a window of `grad_accum` micro-batches."""
        cfg = self.config
        model, world = self.train_model, self.dist.world_size
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window)
        window_tokens = int(distributed.all_sum([local_tokens], self.dist, self.device)[0])  # over every rank
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for i, batch in enumerate(window):
            batch = self._to_device(batch)
            # gradients are reduced across ranks once per window, on its last micro-batch
            last = i == len(window) - 1
            sync = contextlib.nullcontext()
            if self._fsdp:
                model.set_requires_gradient_sync(last)
            elif self.dist.enabled and not last:
                sync = model.no_sync()
            with sync:
                batch_loss, batch_correct = self._forward_loss(model, batch, cfg.label_smoothing)
                # normalised over the whole window on every rank: k x b == k*b, and N ranks x b == N*b
                # (DDP averages gradients over ranks, hence the factor `world`)
                loss = batch_loss * world / window_tokens
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += batch_loss.detach()
            correct += batch_correct
        loss_total, correct_total = distributed.all_sum([float(loss_sum), float(correct)], self.dist, self.device)
        loss_value = loss_total / window_tokens

        if not self._checked_gradients:
            self._check_gradients()
        if self.scaler:
            self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(distributed.full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))

        skipped = False
        if self.scaler:  # fp16: the scaler skips a step with inf/nan gradients and lowers the scale
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
        elif math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm)):
            optimizer.step()
        else:
            skipped = True
            self._nonfinite_in_a_row += 1
            warnings.warn(f"step {self.global_step}: non-finite loss or gradient ({loss_value}); step skipped",
                          stacklevel=2)
            if self._nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise TrainingStopped(f"{self._nonfinite_in_a_row} non-finite steps in a row (last at step "
                                      f"{self.global_step}); stopping. Lower the learning rate or use fp32/bf16.")
        if not skipped:
            self._nonfinite_in_a_row = 0
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"loss": loss_value, "token_accuracy": correct_total / window_tokens, "lr": lr,
                "grad_norm": grad_norm, "skipped": skipped, "tokens": window_tokens,
                "samples": sum(len(b["labels"]) for b in window) * world}

    def _forward_loss(self, model, batch, label_smoothing: float = 0.0):
        """Autocast forward of `model` (the engine's model or its DDP wrapper) -> (summed token loss, correct).

        With `fused_loss` and a plain linear output layer, the model runs up to that layer and
        `finetune.loss.fused_head_loss` does head + cross-entropy block by block, never building the logits;
        otherwise the logits go through `token_loss`. Same loss and gradients (tests/test_loss.py).
        """
        head = self._fused_head(batch)
        with self.autocast():
            if head is not None:
                return self._fused_loss(model, head, batch, label_smoothing)
            logits = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
        return token_loss(logits, batch["labels"], label_smoothing)

    def _fused_loss(self, model, head, batch, label_smoothing: float = 0.0):
        """`model` run up to `head`, then head + cross-entropy by `fused_head_loss` (call under autocast)."""
        with capture_hidden(self.model, head) as capture:
            model(**{k: batch[k] for k in MODEL_INPUTS})
        extra_bias = getattr(self.model, "final_logits_bias", None)  # BART's logits bias (a buffer)
        return fused_head_loss(capture.hidden, head, batch["labels"], label_smoothing, extra_bias)

    def _fused_head(self, batch):
        """The output layer to fuse with the loss, or None. The first time, the fused loss is checked against
        the model's own logits on this batch (eval mode, no gradients, no random numbers drawn): a model that
        changes its logits after the output layer (scaling, capping) would make the fused loss wrong, so a
        disagreement warns and the engine keeps to the plain loss."""
        if not self.config.fused_loss or self._fsdp or self._fused_ok is False:
            return None
        head = fusable_head(self.model)
        if head is None or self._fused_ok:
            return head
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.autocast():
            plain, _ = token_loss(self.model(**{k: batch[k] for k in MODEL_INPUTS}).logits, batch["labels"])
            fused, _ = self._fused_loss(self.model, head, batch)
        self.model.train(was_training)
        tolerance = 1e-4 if self.config.precision == "fp32" else 2e-2
        plain, fused = float(plain), float(fused)
        self._fused_ok = abs(fused - plain) <= tolerance * max(1.0, abs(plain))
        if not self._fused_ok:
            warnings.warn(f"fused_loss: on the first batch the fused output layer + loss gives {fused:.6g} and the "
                          f"model's own logits give {plain:.6g}; this model changes its logits after the output "
                          "layer, so the engine uses the plain loss (set fused_loss=False to skip this check)",
                          stacklevel=3)
        return head if self._fused_ok else None

    def _check_gradients(self):
        """After the first backward: every trainable tensor has a gradient, and not all of them are zero.

        (LoRA's A legitimately gets a zero gradient at step 0 because B starts at zero, so zeros are only
        an error when *every* gradient is zero.)
        """
        self._checked_gradients = True
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        missing = [n for n, p in named if p.grad is None]
        grads = [distributed.full(p.grad) for n, p in named if p.grad is not None]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise TrainingStopped(
                f"{len(missing)} trainable tensor(s) got no gradient after the first backward pass: {shown}. They "
                "are not on the path from the inputs to the loss (unused modules such as BERT's pooler, or a "
                "broken LoRA / checkpointing setup). Freeze them if they are unused by design "
                "(finetune.freeze.freeze(model, [pattern]))."
            )
        if all(not torch.any(g) for g in grads):
            raise TrainingStopped("every gradient is zero after the first backward pass: the model would not "
                                  "learn. Check the labels (all -100?) and what is frozen.")

    # ------------------------------------------------------------------------------------------
    # public API

    def fit(self, train, eval=None, resume: str | None = None) -> dict:
        """Train on `train` (a .jsonl/.tsv/.csv path or a list of (source, target)); evaluate on `eval`.

        `resume="latest"` (or a checkpoint folder) continues exactly where a run stopped. SIGTERM/SIGINT
        finish the current step, write a checkpoint and exit with status 128 + signal number.

        Before the first step: the output folder is locked for this process (a second run into it is
        refused, naming the holder) and checked writable; a fresh run into a folder holding another run's
        outputs is refused unless `overwrite_output_dir`; the training and evaluation data are read and
        tokenised, so a bad file fails here and not after hours of training.
        """
        if resume is True:
            resume = "latest"  # as HF Trainer's resume_from_checkpoint=True
        if resume is False:
            resume = None
        if resume is not None and not isinstance(resume, (str, os.PathLike)):
            raise TypeError(f"fit: resume must be 'latest', a checkpoint folder or None, got {type(resume).__name__}")
        lock = RunLock(self.config.output_dir) if self.dist.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            return self._fit(train, eval, os.fspath(resume) if resume is not None else None)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, train, eval, resume: str | None) -> dict:
        cfg = self.config
        set_seed(cfg.seed)
        checkpoints = os.path.join(cfg.output_dir, "checkpoints")
        if resume is None and self.dist.is_main:
            removed = claim_for_fresh_run(cfg.output_dir, cfg.overwrite_output_dir)
            if removed:
                self._log(f"overwrite_output_dir: removed the earlier run's {', '.join(removed)}")
        if resume is not None:
            resume_path = find_checkpoint(checkpoints, resume)  # a missing or corrupt checkpoint fails now
        _, examples = self._tokenized(train, "train")
        eval_set = self._tokenized(eval, "eval") if eval is not None else None
        world, rank = self.dist.world_size, self.dist.rank
        # global micro-batches of batch_size x world; rank r takes every world-th example of each
        sampler = LengthGroupedBatches([len(e.input_ids) + len(e.labels) for e in examples], cfg.batch_size * world,
                                       cfg.seed, cfg.group_by_length)
        leftover = len(examples) % (cfg.batch_size * world)
        if self.dist.enabled and 0 < leftover < world:  # some rank would get an empty micro-batch
            raise ValueError(f"{len(examples)} examples leave a last global batch of {leftover}, fewer than the "
                             f"{world} ranks; drop or add a few examples")
        steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        epochs = math.ceil(total_steps / steps_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
        if cfg.grad_checkpointing:
            self._enable_checkpointing()
        self.model.train()
        self._log(str(trainable_report(self.model)))
        already_wrapped = self._fsdp or self.train_model is not self.model  # a second fit on this engine
        if self.dist.enabled and not already_wrapped and cfg.fsdp:
            distributed.shard_fsdp(self.model)  # in place: parameters become sharded DTensors
            self._fsdp = True
        elif self.dist.enabled and not already_wrapped:
            from torch.nn.parallel import DistributedDataParallel

            # only trainable tensors are registered, so frozen ones (BitFit, LoRA) need no unused-parameter search
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.type == "cuda" else None)
        _, optimizer, scheduler = self._build_optimizer(total_steps, warmup)
        self._log(f"{total_steps} optimizer steps ({epochs} epoch(s) of {steps_per_epoch}), warm-up {warmup}, "
                  f"batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {world} process(es), precision "
                  f"{cfg.precision}, device {self.device}")
        data_hash = data_fingerprint(examples)
        self.global_step, start_epoch, start_window = 0, 0, 0
        self._nonfinite_in_a_row, self._last_checkpoint = 0, None
        if resume is not None:
            state = load_checkpoint(resume_path, self.model, optimizer, scheduler, self.scaler, cfg.to_dict(),
                                    data_hash, rank=rank, world_size=world, fsdp=self._fsdp)
            self.global_step, start_epoch, start_window = state["step"], state["epoch"], state["window"]
            self._nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
            self._checked_gradients = True
            self._last_checkpoint = resume_path
            if self.dist.is_main:
                print(f"resumed from {resume_path} at step {self.global_step}", flush=True)

        def checkpoint(epoch, window):
            rng = distributed.gather_objects(rng_state(), self.dist)  # every rank's generators
            # FSDP: gather the full model and optimizer state to rank 0 (collectives: every rank takes part)
            model_state = distributed.full_state_dict(self.model) if self._fsdp else None
            optimizer_state = distributed.full_optimizer_state(self.model, optimizer) if self._fsdp else None
            path = None
            if self.dist.is_main:
                progress = {"step": self.global_step, "epoch": epoch, "window": window, "data_fingerprint": data_hash,
                            "nonfinite_in_a_row": self._nonfinite_in_a_row, "world_size": world}
                path = save_checkpoint(checkpoints, self.model, optimizer, scheduler, self.scaler, progress,
                                       cfg.to_dict(), cfg.keep_last, rng_states=rng, model_state=model_state,
                                       optimizer_state=optimizer_state)
                self._last_checkpoint = path
            distributed.barrier(self.dist)
            return path

        def periodic_checkpoint(epoch, window):
            # while steps are being skipped as non-finite, no checkpoint is written, so pruning can never
            # delete the last one written before the run started to diverge
            if self._nonfinite_in_a_row:
                self._log(f"step {self.global_step}: no checkpoint while steps are non-finite (last good: "
                          f"{self._last_checkpoint})")
            else:
                checkpoint(epoch, window)

        def save_training(epoch, window):  # after an evaluation failed: keep what was trained
            paths = [checkpoint(epoch, window)] if not self.dist.enabled else []
            if cfg.save_model:
                paths.append(self._save_outputs(None))
            return [p for p in paths if p]

        history = {"train": [], "eval": []}
        progress = _progress(total_steps, cfg.progress and self.dist.is_main, initial=self.global_step)
        window_stats, started = [], time.perf_counter()
        position = (start_epoch, start_window)  # (epoch, windows of it consumed): where a resume picks up
        with _StopOnSignal() as stop:
            for epoch in range(start_epoch, epochs):
                batches = sampler.batches(epoch)
                starts = range(0, len(batches), cfg.grad_accum)
                for window_index, start in enumerate(starts):
                    if epoch == start_epoch and window_index < start_window:
                        continue  # consumed before the checkpoint we resumed from
                    if self.global_step >= total_steps:
                        break
                    window = [self.collate([self._noised(examples[i], epoch, i) for i in b[rank::world]])
                              for b in batches[start:start + cfg.grad_accum]]
                    try:
                        stats = self._step(window, optimizer, scheduler)
                    except TrainingStopped as err:
                        progress.close()
                        raise TrainingStopped(f"{err} Last checkpoint written before that: "
                                              f"{self._last_checkpoint or 'none (set save_every to keep some)'}") from None
                    position = (epoch, window_index + 1)
                    window_stats.append(stats)
                    progress.update(1)
                    if self.global_step % cfg.log_every == 0 or self.global_step == total_steps:
                        record = _summarise(window_stats, time.perf_counter() - started, self.global_step, epoch)
                        record["samples_per_s_per_rank"] = record["samples_per_s"] / world
                        history["train"].append(record)
                        self._append_metrics(record)
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                             samples_s=f"{record['samples_per_s']:.1f}")
                        window_stats, started = [], time.perf_counter()
                    signum = stop.signum if not self.dist.enabled else distributed.broadcast_object(stop.signum,
                                                                                                     self.dist)
                    if signum is not None:
                        path = checkpoint(*position)
                        progress.close()
                        if self.dist.is_main:
                            print(f"\nstopped by signal {signum} after step {self.global_step}; checkpoint: {path}\n"
                                  f"resume with engine.fit(..., resume='latest')", flush=True)
                        raise SystemExit(128 + signum)
                    if cfg.save_every and self.global_step % cfg.save_every == 0:
                        periodic_checkpoint(*position)
                    if eval_set is not None and cfg.eval_every and self.global_step % cfg.eval_every == 0:
                        self._evaluate_during_fit(eval_set, history, lambda: save_training(*position))
                if eval_set is not None and not cfg.eval_every:
                    self._evaluate_during_fit(eval_set, history, lambda: save_training(*position))
        progress.close()
        if cfg.save_every and self.global_step % cfg.save_every:
            periodic_checkpoint(*position)
        if cfg.save_model:
            # under FSDP the shards are gathered first: a collective, so every rank takes part
            state = distributed.full_state_dict(self.model) if self._fsdp else None
            if self.dist.is_main:
                path = self._save_outputs(state)
                self._log(f"model saved to {path}")
        distributed.barrier(self.dist)
        return history

    def _evaluate_during_fit(self, data, history, save_training):
        """Under torchrun, rank 0 evaluates (on the unwrapped model) while the others wait. An evaluation that
        fails first saves the training (checkpoint and model), then stops the run saying where they are."""
        if self.dist.is_main:
            try:
                history["eval"].append(self.evaluate(data))
            except Exception as err:
                saved = save_training()
                raise TrainingStopped(f"evaluation at step {self.global_step} failed ({type(err).__name__}: {err}); "
                                      f"the training up to here is saved: {', '.join(saved) or 'nothing to save'}"
                                      ) from err
        distributed.barrier(self.dist)
        self.model.train()

    def _save_outputs(self, state: dict | None) -> str:
        """model/ (plain transformers checkpoint, adapters merged) and, for LoRA, adapter/ beside it."""
        path = self.save(os.path.join(self.config.output_dir, "model"), state_dict=state)
        layers = lora_layers(self.model)
        if layers and not self._fsdp and not any(m.merged for m in layers.values()) \
                and hasattr(self.model, "lora_config"):
            adapter = os.path.join(os.path.abspath(self.config.output_dir), "adapter")
            shutil.rmtree(adapter + ".tmp", ignore_errors=True)
            fmt = "finetune" if self.model.lora_config.get("also_train") else "peft"
            save_adapter(self.model, adapter + ".tmp", format=fmt)
            replace_dir(adapter + ".tmp", adapter)
            self._log(f"adapter ({fmt} format) saved to {adapter}")
        return path

    @torch.inference_mode()
    def evaluate(self, data, num_beams: int | None = None, max_new_tokens: int | None = None,
                 predictions_file: str | None = "eval_predictions.jsonl") -> dict:
        """Teacher-forced loss, then generation metrics: exact match, accuracy by edit distance, ROUGE-1/2/L.

        Batches are generated under inference mode; tokens go to the CPU and into the metrics at once, so
        no logits are kept. Predictions are written next to metrics.jsonl in the output folder.
        """
        cfg = self.config
        pairs, examples = data if isinstance(data, _Tokenized) else self._tokenized(data, "eval")
        if max_new_tokens is not None or num_beams is not None:
            self._generate_ids(None, None, num_beams, max_new_tokens, check_only=True)
        was_training = self.model.training
        self.model.eval()
        sampler = LengthGroupedBatches([len(e.input_ids) for e in examples], cfg.eval_batch_size or cfg.batch_size,
                                       shuffle=False)
        metrics = GenerationMetrics()
        predictions = [None] * len(pairs)
        loss_sum, tokens = 0.0, 0
        for indices in sampler.batches(0):
            batch = self._to_device(self.collate([examples[i] for i in indices]))
            batch_loss, _ = self._forward_loss(self.model, batch)
            loss_sum += float(batch_loss)
            tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            texts = self._generate_ids(batch["input_ids"], batch["attention_mask"], num_beams, max_new_tokens)
            for i, text in zip(indices, texts):
                source, target = pairs[i]
                predictions[i] = {"source": source, "target": target, "prediction": text,
                                  "correct": metrics.add(source, target, text)}
        result = {"loss": loss_sum / max(1, tokens), **metrics.result(), "step": self.global_step}
        if predictions_file and self.dist.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            with open(os.path.join(cfg.output_dir, predictions_file), "w", encoding="utf-8") as f:
                for row in predictions:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._append_metrics({"split": "eval", **result})
        self.model.train(was_training)
        return result

    def _generate_ids(self, input_ids, attention_mask, num_beams=None, max_new_tokens=None,
                      check_only: bool = False) -> list[str]:
        cfg = self.config
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
            _check_length(self.model, "max_new_tokens", max_new_tokens, "max_new_tokens")
        if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
            raise ValueError(f"num_beams={num_beams!r}: must be an integer >= 1")
        if check_only:
            return []
        with self.autocast():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams or cfg.num_beams,
                max_new_tokens=max_new_tokens or cfg.max_new_tokens, decoder_start_token_id=self.tokens.decoder_start,
                eos_token_id=self.tokens.eos, pad_token_id=self.tokens.pad, do_sample=False,
            )
        return self.tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)

    @torch.inference_mode()
    def generate(self, texts: list[str], num_beams: int | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Generate one output per input text (greedy when num_beams=1, beam search otherwise)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"generate: texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected a string")
        self._generate_ids(None, None, num_beams, max_new_tokens, check_only=True)
        was_training = self.model.training
        self.model.eval()
        size = self.config.eval_batch_size or self.config.batch_size
        outputs = []
        for i in range(0, len(texts), size):
            enc = self.tokenizer(list(texts[i:i + size]), padding=True, truncation=True,
                                 max_length=self.config.max_source_length, return_tensors="pt")
            outputs += self._generate_ids(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
                                          num_beams, max_new_tokens)
        self.model.train(was_training)
        return outputs

    def overfit_batch(self, pairs, steps: int = 200, lr: float | None = None) -> list[dict]:
        """Train repeatedly on one batch (all of `pairs`), constant learning rate, no weight decay.

        The check to run before a long job: loss should approach zero and token accuracy reach 100% within a
        few hundred steps. It changes the model's weights. Returns the per-step loss and token accuracy.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"overfit_batch: steps must be an integer >= 1, got {steps!r}")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
            raise ValueError(f"overfit_batch: lr must be a finite number > 0, got {lr!r}")
        _, examples = self._tokenized(pairs, "overfit batch")
        window = [self.collate(examples)]
        self.model.train()
        _, optimizer, scheduler = self._build_optimizer(steps, 0, lr=lr or self.config.lr, schedule="constant",
                                                        weight_decay=0.0)
        history = []
        for step in range(steps):
            stats = self._step(window, optimizer, scheduler)
            history.append({"step": step, "loss": stats["loss"], "token_accuracy": stats["token_accuracy"]})
        return history

    def save(self, path: str, state_dict: dict | None = None) -> str:
        """The model as a plain transformers checkpoint (LoRA merged, int8 dequantised; finetune.export) plus the
        tokenizer, into `path`. Written beside it first, then swapped in atomically: at every instant `path`
        holds a complete model (the old or the new one)."""
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputDirError(f"save: {path} exists and is a file, not a model folder; choose another path")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        added = save_plain(self.model, self.tokenizer, tmp, state=state_dict)
        if added:
            self._log(f"{path}: {len(added)} layers carry biases BitFit added; plain from_pretrained drops them - "
                      "load this folder with finetune.models.load_seq2seq (or `finetune eval`), which puts them back")
        replace_dir(tmp, path)
        return path

    def _append_metrics(self, record: dict):
        if not self.dist.is_main:
            return
        os.makedirs(self.config.output_dir, exist_ok=True)
        with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class _Tokenized(tuple):
    """(pairs, examples) of one data set, read and tokenised once."""

    def __new__(cls, pairs, examples):
        return super().__new__(cls, (pairs, examples))


def _check_length(model, name: str, value: int, where: str) -> None:
    """A length beyond the learned position table of the side that reads it is an error naming the limit."""
    config = model.config
    side = getattr(config, "encoder", config) if name == "max_source_length" else getattr(config, "decoder", config)
    limit = getattr(side, "max_position_embeddings", None)
    if limit and value > limit:
        side = "encoder" if name == "max_source_length" else "decoder"
        raise ValueError(f"{where}={value} exceeds the model's {limit} learned positions ({side}); set it <= {limit}")


def _freeze_unused_pooler(model, log) -> None:
    """An EncoderDecoderModel built by `from_encoder_decoder_pretrained` keeps BERT's pooler in its encoder. No
    seq2seq forward reads it, so it would get no gradient and stop training at the gradient check: freeze it."""
    if getattr(model.config, "model_type", "") != "encoder-decoder":
        return
    pooler = getattr(getattr(model, "encoder", None), "pooler", None)
    if pooler is not None and any(p.requires_grad for p in pooler.parameters()):
        pooler.requires_grad_(False)
        log("encoder.pooler is unused by an encoder-decoder model (it gets no gradient): frozen")


def _summarise(window_stats: list[dict], seconds: float, step: int, epoch: int) -> dict:
    tokens = sum(s["tokens"] for s in window_stats)
    samples = sum(s["samples"] for s in window_stats)
    last = window_stats[-1]
    return {
        "split": "train", "step": step, "epoch": epoch,
        "loss": sum(s["loss"] * s["tokens"] for s in window_stats) / tokens,
        "token_accuracy": sum(s["token_accuracy"] * s["tokens"] for s in window_stats) / tokens,
        "lr": last["lr"], "grad_norm": last["grad_norm"],
        "skipped_steps": sum(s["skipped"] for s in window_stats),
        "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
    }


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


class _StopOnSignal:
    """While active, SIGTERM and SIGINT only record the signal; the loop checks it after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
