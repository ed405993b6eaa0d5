"""Text pairs -> tokenised examples -> padded, shifted, masked batches.

Files: JSONL (one object a line, fields configurable), TSV (a tab separates the two columns; quotes are
plain characters) and CSV (two columns with RFC 4180 quoting); TSV and CSV may start with a header row
naming the two fields. Files are UTF-8 (a byte-order mark is dropped). A malformed row, or bytes that are
not UTF-8, raise `DataError` naming the file, the line and what is wrong.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .batching import LengthGroupedBatches  # noqa: F401  (its old home)
from .masks import decoder_attention_mask, pad_inputs, pad_labels, shift_tokens_right


class DataError(ValueError):
    """A data file or list that cannot be read as (source, target) pairs."""


Pair = tuple[str, str]


def read_pairs(data, source_field: str = "source", target_field: str = "target", name: str = "data") -> list[Pair]:
    """(source, target) pairs from a .jsonl/.json/.tsv/.csv path, a sequence of pairs, or a sequence of mappings
    with `source_field` / `target_field` (an HF `datasets.Dataset` is one: `datasets` need not be installed for
    anything else). `name` says which data an error is about where no file names it ("evaluation data[3]: ...")."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not path:
            raise DataError("data path is empty: pass a .jsonl/.tsv/.csv file or a list of (source, target) pairs")
        if os.path.isdir(path):
            raise DataError(f"{path}: is a folder, not a data file (pass a .jsonl, .tsv or .csv file)")
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".jsonl", ".json", ".tsv", ".csv"):
            raise DataError(f"{path}: unknown data format '{ext}' (use .jsonl, .tsv or .csv)")
        text = read_text(path)
        if ext == ".json" and text.lstrip().startswith("["):
            pairs = _read_json_array(path, text, source_field, target_field)
        elif ext in (".jsonl", ".json"):
            pairs = _read_jsonl(path, text, source_field, target_field)
        elif ext == ".tsv":
            pairs = _read_tsv(path, text, source_field, target_field)
        else:
            pairs = _read_csv(path, text, source_field, target_field)
        if not pairs:
            raise DataError(f"{path}: no pairs in the file")
        return pairs
    if isinstance(data, (bytes, dict)) or not hasattr(data, "__iter__"):
        raise DataError(f"{name}: expected a file path, a list of (source, target) pairs or of mappings, or a "
                        f"datasets.Dataset; got {type(data).__name__}")
    pairs = []
    for i, item in enumerate(data):
        if isinstance(item, Mapping):  # a row of an HF datasets.Dataset, or a dict
            item = _mapping_pair(f"{name}[{i}]", item, source_field, target_field)
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise DataError(f"{name}[{i}]: expected a (source, target) pair of strings, got {item!r:.200}")
        pairs.append(_check_row(f"{name}[{i}]", item[0], item[1]))
    if not pairs:
        raise DataError(f"{name}: no pairs given")
    return pairs


def read_text(path: str) -> str:
    """A file's text as UTF-8, a leading byte-order mark dropped; bytes that are not UTF-8 are an error naming
    the line and the byte."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}, file offset "
                        f"{err.start}); save the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def _check_row(where: str, source, target) -> Pair:
    for name, value in (("source", source), ("target", target)):
        if not isinstance(value, str):
            raise DataError(f"{where}: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: empty {name}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone UTF-16 surrogate, e.g. JSON's "\ud800" without its pair
            raise DataError(f"{where}: {name} holds a lone surrogate {value[err.start]!r} at character {err.start} "
                            "(half of a UTF-16 pair, e.g. an escape \\ud800 without its second half), which is not "
                            "text; fix or drop the row") from None
    return source, target


def _mapping_pair(where: str, row, source_field: str, target_field: str) -> Pair:
    """(source, target) from a JSON object / dict / dataset row, naming `where` when it does not hold them."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in (source_field, target_field) if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (have {sorted(row)}); set source_field/target_field "
                        "to the names your data uses")
    return _check_row(where, row[source_field], row[target_field])


def _read_jsonl(path: str, text: str, source_field: str, target_field: str) -> list[Pair]:
    pairs = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})") from None
        pairs.append(_mapping_pair(f"{path}:{line_no}", row, source_field, target_field))
    return pairs


