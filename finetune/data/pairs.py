"""(source, target) pairs read into memory from any source: a file or folder (finetune.data.sources: every
format, each bad row named by file and line), a datasets.Dataset, a list of pairs or of mappings.

Data too large to hold as Python lists goes through finetune.data.corpus (tokenised in worker processes, cached
on disk as Arrow) or finetune.data.stream instead.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from finetune.data.sources import DataError, check_row, is_dataset, is_stream, mapping_pair, open_source, parse_chunk

Pair = tuple[str, str]


def read_pairs(data, source_field: str = "source", target_field: str = "target", name: str = "data") -> list[Pair]:
    """(source, target) pairs, all in memory, from a file or folder (finetune.data.sources: .jsonl/.json/.tsv/.csv/
    .parquet, shards, "hf:PATH"), a `datasets.Dataset`, a sequence of pairs, or a sequence of mappings with
    `source_field` / `target_field`. `name` says which data an error is about where no file names it
    ("evaluation data[3]: ..."). Large files go through finetune.data.corpus instead, which never holds them whole."""
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
