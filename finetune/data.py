"""Text pairs -> tokenised examples -> padded, shifted, masked batches: the in-memory path.

Files are read by finetune.sources (every format, each bad row named by file and line); data too large to hold
as Python lists goes through finetune.corpus (tokenised in worker processes, cached on disk as Arrow).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .batching import LengthGroupedBatches  # noqa: F401  (its old home)
from .masks import decoder_attention_mask, pad_inputs, pad_labels, shift_tokens_right
from .sources import DataError, check_row, is_dataset, is_stream, mapping_pair, open_source, parse_chunk

__all__ = ["DataError", "LengthGroupedBatches", "read_pairs", "tokenize_pairs", "Collator", "Example"]


Pair = tuple[str, str]


def read_pairs(data, source_field: str = "source", target_field: str = "target", name: str = "data") -> list[Pair]:
    """(source, target) pairs, all in memory, from a file or folder (finetune.sources: .jsonl/.json/.tsv/.csv/
    .parquet, shards, "hf:PATH"), a `datasets.Dataset`, a sequence of pairs, or a sequence of mappings with
    `source_field` / `target_field`. `name` says which data an error is about where no file names it
    ("evaluation data[3]: ..."). Large files go through finetune.corpus instead, which never holds them whole."""
    if isinstance(data, (str, os.PathLike)) or is_dataset(data):
        source = open_source(data, name)
        pairs = [p for chunk in source.chunks(source_field, target_field)
                 for p in parse_chunk(chunk, source_field, target_field)]
        if not pairs:
            raise source.no_pairs()
        return pairs
    if isinstance(data, dict) and data and all(is_dataset(v) or is_stream(v) for v in data.values()):
        raise DataError(f"{name}: a DatasetDict of the splits {sorted(data)}: pass one split, e.g. "
                        f"dataset[{sorted(data)[0]!r}]")
    if isinstance(data, (bytes, dict)) or not hasattr(data, "__iter__"):
        raise DataError(f"{name}: expected a file path, a list of (source, target) pairs or of mappings, or a "
                        f"datasets.Dataset; got {type(data).__name__}")
    pairs = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping):  # a dict
            item = mapping_pair(f"{name}[{i}]", item, source_field, target_field)
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise DataError(f"{name}[{i}]: expected a (source, target) pair of strings, got {item!r:.200}")
        pairs.append(check_row(f"{name}[{i}]", item[0], item[1]))
    if not pairs:
        raise DataError(f"{name}: no pairs given")
    return pairs


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


class Collator:
    """Examples -> a batch: inputs padded with pad, labels with -100, decoder inputs shifted from labels."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: int):
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_inputs([e.input_ids for e in examples], self.pad_token_id)
        labels = pad_labels([e.labels for e in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": shift_tokens_right(labels, self.pad_token_id, self.decoder_start_token_id),
            "decoder_attention_mask": decoder_attention_mask(labels),
            "labels": labels,
        }
