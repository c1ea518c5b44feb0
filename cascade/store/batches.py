"""Batches and their jobs as a whole: inserting a batch (one COPY), and what the producer, the client, the CLI
and evaluation read about it.

Database errors are translated here: a second batch with a taken idempotency key raises
``IdempotencyKeyTaken``, two rows with one key ``DuplicateKey``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from psycopg.errors import UniqueViolation
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from cascade.errors import DuplicateKey, IdempotencyKeyTaken
from cascade.store.jobs import Stage

__all__ = [
    "JobResult",
    "NewBatch",
    "batch_audits",
    "batch_by_key",
    "batch_config",
    "batch_rows",
    "batch_starts",
    "copy_jobs",
    "count_finished",
    "count_jobs",
    "count_jobs_by_stage",
    "count_jobs_by_tier",
    "finish_batch",
    "halt_batch",
    "insert_batch",
    "job_results",
    "match_batch_ids",
    "max_tiers",
    "models_ignoring_n",
    "queued_calls",
    "resume_batch",
]


def batch_config(conn: Connection, batch_id: str) -> dict[str, Any]:  # Any: snapshot JSON
    return dict(conn.execute(text("SELECT config FROM batches WHERE id = :id"), {"id": batch_id}).scalar_one())


# --- submitting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewBatch:
    """A batch row as inserted before its jobs: ``rows`` and ``content_hash`` come with ``finish_batch``."""

    id: str
    task_type: str
    idempotency_key: str | None
    config_json: str  # the task's snapshot (``TaskSnapshot.to_json``) as JSON text
    config_hash: str
    source: str
    tiers: int
    top_input_per_mtok: Decimal
    top_output_per_mtok: Decimal


_INSERT_BATCH = text("""
INSERT INTO batches (id, task_type, idempotency_key, content_hash, config, config_hash, rows, source, tiers,
                     top_input_per_mtok, top_output_per_mtok, max_cost_usd)
VALUES (:id, :task, :key, '', CAST(:config AS jsonb), :hash, 0, :source, :tiers, :tin, :tout,
        (CAST(:config AS jsonb) ->> 'max_cost_usd')::numeric)
""")


def insert_batch(conn: Connection, batch: NewBatch) -> None:
    """Insert a batch row, with no jobs yet.

    Raises:
        IdempotencyKeyTaken: another batch holds ``batch.idempotency_key`` (a concurrent submit with the same
            key committed first); the transaction is aborted.
    """
    params = {"id": batch.id, "task": batch.task_type, "key": batch.idempotency_key, "config": batch.config_json,
              "hash": batch.config_hash, "source": batch.source, "tiers": batch.tiers,
              "tin": batch.top_input_per_mtok, "tout": batch.top_output_per_mtok}
    try:
        conn.execute(_INSERT_BATCH, params)
    except IntegrityError as exc:
        if batch.idempotency_key and "idempotency_key" in str(exc.orig):
            raise IdempotencyKeyTaken(batch.idempotency_key) from exc
        raise


_COPY_JOBS = "COPY jobs (batch_id, task_type, key, input, tier, start_tier, route) FROM STDIN"
_DUPLICATE = re.compile(r"\(batch_id, key\)=\([^,]*, (.*)\) already exists")
_COPY_LINE = re.compile(r"COPY jobs, line (\d+)")


def copy_jobs(conn: Connection, batch_id: str, task_type: str,
              rows: Iterable[tuple[str, str, int, str | None]]) -> int:
    """Copy a batch's jobs, (key, input as JSON text, start tier, what chose it) each, in one COPY as ``rows``
    yields them (a batch is never all in memory); returns how many. An error ``rows`` raises ends the COPY and
    propagates.

    Raises:
        DuplicateKey: two rows have the same key; the transaction is aborted.
    """
    count = 0
    raw = conn.connection.driver_connection
    assert raw is not None
    try:
        with raw.cursor() as cur, cur.copy(_COPY_JOBS) as copy:
            for key, data, start, route in rows:
                copy.write_row((batch_id, task_type, key, data, start, start, route))
                count += 1
    except UniqueViolation as exc:
        match = _DUPLICATE.search(exc.diag.message_detail or "")
        copied = _COPY_LINE.search(exc.diag.context or "")
        raise DuplicateKey(match.group(1) if match else "?", int(copied.group(1)) if copied else None) from exc
    return count


_FINISH_BATCH = text("UPDATE batches SET rows = :n, content_hash = :h WHERE id = :id")


def finish_batch(conn: Connection, batch_id: str, rows: int, content_hash: str) -> None:
    """Record a batch's job count and content hash, once its jobs are copied."""
    conn.execute(_FINISH_BATCH, {"n": rows, "h": content_hash, "id": batch_id})


