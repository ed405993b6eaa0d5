"""Generation settings: the knobs of transformers' `generate` that summarisation and translation users set,
checked before any step runs and passed to `generate` only where set (None: the checkpoint's own
generation config decides, so a summarisation checkpoint keeps its length penalty and mBART its forced
first token)."""
from __future__ import annotations

from finetune.checks import is_finite_number, is_integer

SETTINGS = ("length_penalty", "early_stopping", "no_repeat_ngram_size", "min_new_tokens", "repetition_penalty")
BEAM_ONLY = ("length_penalty", "early_stopping")  # act in beam search only


_number, _integer = is_finite_number, is_integer


CHECKS = {
    "length_penalty": (_number, "must be a finite number (> 0 favours longer outputs, < 0 shorter)"),
    "early_stopping": (lambda v: isinstance(v, bool), "must be true or false"),
    "no_repeat_ngram_size": (lambda v: _integer(v) and v >= 0, "must be an integer >= 0 (0: off)"),
    "min_new_tokens": (lambda v: _integer(v) and v >= 0, "must be an integer >= 0"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "must be a number > 0 (1: off, > 1 discourages repeats)"),
}


def check_settings(values: dict, num_beams: int, max_new_tokens: int, where: str = "") -> None:
    """Refuse a bad value, `min_new_tokens` above `max_new_tokens`, and a beam-search setting where every
    generation is greedy (`num_beams`: the most beams any generation of the run uses)."""
    for name, value in values.items():
        if name not in CHECKS:
            raise ValueError(f"{where}{name}: not a generation setting (known: {', '.join(SETTINGS)})")
        ok, what = CHECKS[name]
        if value is not None and not ok(value):
            raise ValueError(f"{where}{name}={value!r}: {what}")
    low = values.get("min_new_tokens")
    if low is not None and _integer(max_new_tokens) and low > max_new_tokens:
        raise ValueError(f"{where}min_new_tokens={low} exceeds max_new_tokens={max_new_tokens}: no output could end")
    beams_only = [n for n in BEAM_ONLY if values.get(n) is not None]
    if beams_only and num_beams == 1:
        raise ValueError(f"{where}{', '.join(f'{n}={values[n]!r}' for n in beams_only)}: acts in beam search only, "
                         "and every generation of this run is greedy (num_beams=1); set num_beams > 1 or leave it "
                         "unset")


def settings_of(config) -> dict:
    """The generation settings a config sets (the rest are the checkpoint's)."""
    return {name: getattr(config, name) for name in SETTINGS if getattr(config, name) is not None}


def generate_kwargs(config, num_beams: int) -> dict:
    """The settings passed to `generate` for a call with `num_beams` beams (beam-only ones when beams > 1)."""
    values = settings_of(config)
    return {k: v for k, v in values.items() if num_beams > 1 or k not in BEAM_ONLY}
