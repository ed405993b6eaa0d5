"""The windows a run trains on, collated (and noised) off the training thread.

A window is `grad_accum` collated micro-batches, this rank's share of each global batch. `windows(engine, run,
epoch)` yields (index, window) from where a resume picks up until the run's last step: from the sampler's
batches of the epoch (finetune.data.batching), or from a stream (finetune.data.stream). With `TrainConfig.prefetch` > 0 a
background thread collates up to that many windows ahead while the step runs (the same windows in the same
order: collation and noise are functions of (seed, epoch, example), not of time); 0 collates on the training
thread.
"""
from __future__ import annotations

import queue
import threading

from finetune.data.batching import padding_fraction
from finetune.data.tokenize import Example
from finetune.data.noise import add_noise


def windows(engine, run, epoch: int):
    """(index, window) of one epoch; sets `engine.padding` (and, for a stream, `engine.stream_position`: where
    a resume after the window just yielded picks up)."""
    cfg = engine.config
    if hasattr(run.sampler, "windows"):  # a stream
        source = run.sampler.windows(engine, run.start[1] if run.start[0] == epoch else 0,
                                     run.total_steps - engine.global_step)
    else:
        world = engine.dist.world_size
        batches = run.sampler.batches(epoch)
        engine.padding = padding_fraction(batches, run.examples, world)  # the train records of this epoch carry it
        engine.recorder.log(f"epoch {epoch}: {len(batches)} batches, padding {engine.padding:.1%} of the padded tokens")
        source = _planned(engine, run, epoch, batches)
    for index, window, state in prefetched(source, cfg.prefetch):
        if state is not None:
            engine.stream_position, engine.padding = state, state["padding"]
        yield index, window


def _planned(engine, run, epoch: int, batches):
    cfg, world, rank = engine.config, engine.dist.world_size, engine.dist.rank
    remaining = run.total_steps - engine.global_step  # steps left when the epoch starts: windows to make at most
    for index, start in enumerate(range(0, len(batches), cfg.grad_accum)):
        if (epoch, index) < run.start:
            continue  # consumed before the checkpoint we resumed from
        if remaining <= 0:
            return
        remaining -= 1
        yield index, [engine.collate([noised(engine, run.examples[i], epoch, i) for i in b[rank::world]])
                      for b in batches[start:start + cfg.grad_accum]], None


def noised(engine, example: Example, epoch: int, index: int) -> Example:
    """The training source corrupted by `engine.noise`, seeded by (seed, epoch, index): resumable."""
    if engine.noise is None or not engine.noise.active:
        return example
    source = add_noise(example.input_ids, engine.noise, engine.tokenizer, seed=[engine.config.seed, epoch, index])
    return Example(source, example.labels)


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
