"""The windows a run trains on, collated (and noised) off the training thread.

A window is `grad_accum` collated micro-batches, this rank's share of each global batch. `windows(data, epoch,
start, steps, collate, noised, log, prefetch)` yields (index, window, state) of the training data's epoch
(finetune.data.training: a corpus or a stream, alike) from where a resume picks up until the run's last step.
With `prefetch` > 0 a background thread collates up to that many windows ahead while the step runs (the same
windows in the same order: collation and noise are functions of (seed, epoch, example), not of time); 0
collates on the training thread.
"""
from __future__ import annotations

import queue
import threading

from finetune.data.noise import add_noise
from finetune.data.tokenize import Example


def windows(data, epoch: int, start: tuple[int, int], steps: int, collate, noised, log, prefetch: int):
    """(index, window, state) of one epoch of `data`, at most `steps` windows, collated `prefetch` ahead."""
    yield from prefetched(data.windows(epoch, start, steps, collate, noised, log), prefetch)


def noiser(noise, tokenizer, seed: int):
    """A function (example, epoch, index) -> the example's source corrupted by `noise` (a NoiseConfig), seeded by
    (seed, epoch, index): the same noise again on resume. No noise (None, or nothing active): the example itself.

    The batches were cut by the sources' lengths before noise (`max_tokens`, `max_source_length`), and text
    infilling's 0-length spans insert mask tokens: a noised source longer than its original is cut back to the
    original length, keeping its last token (eos), so no batch exceeds its budget."""
    def noised(example: Example, epoch: int, index: int) -> Example:
        if noise is None or not noise.active:
            return example
        ids, n = add_noise(example.input_ids, noise, tokenizer, seed=[seed, epoch, index]), len(example.input_ids)
        if len(ids) > n:
            ids = ids[:n - 1] + ids[-1:]
        return Example(ids, example.labels)
    return noised


def prefetched(items, depth: int):
    """`items`, produced by a background thread up to `depth` ahead (0: in the caller's thread). An error in the
    producer is raised here, at the item it failed on; closing this generator stops the producer."""
    if depth <= 0:
        yield from items
        return
    buffer, stop = queue.Queue(depth), threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the consumer, which raises it
            put(("error", err))

    thread = threading.Thread(target=produce, name="finetune-collate", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