_BY_KEY = text("SELECT id, content_hash FROM batches WHERE idempotency_key = :k")


def batch_by_key(conn: Connection, key: str) -> tuple[str, str] | None:
    """(batch id, content hash) of the batch submitted with idempotency key ``key``, if there is one."""
    row = conn.execute(_BY_KEY, {"k": key}).first()
    return (row.id, row.content_hash) if row else None


_QUEUED_CALLS = text("""
SELECT id, tier FROM jobs WHERE batch_id = :b AND status = 'queued' AND stage = 'call' ORDER BY id
""")


def queued_calls(conn: Connection, batch_id: str, chunk: int) -> Iterator[list[tuple[int, int]]]:
    """(job id, tier) of a batch's queued calls in chunks of ``chunk``, streamed (a server-side cursor on
    ``conn``, which must stay open while they are read)."""
    result = conn.execution_options(stream_results=True, yield_per=chunk).execute(_QUEUED_CALLS, {"b": batch_id})
    for part in result.partitions(chunk):
        yield [(job_id, tier) for job_id, tier in part]


# --- halting on a configuration fault -----------------------------------------------------------

_HALT = text("""
UPDATE batches SET halted_at = now(), halt_reason = :reason WHERE id = :b AND halted_at IS NULL
""")
_RESUME = text("UPDATE batches SET halted_at = NULL, halt_reason = NULL WHERE id = :b RETURNING id")
_REPUBLISH = text("""
UPDATE jobs SET published_at = now(), not_before = NULL
WHERE batch_id = :b AND status = 'queued'
RETURNING id, tier, stage
""")


def halt_batch(conn: Connection, batch_id: str, reason: str) -> None:
    """Stop the batch: no job of it is claimed (its messages become no-ops) or re-published until
    ``resume_batch``. The first reason stays."""
    conn.execute(_HALT, {"b": batch_id, "reason": reason[:2000]})


_N_IGNORED = text("""
SELECT DISTINCT a.model FROM attempts a JOIN jobs j ON j.id = a.job_id
WHERE j.batch_id = :b AND (a.error = 'n_unsupported' OR a.choices < a.n)
ORDER BY a.model
""")


def models_ignoring_n(conn: Connection, batch_id: str) -> list[str]:
    """The models that answered fewer choices than ``n`` (or refused ``n``) for this batch's requests."""
    return [model for (model,) in conn.execute(_N_IGNORED, {"b": batch_id})]


_CACHE_USE = text("""
SELECT count(*) FILTER (WHERE a.cached) AS hits, count(*) FILTER (WHERE NOT a.cached AND a.error IS NULL) AS misses,
       coalesce(sum(a.saved_usd) FILTER (WHERE a.cached), 0) AS saved_usd
FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b
""")


def batch_cache_use(conn: Connection, batch_id: str) -> tuple[int, int, Decimal]:
    """The batch's answered requests read from the request cache (hits), those sent (misses), and the original
    cost of the hits."""
    row = conn.execute(_CACHE_USE, {"b": batch_id}).one()
    return int(row.hits), int(row.misses), Decimal(row.saved_usd)


_STARTS = text("""
SELECT start_tier, coalesce(route, 'default') AS route, count(*) FROM jobs WHERE batch_id = :b
GROUP BY 1, 2 ORDER BY 1, 2
""")


def batch_starts(conn: Connection, batch_id: str) -> list[tuple[int, str, int]]:
    """(start tier, what chose it, jobs) of the batch's jobs (``route`` NULL reads ``default``)."""
    return [(int(tier), str(route), int(n)) for tier, route, n in conn.execute(_STARTS, {"b": batch_id})]


_AUDITS = text("""
SELECT count(*) FILTER (WHERE a.status IN ('queued', 'running')) AS pending,
       count(*) FILTER (WHERE a.agreed) AS agreed, count(*) FILTER (WHERE NOT a.agreed) AS disagreed,
       coalesce(sum(a.cost_usd), 0) AS cost_usd
FROM audits a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b
""")


def batch_audits(conn: Connection, batch_id: str) -> tuple[int, int, int, Decimal]:
    """The batch's audits: (waiting or running, agreed, disagreed, their cost)."""
    row = conn.execute(_AUDITS, {"b": batch_id}).one()
    return int(row.pending), int(row.agreed), int(row.disagreed), Decimal(row.cost_usd)


