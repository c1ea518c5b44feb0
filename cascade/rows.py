"""Reading submitted rows: JSONL and CSV byte streams, one bounded line at a time, and the JSON text stored.

No line is ever held whole in memory beyond ``MAX_ROW_BYTES``. A row that cannot be read is yielded as an
``UnreadableRow`` (an ``InputError`` naming source and line) in place of the row, so a caller may reject it
and go on; an ``InputError`` is raised only when the rest of the stream cannot be read reliably (a broken
CSV quote).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from typing import IO, Any, Literal

from cascade.errors import InputError

__all__ = ["MAX_ROW_BYTES", "Parsed", "Row", "UnreadableRow", "encode_row", "kind_of", "read_rows", "sniff_format"]

MAX_ROW_BYTES = 1_000_000
Row = dict[str, Any]  # Any: a user's row
Parsed = tuple[int, Row | InputError]  # (line, the row or why it could not be read)


class UnreadableRow(InputError):
    """A line that did not parse into a row; ``raw`` is its text (for the rejects file), if it fits."""

    def __init__(self, message: str, *, source: str, line: int, raw: str | None = None) -> None:
        super().__init__(message, source=source, line=line)
        self.raw = raw


# --- reading -------------------------------------------------------------------------------------


def _read_line(stream: IO[bytes]) -> tuple[bytes, int]:
    """One physical line: its first MAX_ROW_BYTES + 1 bytes and its full size without the newline.

    The rest of an over-long line is read in bounded chunks and dropped, so one huge line never
    sits in memory whole.
    """
    head = stream.readline(MAX_ROW_BYTES + 1)
    size, tail = len(head), head
    while len(tail) == MAX_ROW_BYTES + 1 and not tail.endswith(b"\n"):
        tail = stream.readline(MAX_ROW_BYTES + 1)
        size += len(tail)
    return head, size - tail.endswith(b"\n")


def _too_big(size: int, source: str, line: int) -> UnreadableRow:
    return UnreadableRow(f"row is {size} bytes, over the limit of {MAX_ROW_BYTES}", source=source, line=line)


def _decode(raw: bytes, source: str, line: int) -> str | UnreadableRow:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return UnreadableRow(f"not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}", source=source,
                             line=line, raw=raw.decode("utf-8", "backslashreplace").rstrip("\r\n"))
    # A UTF-8 byte order mark opens many exported files: accepted and dropped.
    return decoded.removeprefix("\ufeff") if line == 1 else decoded


def _no_constant(name: str) -> Any:  # Any: json's parse_constant hook
    raise ValueError(f"{name} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{literal} is out of range")
    return value


# Built once: json.loads with hooks would build a decoder per row.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def _json_row(raw: bytes, source: str, line: int) -> Row | InputError | None:
    """The row on one JSONL line, None for a blank line."""
    decoded = _decode(raw, source, line)
    if isinstance(decoded, InputError):
        return decoded
    if not decoded.strip():
        return None
    shown = decoded.rstrip("\r\n")
    try:
        row = _DECODER.decode(decoded)
    except json.JSONDecodeError as exc:
        return UnreadableRow(f"malformed JSON: {exc.msg} at column {exc.colno}", source=source, line=line, raw=shown)
    except ValueError as exc:  # NaN, Infinity, 1e999, an integer of more than 4300 digits
        return UnreadableRow(f"malformed JSON: {exc}", source=source, line=line, raw=shown)
    except RecursionError:
        return UnreadableRow("malformed JSON: nested too deeply", source=source, line=line, raw=shown)
    if not isinstance(row, dict):
        return UnreadableRow(f"expected a JSON object, got {kind_of(row)}", source=source, line=line, raw=shown)
    return row


def _jsonl(stream: IO[bytes], source: str) -> Iterator[Parsed]:
    for number in itertools.count(1):
        raw, size = _read_line(stream)
        if not raw:
            return
        item = _too_big(size, source, number) if size > MAX_ROW_BYTES else _json_row(raw, source, number)
        if item is not None:
            yield number, item


class _LineError(Exception):
    """Raised by ``_CsvLines`` through csv.reader; ``_csv`` decides whether the row or the file is lost."""

    def __init__(self, error: UnreadableRow) -> None:
        self.error = error


class _CsvLines:
    """The physical lines under csv.reader: decoded, with each record's bytes bounded."""

    def __init__(self, stream: IO[bytes], source: str) -> None:
        self.stream, self.source = stream, source
        self.line = 0  # the last physical line read
        self.start = 1  # the first physical line of the record being read
        self.size = 0  # bytes of that record so far

    def next_record(self) -> None:
        self.start, self.size = self.line + 1, 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        raw, size = _read_line(self.stream)
        if not raw:
            raise StopIteration
        self.line += 1
        self.size += size + (self.line > self.start)  # the newlines inside a quoted field count too
        if self.size > MAX_ROW_BYTES:
            raise _LineError(_too_big(self.size, self.source, self.start))
        decoded = _decode(raw, self.source, self.line)
        if isinstance(decoded, UnreadableRow):
            raise _LineError(decoded)
        return decoded


