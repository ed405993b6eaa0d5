"""Where (source, target) pairs come from, read as a stream of chunks of rows, in bounded memory.

A source is a file (.jsonl / .json / .tsv / .csv / .parquet), a folder of such shards (read in name order), a
folder written by `datasets.Dataset.save_to_disk` (also as "hf:PATH"), or a `datasets.Dataset` object.
`open_source` says what it is and what identifies its contents (the cache key's data part); `Source.chunks()`
reads it once, front to back, as chunks that `parse_chunk` turns into checked rows. JSONL and TSV chunks are
raw lines, parsed in the tokenising workers (finetune.data.corpus); CSV needs one reader front to back (a quoted cell
may span lines), Parquet and datasets give columns: those chunks hold rows already.

Every row is checked where it is parsed, and a bad one raises `DataError` naming the file and line (Parquet: the
row; a dataset: its index) and what is wrong; reading stops there, so a bad row of a 10-GB file is reported
without reading the file twice. TSV: a tab separates two columns and quotes are plain characters; CSV: RFC 4180
quoting; both may start with a header row naming the two fields. Files are UTF-8 (a byte-order mark is dropped).
"""
from __future__ import annotations

import csv
import json
import lzma
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

CHUNK_ROWS = 4096  # rows (lines) a chunk holds
FILE_FORMATS = (".jsonl", ".json", ".tsv", ".csv", ".parquet")
# text formats may be compressed (what HF datasets reads too): the suffix names the module that opens it
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}


class DataError(ValueError):
    """A data file or list that cannot be read as (source, target) pairs."""


@dataclass
class Chunk:
    """`kind` "jsonl" / "tsv": `items` are (line number, file offset of the line, raw bytes); "rows": (where,
    source, target) still to check. `first`: the file's first chunk (where a header row may be)."""
    kind: str
    path: str
    items: list
    first: bool = False


@dataclass
class Source:
    description: str  # what the log and `finetune check` say the data is
    identity: list  # what identifies the contents: (path, size, mtime) of each file, or a dataset's fingerprint
    files: list = field(default_factory=list)
    dataset: object = None  # a datasets.Dataset, read by rows

    def no_pairs(self) -> DataError:
        return DataError(f"{self.description}: no pairs in the file" if self.files else f"{self.description}: no pairs")

    def chunks(self, source_field: str, target_field: str):
        if self.dataset is not None:
            yield from _dataset_chunks(self.dataset, self.description, source_field, target_field)
            return
        for path in self.files:
            yield from file_chunks(path, source_field, target_field)


def is_dataset(data) -> bool:
    """A `datasets.Dataset` (told by its attributes: `datasets` need not be importable to ask)."""
    return hasattr(data, "column_names") and hasattr(data, "_fingerprint")


def is_stream(data) -> bool:
    """A `datasets.IterableDataset` (told by its attributes, as `is_dataset`)."""
    return hasattr(data, "iter") and hasattr(data, "shuffle") and hasattr(data, "n_shards")


def open_source(data, name: str = "data") -> Source:
    """What `data` (a path, "hf:PATH", or a datasets.Dataset) is, checked before anything is read."""
    if is_dataset(data):
        return Source(f"{name}: a datasets.Dataset of {len(data)} rows", [data._fingerprint], dataset=data)
    path = os.fspath(data)
    if path.startswith("hf:"):
        return _saved_dataset(path[3:], name)
    if not path:
        raise DataError("data path is empty: pass a .jsonl/.tsv/.csv/.parquet file, a folder of them or a list of "
                        "(source, target) pairs")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            return _saved_dataset(path, name)
        return _shards(path)
    _check_format(path)
    return Source(path, [_stat(path)], files=[path])


def data_format(path: str) -> tuple[str, str]:
    """(format, compression) by the file's suffixes: "a.jsonl.gz" -> (".jsonl", ".gz"); "a.csv" -> (".csv", "")."""
    base, ext = os.path.splitext(path.lower())
    if ext in COMPRESSIONS:
        return os.path.splitext(base)[1], ext
    return ext, ""


def _check_format(path: str) -> str:
    ext, compression = data_format(path)
    if ext not in FILE_FORMATS or (compression and ext == ".parquet"):
        raise DataError(f"{path}: unknown data format '{ext}{compression}' (use .jsonl, .json, .tsv, .csv or .parquet; "
                        f"the text formats may be compressed: {', '.join(COMPRESSIONS)})")
    return ext


def _open_binary(path: str):
    """The file's bytes, decompressed by its suffix (.gz, .bz2, .xz; .zst with the zstandard package)."""
    compression = data_format(path)[1]
    if not compression:
        return open(path, "rb")
    try:
        module = __import__(COMPRESSIONS[compression])
    except ImportError:
        raise DataError(f"{path}: reading {compression} files needs the {COMPRESSIONS[compression]} package: pip "
                        f"install {COMPRESSIONS[compression]}") from None
    return module.open(path, "rb")


