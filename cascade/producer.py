"""Submit batches: stream rows, check them, insert the batch whole (COPY, one transaction), then publish.

Rows are never all in memory: they are read, checked and copied into Postgres one at a time, and job
ids are streamed back for publishing after the commit. Without ``skip_invalid`` the first bad row
aborts the transaction, so nothing is inserted and nothing is published.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError

from cascade.config import CascadeConfig, TaskSnapshot, template_fields
from cascade.errors import IdempotencyConflict, InputError
from cascade.publish import Publisher
from cascade.store import Stage

__all__ = ["MAX_ROW_BYTES", "SubmitResult", "read_rows", "required_fields", "submit", "submit_rows"]

MAX_ROW_BYTES = 1_000_000
PUBLISH_CHUNK = 2000
Row = dict[str, Any]  # Any: a user's row


@dataclass(frozen=True)
class SubmitResult:
    batch_id: str
    rows: int
    rejected: int
    created: bool  # False: the idempotency key named an existing batch with the same content


def required_fields(snap: TaskSnapshot) -> list[str]:
    """Every ``{field}`` the task's prompts (all tiers and variants) use."""
    task = snap.task_type
    texts = [task.system, task.prompt]
    texts += [v.prompt for v in task.self_consistency.variants or []]
    texts += [v.system or "" for v in task.self_consistency.variants or []]
    for i in range(1, snap.tier_count + 1):
        tier = snap.tier(i)
        texts += [tier.system, tier.prompt] + [v.prompt for v in tier.variants or []]
    fields: list[str] = []
    for t in texts:
        fields += [f for f in template_fields(t) if f not in fields]
    return fields


def _jsonl(stream: IO[bytes], source: str) -> Iterator[tuple[int, Row]]:
    for number, raw in enumerate(stream, start=1):
        if len(raw) > MAX_ROW_BYTES:
            raise InputError(f"row is {len(raw)} bytes, over the limit of {MAX_ROW_BYTES}", source=source, line=number)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8 (byte {exc.start})", source=source, line=number) from None
        line = line.lstrip("\ufeff") if number == 1 else line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"malformed JSON: {exc.msg} at column {exc.colno}", source=source, line=number) from None
        if not isinstance(row, dict):
            raise InputError(f"expected a JSON object, got {type(row).__name__}", source=source, line=number)
        yield number, row


def _csv(stream: IO[bytes], source: str) -> Iterator[tuple[int, Row]]:
    reader = csv.reader(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        for record in reader:
            if not any(record):
                continue
            if len(record) != len(header):
                raise InputError(f"{len(record)} columns, the header has {len(header)} ({', '.join(header)})",
                                 source=source, line=reader.line_num)
            yield reader.line_num, dict(zip(header, record, strict=True))
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 (byte {exc.start})", source=source, line=reader.line_num + 1) from None
    except csv.Error as exc:
        raise InputError(f"malformed CSV: {exc}", source=source, line=reader.line_num) from None


def read_rows(stream: IO[bytes], fmt: Literal["jsonl", "csv"], source: str) -> Iterator[tuple[int, Row]]:
    """Yield (line number, row) from a JSONL or CSV byte stream; InputError names source and line."""
    return _csv(stream, source) if fmt == "csv" else _jsonl(stream, source)


def check_row(row: Row, line: int, source: str, fields: list[str], key_field: str | None, task: str) -> str:
    """Check one row against the task's template fields; return its key. Raises InputError."""
    for name in fields:
        if name not in row:
            raise InputError(f'column "{name}" missing for task "{task}"', source=source, line=line, field=name)
        if not isinstance(row[name], str | int | float | bool):
            kind = "null" if row[name] is None else type(row[name]).__name__
            raise InputError(f'field "{name}" is {kind}; expected a string or number', source=source, line=line,
                             field=name)
    if key_field is None:
        return str(line)
    value = row.get(key_field)
    if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
        raise InputError(f'key field "{key_field}" missing or not a string/integer', source=source, line=line,
                         field=key_field)
    return str(value)


@dataclass
class _Rejects:
    path: Path | None
    count: int = 0
    _file: IO[str] | None = None

    def add(self, error: InputError, row: Row | None) -> None:
        if self.path is None:
            raise error
        if self._file is None:
            self._file = self.path.open("w", encoding="utf-8")
        record = {"line": error.line, "field": error.field, "reason": error.reason, "row": row}
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _good_rows(rows: Iterable[tuple[int, Row]], snap: TaskSnapshot, source: str, key_field: str | None,
               rejects: _Rejects) -> Iterator[tuple[str, Row]]:
    fields, task = required_fields(snap), snap.task_type.name
    it = iter(rows)
    while True:
        try:
            line, row = next(it)
        except StopIteration:
            return
        except InputError as exc:  # a row that could not even be parsed: JSONL goes on, CSV stops
            rejects.add(exc, None)
            if not isinstance(rows, Iterator) or exc.line is None:
                return
            continue
        try:
            yield check_row(row, line, source, fields, key_field, task), row
        except InputError as exc:
            rejects.add(exc, row)


def _insert_batch(conn: Connection, batch_id: str, snap: TaskSnapshot, key: str | None, source: str) -> None:
    top = snap.tier(snap.tier_count).model.price
    conn.execute(text("""
        INSERT INTO batches (id, task_type, idempotency_key, content_hash, config, config_hash, rows, source, tiers,
                             top_input_per_mtok, top_output_per_mtok)
        VALUES (:id, :task, :key, '', CAST(:config AS jsonb), :hash, 0, :source, :tiers, :tin, :tout)
    """), {"id": batch_id, "task": snap.task_type.name, "key": key, "config": json.dumps(snap.to_json()),
           "hash": snap.config_hash(), "source": source, "tiers": snap.tier_count,
           "tin": top.input_per_mtok, "tout": top.output_per_mtok})


def _encoded(rows: Iterator[tuple[str, Row]], digest: Any) -> Iterator[tuple[str, str]]:  # Any: hashlib
    """(key, row JSON) for each row, fed into the batch's content hash on the way."""
    for key, row in rows:
        data = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        digest.update(key.encode() + b"\0" + data.encode() + b"\n")
        yield key, data


def _copy_jobs(conn: Connection, batch_id: str, task: str, rows: Iterator[tuple[str, str]]) -> int:
    count = 0
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur, cur.copy("COPY jobs (batch_id, task_type, key, input) FROM STDIN") as copy:
        for key, data in rows:
            copy.write_row((batch_id, task, key, data))
            count += 1
    return count


_DUPLICATE = re.compile(r"\(batch_id, key\)=\([^,]*, (.*)\) already exists")


def _existing(engine: Engine, key: str) -> tuple[str, str] | None:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT id, content_hash FROM batches WHERE idempotency_key = :k"), {"k": key}).first()
    return (row.id, row.content_hash) if row else None


def submit_rows(
    engine: Engine,
    publisher: Publisher,
    snap: TaskSnapshot,
    rows: Iterable[tuple[int, Row]],
    *,
    source: str = "<rows>",
    key_field: str | None = None,
    idempotency_key: str | None = None,
    rejects_path: Path | None = None,
) -> SubmitResult:
    """Insert a batch whole (or not at all), then publish its jobs to tier 1.

    Raises InputError (naming source, line and field) for a bad row unless ``rejects_path`` is given,
    IdempotencyConflict when the key names a batch with other content.
    """
    batch_id = uuid.uuid4().hex
    digest = hashlib.sha256(f"{snap.task_type.name}\0{snap.config_hash()}\0".encode())
    rejects = _Rejects(rejects_path)
    encoded = _encoded(_good_rows(rows, snap, source, key_field, rejects), digest)
    try:
        if idempotency_key and (found := _existing(engine, idempotency_key)):
            return _same_batch(idempotency_key, found, encoded, digest, rejects)
        try:
            with engine.begin() as conn:
                _insert_batch(conn, batch_id, snap, idempotency_key, source)
                count = _copy_jobs(conn, batch_id, snap.task_type.name, encoded)
                if count == 0:
                    raise InputError("no rows to submit" + (f" ({rejects.count} rejected)" if rejects.count else ""),
                                     source=source)
                conn.execute(text("UPDATE batches SET rows = :n, content_hash = :h WHERE id = :id"),
                             {"n": count, "h": digest.hexdigest(), "id": batch_id})
        except IntegrityError as exc:
            found = _existing(engine, idempotency_key) if idempotency_key else None
            if idempotency_key and found and "idempotency_key" in str(exc.orig):
                return _same_batch(idempotency_key, found, encoded, digest, rejects)  # a concurrent twin won
            match = _DUPLICATE.search(str(exc.orig))
            if match:
                raise InputError(f"duplicate key {match.group(1)!r}", source=source, field=key_field) from None
            raise
    finally:
        rejects.close()
    publish_batch(engine, publisher, batch_id)
    return SubmitResult(batch_id, count, rejects.count, True)


def _same_batch(key: str, found: tuple[str, str], encoded: Iterator[tuple[str, str]], digest: Any,
                rejects: _Rejects) -> SubmitResult:  # Any: a hashlib object
    """The key names an existing batch: hash our rows without inserting them and compare."""
    count = sum(1 for _ in encoded)
    if found[1] != digest.hexdigest():
        raise IdempotencyConflict(key, found[0])
    return SubmitResult(found[0], count, rejects.count, False)


def publish_batch(engine: Engine, publisher: Publisher, batch_id: str) -> int:
    """Publish every queued tier-1 call of a batch, streaming ids in chunks."""
    sent = 0
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=PUBLISH_CHUNK).execute(
            text("SELECT id FROM jobs WHERE batch_id = :b AND status = 'queued' AND stage = 'call' ORDER BY id"),
            {"b": batch_id})
        for chunk in result.partitions(PUBLISH_CHUNK):
            publisher.publish([(job_id, 1, Stage.CALL) for (job_id,) in chunk])
            sent += len(chunk)
    return sent


def submit(
    engine: Engine,
    publisher: Publisher,
    config: CascadeConfig,
    task_type: str,
    stream: IO[bytes],
    *,
    source: str,
    fmt: Literal["jsonl", "csv"] = "jsonl",
    key_field: str | None = None,
    idempotency_key: str | None = None,
    rejects_path: Path | None = None,
) -> SubmitResult:
    """Submit a JSONL or CSV byte stream as one batch of ``task_type``."""
    snap = config.snapshot(task_type)
    return submit_rows(engine, publisher, snap, read_rows(stream, fmt, source), source=source, key_field=key_field,
                       idempotency_key=idempotency_key, rejects_path=rejects_path)