def _read_json_array(path: str, text: str, source_field: str, target_field: str) -> list[Pair]:
    """A .json file holding one array of objects (what `json.dump(list_of_dicts)` writes)."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line (JSONL)")
    return [_mapping_pair(f"{path}: item [{i}]", row, source_field, target_field) for i, row in enumerate(rows)]


def _is_header(row: list[str], pairs: list, source_field: str, target_field: str) -> bool:
    return not pairs and [c.strip() for c in row] == [source_field, target_field]


def _read_tsv(path: str, text: str, source_field: str, target_field: str) -> list[Pair]:
    """TSV as written by `cut`/spreadsheets' "tab-separated": a tab separates, quotes are literal characters."""
    pairs = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        row = line.split("\t")
        if len(row) != 2:
            raise DataError(f"{path}:{line_no}: expected 2 columns (source, target), got {len(row)} (columns are "
                            "separated by tabs)")
        if _is_header(row, pairs, source_field, target_field):
            continue
        pairs.append(_check_row(f"{path}:{line_no}", row[0], row[1]))
    return pairs


def _read_csv(path: str, text: str, source_field: str, target_field: str) -> list[Pair]:
    """CSV with RFC 4180 quoting (a quoted cell may hold commas, quotes doubled, and newlines). Strict: a quote
    that is never closed, or text after a closing quote, is an error naming the line of that quote."""
    pairs = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    first_line = 1  # where the record being read starts
    try:
        for row in reader:
            line_no, first_line = first_line, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line_no}: expected 2 columns (source, target), got {len(row)}")
            if _is_header(row, pairs, source_field, target_field):
                continue
            pairs.append(_check_row(f"{path}:{line_no}", row[0], row[1]))
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            quote_line = _unclosed_quote_line(text, first_line)
            raise DataError(f"{path}:{quote_line}: a quote (\") opened on this line is never closed, so every line "
                            f"after it up to the end of the file (line {reader.line_num}) would be one cell; close "
                            "the quote, or double a quote inside a quoted cell (\"\")") from None
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}); a quoted cell ends at its closing quote, "
                        "and a quote inside one is doubled (\"\")") from None
    return pairs


def _unclosed_quote_line(text: str, first_line: int) -> int:
    """The line of the quote left open at the end of the file, reading CSV records from line `first_line`."""
    offset = 0
    for _ in range(first_line - 1):
        offset = text.index("\n", offset) + 1
    opened, inside = offset, False
    for i in range(offset, len(text)):
        if text[i] == '"':
            inside = not inside
            if inside:
                opened = i
    return text.count("\n", 0, opened) + 1


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TokenizeReport:
    examples: int
    truncated_sources: int
    truncated_targets: int

    def __str__(self):
        return (f"{self.examples} examples; truncated: {self.truncated_sources} sources, "
                f"{self.truncated_targets} targets")


def _truncate(ids: list[int], max_length: int, special_ids: set[int]) -> list[int]:
    """Cut to max_length, keeping a final special token (eos / [SEP]) as the last one."""
    if len(ids) <= max_length:
        return ids
    if ids[-1] in special_ids:
        return ids[: max_length - 1] + ids[-1:]
    return ids[:max_length]


def tokenize_pairs(pairs: list[Pair], tokenizer, max_source_length: int, max_target_length: int,
                   decoder_start_token_id: int) -> tuple[list[Example], TokenizeReport]:
    """Tokenise sources and targets; truncate and count the truncations.

    A target that begins with the decoder start token (BERT's tokenizer puts [CLS] first, and [CLS] is
    bert2bert's start token) loses it: the shift puts it back, and keeping it would teach the decoder
    to read two start tokens.
    """
    sources = tokenizer([s for s, _ in pairs], add_special_tokens=True)["input_ids"]
    targets = tokenizer(text_target=[t for _, t in pairs], add_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    examples, cut_src, cut_tgt = [], 0, 0
    for src, tgt in zip(sources, targets):
        if tgt and tgt[0] == decoder_start_token_id:
            tgt = tgt[1:]
        cut_src += len(src) > max_source_length
        cut_tgt += len(tgt) > max_target_length
        examples.append(Example(_truncate(src, max_source_length, special), _truncate(tgt, max_target_length, special)))
    return examples, TokenizeReport(len(examples), cut_src, cut_tgt)


def data_fingerprint(examples) -> str:
    """SHA-256 of the tokenised examples (what a resumed run must train and evaluate on again)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes() + b"|")
        h.update(np.asarray(e.labels, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()


class Collator:
    """Examples -> a batch: inputs padded with pad, labels with -100, decoder inputs shifted from labels."""

    def __init__(self, pad_token_id: int, decoder_start_token_id: int):
        self.pad_token_id = pad_token_id
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_inputs([e.input_ids for e in examples], self.pad_token_id)
        labels = pad_labels([e.labels for e in examples])
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": shift_tokens_right(labels, self.pad_token_id, self.decoder_start_token_id),
            "decoder_attention_mask": decoder_attention_mask(labels),
            "labels": labels,
        }