def _stat(path: str) -> list:
    """What identifies a file's contents for the cache: its path, size, modification time and inode change time.
    The last cannot be set back by a user (restoring a modification time changes it), so a file edited in place
    with its size and modification time restored is still told apart."""
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _shards(folder: str) -> Source:
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))  # hidden files (.DS_Store) are not data
    shards, unread = [], []
    for n in names:
        ext, compression = data_format(n)
        readable = ext in FILE_FORMATS and not (compression and ext == ".parquet")
        (shards if readable and os.path.isfile(os.path.join(folder, n)) else unread).append(n)
    if not shards:
        raise DataError(f"{folder}: is a folder with no data files in it (.jsonl, .json, .tsv, .csv or .parquet "
                        "shards), nor a datasets.save_to_disk folder")
    if unread:
        raise DataError(f"{folder}: holds {len(unread)} entr{'y' if len(unread) == 1 else 'ies'} that would not be "
                        f"read as data: {unread[:5]}{' ...' if len(unread) > 5 else ''}; a shard folder holds data "
                        f"files only (.jsonl, .json, .tsv, .csv, .parquet; the text formats may be compressed: "
                        f"{', '.join(COMPRESSIONS)}): move the others out")
    shards = [os.path.join(folder, n) for n in shards]
    kinds = sorted({data_format(s)[0] for s in shards})
    if len(kinds) > 1:
        raise DataError(f"{folder}: holds shards of several formats {kinds}; keep one format in a folder")
    return Source(f"{folder} ({len(shards)} {kinds[0]} shards)", [_stat(s) for s in shards], files=shards)


def _saved_dataset(path: str, name: str) -> Source:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: {path} is a datasets folder (hf:PATH); reading it needs the `datasets` package: "
                        "pip install 'finetune[data]'") from None
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        splits = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
        first = os.path.join(path, splits[0]) if splits else ""
        raise DataError(f"{path}: holds a DatasetDict with splits {splits}; name one: hf:{first}" if splits else
                        f"{path}: holds an empty DatasetDict")
    if not os.path.exists(os.path.join(path, "state.json")):
        raise DataError(f"hf:{path}: not a folder written by datasets' save_to_disk (no state.json)")
    try:
        dataset = datasets.load_from_disk(path)
    except Exception as err:  # a damaged folder: say which and why
        raise DataError(f"hf:{path}: cannot be loaded by datasets.load_from_disk ({type(err).__name__}: "
                        f"{err})") from None
    return Source(f"hf:{path} ({len(dataset)} rows)", [dataset._fingerprint], dataset=dataset)


# ----------------------------------------------------------------------------------------------
# reading files as chunks


def file_chunks(path: str, source_field: str, target_field: str, size: int = CHUNK_ROWS):
    ext = _check_format(path)
    if ext in (".parquet", ".csv"):  # rows made here: columns, or one CSV reader front to back
        yield from (_parquet_chunks if ext == ".parquet" else _csv_chunks)(path, source_field, target_field, size)
        return
    if ext == ".json" and _starts_with_bracket(path):
        rows = _json_array_rows(path, source_field, target_field)
        for i in range(0, len(rows), size):
            yield Chunk("rows", path, rows[i:i + size], i == 0)
        return
    kind, items, first = "tsv" if ext == ".tsv" else "jsonl", [], True
    for item in _raw_lines(path):
        items.append(item)
        if len(items) == size:
            yield Chunk(kind, path, items, first)
            items, first = [], False
    if items:
        yield Chunk(kind, path, items, first)


def _raw_lines(path: str):
    """(line number, file offset, bytes) of every line, the leading byte-order mark dropped."""
    try:
        f = _open_binary(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    number = 0
    with f:
        offset = 0
        try:
            for number, raw in enumerate(f, start=1):
                start = offset
                offset += len(raw)
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw, start = raw[3:], start + 3
                yield number, start, raw.rstrip(b"\n")
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as err:  # a damaged or cut compressed file
            raise DataError(f"{path}: cannot be decompressed after line {number} ({type(err).__name__}: {err}); "
                            "the file is damaged or was cut short") from None


def decode(path: str, number: int, offset: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}, "
                        f"file offset {offset + err.start}); save the file as UTF-8") from None


