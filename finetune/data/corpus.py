"""Tokenised data at any size: int32 columns, tokenised once in worker processes, cached on disk as Arrow.

`load(data, tokenizer, config, decoder_start)` gives the (pairs, examples) of one data set:

- a file, a folder of shards, "hf:PATH" or a `datasets.Dataset`, with pyarrow installed (`finetune[data]`) and
  `cache_data` on: read once front to back (finetune.data.sources), parsed, checked and tokenised in `num_proc`
  worker processes, chunk by chunk in order, and written as an Arrow stream file (the format of `datasets`' own
  cache: `datasets.Dataset.from_file` opens it) under CACHE_DIR/<key>/, the key being the data's identity (each
  file's path, size and modification time, or the dataset's fingerprint), the tokenizer (its vocabulary, rules
  and special tokens), the lengths, the fields and the decoder start token. The examples are then read from
  that file memory-mapped: a second run on the same data starts without tokenising, and the log says so.
- a Python list (or pyarrow missing, or `cache_data=False`): read and tokenised in this process
  (finetune.data.pairs), then packed into the same int32 columns.

Either way the result is finetune.data.columns.Examples: int32 columns, a sequence of `Example`.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import time

import numpy as np

from finetune.data.columns import Block, Examples, in_memory
from finetune.data.sources import CHUNK_ROWS, DataError, is_dataset, open_source, parse_chunk
from finetune.data.tokenize import TokenizeReport, tokenize_pairs

FORMAT = 2  # of the cache folders; part of the key (2: files known by inode change time too; a content digest)


def cache_root(cache_dir: str | None) -> str:
    return os.path.expanduser(cache_dir or os.environ.get("FINETUNE_CACHE") or "~/.cache/finetune")


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
    """The examples of a finished cache folder, memory-mapped; an error if its file holds fewer than were written."""
    import pyarrow as pa

    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    path = os.path.join(folder, "examples.arrow")
    if file_digest(path) != meta.get("sha256"):  # a file damaged in place: a flipped id would train silently
        raise ValueError(f"{path}: its content digest differs from the one written with it (meta.json sha256)")
    table = pa.ipc.open_stream(pa.memory_map(path)).read_all()  # zero-copy: pages are read as they are used
    blocks = []
    for batch in table.to_batches():
        src, tgt = batch.column("input_ids"), batch.column("labels")
        blocks.append(Block(src.values.to_numpy(), src.offsets.to_numpy().astype(np.int64),
                            tgt.values.to_numpy(), tgt.offsets.to_numpy().astype(np.int64),
                            batch.column("source"), batch.column("target")))
    report = TokenizeReport(**meta["report"])
    examples = Examples(blocks, report, meta["fingerprint"], meta["origin"], path)
    if len(examples) != report.examples:
        raise ValueError(f"{len(examples)} examples where {report.examples} were written")
    return examples


def file_digest(path: str) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (hardware SHA on most x86 CPUs: about a second per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def remove_dead_builds(root: str) -> list[str]:
    """The `<key>.tmp-<pid>` folders of cache builds whose process is gone (killed mid-build): removed. A live
    builder's folder (its process exists, or belongs to another user) is never touched."""
    removed = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        stem, _, pid = name.rpartition(".tmp-")
        if not stem or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue  # another user's live process (or no such pid to ask about): leave it
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
    return removed


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
    import pyarrow as pa

    schema = pa.schema([("source", pa.string()), ("target", pa.string()), ("input_ids", pa.list_(pa.int32())),
                        ("labels", pa.list_(pa.int32()))])
    tmp = f"{folder}.tmp-{os.getpid()}"
    dead = remove_dead_builds(os.path.dirname(folder))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    started, counts, digest = time.perf_counter(), [0, 0, 0], hashlib.sha256()
    try:
        read = source.chunks(*fields)
        cores = default_num_proc()
        first = list(itertools.islice(read, min(num_proc, cores)))  # no more workers than cores or chunks
        workers = max(1, min(num_proc, cores, len(first)))
        chunks = _tokenised_chunks(itertools.chain(first, read), (tokenizer, fields, lengths, decoder_start), workers)
        with open(os.path.join(tmp, "examples.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
                contextlib.closing(chunks):
            for block, report, digests in chunks:
                counts[0] += report.examples
                counts[1] += report.truncated_sources
                counts[2] += report.truncated_targets
                digest.update(digests)
                offsets = [pa.array(o.astype(np.int32)) for o in (block.src_offsets, block.tgt_offsets)]
                writer.write_batch(pa.record_batch([
                    pa.array(block.sources, pa.string()), pa.array(block.targets, pa.string()),
                    pa.ListArray.from_arrays(offsets[0], pa.array(block.src_values)),
                    pa.ListArray.from_arrays(offsets[1], pa.array(block.tgt_values))], schema=schema))
        if not counts[0]:
            raise source.no_pairs()
        seconds = time.perf_counter() - started
        capped = "" if workers == num_proc else f" (num_proc {num_proc}: " + (
            f"the data is {len(first)} chunk(s) of {CHUNK_ROWS} rows)" if len(first) < min(num_proc, cores) else
            f"capped at the {cores} core(s))")
        cleaned = f"; removed {len(dead)} folder(s) of killed builds" if dead else ""
        meta = {"format": FORMAT, "source": source.description, "report": dict(zip(
                    ("examples", "truncated_sources", "truncated_targets"), counts)),
                "fingerprint": digest.hexdigest(), "num_proc": workers, "seconds": round(seconds, 3),
                "sha256": file_digest(os.path.join(tmp, "examples.arrow")),
                "origin": f"tokenised in {workers} process(es){capped} in {seconds:.1f} s on "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}{cleaned}"}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, "meta.json")):  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenised_chunks(chunks, args: tuple, num_proc: int):
    """(block, report, digests) of each of `chunks`, in file order: tokenised in this process (num_proc 1:
    its tokenizer keeps its own threads) or in `num_proc` worker processes, a few chunks in flight, never the
    file. A bad row raises here, the first in file order; the workers stop when this generator is closed."""
    import multiprocessing

    tokenizer, fields, lengths, decoder_start = args
    if num_proc <= 1:
        _WORKER.update(tokenizer=tokenizer, fields=fields, lengths=lengths, decoder_start=decoder_start)
        try:
            for chunk in chunks:
                result = _tokenize_chunk(chunk)
                if result is not None:
                    yield result
        finally:
            _WORKER.clear()  # holds no tokenizer after the build
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(num_proc, _init_worker, args)
    pending = collections.deque()
    try:
        try:
            for chunk in chunks:
                pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
                while len(pending) >= 2 * num_proc:
                    result = pending.popleft().get()
                    if result is not None:
                        yield result
        except DataError:
            while pending:  # a bad row in an earlier chunk is the one to report
                pending.popleft().get()
            raise
        while pending:
            result = pending.popleft().get()
            if result is not None:
                yield result
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------------------------
# the one entry point


def load(data, tokenizer, config, decoder_start: int, name: str = "data", dist=None):
    """(pairs, Examples) of `data`, read and tokenised as `config` (a TrainConfig) says: lengths, fields,
    cache_data, cache_dir, num_proc. Under torchrun (`dist`) rank 0 tokenises and the other ranks read its cache."""
    from finetune.data.pairs import read_pairs

    fields = (config.source_field, config.target_field)
    lengths = (config.max_source_length, config.max_target_length)
    cached = config.cache_data and (isinstance(data, (str, os.PathLike)) or is_dataset(data)) and _have_pyarrow()
    if not cached:
        pairs = read_pairs(data, *fields, name)
        return pairs, in_memory(pairs, tokenizer, *lengths, decoder_start)
    source = open_source(data, name)
    key = cache_key(source, tokenizer, {"fields": fields, "lengths": lengths, "decoder_start": decoder_start})
    folder = os.path.join(cache_root(config.cache_dir), key)
    main = dist is None or dist.is_main
    examples, built, failure, warning = None, False, None, ""
    if main and os.path.exists(os.path.join(folder, "meta.json")):
        try:
            examples = open_cached(folder)
        except Exception as err:  # e.g. a file cut short by a full disk (pyarrow's error), a short count: built again
            warning = f"the cache {folder} was damaged ({type(err).__name__}: {err}) and is tokenised again; "
            shutil.rmtree(folder, ignore_errors=True)
    if main and not os.path.exists(os.path.join(folder, "meta.json")):
        try:
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            build(source, folder, tokenizer, fields, lengths, decoder_start, config.num_proc or default_num_proc())
            built = True
        except OSError as err:  # the cache folder (a read error of the data is a DataError naming the file)
            failure = DataError(f"TrainConfig.cache_dir: cannot write the tokenised data to {folder} "
                                f"({err.strerror or err}); set cache_dir (or $FINETUNE_CACHE) to a writable folder "
                                "with room, or cache_data=False")
        except Exception as err:  # under torchrun the other ranks must hear of it too, not wait for ever
            failure = err
    if dist is not None and dist.enabled:  # the other ranks wait for rank 0's cache, and share its verdict
        from finetune import distributed

        message = distributed.gather_objects(str(failure) if failure else None, dist)[0]
        failure = failure or (DataError(f"rank 0 could not read the data: {message}") if message else None)
    if failure is not None:
        raise failure
    if examples is None:  # rank 0 opened its cache hit already
        examples = open_cached(folder)
    known = ("files known by path, size, modification and inode-change time" if source.files else
             "the dataset known by its fingerprint")
    examples.origin = warning + (f"{examples.origin}; cached in {folder} ({known})" if built else
                                 f"cache hit {folder} ({examples.origin}; {known}, content digest checked; not "
                                 "tokenised again)")
    return examples.pairs(), examples


def _have_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True