def _csv_header(record: list[str], source: str) -> list[str]:
    seen: set[str] = set()
    for name in record:
        if name in seen:
            raise InputError(f'duplicate column "{name}" in the header', source=source, line=1, field=name)
        seen.add(name)
    return record


def _csv_text(record: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(record)
    return out.getvalue()


def _csv(stream: IO[bytes], source: str) -> Iterator[Parsed]:
    # Process-wide, but only ever raised: _CsvLines bounds a record to MAX_ROW_BYTES itself.
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_BYTES + 1))
    lines = _CsvLines(stream, source)
    # strict: a stray or unclosed quote is an error, not a field that swallows the following rows.
    reader = csv.reader(lines, strict=True)
    header: list[str] | None = None
    while True:
        lines.next_record()
        try:
            record = next(reader)
        except StopIteration:
            return
        except _LineError as exc:
            if header is not None and lines.line == lines.start:
                yield lines.start, exc.error
                continue
            if lines.line == lines.start:
                raise exc.error from None
            raise InputError(f"{exc.error.reason} (inside a quoted field opened on line {lines.start}: an unclosed "
                             "quote? the rest of the file cannot be read)", source=source, line=lines.line) from None
        except csv.Error as exc:
            raise InputError(f"malformed CSV: {exc}", source=source, line=lines.start) from None
        if not any(record):  # a blank line
            continue
        if header is None:
            header = _csv_header(record, source)
        elif len(record) != len(header):
            yield lines.start, UnreadableRow(f"{len(record)} columns, the header has {len(header)} "
                                             f"({', '.join(header)})", source=source, line=lines.start,
                                             raw=_csv_text(record))
        else:
            yield lines.start, dict(zip(header, record, strict=True))


def read_rows(stream: IO[bytes], fmt: Literal["jsonl", "csv"], source: str) -> Iterator[Parsed]:
    """Yield (line number, row) from a JSONL or CSV byte stream, line by line.

    A row that cannot be read comes as an ``InputError`` (naming source and line) in place of the
    row; an ``InputError`` is raised only when the rest of the stream cannot be read reliably.
    """
    return _csv(stream, source) if fmt == "csv" else _jsonl(stream, source)


def sniff_format(head: bytes) -> Literal["jsonl", "csv"]:
    """Guess the format of a stream without a file name from its first bytes: a first line that is not a
    JSON object but holds a comma is a CSV header; anything else is read as JSONL (and its errors say so)."""
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    first = text.split(b"\n", 1)[0]
    return "csv" if first and not first.startswith((b"{", b"[")) and b"," in first else "jsonl"


# --- the JSON text stored in jobs.input ----------------------------------------------------------


def kind_of(value: Any) -> str:  # Any: a JSON value
    """How an error names a value's type: null, an object, an array, str, int..."""
    return {type(None): "null", dict: "an object", list: "an array"}.get(type(value), type(value).__name__)


# An escaped NUL that is not itself an escaped backslash followed by "u0000".
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_NUL_REASON = "contains a NUL character (\\u0000), which PostgreSQL cannot store"
_SURROGATE_REASON = "contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode"
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> str:  # Any: a row or one of its values
    return _ENCODER.encode(value)


def _utf8(data: str) -> bytes | None:
    try:
        return data.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _unstorable(data: str, encoded: bytes | None) -> str | None:
    """Why Postgres' jsonb cannot store this JSON text, or None."""
    if encoded is None:
        return _SURROGATE_REASON
    if "\\u0000" in data and _NUL.search(data):
        return _NUL_REASON
    return None


def _storable(value: Any) -> bool:  # Any: a JSON value
    data = _dumps(value)
    return _unstorable(data, _utf8(data)) is None


def encode_row(row: Row, line: int, source: str) -> tuple[str, bytes]:
    """The row as the JSON text stored in ``jobs.input``, and its UTF-8 bytes.

    Raises InputError for what Postgres' jsonb cannot store, naming the field at fault.
    """
    try:
        data = _dumps(row)
    except (TypeError, ValueError) as exc:  # rows given as dicts: a datetime, a NaN
        raise InputError(f"not JSON-serializable: {exc}", source=source, line=line) from None
    encoded = _utf8(data)
    reason = _unstorable(data, encoded)
    if reason or encoded is None:
        bad = next((k for k, v in row.items() if not _storable({k: v})), None)
        raise InputError(f'field "{bad}" {reason}' if bad else f"row {reason}", source=source, line=line, field=bad)
    if len(encoded) > MAX_ROW_BYTES:
        raise InputError(f"row is {len(encoded)} bytes as JSON, over the limit of {MAX_ROW_BYTES}", source=source,
                         line=line)
    return data, encoded
