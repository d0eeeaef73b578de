"""Reading data files, one record at a time: JSONL, JSON arrays, Parquet and CSV; column mapping.

Every record comes out as ``(where, record, error)`` with ``where`` = ``"file:line"`` (``"file:row N"`` for
Parquet), so a problem can always be pointed at. JSONL, Parquet and CSV are streamed; a JSON array is
decoded whole (it is one JSON value), so very large data belongs in JSONL or Parquet.

Problems that make a whole file unusable (not UTF-8, cut off mid-record, a column mapping that names a
column the file does not have) raise `DataError` at once; a single bad record is yielded with its error and
counted as malformed by the caller.

A record nested deeper than `MAX_NESTING` levels is malformed, in every format: Python's JSON parser recurses
once per level and dies with a RecursionError near a thousand (sooner on a deeper stack), and every later step
that walks the record would recurse as deep. No training record needs a hundred levels; one line of brackets
from a broken export or a hostile upload must not take down the reader, nor the service that validates uploads
with it. (Deep enough to stop the parser, an element of a JSON array refuses the file: it cannot be skipped.)
"""
from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator, Mapping
from itertools import accumulate
from pathlib import Path

from tunerun.jobs.errors import DataError

# Fields that hold structure; a CSV cell can only hold them as JSON text.
JSON_FIELDS = ("messages", "conversations", "history", "tools")
OPTIONAL_FIELDS = ("system", "input", "history", "tools")
Row = tuple[str, dict | None, str | None]  # where, record, error
MAX_NESTING = 100
TOO_DEEP = f"nested too deeply (more than {MAX_NESTING} levels of [ and {{)"
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
BRACKET = re.compile(r"[\[\]{}]")


class JsonLine(str):
    """A line of a JSONL file left unparsed: `parse_line` makes it a record where the record is processed."""


def read_records(files: list[Path], columns: Mapping[str, str] | None = None, parse: bool = True) -> Iterator[Row]:
    """Yield ``(where, record, error)`` for every record of every file; exactly one of record/error is None.

    ``parse=False``: a line of a JSONL file (or a .json file of lines) without ``columns`` comes as a `JsonLine`
    for the caller to `parse_line` elsewhere: data preparation's worker processes parse their own records, and
    a line crosses to them at a fraction of a record's cost."""
    for path in files:
        path = Path(path)
        suffix, parse = path.suffix.lower(), parse or bool(columns)  # renaming columns needs the record here
        reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}[suffix]
        rows = reader(path, parse) if suffix in (".jsonl", ".json") else reader(path)
        rows = _mapped(path, rows, dict(columns or {}))
        yield from _json_cells(rows) if suffix == ".csv" else rows


def _mapped(path: Path, rows: Iterator[Row], columns: dict[str, str]) -> Iterator[Row]:
    """Rename the file's columns to tunerun's field names (``columns`` is field → column).

    A column for a field every record needs must be in the first record (a wrong mapping is wrong
    everywhere: fail at once); one for an optional field (system, input, history, tools) may be absent from
    some records, but not from all of them.
    """
    first, seen = True, set()
    for where, record, error in rows:
        if error is None and not isinstance(record, (dict, JsonLine)):
            record, error = None, _not_an_object(record)
        if record is not None and columns:
            if first:
                _check_columns(where, record, {f: c for f, c in columns.items() if f not in OPTIONAL_FIELDS},
                               "the record has no such column")
                first = False
            seen.update(field for field, column in columns.items() if column in record)
            renamed = {k: v for k, v in record.items() if k not in columns.values()}
            record = renamed | {field: record[column] for field, column in columns.items() if column in record}
        yield where, record, error
    if not first:
        never = {f: c for f, c in columns.items() if f not in seen}
        _check_columns(str(path), {}, never, "no record has such a column")


def _check_columns(where: str, record: dict, columns: dict[str, str], problem: str) -> None:
    missing = {field: column for field, column in columns.items() if column not in record}
    if missing:
        wrong = ", ".join(f"{field} → {column!r}" for field, column in missing.items())
        found = f" (its columns: {', '.join(map(str, record)) or 'none'})" if record else ""
        raise DataError(f"{where}: data.columns maps {wrong}, but {problem}{found}; fix data.columns to name one "
                        "of the file's columns")


# ---------------------------------------------------------------- JSON


def _not_an_object(record) -> str:
    return f"expected a JSON object, got {type(record).__name__}"


def parse_line(line: JsonLine) -> tuple[dict | None, str | None]:
    """(record, None), or (None, why it is malformed): what `read_records` yields for a line it parses."""
    if too_deep(line):
        return None, TOO_DEEP
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    return (record, None) if isinstance(record, dict) else (None, _not_an_object(record))


def _jsonl_rows(path: Path, parse: bool = True) -> Iterator[Row]:
    """One JSON object per line, streamed. Bytes are decoded line by line so an encoding error has a line.
    ``parse=False``: lines as `JsonLine`, except a last line without its newline, which may be cut off."""
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(path, number, raw)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            if not parse and raw.endswith(b"\n"):
                yield where, JsonLine(line), None
                continue
            record, error = parse_line(line)
            if error is not None and not raw.endswith(b"\n") and _cut_short(line):
                raise DataError(_cut_off(path, number))
            yield where, record, error


