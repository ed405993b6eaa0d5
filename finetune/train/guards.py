"""What stops a run rather than let it train wrongly: evaluation settings that could never act (refused before the
first step), the gradient check after the first backward, and the count of non-finite steps in a row."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from finetune import distributed
from finetune.checks import is_finite_number, is_integer


class TrainingStopped(RuntimeError):
    """Training cannot go on: what is wrong is in the message."""


def check_evaluation_settings(config, has_eval: bool, total_steps: int, sharded: bool = False) -> None:
    """Evaluation settings that could never act are refused before the first step (`Engine.prepare` and the
    preflight, `finetune check`, call this alike): evaluation settings without evaluation data, and a best model
    or early stopping whose evaluations would all fall after the run's last step. `sharded`: FSDP (no best
    model yet)."""
    if config.best_metric and sharded:
        raise ValueError("TrainConfig.best_metric is not supported with fsdp=True yet (the best weights would have to "
                         "be gathered); keep the checkpoints (save_every) and pick one instead")
    if not has_eval:
        if config.best_metric:
            raise ValueError(f"TrainConfig.best_metric={config.best_metric!r} needs evaluation data: fit(train, "
                             "eval=...) (a run file: [data] eval = ...)")
        unused = [f"{name}={getattr(config, name)!r}" for name, default in
                  (("eval_every", None), ("eval_max_samples", None), ("eval_num_beams", 1))
                  if getattr(config, name) != default]
        if unused:
            raise ValueError(f"TrainConfig.{', '.join(unused)}: set, but there is no evaluation data, so "
                             f"{'it' if len(unused) == 1 else 'they'} would never act; pass fit(train, eval=...) (a "
                             "run file: [data] eval = ...) or leave them unset")
        return
    if config.eval_every and config.eval_every > total_steps:
        what = f"TrainConfig.eval_every={config.eval_every} is beyond the run's last step ({total_steps})"
        if config.best_metric:
            raise ValueError(f"{what}: no evaluation would run during training, so best_metric="
                             f"{config.best_metric!r}{' and early stopping' if config.early_stopping_patience else ''}"
                             f" could never act and model/ would hold the last weights; set eval_every <= "
                             f"{total_steps}")
        warnings.warn(f"{what}: no evaluation runs during training, only the final one", stacklevel=3)
    patience = config.early_stopping_patience
    evaluations = total_steps // config.eval_every if config.eval_every else None
    if patience and evaluations is not None and evaluations <= patience:
        warnings.warn(f"TrainConfig.early_stopping_patience={patience} needs at least {patience + 1} evaluations "
                      f"and this run has {evaluations} (eval_every={config.eval_every}, {total_steps} steps): it can "
                      "never stop early", stacklevel=3)


def check_gradients(model: nn.Module) -> None:
    """After the first backward: every trainable tensor has a gradient, and not all of them are zero.
    (LoRA's A legitimately gets a zero gradient at step 0 because B starts at zero.)"""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    grads = [distributed.full(p.grad) for n, p in named if p.grad is not None]  # every rank gathers alike
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise TrainingStopped(
            f"{len(missing)} trainable tensor(s) got no gradient after the first backward pass: {shown}. They are "
            "not on the path from the inputs to the loss (an unused module, or a broken LoRA / checkpointing "
            "setup). Freeze them if they are unused by design (finetune.methods.freeze.freeze).")
    if all(not torch.any(g) for g in grads):
        raise TrainingStopped("every gradient is zero after the first backward pass: the model would not learn. "
                              "Check the labels (all -100?) and what is frozen.")


def count_nonfinite(in_a_row: int, nonfinite: bool, loss: float, step: int, limit: int) -> int:
    """The new count of non-finite steps in a row; a warning for each, and TrainingStopped at `limit`."""
    if not nonfinite:
        return 0
    in_a_row += 1
    warnings.warn(f"step {step}: non-finite loss or gradient ({loss}); step skipped", stacklevel=3)
    if in_a_row >= limit:
        raise TrainingStopped(f"{in_a_row} non-finite steps in a row (last at step {step}); stopping. Lower the "
                              "learning rate or use fp32/bf16.")
    return in_a_row


def check_engine_arguments(model, tokenizer, config, noise) -> None:
    """What Engine(...) is given is what it needs: a transformers model, its tokenizer, a TrainConfig, a NoiseConfig."""
    from finetune.data.noise import NoiseConfig
    from finetune.train.config import TrainConfig

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"Engine: model must be a transformers seq2seq model (an nn.Module with a .config), got "
                        f"{type(model).__name__}")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError(f"Engine: tokenizer must be the model's transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"Engine: config must be a TrainConfig (e.g. TrainConfig(**values)), got "
                        f"{type(config).__name__}")
    if noise is not None and not isinstance(noise, NoiseConfig):
        raise TypeError(f"Engine: noise must be a NoiseConfig or None, got {type(noise).__name__}")


def check_overfit_arguments(steps, lr) -> None:
    if not (is_integer(steps) and steps >= 1):
        raise ValueError(f"overfit_batch: steps must be an integer >= 1, got {steps!r}")
    if lr is not None and not (is_finite_number(lr) and lr > 0):
        raise ValueError(f"overfit_batch: lr must be a finite number > 0, got {lr!r}")


def check_device(name: str | None) -> torch.device:
    """TrainConfig.device as a torch.device (None: cuda when available, else cpu); cuda without a GPU is refused."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r}: no CUDA device is available here (torch {torch.__version__}); "
                         "use device='cpu' or leave it None")
    return device
