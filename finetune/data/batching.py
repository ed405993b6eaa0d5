"""Which examples go into which micro-batch, epoch by epoch: deterministic, length-grouped, and either a fixed
number of examples (`batch_size`) or a budget of padded tokens (`max_tokens`).

Both samplers give every example exactly once per epoch, in an order fixed by (seed, epoch), so a resumed run
sees the same batches. Under torchrun the batches are global: rank r takes `batch[r::world]`.

`padding_fraction` says how much of an epoch's micro-batches is padding (the log and metrics.jsonl report it
each epoch).
"""
from __future__ import annotations

import math
import random
import statistics


class LengthGroupedBatches:
    """Deterministic batches of similar length: less padding, the same examples every epoch.

    Each epoch: shuffle with (seed, epoch), cut into mega-batches of `batch_size * mega` examples, sort
    each by length (longest first), cut into batches, shuffle the batch order. Every example appears
    exactly once per epoch; the last batch may be smaller. `group_by_length=False` gives plain shuffled
    batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group_by_length: bool = True,
                 shuffle: bool = True, mega: int = 50):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.shuffle = shuffle
        self.mega = mega

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def num_batches(self, epoch: int) -> int:
        return len(self)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = grouped_order(self.lengths, self.batch_size * self.mega, rng, self.shuffle, self.group_by_length)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches


def grouped_order(lengths, chunk: int, rng: random.Random, shuffle: bool, group: bool, key=None) -> list[int]:
    """Indices shuffled by `rng`, then (`group`) sorted longest first within consecutive chunks of `chunk`
    (`key(j)`: a sort key of example j instead of its length; smallest first)."""
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group:
        key = key or (lambda j: -lengths[j])
        chunks = [sorted(order[i:i + chunk], key=key) for i in range(0, len(order), chunk)]
        order = [j for c in chunks for j in c]
    return order


SOURCE_STEP = 8  # TokenBudgetBatches: sources within this many tokens sort together, then by target length


class TokenBudgetBatches:
    """Batches of as many examples as fit `max_tokens` padded tokens (source + target) per micro-batch.

    The order: shuffle by (seed, epoch), then sort within mega-batches of about `mega` batches by source length
    in steps of `SOURCE_STEP` tokens, and within a step by target length (longest first): sources and targets
    are padded separately, and sorting by their sum alone leaves the targets of a batch mixed (on the code job
    that was most of the padding: benchmarks/bench_batching.py). Then the sorted examples are packed greedily:
    a batch closes when one more group of `world` examples (one per rank) would take a rank's micro-batch past
    the budget, counted as ceil(n / world) x (longest source + longest target in the batch), the padded size of
    the largest share.
    Long examples so travel in small batches and short ones in large: the same tokens a step, little padding.
    Every example appears once per epoch; batch counts differ between epochs (`num_batches`). Under torchrun a
    last group of fewer than `world` examples joins the batch before it (taking that batch's last group with
    it if the budget needs), so every rank gets at least one example of every batch.
    """

    def __init__(self, source_lengths: list[int], target_lengths: list[int], max_tokens: int, world: int = 1,
                 seed: int = 0, group_by_length: bool = True, shuffle: bool = True, mega: int = 100):
        self.source, self.target = source_lengths, target_lengths
        self.max_tokens, self.world, self.seed = max_tokens, world, seed
        self.group_by_length, self.shuffle = group_by_length, shuffle
        longest = max((s + t for s, t in zip(source_lengths, target_lengths)), default=0)
        if longest > max_tokens:
            raise ValueError(f"TrainConfig.max_tokens={max_tokens}: an example of {longest} tokens (source + target) "
                             "does not fit; raise max_tokens to at least max_source_length + max_target_length")
        typical = statistics.median(s + t for s, t in zip(source_lengths, target_lengths)) if source_lengths else 1
        self.chunk = mega * world * max(1, int(max_tokens // max(1, typical)))
        self._counts: dict[int, int] = {}

    def cost(self, batch: list[int]) -> int:
        """Padded tokens of the largest rank share of `batch`."""
        return math.ceil(len(batch) / self.world) * (max(self.source[j] for j in batch) +
                                                     max(self.target[j] for j in batch))

    def num_batches(self, epoch: int) -> int:
        if epoch not in self._counts:
            self._counts[epoch] = len(self.batches(epoch))
        return self._counts[epoch]

    def __len__(self) -> int:
        return self.num_batches(0)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        lengths = [s + t for s, t in zip(self.source, self.target)]
        order = grouped_order(lengths, self.chunk, rng, self.shuffle, self.group_by_length,
                              key=lambda j: (-(self.source[j] // SOURCE_STEP), -self.target[j], -self.source[j]))
        batches, current, longest_source, longest_target = [], [], 0, 0
        for start in range(0, len(order), self.world):
            group = order[start:start + self.world]
            source = max(longest_source, max(self.source[j] for j in group))
            target = max(longest_target, max(self.target[j] for j in group))
            if current and math.ceil((len(current) + len(group)) / self.world) * (source + target) > self.max_tokens:
                batches.append(current)
                current, source, target = [], max(self.source[j] for j in group), max(self.target[j] for j in group)
            current, longest_source, longest_target = current + group, source, target
        if current:
            batches.append(current)
        if self.world > 1 and len(batches) > 1 and len(batches[-1]) < self.world:  # a rank would get nothing
            short = batches.pop()
            if self.cost(batches[-1] + short) <= self.max_tokens:
                batches[-1] += short
            else:
                batches.append(batches[-1][-self.world:] + short)
                del batches[-2][-self.world:]
                if not batches[-2] or self.cost(batches[-1]) > self.max_tokens:
                    raise ValueError(f"TrainConfig.max_tokens={self.max_tokens}: the last {len(short)} example(s) "
                                     f"of an epoch cannot join a batch within the budget on {self.world} ranks; "
                                     "raise max_tokens, or drop or add a few examples")
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches


def padding_fraction(batches: list[list[int]], examples, world: int = 1) -> float:
    """The share of padding in the micro-batches of an epoch (each rank's share padded to its longest source and
    longest target): 1 - real tokens / padded tokens."""
    source, target = lengths_of(examples)
    real = padded = 0
    for batch in batches:
        for rank in range(world):
            share = batch[rank::world]
            if share:
                real += sum(source[j] + target[j] for j in share)
                padded += len(share) * (max(source[j] for j in share) + max(target[j] for j in share))
    return 1 - real / padded if padded else 0.0


def epoch_padding(config, batches: list[list[int]], examples, world: int = 1) -> float:
    """The padding share the log and metrics report for these batches: none under TrainConfig.pack (each
    micro-batch is one row of its pairs' tokens), else `padding_fraction`."""
    return 0.0 if config.pack else padding_fraction(batches, examples, world)


def lengths_of(examples) -> tuple[list[int], list[int]]:
    """(source lengths, target lengths) of finetune.data.columns.Examples (its int32 columns) or a list of Example."""
    if hasattr(examples, "source_lengths"):
        return examples.source_lengths.tolist(), examples.target_lengths.tolist()
    return [len(e.input_ids) for e in examples], [len(e.labels) for e in examples]


def training_sampler(config, examples, world: int = 1):
    """The sampler of a run's training examples (`sampler_for`); rank r takes every world-th example of each
    global micro-batch, so every rank must get one."""
    source, target = lengths_of(examples)
    if config.max_tokens and world > 1 and len(examples) < world:
        raise ValueError(f"{len(examples)} examples for {world} ranks: every rank needs one")
    leftover = len(examples) % (config.batch_size * world)
    if not config.max_tokens and world > 1 and 0 < leftover < world:  # some rank would get an empty micro-batch
        raise ValueError(f"{len(examples)} examples leave a last global batch of {leftover}, fewer than the "
                         f"{world} ranks; drop or add a few examples")
    return sampler_for(config, source, target, world, config.seed)


def sampler_for(config, source: list[int], target: list[int], world: int, seed: int, whole_buffer: bool = False):
    """The one place `max_tokens` chooses the batches: a token budget per rank (`TokenBudgetBatches`), or
    `batch_size` x world examples grouped by length (`LengthGroupedBatches`). `whole_buffer`: a stream's buffer,
    sorted whole by source length."""
    if config.max_tokens:
        return TokenBudgetBatches(source, target, config.max_tokens, world, seed, config.group_by_length)
    if whole_buffer:
        mega = max(1, -(-len(source) // config.batch_size))
        return LengthGroupedBatches(source, config.batch_size, seed, config.group_by_length, True, mega)
    return LengthGroupedBatches([s + t for s, t in zip(source, target)], config.batch_size * world, seed,
                                config.group_by_length)


def describe_batches(config) -> str:
    """A micro-batch's size in words, for the log and `finetune check`."""
    return f"of at most {config.max_tokens} padded tokens" if config.max_tokens else f"of {config.batch_size}"


def schedule_of(config, sampler) -> tuple[int, int, int]:
    """(optimizer steps of the first epoch, total optimizer steps, epochs) of a run over `sampler`'s batches
    (`max_steps`, else `epochs` whole epochs)."""
    def steps(epoch):
        return math.ceil(sampler.num_batches(epoch) / config.grad_accum)

    if not config.max_steps:
        return steps(0), sum(steps(e) for e in range(config.epochs)), config.epochs
    total, epochs = 0, 0
    while total < config.max_steps:
        total, epochs = total + steps(epochs), epochs + 1
    return steps(0), config.max_steps, epochs
