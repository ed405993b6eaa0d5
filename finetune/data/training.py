"""One way into the training data: whatever `fit` receives becomes one object the loop reads without asking what
it is.

`open_training_data(data, tokenizer, config, decoder_start, dist)` gives

- a `Corpus` for a list of pairs, a file, a folder of shards, "hf:PATH" or a `datasets.Dataset`: read and
  tokenised whole (finetune.data.corpus: cached on disk for files), every epoch cut into batches by the sampler
  the config chooses (finetune.data.batching.training_sampler);
- a `Stream` for `streaming=True` or a `datasets.IterableDataset`: tokenised buffer by buffer as it is read
  (finetune.data.stream), the same sampler choice made per buffer.

Both answer the same questions: `description` (for the log), `fingerprint` (checked on resume), `schedule()`
(steps of the first epoch, total steps, epochs), `windows(...)` (the windows of micro-batches from where a resume
picks up, each with its state: the padding share and, for a stream, the position a checkpoint records),
`resume(state, rank)` (a checkpoint's progress) and `sample()` (the pairs and examples `finetune check` looks at).
"""
from __future__ import annotations

from finetune.data import corpus
from finetune.data.batching import epoch_padding, schedule_of, training_sampler
from finetune.data.sources import is_stream
from finetune.data.stream import Stream


def open_training_data(data, tokenizer, config, decoder_start: int, dist) -> "Corpus | Stream":
    """The training data of a run, as `config` (a TrainConfig) says to read it; `dist`: this process's place under
    torchrun (finetune.distributed.DistInfo)."""
    if config.streaming or is_stream(data):
        return Stream(data, tokenizer, config, decoder_start, dist.rank, dist.world_size)
    pairs, examples = corpus.load(data, tokenizer, config, decoder_start, "training data", dist)
    return Corpus(pairs, examples, config, dist.rank, dist.world_size)


class Corpus:
    """Training data read and tokenised whole: the pairs, their int32 examples, and the sampler over them."""

    def __init__(self, pairs, examples, config, rank: int = 0, world: int = 1):
        self.pairs, self.examples, self.config, self.rank, self.world = pairs, examples, config, rank, world
        self.sampler = training_sampler(config, examples, world)
        self.fingerprint = examples.fingerprint
        self.description = f"{examples.report} ({examples.origin})"

    def schedule(self) -> tuple[int, int, int]:
        return schedule_of(self.config, self.sampler)

    def windows(self, epoch: int, start: tuple[int, int], steps: int, collate, noised, log):
        """(index, window, state) of one epoch, after the windows a resume `start` (epoch, window) consumed, at most
        `steps` of them: `grad_accum` collated micro-batches each, this rank's share of every global batch."""
        cfg, rank, world = self.config, self.rank, self.world
        batches = self.sampler.batches(epoch)
        state = {"padding": epoch_padding(cfg, batches, self.examples, world), "position": None}
        log(f"epoch {epoch}: {len(batches)} batches, padding {state['padding']:.1%} of the padded tokens")
        for index, first in enumerate(range(0, len(batches), cfg.grad_accum)):
            if (epoch, index) < start:
                continue  # consumed before the checkpoint we resumed from
            if steps <= 0:
                return
            steps -= 1
            yield index, [collate([noised(self.examples[i], epoch, i) for i in b[rank::world]])
                          for b in batches[first:first + cfg.grad_accum]], state

    def resume(self, state: dict, rank: int) -> None:
        """Nothing to restore: the epoch and window of `state` say where `windows` picks up."""

    def first_batches(self):
        """(batches, examples) of the first epoch."""
        return self.sampler.batches(0), self.examples

    def sample(self):
        """(pairs, examples, where they came from) for `finetune check`."""
        return self.pairs, self.examples, f"{self.examples.report} ({self.examples.origin})"
