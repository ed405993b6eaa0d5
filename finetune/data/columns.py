"""Tokenised examples as int32 columns: what a run trains and evaluates on, whatever the data's size.

`Examples` is a sequence of `Example` (lists of ints, as the collator and the noise take them) over blocks of
int32 token ids with int64 offsets, memory-mapped from finetune.data.corpus's Arrow cache or packed in memory: 1M
pairs of 100 tokens are 800 MB of ids, not the ~6 GB of two lists of Python ints. `Examples.fingerprint` (what a
resumed run must see again) hashes 16 bytes per example, so it is the same however the examples were blocked.
"""
from __future__ import annotations

import collections.abc
import hashlib

import numpy as np

from finetune.data.tokenize import Example, TokenizeReport, tokenize_pairs


class Block:
    """`n` examples as int32 ids with int64 offsets (row i: values[offsets[i]:offsets[i+1]]) and their texts."""

    def __init__(self, src_values, src_offsets, tgt_values, tgt_offsets, sources, targets):
        self.src_values, self.src_offsets = src_values, src_offsets
        self.tgt_values, self.tgt_offsets = tgt_values, tgt_offsets
        self.sources, self.targets = sources, targets  # lists of str, or pyarrow string arrays (memory-mapped)
        self.n = len(src_offsets) - 1

    @classmethod
    def pack(cls, examples: list[Example], pairs) -> "Block":
        def column(seqs):
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in seqs], out=offsets[1:])
            values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
            return values, offsets

        return cls(*column([e.input_ids for e in examples]), *column([e.labels for e in examples]),
                   [s for s, _ in pairs], [t for _, t in pairs])

    def example(self, j: int) -> Example:
        so, to = self.src_offsets, self.tgt_offsets
        return Example(self.src_values[so[j]:so[j + 1]].tolist(), self.tgt_values[to[j]:to[j + 1]].tolist())

    def pair(self, j: int) -> tuple[str, str]:
        s, t = self.sources[j], self.targets[j]
        return (s, t) if isinstance(s, str) else (s.as_py(), t.as_py())

    def digests(self) -> bytes:
        """16 bytes per example (its ids), in order: what `Examples.fingerprint` hashes."""
        so, to = self.src_offsets, self.tgt_offsets
        return b"".join(hashlib.blake2b(self.src_values[so[j]:so[j + 1]].tobytes() + b"|" +
                                        self.tgt_values[to[j]:to[j + 1]].tobytes(), digest_size=16).digest()
                        for j in range(self.n))


class Examples(collections.abc.Sequence):
    """The tokenised examples of one data set, in blocks of int32 columns; `examples[i]` is an `Example`."""

    def __init__(self, blocks: list[Block], report: TokenizeReport, fingerprint: str | None = None,
                 origin: str = "tokenised in memory", path: str | None = None):
        self.blocks = [b for b in blocks if b.n]
        self.starts = np.cumsum([0] + [b.n for b in self.blocks])
        self.report, self.origin, self.path = report, origin, path  # path: the Arrow file, when cached
        self.fingerprint = fingerprint or hashlib.sha256(b"".join(b.digests() for b in self.blocks)).hexdigest()
        self.source_lengths = _lengths(self.blocks, "src_offsets")
        self.target_lengths = _lengths(self.blocks, "tgt_offsets")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[Block, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        i %= len(self)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.blocks[k], i - int(self.starts[k])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        block, j = self._locate(int(i))
        return block.example(j)

    def pair(self, i: int) -> tuple[str, str]:
        block, j = self._locate(int(i))
        return block.pair(j)

    def pairs(self) -> "Pairs":
        return Pairs(self)

    def dataset(self):
        """The cached Arrow file as a `datasets.Dataset` (memory-mapped), for inspection or reuse."""
        if self.path is None:
            raise ValueError("these examples were tokenised in memory: there is no Arrow file to open")
        import datasets

        return datasets.Dataset.from_file(self.path)


class Pairs(collections.abc.Sequence):
    """The (source, target) texts of `Examples`, read on demand."""

    def __init__(self, examples: Examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.examples.pair(i)


def _lengths(blocks, name) -> np.ndarray:
    if not blocks:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate([np.diff(getattr(b, name)).astype(np.int32) for b in blocks])


def in_memory(pairs, tokenizer, max_source_length: int, max_target_length: int, decoder_start: int,
              fingerprint: str | None = None) -> Examples:
    """`pairs` tokenised in this process (finetune.data.tokenize_pairs) and packed into one block."""
    examples, report = tokenize_pairs(pairs, tokenizer, max_source_length, max_target_length, decoder_start)
    return Examples([Block.pack(examples, pairs)], report, fingerprint)