def _cut_short(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError as e:
        return _incomplete(line, e)
    return False


def too_deep(text: str) -> bool:
    """Whether the JSON ``text`` nests more than `MAX_NESTING` levels (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= MAX_NESTING:  # the common case, at C speed
        return False
    steps = (1 if bracket in "[{" else -1 for bracket in BRACKET.findall(JSON_STRING.sub("", text)))
    return max(accumulate(steps), default=0) > MAX_NESTING


def _incomplete(text: str, e: json.JSONDecodeError) -> bool:
    """The decoder ran out of text rather than meeting a wrong character: the record was cut short. (A JSON
    string cannot span lines, so an unterminated one runs to the end of the text.)"""
    return e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())


def _json_rows(path: Path, parse: bool = True) -> Iterator[Row]:
    """A ``.json`` file holds one JSON array of records, or (like JSONL) one object per line."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        yield from _jsonl_rows(path, parse)
        return
    for line, value, error in _array_elements(path, text):
        yield f"{path}:{line}", value, error


def _array_elements(path: Path, text: str) -> Iterator[tuple[int, object, str | None]]:
    """Elements of a top-level JSON array, each with the line it starts on (and `TOO_DEEP` in place of one).

    `json.loads` would not say where each record is; decoding element by element gives malformed records a
    line number. A syntax error inside the array cannot be skipped, so it refuses the whole file.
    """
    decoder, blank = json.JSONDecoder(), re.compile(r"\s*")
    pos = blank.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except RecursionError:
            raise DataError(f"{path}:{line}: a record {TOO_DEEP}; a .json array cannot be read past it") from None
        except json.JSONDecodeError as e:
            if _incomplete(text, e):
                raise DataError(_cut_off(path, e.lineno)) from None
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); a .json file must "
                            "hold one JSON array of records (or one object per line)") from None
        yield (line, None, TOO_DEEP) if too_deep(text[counted:pos]) else (line, value, None)
        pos = blank.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = blank.match(text, pos + 1).end()
        elif pos < len(text) and text[pos] != "]":
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{lineno}: not valid JSON (expected ',' or ']' between records)")
    if pos >= len(text):
        raise DataError(_cut_off(path, text.count("\n") + 1))


def _cut_off(path: Path, line: int) -> str:
    return (f"{path}:{line}: the file ends in the middle of a record (an interrupted export or copy?); "
            "export the file again, or delete the incomplete last record")


# ---------------------------------------------------------------- Parquet and CSV


def _parquet_rows(path: Path) -> Iterator[Row]:
    """Streamed in row batches; nested columns (a list of message structs) arrive as lists of dicts."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record, None


def _csv_rows(path: Path) -> Iterator[Row]:
    """A header row names the columns; every cell is text (see `_json_cells` for structured fields)."""
    _check_utf8(path)
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(handle)
        _ = reader.fieldnames  # reads the header row
        start = reader.line_num + 1
        for record in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if None in record:
                yield where, None, f"more cells than the header has columns ({len(reader.fieldnames or [])})"
            else:
                yield where, {k: v for k, v in record.items() if v is not None}, None


def _json_cells(rows: Iterator[Row]) -> Iterator[Row]:
    """A CSV cell can hold messages, history or tools only as JSON text: decode them (after column mapping,
    so a mapped column counts); an empty cell is an absent field."""
    for where, record, error in rows:
        cells = [v for k, v in (record or {}).items() if k in JSON_FIELDS and isinstance(v, str)]
        if any(too_deep(cell) for cell in cells):
            record, error = None, f"a {'/'.join(JSON_FIELDS)} cell is {TOO_DEEP}"
        if record is not None:
            try:
                record = {k: json.loads(v) if k in JSON_FIELDS and isinstance(v, str) else v
                          for k, v in record.items() if not (k in JSON_FIELDS and v == "")}
            except json.JSONDecodeError as e:
                record, error = None, f"a {'/'.join(JSON_FIELDS)} cell must hold JSON ({e.msg} at column {e.colno})"
        yield where, record, error


# ---------------------------------------------------------------- text and bytes


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


def _decode(path: Path, line: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(path, line, e.start + 1, raw[e.start])) from None


def _read_text(path: Path) -> str:
    _check_utf8(path)
    with _open_binary(path) as handle:
        return handle.read().decode("utf-8-sig")


def _check_utf8(path: Path) -> None:
    """Stream the file through an incremental decoder so a bad byte is reported with its line."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with _open_binary(path) as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                before = chunk[:e.start]
                column = e.start - (before.rfind(b"\n") + 1) + 1
                raise DataError(_not_utf8(path, line + before.count(b"\n"), column, chunk[e.start])) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(_cut_off(path, line)) from None


def _not_utf8(path: Path, line: int, column: int, byte: int) -> str:
    return (f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at column {column}); save the file as UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}")