def resume_batch(conn: Connection, batch_id: str) -> list[tuple[int, int, Stage]] | None:
    """Clear the halt and stamp every queued job of the batch as published now; returns the (job, tier,
    stage)s to publish, or None when there is no such batch."""
    if conn.execute(_RESUME, {"b": batch_id}).first() is None:
        return None
    return [(job_id, tier, Stage(stage)) for job_id, tier, stage in conn.execute(_REPUBLISH, {"b": batch_id})]


# --- reading -------------------------------------------------------------------------------------


_PREFIX = text("SELECT id FROM batches WHERE id = :p UNION ALL "
               "(SELECT id FROM batches WHERE id LIKE :like ESCAPE '\\' AND id <> :p ORDER BY id LIMIT :n)")


def match_batch_ids(conn: Connection, prefix: str, limit: int = 5) -> list[str]:
    """Batch ids equal to ``prefix`` (first) or starting with it, at most ``limit`` + 1 of them."""
    like = re.sub(r"([\\%_])", r"\\\1", prefix) + "%"
    return [r.id for r in conn.execute(_PREFIX, {"p": prefix, "like": like, "n": limit})]


def batch_rows(conn: Connection, batch_id: str) -> tuple[str, int, str | None, bool] | None:
    """(task type, row count, why it is halted or None, whether it was cancelled) of a batch; None if there is
    no such batch."""
    row = conn.execute(text("SELECT task_type, rows, halted_at, halt_reason, cancelled_at FROM batches WHERE id = :b"),
                       {"b": batch_id}).first()
    if row is None:
        return None
    return (row.task_type, row.rows, None if row.halted_at is None else str(row.halt_reason or "halted"),
            row.cancelled_at is not None)


_COUNT_JOBS = text("SELECT status, tier, count(*), sum(cost_usd) FROM jobs WHERE batch_id = :b GROUP BY status, tier")


def count_jobs(conn: Connection, batch_id: str) -> list[tuple[str, int, int, Decimal | None]]:
    """A batch's jobs per (status, tier): (status, tier, count, total cost)."""
    return [(status, tier, n, cost) for status, tier, n, cost in conn.execute(_COUNT_JOBS, {"b": batch_id})]


_BY_STAGE = text("SELECT tier, stage, status, count(*) FROM jobs WHERE batch_id = :b GROUP BY tier, stage, status "
                 "ORDER BY tier, stage, status")


def count_jobs_by_stage(conn: Connection, batch_id: str) -> list[tuple[int, str, str, int]]:
    """A batch's jobs per (tier, stage, status): (tier, stage, status, count)."""
    return [(tier, stage, status, n) for tier, stage, status, n in conn.execute(_BY_STAGE, {"b": batch_id})]


_BY_TIER = text("SELECT tier, status, count(*) FROM jobs WHERE batch_id = ANY(:ids) GROUP BY tier, status")


def count_jobs_by_tier(conn: Connection, batch_ids: Sequence[str]) -> list[tuple[int, str, int]]:
    """The jobs of several batches per (tier, status): (tier, status, count)."""
    return [(tier, status, n) for tier, status, n in conn.execute(_BY_TIER, {"ids": list(batch_ids)})]


def max_tiers(conn: Connection, batch_ids: Sequence[str]) -> int:
    """The most tiers any of the batches has (1 if none exists)."""
    sql = text("SELECT coalesce(max(tiers), 1) FROM batches WHERE id = ANY(:ids)")
    return int(conn.execute(sql, {"ids": list(batch_ids)}).scalar_one())


_FINISHED = text("SELECT count(*), count(*) FILTER (WHERE status IN ('succeeded', 'failed')) FROM jobs "
                 "WHERE batch_id = ANY(:ids)")


def count_finished(conn: Connection, batch_ids: Sequence[str]) -> tuple[int, int]:
    """(jobs, finished jobs) of several batches together."""
    total, done = conn.execute(_FINISHED, {"ids": list(set(batch_ids))}).one()
    return int(total), int(done)


@dataclass(frozen=True)
class JobResult:
    """Where one job ended, or stands."""

    job_id: int
    key: str
    status: str
    tier: int
    output: Any  # Any: the job's JSON output, None until it succeeded
    cost_usd: Decimal
    error: str | None


_RESULTS = text("SELECT id, key, status, tier, output, cost_usd, error FROM jobs WHERE batch_id = :b ORDER BY id")


def job_results(conn: Connection, batch_id: str) -> Iterator[JobResult]:
    """A batch's jobs in input order, streamed 1000 at a time (``conn`` must stay open while they are read)."""
    result = conn.execution_options(stream_results=True, yield_per=1000).execute(_RESULTS, {"b": batch_id})
    for r in result:
        yield JobResult(r.id, r.key, r.status, r.tier, r.output, r.cost_usd, r.error)
