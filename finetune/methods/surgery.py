"""Model surgery's one operation: put a new module where another was, by its dotted name."""
from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """`model.<name>` becomes `new` ("decoder.layers.0.fc1": the child fc1 of decoder.layers.0)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
