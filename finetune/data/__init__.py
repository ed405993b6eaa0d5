"""Data: sources -> (source, target) pairs -> tokenised int32 columns (cached as Arrow) -> batches (length groups,
token budgets) -> collation (label shift, padding, masks) and BART-style noise; streams; the built-in data sets.

Modules, in the order data flows through them:

    sources     every file format, shard folders, hf:PATH, datasets objects: chunks of checked rows
    pairs       the rows read into memory (`read_pairs`)
    tokenize    pairs -> `Example`s, truncated, truncations counted
    columns     `Examples`: int32 columns in memory or memory-mapped from the Arrow cache
    corpus      tokenise once in worker processes, cache on disk (`load`)
    stream      tokenise as it reads, buffer by buffer (`Stream`)
    batching    which examples make each micro-batch (`LengthGroupedBatches`, `TokenBudgetBatches`)
    noise       BART's pretraining noise as augmentation
    collate     examples -> padded, shifted, masked tensors (`Collator`)
    feed        the windows of micro-batches a run trains on, collated off the training thread
    builtin     the data sets installed with the package's extras (codespell, the standard library's docstrings)
"""
from finetune.data.batching import LengthGroupedBatches, TokenBudgetBatches
from finetune.data.builtin import code_summary_pairs, codespell_pairs, name_baseline
from finetune.data.collate import IGNORE_INDEX, Collator, shift_tokens_right
from finetune.data.noise import NoiseConfig, add_noise
from finetune.data.pairs import read_pairs
from finetune.data.sources import DataError
from finetune.data.tokenize import Example, TokenizeReport, tokenize_pairs

__all__ = ["DataError", "read_pairs", "Example", "TokenizeReport", "tokenize_pairs", "Collator", "IGNORE_INDEX",
           "shift_tokens_right", "LengthGroupedBatches", "TokenBudgetBatches", "NoiseConfig", "add_noise",
           "codespell_pairs", "code_summary_pairs", "name_baseline"]