def _starts_with_bracket(path: str) -> bool:
    with _open_binary(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _json_array_rows(path: str, source_field: str, target_field: str) -> list:
    """A .json file holding one array of objects (what `json.dump(list_of_dicts)` writes): read whole."""
    text = "\n".join(decode(path, n, o, raw) for n, o, raw in _raw_lines(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line (JSONL)")
    return [(f"{path}: item [{i}]", *mapping_pair(f"{path}: item [{i}]", row, source_field, target_field))
            for i, row in enumerate(rows)]


def _csv_chunks(path: str, source_field: str, target_field: str, size: int):
    """CSV with RFC 4180 quoting (a quoted cell may hold commas, quotes doubled, and newlines). Strict: a quote
    that is never closed, or text after a closing quote, is an error naming the line of that quote."""
    lines = (decode(path, n, o, raw) + "\n" for n, o, raw in _raw_lines(path))
    reader = csv.reader(lines, strict=True)
    rows, first_line, first, seen = [], 1, True, False  # first_line: where the record being read starts
    try:
        for row in reader:
            line_no, first_line = first_line, reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{line_no}: expected 2 columns (source, target), got {len(row)}")
            if not seen and is_header(row, source_field, target_field):
                seen = True
                continue
            seen = True
            rows.append((f"{path}:{line_no}", row[0], row[1]))
            if len(rows) == size:
                yield Chunk("rows", path, rows, first)
                rows, first = [], False
    except csv.Error as err:
        if "unexpected end of data" in str(err):
            quote_line = _unclosed_quote_line(path, first_line)
            raise DataError(f"{path}:{quote_line}: a quote (\") opened on this line is never closed, so every line "
                            f"after it up to the end of the file (line {reader.line_num}) would be one cell; close "
                            "the quote, or double a quote inside a quoted cell (\"\")") from None
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}); a quoted cell ends at its closing quote, "
                        "and a quote inside one is doubled (\"\")") from None
    if rows:
        yield Chunk("rows", path, rows, first)


def _unclosed_quote_line(path: str, first_line: int) -> int:
    """The line of the quote left open at the end of the file, reading CSV records from line `first_line`
    (the file is read again from there: this is the error path only)."""
    inside, opened = False, first_line
    for number, offset, raw in _raw_lines(path):
        if number < first_line:
            continue
        for char in decode(path, number, offset, raw):
            if char == '"':
                inside = not inside
                if inside:
                    opened = number
    return opened


def _parquet_chunks(path: str, source_field: str, target_field: str, size: int):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'finetune[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # not Parquet, truncated: pyarrow's reason
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    names = table.schema_arrow.names
    missing = [k for k in (source_field, target_field) if k not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (have {names}); set source_field/target_field to the "
                        "names your data uses")
    row, first, batches = 0, True, table.iter_batches(batch_size=size, columns=[source_field, target_field])
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:  # a damaged row group: pyarrow's reason, and where reading stopped
            raise DataError(f"{path}: row {row + 1} on cannot be read ({type(err).__name__}: {err})") from None
        if batch is None:
            return
        sources, targets = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        yield Chunk("rows", path, [(f"{path}: row {row + i + 1}", s, t) for i, (s, t) in
                                   enumerate(zip(sources, targets))], first)
        row, first = row + len(sources), False


def _dataset_chunks(dataset, description: str, source_field: str, target_field: str, size: int = CHUNK_ROWS):
    missing = [k for k in (source_field, target_field) if k not in dataset.column_names]
    if missing:
        raise DataError(f"{description}: missing column(s) {missing} (have {dataset.column_names}); set "
                        "source_field/target_field to the names your data uses")
    start = 0
    for batch in dataset.select_columns([source_field, target_field]).iter(batch_size=size):
        sources, targets = batch[source_field], batch[target_field]
        yield Chunk("rows", "dataset", [(f"dataset row [{start + i}]", s, t) for i, (s, t) in
                                        enumerate(zip(sources, targets))], start == 0)
        start += len(sources)


# ----------------------------------------------------------------------------------------------
# checked rows


def parse_chunk(chunk: Chunk, source_field: str, target_field: str) -> list[tuple[str, str]]:
    """The checked (source, target) pairs of a chunk; a bad row raises DataError naming its file and line."""
    if chunk.kind == "rows":
        return [check_row(where, s, t) for where, s, t in chunk.items]
    pairs, path = [], chunk.path
    for number, offset, raw in chunk.items:
        line = decode(path, number, offset, raw)
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if chunk.kind == "jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            pairs.append(mapping_pair(where, row, source_field, target_field))
            continue
        cells = line.rstrip("\r").split("\t")
        if len(cells) != 2:
            raise DataError(f"{where}: expected 2 columns (source, target), got {len(cells)} (columns are "
                            "separated by tabs)")
        if chunk.first and not pairs and is_header(cells, source_field, target_field):
            continue
        pairs.append(check_row(where, cells[0], cells[1]))
    return pairs


def is_header(row: list[str], source_field: str, target_field: str) -> bool:
    return [c.strip() for c in row] == [source_field, target_field]


def check_row(where: str, source, target) -> tuple[str, str]:
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


def mapping_pair(where: str, row, source_field: str, target_field: str) -> tuple[str, str]:
    """(source, target) from a JSON object / dict / dataset row, naming `where` when it does not hold them."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in (source_field, target_field) if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (have {sorted(row)}); set source_field/target_field "
                        "to the names your data uses")
    return check_row(where, row[source_field], row[target_field])
