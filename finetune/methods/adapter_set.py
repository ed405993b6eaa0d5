"""Several LoRA adapters on one base, by name, as PEFT keeps them: switch, disable for a while, delete, merge one,
combine some into a new one.

The active adapter is the model's LoRA layers as `apply_lora` makes them (its tensors are the model's parameters:
training, saving and merging see it alone); the others wait in `model.lora_stash`, each as its LoRA layers (around
the same base modules, so a stashed adapter costs its A and B only) and the values of its tensors trained in full
(modules_to_save, also_train). Switching puts the active one's layers away, the base's own values of those tensors
back (`model.lora_originals`), then the chosen one's in. Stashed layers stay where they were made: `model.to(...)`
moves the active adapter only.

    set_adapter(model, "b")                      PEFT's set_adapter
    with disable_adapter(model): ...             the base model alone (PEFT's disable_adapter())
    delete_adapter(model, "a")                   PEFT's delete_adapter
    merge_adapter(model, "b")                    PEFT's merge_and_unload(adapter_names=["b"])
    add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "mix", "linear" | "cat")
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn

from finetune.checks import is_finite_number
from finetune.methods.lora import LoRALinear, full_tensors, lora_layers, merge_lora
from finetune.methods.surgery import replace_module

DEFAULT = "default"  # the name of an adapter applied or loaded without one (PEFT's)
COMBINATIONS = ("linear", "cat")


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name; None when the model has no LoRA adapter at all."""
    if getattr(model, "lora_config", None) is None:
        return None
    return getattr(model, "lora_adapter_name", DEFAULT)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter's name, the active one first."""
    active = active_adapter(model)
    return ([active] if active else []) + list(getattr(model, "lora_stash", {}))


def _stash_active(model: nn.Module) -> dict:
    """Take the active adapter out of the model (its layers replaced by their bases, its full tensors back at the
    base's values and frozen) and return it."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the active adapter is merged into the base weights; unmerge() its layers first")
    full = full_tensors(model)
    record = {"config": model.lora_config, "layers": lora_layers(model),
              "full": {n: p.detach().clone() for n, p in full.items()}}
    originals = getattr(model, "lora_originals", {})
    with torch.no_grad():
        for name, tensor in full.items():
            tensor.copy_(originals[name])
            tensor.requires_grad_(False)
    for name, layer in record["layers"].items():
        replace_module(model, name, layer.base_layer)
    del model.lora_config
    return record


def _put_back(model: nn.Module, record: dict) -> None:
    """Make a stashed adapter the active one."""
    for name, layer in record["layers"].items():
        if model.get_submodule(name) is not layer.base_layer:
            raise RuntimeError(f"adapter layer {name}: the model's module there is no longer the base it wraps")
        replace_module(model, name, layer)
    model.lora_config = record["config"]
    full = full_tensors(model)
    with torch.no_grad():
        for name, tensor in full.items():
            tensor.copy_(record["full"][name])
            tensor.requires_grad_(True)


def _need_adapter(model: nn.Module, name: str, where: str) -> None:
    if name not in adapter_names(model):
        raise ValueError(f"{where}: no adapter named {name!r} (this model has {adapter_names(model) or 'none'})")


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the active one (the one forward, training and saving use)."""
    _need_adapter(model, name, "set_adapter")
    active = active_adapter(model)
    if name == active:
        return
    stash = model.lora_stash
    record = stash.pop(name)
    stash[active] = _stash_active(model)
    _put_back(model, record)
    model.lora_adapter_name = name


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block the model is its base alone (no adapter, the base's own values of the tensors the adapter
    trains in full); the active adapter is back after it, also when the block raises."""
    if active_adapter(model) is None:
        raise ValueError("disable_adapter: the model has no LoRA adapter")
    record = _stash_active(model)
    try:
        yield model
    finally:
        _put_back(model, record)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter `name`; deleting the active one makes the first other one active (PEFT's rule). The last
    adapter is not deleted: merge_lora or a fresh base is the way back to a plain model."""
    _need_adapter(model, name, "delete_adapter")
    names = adapter_names(model)
    if len(names) == 1:
        raise ValueError(f"delete_adapter: {name!r} is the model's only adapter; merge_lora(model) folds it in, or "
                         "load the base model again for a plain one")
    if name == active_adapter(model):
        set_adapter(model, next(n for n in names if n != name))
    del model.lora_stash[name]


def merge_adapter(model: nn.Module, name: str) -> nn.Module:
    """Fold adapter `name` into the base weights and drop every adapter (PEFT's merge_and_unload(adapter_names=
    [name])): a plain model that computes as the base plus that adapter."""
    set_adapter(model, name)
    return merge_lora(model)


def add_named(model: nn.Module, name: str, record: dict) -> None:
    """Keep `record` (the active adapter as `_stash_active` took it) as the stashed adapter `name`."""
    model.lora_stash = {**getattr(model, "lora_stash", {}), name: record}


