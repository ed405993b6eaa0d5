"""The fine-tuning methods by name, as one function of the model: the surgery done before the optimizer.

    full            every tensor trains
    frozen-encoder  the encoder is frozen (tied tensors with it, such as a shared embedding, too)
    bitfit          only biases (T5: zero-initialised added biases)
    lora            LoRA adapters on the family's default (or given) targets; the rest frozen
    int8-lora       int8 base weights (bitsandbytes) under LoRA adapters

`new_parameters` (a warm-started bert2bert's cross-attention and LM-head transform) always train in full:
they start from random values, and no frozen-base method may leave them random.
"""
from __future__ import annotations

import re

from torch import nn

from .freeze import bitfit, freeze, unfreeze

METHODS = ("full", "frozen-encoder", "bitfit", "lora", "int8-lora")


def exact_names_pattern(names) -> str | None:
    """One regex matching exactly these parameter names, with layer indices folded (`.3.` -> `.\\d+.`)."""
    if not names:
        return None
    stems = sorted({re.escape(re.sub(r"\.\d+\.", ".#.", n)).replace("\\#", "#").replace("#", r"\d+") for n in names})
    return "^(" + "|".join(stems) + ")$"


def encoder_pattern(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", "")
    if model_type in ("bart", "mbart", "marian", "pegasus"):
        return r"^model\.encoder\."
    return r"^encoder\."


def apply_method(model: nn.Module, method: str, new_parameters=(), *, lora_targets=None, lora_r: int = 16,
                 lora_alpha: float = 32, lora_dropout: float = 0.05, add_missing_biases: bool = False,
                 int8_threshold: float = 6.0) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    new = [p for p in [exact_names_pattern(new_parameters)] if p]
    if method == "frozen-encoder":
        freeze(model, [encoder_pattern(model)])
        if new:
            unfreeze(model, new)
    elif method == "bitfit":
        bitfit(model, also=new, add_missing_biases=add_missing_biases)
    elif method in ("lora", "int8-lora"):
        from .lora import apply_lora

        if method == "int8-lora":
            from .int8 import prepare_int8_training, quantize_int8

            skip = new  # newly initialised tensors train in full: keep them float
            quantize_int8(model, skip=skip, threshold=int8_threshold)
            prepare_int8_training(model)
        new_modules = exact_names_pattern({n.rsplit(".", 1)[0] for n in new_parameters})
        apply_lora(model, targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, also_train=new,
                   exclude=[new_modules] if new_modules else ())
    return model
