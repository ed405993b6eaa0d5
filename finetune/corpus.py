"""Tokenised data at any size: int32 columns, tokenised once in worker processes, cached on disk as Arrow.

`load(data, tokenizer, settings)` gives the (pairs, examples) of one data set:

- a file, a folder of shards, "hf:PATH" or a `datasets.Dataset`, with pyarrow installed (`finetune[data]`) and
  `cache_data` on: read once front to back (finetune.sources), parsed, checked and tokenised in `num_proc`
  worker processes, chunk by chunk in order, and written as an Arrow stream file (the format of `datasets`' own
  cache: `datasets.Dataset.from_file` opens it) under CACHE_DIR/<key>/, the key being the data's identity (each
  file's path, size and modification time, or the dataset's fingerprint), the tokenizer (its vocabulary, rules
  and special tokens), the lengths, the fields and the decoder start token. The examples are then read from
  that file memory-mapped: a second run on the same data starts without tokenising, and the log says so.
- a Python list (or pyarrow missing, or `cache_data=False`): read and tokenised in this process
  (finetune.data), then packed into the same int32 columns.

Either way, `Examples` is a sequence of `Example` (lists of ints, as the collator and the noise take them) over
int32 arrays: 1M pairs of 100 tokens are 800 MB of ids, not the ~6 GB of two lists of Python ints.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time

import numpy as np

from .data import Example, TokenizeReport, tokenize_pairs
from .sources import DataError, open_source, parse_chunk

FORMAT = 1  # of the cache folders; part of the key


def cache_root(cache_dir: str | None) -> str:
    return os.path.expanduser(cache_dir or os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune")


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


# ----------------------------------------------------------------------------------------------
# the cache


def cache_key(source, tokenizer, settings: dict) -> str:
    """What the tokenised examples depend on: the data's identity, the tokenizer, the lengths, the fields and the
    decoder start token (`settings`), and this module's format."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "data": source.identity, "settings": settings}).encode())
    h.update(tokenizer_identity(tokenizer).encode())
    return h.hexdigest()[:32]


