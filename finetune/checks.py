"""The checks every part of the package makes on values from users, written once.

A number is an int or a float but never a bool (`True` is an int to Python, never a learning rate to a user);
a table (a run file's section, an adapter config, TrainConfig.from_dict) names an unknown key together with the
nearest known one; a value of the wrong type names what was expected in words.
"""
from __future__ import annotations

import difflib
import math
import types
import typing


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_seed(value) -> bool:
    """An int in [0, 2**63), the range every seed of the package takes (TrainConfig.seed, the warm start's)."""
    return is_integer(value) and 0 <= value < 2**63


def is_finite_number(value) -> bool:
    return is_number(value) and math.isfinite(value)


def in_unit_interval(value) -> bool:
    """A number in [0, 1): a dropout or noise probability."""
    return is_number(value) and 0 <= value < 1


def describe(hint) -> str:
    """A type hint in words: "an integer or None"."""
    names = {float: "a number", int: "an integer", bool: "true/false", str: "a string", type(None): "None"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is dict:
        return "a table (mapping)"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def fits(value, hint) -> bool:
    """Whether `value` has the type `hint` names (an int fits a float; a bool fits neither)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return is_number(value)
    if hint is int:
        return is_integer(value)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def unknown_keys(values, known, where: str) -> None:
    """ValueError naming the first key of `values` that is not in `known`, with the nearest known name."""
    known = sorted(known)
    for key in values:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ValueError(f"{where}: unknown key '{key}' ({hint}known: {', '.join(known)})")


def check_table(values: dict, hints: dict, where: str) -> None:
    """Unknown keys (`unknown_keys`) and values of the wrong type, named with the key and the type expected."""
    unknown_keys(values, hints, where)
    for key, value in values.items():
        if not fits(value, hints[key]):
            raise ValueError(f"{where}: key '{key}' has {type(value).__name__} {value!r}, expected "
                             f"{describe(hints[key])}")
