"""BART's pretraining corruptions (Lewis et al., 2020, §2.2) on token ids, as fine-tuning augmentation.

Applied to the source only (the target stays clean), freshly for every epoch, and reproducibly: the
random stream of an example is seeded by (run seed, epoch, example index), so a resumed run corrupts
each pair exactly as the uninterrupted run did.

    token deletion      delete a fraction of the tokens
    token masking       replace a fraction of the tokens with the mask token
    text infilling      spans with Poisson(lambda) lengths, until a fraction of tokens is covered; each span
                        becomes one mask token; a 0-length span inserts a mask
    sentence permutation  split on sentence ends and shuffle the sentences
    document rotation   rotate so the sequence starts at a random token

Special tokens (bos/eos/pad/cls/sep...) never change or move, and protected positions (for example the
last word of a lyric line, which carries the rhyme: `protect="last_word"`) are never deleted or masked.
Deletion, masking and infilling run first, on the original order; permutation and rotation then move
tokens without changing any.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

import numpy as np

from finetune.checks import is_finite_number

Protect = Callable[[list[int], object], set]


@dataclass
class NoiseConfig:
    mask_rate: float = 0.0
    delete_rate: float = 0.0
    infill_rate: float = 0.0
    poisson_lambda: float = 3.0
    permute_sentences: bool = False
    rotate: bool = False
    protect: str | Protect | None = None  # "last_word", or a function (ids, tokenizer) -> protected positions

    def __post_init__(self):
        for name in ("mask_rate", "delete_rate", "infill_rate", "poisson_lambda"):
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ValueError(f"NoiseConfig.{name}={value!r}: must be a finite number")
        for name in ("permute_sentences", "rotate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NoiseConfig.{name}={getattr(self, name)!r}: must be true or false")
        if self.protect is not None and not isinstance(self.protect, str) and not callable(self.protect):
            raise ValueError(f"NoiseConfig.protect={self.protect!r}: must be a rule name such as 'last_word', a "
                             "function (ids, tokenizer) -> set of positions, or None")
        for name in ("mask_rate", "delete_rate", "infill_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NoiseConfig.{name}={value!r}: must be in [0, 1]")
        if self.poisson_lambda < 0:
            raise ValueError(f"NoiseConfig.poisson_lambda={self.poisson_lambda!r}: must be >= 0")
        if isinstance(self.protect, str) and self.protect not in PROTECT_RULES:
            raise ValueError(f"NoiseConfig.protect={self.protect!r}: known rules are {sorted(PROTECT_RULES)}, "
                             "or pass a function (ids, tokenizer) -> set of positions")

    @property
    def active(self) -> bool:
        return bool(self.mask_rate or self.delete_rate or self.infill_rate or self.permute_sentences or self.rotate)


def _token_strings(ids, tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def _is_punctuation(token: str) -> bool:
    stripped = token.lstrip("Ġ▁").removeprefix("##")
    return bool(stripped) and all(c in string.punctuation for c in stripped)


_WORDPIECE: dict[int, bool] = {}


def _is_wordpiece(tokenizer) -> bool:
    """WordPiece marks continuations with '##' (and a token without it starts a word)."""
    key = id(tokenizer)
    if key not in _WORDPIECE:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            _WORDPIECE[key] = type(backend.model).__name__ == "WordPiece"
        else:
            _WORDPIECE[key] = any(t.startswith("##") for t in tokenizer.get_vocab())
    return _WORDPIECE[key]


def last_word_positions(ids, tokenizer) -> set[int]:
    """Positions of the last word's tokens (trailing punctuation and special tokens skipped).

    Word boundaries: a token starting with 'Ġ' or '▁' (BPE, SentencePiece) starts a word; one starting with
    '##' (WordPiece) continues one; a white-space token separates words (character tokenizers).
    """
    tokens = _token_strings(ids, tokenizer)
    special = set(tokenizer.all_special_ids)
    wordpiece = _is_wordpiece(tokenizer)
    i = len(ids) - 1
    while i >= 0 and (ids[i] in special or _is_punctuation(tokens[i]) or not tokens[i].strip()):
        i -= 1
    positions = set()
    while i >= 0 and ids[i] not in special and tokens[i].strip():
        positions.add(i)
        tok = tokens[i]
        if tok.startswith(("Ġ", "▁")) or (wordpiece and not tok.startswith("##")):
            break
        i -= 1
    return positions


PROTECT_RULES: dict[str, Protect] = {"last_word": last_word_positions}


def _take(rng, free_positions: list[int], rate: float) -> list[int]:
    """A random subset of about rate * n positions (stochastic rounding keeps the expectation exact)."""
    n = rate * len(free_positions)
    count = int(n) + (rng.random() < n - int(n))
    if count == 0:
        return []
    return sorted(rng.choice(free_positions, size=count, replace=False).tolist())


def _sentence_end(token: str) -> bool:
    return token.rstrip().endswith((".", "!", "?"))


def add_noise(token_ids, config: NoiseConfig, tokenizer, seed) -> list[int]:
    """A corrupted copy of `token_ids` (list or 1-D tensor); `seed` is an int or a sequence of ints."""
    ids = [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
    if not config.active:
        return ids
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    protect = PROTECT_RULES[config.protect] if isinstance(config.protect, str) else config.protect
    protected = protect(ids, tokenizer) if protect else set()
    # each token with a flag: may it still be corrupted?
    seq = [(t, t not in special and i not in protected) for i, t in enumerate(ids)]
    mask_id = tokenizer.mask_token_id
    if (config.mask_rate or config.infill_rate) and mask_id is None:
        raise ValueError("NoiseConfig: masking and infilling need a tokenizer with a mask token")

    if config.delete_rate:
        drop = set(_take(rng, [i for i, (_, free) in enumerate(seq) if free], config.delete_rate))
        seq = [x for i, x in enumerate(seq) if i not in drop]
    if config.mask_rate:
        hit = set(_take(rng, [i for i, (_, free) in enumerate(seq) if free], config.mask_rate))
        seq = [(mask_id, False) if i in hit else x for i, x in enumerate(seq)]
    if config.infill_rate:
        seq = infill_spans(seq, rng, config.infill_rate, config.poisson_lambda, mask_id)[0]
    out = [t for t, _ in seq]
    if config.permute_sentences:
        out = _permute_sentences(out, rng, special, tokenizer)
    if config.rotate:
        out = _rotate(out, rng, special)
    return out


def infill_spans(seq, rng, rate: float, lam: float, mask_id: int):
    """Text infilling; returns (new sequence, the sampled span lengths).

    Span lengths are drawn from Poisson(lam) until they cover round(rate * n) of the n corruptible tokens
    (the last one trimmed). The spans are then laid over those tokens without overlap, in random order and
    with uniformly random gaps (stars and bars), so the covered fraction is exactly the rate. Each span
    becomes one mask token (one per contiguous piece where a protected or special token splits it); a
    0-length span inserts a mask.
    """
    free = [i for i, (_, f) in enumerate(seq) if f]
    n = len(free)
    target = int(round(rate * n))
    lengths = []
    while sum(lengths) < target:
        lengths.append(int(rng.poisson(lam)))
        if len(lengths) > 10 * n + 10:  # lam ~ 0 and a positive target: stop drawing zeros
            break
    if lengths and sum(lengths) > target:
        lengths[-1] -= sum(lengths) - target
    covered = sum(lengths)
    k = len(lengths)
    bars = np.sort(rng.choice(n - covered + k, size=k, replace=False)) if k else np.array([], dtype=int)
    gaps = np.diff(np.concatenate(([-1], bars))) - 1
    span_of = {}  # seq index -> span number
    insert_before: dict[int, int] = {}
    pos = 0
    for number, (gap, length) in enumerate(zip(gaps.tolist(), lengths)):
        pos += gap
        if length == 0:
            at = free[pos] if pos < n else len(seq)
            insert_before[at] = insert_before.get(at, 0) + 1
        for j in range(pos, pos + length):
            span_of[free[j]] = number
        pos += length
    out = []
    for i, item in enumerate(seq):
        out.extend([(mask_id, False)] * insert_before.get(i, 0))
        if i not in span_of:
            out.append(item)
        elif i - 1 not in span_of or span_of[i - 1] != span_of[i]:
            out.append((mask_id, False))  # the first token of a span (or of a piece of one)
    out.extend([(mask_id, False)] * insert_before.get(len(seq), 0))
    return out, lengths


def _content_bounds(ids, special):
    start = 0
    while start < len(ids) and ids[start] in special:
        start += 1
    end = len(ids)
    while end > start and ids[end - 1] in special:
        end -= 1
    return start, end


def _permute_sentences(ids, rng, special, tokenizer):
    start, end = _content_bounds(ids, special)
    body, tokens = ids[start:end], _token_strings(ids[start:end], tokenizer)
    sentences, current = [], []
    for t, s in zip(body, tokens):
        current.append(t)
        if _sentence_end(s):
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    order = rng.permutation(len(sentences))
    return ids[:start] + [t for k in order for t in sentences[k]] + ids[end:]


def _rotate(ids, rng, special):
    start, end = _content_bounds(ids, special)
    body = ids[start:end]
    if len(body) < 2:
        return ids
    k = int(rng.integers(len(body)))
    return ids[:start] + body[k:] + body[:k] + ids[end:]