def tokenizer_identity(tokenizer) -> str:
    """A digest of what decides the ids: the class, the tokenizer's full definition (a fast tokenizer's JSON:
    vocabulary, normaliser, pre-tokeniser, post-processor) or vocabulary, and the special tokens."""
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    kwargs = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k != "name_or_path"}
    h.update(json.dumps([tokenizer.all_special_tokens, tokenizer.all_special_ids, kwargs], sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def open_cached(folder: str) -> Examples:
    import pyarrow as pa

    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    path = os.path.join(folder, "examples.arrow")
    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()  # zero-copy: pages are read as they are used
    blocks = []
    for batch in table.to_batches():
        src, tgt = batch.column("input_ids"), batch.column("labels")
        blocks.append(Block(src.values.to_numpy(), src.offsets.to_numpy().astype(np.int64),
                            tgt.values.to_numpy(), tgt.offsets.to_numpy().astype(np.int64),
                            batch.column("source"), batch.column("target")))
    report = TokenizeReport(**meta["report"])
    return Examples(blocks, report, meta["fingerprint"], meta["origin"], path)


# ----------------------------------------------------------------------------------------------
# tokenising in worker processes

_WORKER: dict = {}


def _init_worker(tokenizer, fields, lengths, decoder_start):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core a worker: the workers are the parallelism
    _WORKER.update(tokenizer=tokenizer, fields=fields, lengths=lengths, decoder_start=decoder_start)


def _tokenize_chunk(chunk):
    """A chunk -> (Block, truncation counts, digests): runs in a worker (or in this process with num_proc=1)."""
    w = _WORKER
    pairs = parse_chunk(chunk, *w["fields"])
    if not pairs:
        return None
    examples, report = tokenize_pairs(pairs, w["tokenizer"], *w["lengths"], w["decoder_start"])
    block = Block.pack(examples, pairs)
    return block, report, block.digests()


def build(source, folder: str, tokenizer, fields, lengths, decoder_start: int, num_proc: int) -> None:
    """Tokenise `source` into folder/examples.arrow + meta.json, written beside it and moved into place whole."""
    import multiprocessing

    import pyarrow as pa

    schema = pa.schema([("source", pa.string()), ("target", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("labels", pa.list_(pa.int32()))])
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    started, counts, digest, pool = time.perf_counter(), [0, 0, 0], hashlib.sha256(), None
    try:
        with open(os.path.join(tmp, "examples.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            def write(result):
                if result is None:
                    return
                block, report, digests = result
                counts[0] += report.examples
                counts[1] += report.truncated_sources
                counts[2] += report.truncated_targets
                digest.update(digests)
                offsets = [pa.array(o.astype(np.int32)) for o in (block.src_offsets, block.tgt_offsets)]
                writer.write_batch(pa.record_batch([
                    pa.array(block.sources, pa.string()), pa.array(block.targets, pa.string()),
                    pa.ListArray.from_arrays(offsets[0], pa.array(block.src_values)),
                    pa.ListArray.from_arrays(offsets[1], pa.array(block.tgt_values))], schema=schema))

            args = (tokenizer, fields, lengths, decoder_start)
            if num_proc <= 1:
                saved = dict(_WORKER)
                _WORKER.update(tokenizer=tokenizer, fields=fields, lengths=lengths, decoder_start=decoder_start)
                try:
                    for chunk in source.chunks(*fields):
                        write(_tokenize_chunk(chunk))
                finally:
                    _WORKER.clear()
                    _WORKER.update(saved)
            else:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                pool = multiprocessing.get_context(method).Pool(num_proc, _init_worker, args)
                pending = collections.deque()
                try:
                    for chunk in source.chunks(*fields):
                        pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
                        while len(pending) >= 2 * num_proc:  # bounded: a few chunks in flight, never the file
                            write(pending.popleft().get())
                except DataError:
                    while pending:  # a bad row in an earlier chunk is the one to report
                        write(pending.popleft().get())
                    raise
                while pending:
                    write(pending.popleft().get())
        if not counts[0]:
            raise DataError(f"{source.description}: no pairs in the file" if source.files else
                            f"{source.description}: no pairs")
        seconds = time.perf_counter() - started
        meta = {"format": FORMAT, "source": source.description, "report": dict(zip(
                    ("examples", "truncated_sources", "truncated_targets"), counts)),
                "fingerprint": digest.hexdigest(), "num_proc": num_proc, "seconds": round(seconds, 3),
                "origin": f"tokenised in {num_proc} process(es) in {seconds:.1f} s on "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}"}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, "meta.json")):  # not another process's finished copy
                raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# the one entry point


def load(data, tokenizer, config, decoder_start: int, name: str = "data", dist=None):
    """(pairs, Examples) of `data`, read and tokenised as `config` (a TrainConfig) says: lengths, fields,
    cache_data, cache_dir, num_proc. Under torchrun (`dist`) rank 0 tokenises and the other ranks read its cache."""
    from .data import is_dataset, read_pairs

    fields = (config.source_field, config.target_field)
    lengths = (config.max_source_length, config.max_target_length)
    cached = config.cache_data and (isinstance(data, (str, os.PathLike)) or is_dataset(data)) and _have_pyarrow()
    if not cached:
        pairs = read_pairs(data, *fields, name)
        examples, report = tokenize_pairs(pairs, tokenizer, *lengths, decoder_start)
        return pairs, Examples([Block.pack(examples, pairs)], report)
    source = open_source(data, name)
    key = cache_key(source, tokenizer, {"fields": fields, "lengths": lengths, "decoder_start": decoder_start})
    folder = os.path.join(cache_root(config.cache_dir), key)
    main = dist is None or dist.is_main
    built, failure = False, None
    if main and not os.path.exists(os.path.join(folder, "meta.json")):
        try:
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            build(source, folder, tokenizer, fields, lengths, decoder_start, config.num_proc or default_num_proc())
            built = True
        except Exception as err:  # under torchrun the other ranks must hear of it too, not wait for ever
            failure = err
    if dist is not None and dist.enabled:  # the other ranks wait for rank 0's cache, and share its verdict
        from . import distributed

        message = distributed.gather_objects(str(failure) if failure else None, dist)[0]
        failure = failure or (DataError(f"rank 0 could not read the data: {message}") if message else None)
    if failure is not None:
        raise failure
    examples = open_cached(folder)
    examples.origin = (f"{examples.origin}; cached in {folder}" if built else
                       f"cache hit {folder} ({examples.origin}; not tokenised again)")
    return examples.pairs(), examples


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True
