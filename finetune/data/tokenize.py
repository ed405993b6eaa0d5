"""(source, target) pairs -> tokenised examples: truncated to the run's lengths, the truncations counted."""
from __future__ import annotations

from dataclasses import dataclass

Pair = tuple[str, str]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeReport:
    examples: int
    truncated_sources: int
    truncated_targets: int

    def __str__(self):
        return (f"{self.examples} examples; truncated: {self.truncated_sources} sources, "
                f"{self.truncated_targets} targets")


def _truncate(ids: list[int], max_length: int, special_ids: set[int]) -> list[int]:
    """Cut to max_length, keeping a final special token (eos / [SEP]) as the last one."""
    if len(ids) <= max_length:
        return ids
    if ids[-1] in special_ids:
        return ids[: max_length - 1] + ids[-1:]
    return ids[:max_length]


def tokenize_pairs(pairs: list[Pair], tokenizer, max_source_length: int, max_target_length: int,
                   decoder_start_token_id: int) -> tuple[list[Example], TokenizeReport]:
    """Tokenise sources and targets; truncate and count the truncations.

    A target that begins with the decoder start token (BERT's tokenizer puts [CLS] first, and [CLS] is
    bert2bert's start token) loses it: the shift puts it back, and keeping it would teach the decoder
    to read two start tokens.
    """
    sources = tokenizer([s for s, _ in pairs], add_special_tokens=True)["input_ids"]
    targets = tokenizer(text_target=[t for _, t in pairs], add_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    examples, cut_src, cut_tgt = [], 0, 0
    for src, tgt in zip(sources, targets):
        if tgt and tgt[0] == decoder_start_token_id:
            tgt = tgt[1:]
        cut_src += len(src) > max_source_length
        cut_tgt += len(tgt) > max_target_length
        examples.append(Example(_truncate(src, max_source_length, special), _truncate(tgt, max_target_length, special)))
    return examples, TokenizeReport(len(examples), cut_src, cut_tgt)
