"""Freezing by regex, BitFit, and the trainable-parameter report.

Names are matched against every name a tensor has (`named_parameters(remove_duplicate=False)`), so
a tied tensor — BART's `lm_head.weight` is `model.shared.weight` is `model.encoder.embed_tokens.weight`
— is found under each of its names, and freezing any one name freezes the one tensor behind all of
them. Counting goes by tensor, so tied weights count once and are reported as shared.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from finetune.methods.surgery import replace_module
from finetune.patterns import compile_patterns


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every name it has in the model, in registration order."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return names


def _set_requires_grad(model: nn.Module, patterns, value: bool, what: str) -> int:
    regexes = compile_patterns(patterns, what)
    hits = {rx.pattern: 0 for rx in regexes}
    changed = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        for rx in regexes:
            if rx.search(name):
                hits[rx.pattern] += 1
                if param.requires_grad != value:
                    param.requires_grad_(value)
                    changed += param.numel()
    unmatched = [p for p, n in hits.items() if n == 0]
    if unmatched:
        raise ValueError(
            f"{what}: pattern(s) {unmatched} match no parameter name; nothing was changed for them. "
            f"Names look like {[n for n, _ in list(model.named_parameters())[:3]]} "
            "(see model.named_parameters())"
        )
    return changed


def freeze(model: nn.Module, patterns) -> int:
    """Stop training every tensor whose name (any of its names) matches a regex; returns parameters frozen."""
    return _set_requires_grad(model, patterns, False, "freeze")


def unfreeze(model: nn.Module, patterns) -> int:
    """Train every tensor whose name (any of its names) matches a regex; returns parameters unfrozen."""
    return _set_requires_grad(model, patterns, True, "unfreeze")


def freeze_all(model: nn.Module) -> None:
    for param in model.parameters():
        param.requires_grad_(False)


@dataclass
class TrainableReport:
    trainable: int
    total: int
    shared: list[list[str]]  # groups of names that are one tensor
    by_module: dict[str, tuple[int, int]]  # top-level module -> (trainable, total)
    trainable_names: set[str] = field(default_factory=set, repr=False)  # first name of each trainable tensor

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%), "
                 "tied tensors counted once"]
        width = max((len(m) for m in self.by_module), default=0)
        for module, (t, n) in self.by_module.items():
            lines.append(f"  {module:<{width}}  {t:>12,} / {n:>12,} trainable")
        for names in self.shared:
            lines.append(f"  shared tensor ({'trainable' if names[0] in self.trainable_names else 'frozen'}): "
                         + " = ".join(names))
        if self.trainable == 0:
            lines.append("  NOTHING IS TRAINABLE: the optimizer would update no tensor. A tied tensor (e.g. the LM "
                         "head = shared embedding) is frozen by freezing any of its names.")
        return "\n".join(lines)


def _module_key(name: str, depth: int) -> str:
    parts = name.split(".")[:-1]
    return ".".join(parts[:depth]) or "(root)"


def trainable_report(model: nn.Module, depth: int = 2) -> TrainableReport:
    """Trainable / total parameters, each tensor once, with a per-module summary and the shared tensors."""
    names = tensor_names(model)
    trainable = total = 0
    by_module: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    trainable_names = set()
    for param in {id(p): p for p in model.parameters()}.values():
        first = names[id(param)][0]
        total += param.numel()
        by_module[_module_key(first, depth)][1] += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            by_module[_module_key(first, depth)][0] += param.numel()
            trainable_names.add(first)
    return TrainableReport(trainable, total, [n for n in names.values() if len(n) > 1],
                           {k: (v[0], v[1]) for k, v in by_module.items()}, trainable_names)


# ---------------------------------------------------------------------------------------------
# BitFit (Ben Zaken et al., 2022): train only the bias terms


class LinearWithAddedBias(nn.Module):
    """A bias-free linear layer plus a zero-initialised bias: output unchanged until the bias trains."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.bias = nn.Parameter(torch.zeros(base.out_features, dtype=base.weight.dtype, device=base.weight.device))

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + self.bias

    def plain_linear(self, state: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(weight, bias, True: the bias is an added one) under the plain layer's names (finetune.store.export)."""
        return state[prefix + "base.weight"], state[prefix + "bias"], True

    def extra_repr(self) -> str:
        return "bias added for BitFit (zero-initialised)"


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "bias"


def bitfit(model: nn.Module, also=(), add_missing_biases: bool = False) -> TrainableReport:
    """Freeze everything but the bias terms (and whatever `also` names).

    For models without biases (T5), `add_missing_biases=True` gives every bias-free nn.Linear a
    zero-initialised bias, so the model's output is unchanged at step 0; without it, BitFit refuses
    rather than train nothing. The LM head is left alone (its output bias would act on every token).
    """
    has_bias = any(_is_bias(n) for n, _ in model.named_parameters())
    if not has_bias and not add_missing_biases:
        raise ValueError(
            f"bitfit: {type(model).__name__} has no bias terms (T5-style models are built without them), so BitFit "
            "would train nothing. Call bitfit(model, add_missing_biases=True) to add zero-initialised biases to its "
            "linear layers (output unchanged at step 0), or choose another method (LoRA)."
        )
    if add_missing_biases:
        _add_biases(model)
    freeze_all(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if _is_bias(name):
            param.requires_grad_(True)
    if also:
        unfreeze(model, also)
    return trainable_report(model)


def add_biases_to(model: nn.Module, names) -> None:
    """Wrap the named bias-free nn.Linear layers in LinearWithAddedBias (reloading a saved BitFit T5)."""
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"added bias for layer {name!r}: the model has no such layer") from None
        if type(layer) is not nn.Linear or layer.bias is not None:
            raise ValueError(f"added bias for layer {name!r}: expected a bias-free nn.Linear, found "
                             f"{type(layer).__name__}")
        replace_module(model, name, LinearWithAddedBias(layer))


def _add_biases(model: nn.Module) -> int:
    """Give each bias-free nn.Linear (not the LM head, not one an earlier call wrapped already) an added bias."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LinearWithAddedBias)}
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and m.bias is None and m is not output and id(m) not in wrapped]
    if not names and not wrapped:
        raise ValueError("bitfit: add_missing_biases found no bias-free nn.Linear layer to give a bias")
    add_biases_to(model, names)
    return len(names)
