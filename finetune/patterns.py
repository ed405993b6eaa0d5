"""Compiling the user's regexes once, with an error that names the parameter and the bad pattern."""
from __future__ import annotations

import re


def compile_patterns(patterns, what: str) -> list[re.Pattern]:
    """A list of compiled regexes from a list (or one string) of patterns; `what` names the parameter."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"{what}: invalid regex {p!r}: {err}") from None
    return out