@contextlib.contextmanager
def stash_for_loading(model: nn.Module, name: str):
    """A context for loading adapter `name` beside the others: the active one is put away (the model is its base
    within), and after the block the new adapter joins the stash and the active one comes back; when the block
    raises, the model is as it was."""
    check_new_name(model, name, "load_adapter")
    active = active_adapter(model)
    record = _stash_active(model)
    try:
        yield
        add_named(model, name, _stash_active(model))
    finally:
        _put_back(model, record)
        model.lora_adapter_name = active


def check_new_name(model: nn.Module, name: str, where: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: adapter_name must be a non-empty string, got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"{where}: the model has an adapter named {name!r} already (delete_adapter it first)")


def _layers_of(model: nn.Module, name: str) -> tuple[dict, dict[str, LoRALinear]]:
    """(config, layers by module name) of adapter `name`, active or stashed."""
    if name == active_adapter(model):
        return model.lora_config, lora_layers(model)
    record = model.lora_stash[name]
    return record["config"], record["layers"]


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "linear") -> None:
    """A new stashed adapter combining others, as PEFT's add_weighted_adapter: "linear" (same rank r: A = sum
    sign(w s) sqrt|w s| A_i, B = sum sqrt|w s| B_i, s each adapter's scale) or "cat" (rank sum r_i: A stacks
    w s A_i, B stacks B_i: the exact sum of w_i s_i B_i A_i). Its alpha is its rank, its dropout and rsLoRA the
    first adapter's. Adapters with DoRA or tensors trained in full are not combined (PEFT cannot either)."""
    configs = _check_weighted(model, adapters, weights, adapter_name, combination_type)
    sources = [_layers_of(model, name)[1] for name in adapters]
    ranks = {layer.r for layers in sources for layer in layers.values()}
    if combination_type == "linear" and len(ranks) != 1:
        raise ValueError(f"add_weighted_adapter: 'linear' needs one rank in every adapter's layers, got {sorted(ranks)};"
                         " use 'cat'")
    new_r = ranks.pop() if combination_type == "linear" else sum(c["r"] if not c["rank_pattern"] else
                                                                  max(c["r"], *c["rank_pattern"].values())
                                                                  for c in configs)
    first = configs[0]
    layers = {}
    for module in sorted({m for layers_ in sources for m in layers_}):
        base = next(layers_[module].base_layer for layers_ in sources if module in layers_)
        layer = LoRALinear(base, r=new_r, alpha=new_r, dropout=first["dropout"], rslora=first["rslora"])
        parts = [(layers_[module], w) for layers_, w in zip(sources, weights) if module in layers_]
        with torch.no_grad():
            a, b = _combined(parts, combination_type, new_r)
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        layers[module] = layer
    config = {**first, "r": new_r, "alpha": float(new_r), "modules": sorted(layers), "rank_pattern": {},
              "alpha_pattern": {}, "targets": [f"^{re.escape(m)}$" for m in sorted(layers)]}
    add_named(model, adapter_name, {"config": config, "layers": layers, "full": {}})


def _check_weighted(model, adapters, weights, adapter_name, combination_type) -> list[dict]:
    where = "add_weighted_adapter"
    check_new_name(model, adapter_name, where)
    if combination_type not in COMBINATIONS:
        raise ValueError(f"{where}: combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"{where}: give as many weights as adapters (got {len(adapters)} and {len(weights)})")
    bad = [w for w in weights if not is_finite_number(w)]
    if bad:
        raise ValueError(f"{where}: weights must be finite numbers, got {bad[0]!r}")
    for name in adapters:
        _need_adapter(model, name, where)
    configs = [_layers_of(model, name)[0] for name in adapters]
    for name, config in zip(adapters, configs):
        if config.get("dora") or config.get("also_train") or config.get("modules_to_save"):
            raise ValueError(f"{where}: adapter {name!r} has DoRA magnitudes or tensors trained in full "
                             "(modules_to_save / also_train), which a weighted sum cannot combine")
    return configs


def _combined(parts, combination_type: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combination of `parts` (layer, weight) at rank r (PEFT's arithmetic, in float32)."""
    a_rows, b_cols = [], []
    for layer, weight in parts:
        a, b = layer.lora_A.weight.float(), layer.lora_B.weight.float()
        if combination_type == "cat":
            a_rows.append(a * weight * layer.scaling)
            b_cols.append(b)
        else:
            scaled = weight * layer.scaling
            a_rows.append(math.copysign(math.sqrt(abs(scaled)), scaled) * a)
            b_cols.append(math.sqrt(abs(scaled)) * b)
    if combination_type == "linear":
        return sum(a_rows), sum(b_cols)
    a, b = torch.cat(a_rows, dim=0), torch.cat(b_cols, dim=1)
    pad = r - a.shape[0]  # a layer some of the adapters do not wrap: PEFT leaves those rows zero
    return (nn.functional.pad(a, (0, 0, 0, pad)), nn.functional.pad(b, (0, pad))) if pad else (a, b)
