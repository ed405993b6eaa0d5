"""The fine-tuning methods by name: the model surgery done once, before the optimizer is built.

Each method is one registered function `(model, new_tensors, **settings)`; `METHODS` lists them in order, and the
CLI, run files, examples and benchmarks all read it. Adding a method is one `@register`ed function here.

    full            every tensor trains
    frozen-encoder  the encoder is frozen (tied tensors with it, such as a shared embedding, too)
    bitfit          only biases (T5: zero-initialised added biases with add_missing_biases=True)
    lora            LoRA adapters on the family's default (or given) targets; the rest frozen
    int8-lora       int8 base weights (bitsandbytes) under LoRA adapters
    dora            LoRA with DoRA's trained magnitude per output row (Liu et al., 2024)
    qlora           4-bit base weights (bitsandbytes NF4 or FP4, double quantisation) under LoRA adapters

`new_tensors` (a warm-started bert2bert's cross-attention and LM-head transform: the names its load report
gave as missing) always train in full: they start from random values, and no method may leave them random.
`new_tensor_lr` gives them their own learning rate.
"""
from __future__ import annotations

import inspect
import re

from torch import nn

from .families import family_of
from .freeze import bitfit, freeze, unfreeze

REGISTRY: dict[str, callable] = {}


def register(name: str):
    def add(fn):
        REGISTRY[name] = fn
        return fn
    return add


def exact_names_pattern(names) -> str | None:
    """One regex matching exactly these parameter names, with layer indices folded (`.3.` -> `.\\d+.`)."""
    if not names:
        return None
    stems = sorted({re.escape(re.sub(r"\.\d+\.", ".#.", n)).replace("\\#", "#").replace("#", r"\d+") for n in names})
    return "^(" + "|".join(stems) + ")$"


def new_tensor_lr(new_tensors, lr: float | None) -> dict[str, float]:
    """`lr_overrides` giving the newly initialised tensors their own learning rate (empty if none, or no rate).

    Warm-started models mix pretrained tensors with new ones: a rate that moves the new ones in minutes wrecks
    the pretrained ones, and the textbook rate barely moves the new ones (DESIGN.md)."""
    pattern = exact_names_pattern(new_tensors)
    return {pattern: lr} if pattern and lr else {}


def encoder_pattern(model: nn.Module) -> str:
    return family_of(model).encoder


def _new(new_tensors) -> list[str]:
    return [p for p in [exact_names_pattern(new_tensors)] if p]


@register("full")
def full(model: nn.Module, new_tensors=()) -> None:
    """Every tensor trains (nothing to do)."""


@register("frozen-encoder")
def frozen_encoder(model: nn.Module, new_tensors=()) -> None:
    freeze(model, [encoder_pattern(model)])
    if new_tensors:
        unfreeze(model, _new(new_tensors))


@register("bitfit")
def bitfit_method(model: nn.Module, new_tensors=(), add_missing_biases: bool = False) -> None:
    bitfit(model, also=_new(new_tensors), add_missing_biases=add_missing_biases)


def _lora_placement(new_tensors) -> dict:
    """Where adapters go around a warm-started model's new tensors: never on them (they train in full)."""
    new_modules = exact_names_pattern({n.rsplit(".", 1)[0] for n in new_tensors})
    return {"also_train": _new(new_tensors), "exclude": [new_modules] if new_modules else ()}


@register("lora")
def lora(model: nn.Module, new_tensors=(), lora_targets=None, lora_r: int = 16, lora_alpha: float = 32,
         lora_dropout: float = 0.05, dora: bool = False) -> None:
    from .lora import apply_lora

    apply_lora(model, targets=lora_targets, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, dora=dora,
               **_lora_placement(new_tensors))


def _quantized_lora(model, new_tensors, quantize, lora_targets, lora_r, lora_alpha, lora_dropout) -> None:
    """Quantise the base (new tensors stay float: they train in full), then LoRA over it. The LoRA settings are
    checked first, so a refused target or rank leaves the model unquantised and a corrected retry works."""
    from .lora import lora_plan
    from .quant import prepare_quantized_training

    lora_plan(model, lora_targets, lora_r, lora_alpha, lora_dropout, **_lora_placement(new_tensors))
    quantize(model, skip=_new(new_tensors))
    prepare_quantized_training(model)
    lora(model, new_tensors, lora_targets, lora_r, lora_alpha, lora_dropout)


@register("int8-lora")
def int8_lora(model: nn.Module, new_tensors=(), lora_targets=None, lora_r: int = 16, lora_alpha: float = 32,
              lora_dropout: float = 0.05, int8_threshold: float = 6.0) -> None:
    from functools import partial

    from .int8 import quantize_int8

    _quantized_lora(model, new_tensors, partial(quantize_int8, threshold=int8_threshold), lora_targets, lora_r,
                    lora_alpha, lora_dropout)


@register("dora")
def dora(model: nn.Module, new_tensors=(), lora_targets=None, lora_r: int = 16, lora_alpha: float = 32,
         lora_dropout: float = 0.05) -> None:
    lora(model, new_tensors, lora_targets, lora_r, lora_alpha, lora_dropout, dora=True)


@register("qlora")
def qlora(model: nn.Module, new_tensors=(), lora_targets=None, lora_r: int = 16, lora_alpha: float = 32,
          lora_dropout: float = 0.05, quant_type: str = "nf4", double_quant: bool = True) -> None:
    """4-bit base weights (the compute dtype follows the engine's precision) under LoRA adapters."""
    from functools import partial

    from .int4 import quantize_4bit

    _quantized_lora(model, new_tensors, partial(quantize_4bit, quant_type=quant_type, double_quant=double_quant),
                    lora_targets, lora_r, lora_alpha, lora_dropout)


METHODS = tuple(REGISTRY)


def settings_of(method: str) -> dict:
    """The settings a method takes, with their defaults."""
    if method not in REGISTRY:
        raise ValueError(f"method {method!r}: choose one of {', '.join(METHODS)}")
    params = list(inspect.signature(REGISTRY[method]).parameters.values())[2:]
    return {p.name: p.default for p in params}


def apply_method(model: nn.Module, method: str, new_tensors=(), **settings) -> nn.Module:
    """Apply a registered method; a setting the method does not take is an error naming it (None means not
    set). Returns the model."""
    known = settings_of(method)
    settings = {k: v for k, v in settings.items() if v is not None}  # None: not set
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} takes no setting {', '.join(unknown)} (its settings: "
                         f"{', '.join(known) or 'none'})")
    REGISTRY[method](model, list(new_tensors or ()), **settings)
    return model
