"""Training data read as a stream: tokenised as it is needed, never up front, for data too large to tokenise
ahead or that arrives as a `datasets.IterableDataset`.

Rows are read front to back (finetune.data.sources for files; an IterableDataset row by row). Under torchrun every
rank keeps its own shard: of a folder whose shard files divide among the ranks, files rank, rank + world, ...
(the others are never opened); of one file (or shards that do not divide), the rows r with r % world == rank
(the others are read, never tokenised); of an IterableDataset, `datasets.distributed.split_dataset_by_node`.
Each rank fills a buffer of `stream_buffer` rows, tokenises it, and cuts it into micro-batches with the run's
sampler (finetune.data.batching: `batch_size` examples or a `max_tokens` budget, length-grouped within the buffer,
shuffled by (seed, pass, buffer)); `grad_accum` consecutive micro-batches make a window. At the end of the data
the next pass starts, so a stream has no epochs: the run lasts `max_steps`, which a streamed run must declare.

Exact resume: the position after each window — (pass, buffer, micro-batches of it used) — goes into every
checkpoint, for every rank; a resume reads and skips the rows of the buffers before it (no tokenising), makes
that buffer's batches again and continues after the used ones: the same batches, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os

from finetune.data.batching import epoch_padding, sampler_for
from finetune.data.columns import in_memory
from finetune.data.sources import DataError, file_chunks, is_dataset, is_stream, mapping_pair, open_source, parse_chunk


def check_stream_settings(config) -> None:
    """A streamed run lasts `max_steps` (it cannot count its steps from data it has not read) in one "epoch":
    checked by TrainConfig for streaming=True, and here for a datasets.IterableDataset given without it."""
    if not config.max_steps:
        raise ValueError(f"TrainConfig.max_steps={config.max_steps!r}: a streamed run reads its data as it goes, so "
                         "it cannot count its steps from the data; declare how many optimizer steps to take")
    if config.epochs != 1:
        raise ValueError(f"TrainConfig.epochs={config.epochs}: a streamed run lasts max_steps, passing over the "
                         "data as often as that takes: leave epochs at 1")


class Stream:
    def __init__(self, data, tokenizer, config, decoder_start: int, rank: int = 0, world: int = 1,
                 name: str = "training data"):
        check_stream_settings(config)
        self.data, self.tokenizer, self.config, self.decoder_start = data, tokenizer, config, decoder_start
        self.rank, self.world, self.name = rank, world, name
        if not (is_stream(data) or isinstance(data, (str, os.PathLike)) or is_dataset(data)):
            raise ValueError(f"TrainConfig.streaming: streams read a file, a folder, hf:PATH, a datasets.Dataset or "
                             f"IterableDataset; a {type(data).__name__} is in memory already: drop streaming=True")
        if is_stream(data):
            self.description = f"{name}: a datasets.IterableDataset ({data.n_shards} shard(s)), streamed"
            self.fields_checked = False
        else:
            self.source = open_source(data, name)
            self.description = f"{self.source.description}, streamed"
        self.resume_at = None  # a checkpoint's stream position for this rank
        self.first_buffer = None  # `sample()`'s, kept
        identity = [str(getattr(data, "_fingerprint", None) or getattr(data, "info", ""))] if is_stream(data) else \
            self.source.identity
        self.fingerprint = "stream:" + hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()

    # ------------------------------------------------------------------------------------------
    # rows

    def rows(self):
        """(row number in this rank's shard, source, target), checked, for one pass over the data."""
        cfg = self.config
        fields = (cfg.source_field, cfg.target_field)
        n = 0
        if is_stream(self.data):
            data = self.data
            if self.world > 1:
                from datasets.distributed import split_dataset_by_node

                data = split_dataset_by_node(data, rank=self.rank, world_size=self.world)
            for i, row in enumerate(data):
                yield (n, *mapping_pair(f"{self.name}: stream row [{i}]", row, *fields))
                n += 1
            return
        files = self.source.files
        if self.world > 1 and len(files) % self.world == 0:  # shards: each rank reads its own files only
            for path in files[self.rank::self.world]:
                for chunk in file_chunks(path, *fields):
                    for pair in parse_chunk(chunk, *fields):
                        yield (n, *pair)
                        n += 1
            return
        r = 0
        for chunk in self.source.chunks(*fields):
            for pair in parse_chunk(chunk, *fields):
                if r % self.world == self.rank:  # one file (or shards that do not divide): every world-th row
                    yield (n, *pair)
                    n += 1
                r += 1

    def buffers(self, start_pass: int, start_buffer: int):
        """(pass, buffer number, [(row, source, target)]) forever, from `start_buffer` of `start_pass` (the rows
        of the buffers before it read and skipped)."""
        size, p = self.config.stream_buffer, start_pass
        while True:
            buffer, any_rows = [], False
            for row in self.rows():
                any_rows = True
                if p == start_pass and row[0] < start_buffer * size:
                    continue
                buffer.append(row)
                if len(buffer) == size:
                    yield p, row[0] // size, buffer
                    buffer = []
            if buffer:
                yield p, buffer[0][0] // size, buffer
            if not any_rows:
                raise DataError(f"{self.description}: no rows for rank {self.rank} of {self.world}" if self.world > 1
                                else f"{self.description}: no pairs")
            p += 1

    # ------------------------------------------------------------------------------------------
    # windows

    def sampler(self, examples, p: int, b: int):
        """The batches of one buffer: the run's sampler (finetune.data.batching.sampler_for) over the whole buffer,
        shuffled by (seed, pass, buffer)."""
        seed = (self.config.seed * 1_000_003 + p) * 1_000_003 + b  # a different shuffle for every buffer of every pass
        return sampler_for(self.config, examples.source_lengths.tolist(), examples.target_lengths.tolist(), 1, seed,
                           whole_buffer=True)

    def schedule(self) -> tuple[int, int, int]:
        """A stream has no epochs: `max_steps` steps, counted as one epoch."""
        return self.config.max_steps, self.config.max_steps, 1

    def resume(self, state: dict, rank: int) -> None:
        """Pick up at this rank's stream position of a checkpoint's progress."""
        self.resume_at = state["stream"][rank]

    def sample(self):
        """(pairs, examples, where they came from) of the first buffer, for `finetune check`: read and tokenised
        once, however often the checks ask."""
        if self.first_buffer is None:
            pairs = [(s, t) for _, s, t in next(self.buffers(0, 0))[2]]
            examples = in_memory(pairs, self.tokenizer, self.config.max_source_length, self.config.max_target_length,
                                 self.decoder_start)
            self.first_buffer = (pairs, examples,
                                 f"{self.description}; checked here: its first buffer of {len(pairs)} rows")
        return self.first_buffer

    def first_batches(self):
        """(batches, examples) of the first buffer."""
        _, examples, _ = self.sample()
        return self.sampler(examples, 0, 0).batches(0), examples

    def windows(self, epoch: int, start: tuple[int, int], steps: int, collate, noised, log):
        """(index, window, state) for `steps` windows from the resume position (if any); the state holds the
        position a resume after that window picks up at, and the buffer's padding share."""
        cfg = self.config
        at = self.resume_at or {"pass": 0, "buffer": 0, "batch": 0}
        index, pending = start[1] if start[0] == epoch else 0, []
        if steps <= 0:
            return
        for p, b, rows in self.buffers(at["pass"], at["buffer"]):
            pairs = [(s, t) for _, s, t in rows]
            examples = in_memory(pairs, self.tokenizer, cfg.max_source_length, cfg.max_target_length,
                                 self.decoder_start, fingerprint="stream")  # a buffer's: not hashed
            batches = self.sampler(examples, p, b).batches(0)
            padding = epoch_padding(cfg, batches, examples)
            log(f"stream pass {p} buffer {b}: {len(rows)} rows from row {rows[0][0]}, {len(batches)} batches, "
                f"padding {padding:.1%}; {examples.report}")
            first = at["batch"] if (p, b) == (at["pass"], at["buffer"]) else 0
            for j in range(first, len(batches)):
                pending.append(collate([noised(examples[i], p, rows[i][0]) for i in batches[j]]))
                if len(pending) == cfg.grad_accum:
                    position = {"pass": p, "buffer": b, "batch": j + 1, "padding": padding}
                    if j + 1 == len(batches):
                        position.update(buffer=b + 1, batch=0)
                    yield index, pending, {"padding": padding, "position": position}
                    index, pending, steps = index + 1, [], steps - 1
                    if steps == 0:
                        return
