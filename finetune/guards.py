"""What stops a run rather than let it train wrongly: the gradient check after the first backward, and the count of
non-finite steps in a row."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import distributed


class TrainingStopped(RuntimeError):
    """Training cannot go on: what is wrong is in the message."""


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
            "setup). Freeze them if they are unused by design (finetune.freeze.freeze).")
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
    from .config import TrainConfig
    from .noise import NoiseConfig

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
