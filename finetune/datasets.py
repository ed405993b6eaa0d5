"""Real data that installs from the package registry: codespell's dictionary of misspellings.

`codespell_lib/data/dictionary.txt` holds about 65,000 `misspelling->correction` lines; about 59,000
have a single correction, and those are the spelling-correction pairs. The split is fixed by a hash of
the misspelling (CRC-32 mod 100: 0-89 train, 90-94 validation, 95-99 test), so it does not depend on
the order of the file and a word never moves between splits when the dictionary grows.
"""
from __future__ import annotations

import os
import random
import zlib

SPLITS = {"train": range(0, 90), "validation": range(90, 95), "test": range(95, 100)}


def codespell_dictionary() -> str:
    try:
        import codespell_lib
    except ImportError as err:
        raise FileNotFoundError("codespell is not installed: pip install -e '.[examples]'") from err
    return os.path.join(os.path.dirname(codespell_lib.__file__), "data", "dictionary.txt")


def codespell_pairs(split: str = "train", limit: int | None = None, seed: int = 0, path: str | None = None):
    """(misspelling, correction) pairs of one split; `limit` takes a seeded random subset of that size."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    path = path or codespell_dictionary()
    buckets = SPLITS[split]
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "->" not in line:
                raise ValueError(f"{path}:{line_no}: expected 'misspelling->correction', got {line!r}")
            wrong, right = line.split("->", 1)
            corrections = [c.strip() for c in right.split(",") if c.strip()]
            if len(corrections) != 1:
                continue  # ambiguous: several corrections
            if zlib.crc32(wrong.encode("utf-8")) % 100 in buckets:
                pairs.append((wrong, corrections[0]))
    pairs.sort()
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs
