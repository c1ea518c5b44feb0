"""Submit batches: stream rows, check them, insert the batch whole (COPY, one transaction), then publish.

Rows are never all in memory: ``cascade.rows`` reads each physical line with a size bound, and each
row is checked and copied into Postgres in turn; job ids are streamed back for publishing after the
commit. Without ``rejects_path`` the first bad row aborts the transaction: nothing is inserted and
nothing is published. With it, bad rows go to that file and the rest is submitted.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import Engine

from cascade import routing, store
from cascade.config import CascadeConfig, TaskSnapshot, template_fields
from cascade.errors import DuplicateKey, IdempotencyConflict, IdempotencyKeyTaken, InputError, ServiceUnreachable
from cascade.publish import Publisher, broker_errors
from cascade.rows import MAX_ROW_BYTES, Row, UnreadableRow, encode_row, kind_of, read_rows
from cascade.store import Stage

__all__ = [
    "MAX_ROW_BYTES",
    "SubmitResult",
    "publish_batch",
    "read_rows",
    "required_fields",
    "submit",
    "submit_rows",
]

PUBLISH_CHUNK = 2000


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
        texts += [tier.system, tier.prompt] + [t for v in tier.variants or [] for t in (v.prompt, v.system or "")]
    fields: list[str] = []
    for t in texts:
        fields += [f for f in template_fields(t) if f not in fields]
    return fields


# --- checking ------------------------------------------------------------------------------------


def check_row(row: Row, line: int, source: str, fields: list[str], key_field: str | None, task: str) -> str:
    """Check one row against the task's template fields; return its key. Raises InputError."""
    if not isinstance(row, dict):
        raise InputError(f"expected an object, got {kind_of(row)}", source=source, line=line)
    for name in fields:
        if name not in row:
            raise InputError(f'column "{name}" missing for task "{task}"', source=source, line=line, field=name)
        if not isinstance(row[name], str | int | float | bool):
            raise InputError(f'field "{name}" is {kind_of(row[name])}; expected a string or number', source=source,
                             line=line, field=name)
    if key_field is None:
        return str(line)
    value = row.get(key_field)
    if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
        what = "missing or null" if value is None else "empty" if value == "" else kind_of(value)
        raise InputError(f'key field "{key_field}" is {what}; expected a string or integer', source=source,
                         line=line, field=key_field)
    return str(value)


@dataclass
class _Rejects:
    """The rejects file: one JSON line per bad row. None: a bad row aborts the batch."""

    path: Path | None
    count: int = 0
    _file: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None:  # truncated up front: a rejects file from an earlier run must not linger
            try:
                # backslashreplace: a rejected row may hold a lone surrogate, which UTF-8 cannot encode
                self._file = self.path.open("w", encoding="utf-8", errors="backslashreplace")
            except OSError as exc:
                raise InputError(f"cannot write rejects: {exc.strerror}", source=str(self.path)) from None

    def add(self, error: InputError, row: Any) -> None:  # Any: the row as given, if it was read
        if self._file is None:
            raise error
        record = {"line": error.line, "field": error.field, "reason": error.reason}
        raw = error.raw if isinstance(error, UnreadableRow) else None
        record.update({"raw": raw} if row is None else {"row": row})
        self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class _Accepted:
    """The good rows of a stream as (key, JSON text); hashes them for the idempotency check on the way."""

    rows: Iterable[tuple[int, Any]]  # Any: a row, or an InputError from read_rows
    snap: TaskSnapshot
    source: str
    key_field: str | None
    rejects: _Rejects
    batch_id: str = ""
    #: where rows no ``route`` rule matches start under ``routing: {start: learned}`` (``learn_start``)
    learned: int = 1
    digest: Any = None  # Any: a hashlib object
    lines: array[int] = field(default_factory=lambda: array("q"))  # source line of each accepted row

    def __post_init__(self) -> None:
        self.digest = hashlib.sha256(f"{self.snap.task_type.name}\0{self.snap.config_hash()}\0".encode())

    def __iter__(self) -> Iterator[tuple[str, str, int, str | None]]:
        fields, task = required_fields(self.snap), self.snap.task_type.name
        for line, row in self.rows:
            if isinstance(row, InputError):
                self.rejects.add(row, None)
                continue
            try:
                key = check_row(row, line, self.source, fields, self.key_field, task)
                data, encoded = encode_row(row, line, self.source)
            except InputError as exc:
                self.rejects.add(exc, row)
                continue
            self.digest.update(key.encode() + b"\0" + encoded + b"\n")
            if self.key_field is not None:  # only keyed rows can collide; 8 bytes a row names the duplicate's line
                self.lines.append(line)
            start = routing.start_of(self.snap.task_type, self.batch_id, key, row, self.learned)
            yield key, data, start.tier, start.route

    def duplicate(self, exc: DuplicateKey) -> InputError:
        """The InputError for a COPY that failed on a duplicate key: the second row's source line and field."""
        index = exc.row - 1 if exc.row is not None else -1
        line = self.lines[index] if 0 <= index < len(self.lines) else None
        return InputError(f'duplicate key "{exc.key}" in field "{self.key_field}"', source=self.source, line=line,
                          field=self.key_field)


# --- inserting and publishing --------------------------------------------------------------------


def _new_batch(batch_id: str, snap: TaskSnapshot, key: str | None, source: str) -> store.NewBatch:
    top = snap.tier(snap.tier_count).model.price
    return store.NewBatch(batch_id, snap.task_type.name, key, json.dumps(snap.to_json()), snap.config_hash(), source,
                          snap.tier_count, top.input_per_mtok, top.output_per_mtok)


def learn_start(engine: Engine, snap: TaskSnapshot) -> int:
    """The tier a batch's jobs start at under ``routing: {start: learned}`` (``cascade.routing.learned_start``,
    from the task type's history now); 1 when the task type does not learn."""
    learning = snap.task_type.routing
    if learning.start != "learned":
        return 1
    with engine.connect() as conn:
        history = store.tier_history(conn, snap.task_type.name, snap.tier_count, learning.window)
    return routing.learned_start([routing.TierHistory(*h) for h in history], snap.tier_count, learning.min_jobs)


def _existing(engine: Engine, key: str) -> tuple[str, str] | None:
    with engine.connect() as conn:
        return store.batch_by_key(conn, key)


def _insert(engine: Engine, batch_id: str, snap: TaskSnapshot, accepted: _Accepted,
            idempotency_key: str | None) -> int:
    """Insert the batch and its jobs in one transaction; returns the job count."""
    with engine.begin() as conn:
        store.insert_batch(conn, _new_batch(batch_id, snap, idempotency_key, accepted.source))
        try:
            count = store.copy_jobs(conn, batch_id, snap.task_type.name, accepted)
        except DuplicateKey as exc:
            raise accepted.duplicate(exc) from None
        if count == 0:
            rejected = f" ({accepted.rejects.count} rejected)" if accepted.rejects.count else ""
            raise InputError(f"no rows to submit{rejected}", source=accepted.source)
        store.finish_batch(conn, batch_id, count, accepted.digest.hexdigest())
    return count


def submit_rows(
    engine: Engine,
    publisher: Publisher,
    snap: TaskSnapshot,
    rows: Iterable[tuple[int, Any]],  # Any: a row, or an InputError from read_rows
    *,
    source: str = "<rows>",
    key_field: str | None = None,
    idempotency_key: str | None = None,
    rejects_path: Path | None = None,
    on_committed: Callable[[str], None] | None = None,
) -> SubmitResult:
    """Insert a batch whole (or not at all), then publish its jobs to tier 1.

    Raises InputError (naming source, line and field) for a bad row unless ``rejects_path`` is given,
    in which case bad rows are written there (line, field, reason, row) and the rest is submitted;
    IdempotencyConflict when the key names a batch with other content; ServiceUnreachable with the
    ``batch_id`` when the batch was committed but the broker did not take its messages. ``on_committed``
    is called with the new batch's id right after the commit, before publishing.
    """
    batch_id = uuid.uuid4().hex
    rejects = _Rejects(rejects_path)
    accepted = _Accepted(rows, snap, source, key_field, rejects, batch_id, learn_start(engine, snap))
    rejects.open()
    try:
        if idempotency_key and (found := _existing(engine, idempotency_key)):
            return _same_batch(idempotency_key, found, accepted)
        try:
            count = _insert(engine, batch_id, snap, accepted, idempotency_key)
        except IdempotencyKeyTaken as exc:
            if found := _existing(engine, exc.key):
                return _same_batch(exc.key, found, accepted)  # a concurrent twin won
            raise
    finally:
        rejects.close()
    if on_committed:
        on_committed(batch_id)
    try:
        publish_batch(engine, publisher, batch_id)
    except broker_errors() as exc:
        # Committed but not sent: the jobs are queued in Postgres, and the sweeper finds their messages missing.
        raise ServiceUnreachable("broker", detail=_first_line(exc), batch_id=batch_id) from exc
    return SubmitResult(batch_id, count, rejects.count, True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _same_batch(key: str, found: tuple[str, str], accepted: _Accepted) -> SubmitResult:
    """The key names an existing batch: hash our rows without inserting them and compare."""
    count = sum(1 for _ in accepted)
    if found[1] != accepted.digest.hexdigest():
        raise IdempotencyConflict(key, found[0])
    return SubmitResult(found[0], count, accepted.rejects.count, False)


def publish_batch(engine: Engine, publisher: Publisher, batch_id: str) -> int:
    """Publish every queued call of a batch (each at its start tier), streaming ids in chunks."""
    sent = 0
    with engine.connect() as conn:
        for chunk in store.queued_calls(conn, batch_id, PUBLISH_CHUNK):
            publisher.publish([(job_id, tier, Stage.CALL) for job_id, tier in chunk])
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
