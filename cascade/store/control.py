"""Batch control (migration 0014): list batches, cancel one, run its failed (or cancelled) rows again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Connection, text

__all__ = ["BatchSummary", "Cancelled", "cancel_batch", "list_batches", "retry_jobs"]


@dataclass(frozen=True)
class BatchSummary:
    """One line of ``cascade batches``."""

    id: str
    task_type: str
    created_at: datetime
    rows: int
    succeeded: int
    failed: int
    cancelled: int
    open: int  # queued or running
    cost_usd: Decimal
    state: str  # running, done, halted, cancelled (still stopping: cancelling)


_LIST = text("""
SELECT b.id, b.task_type, b.created_at, b.rows, b.halted_at IS NOT NULL AS halted,
       b.cancelled_at IS NOT NULL AS cancelled_batch, c.succeeded, c.failed, c.cancelled, c.open, c.cost_usd
FROM (SELECT * FROM batches WHERE CAST(:t AS text) IS NULL OR task_type = :t
      ORDER BY created_at DESC, id LIMIT :n) b
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded, count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE status IN ('queued', 'running')) AS open, coalesce(sum(cost_usd), 0) AS cost_usd
    FROM jobs WHERE batch_id = b.id
) c
ORDER BY b.created_at DESC, b.id
""")


def _state(halted: bool, cancelled: bool, open_: int) -> str:
    if cancelled:
        return "cancelling" if open_ else "cancelled"
    if open_:
        return "halted" if halted else "running"
    return "done"


def list_batches(conn: Connection, *, limit: int = 20, task_type: str | None = None) -> list[BatchSummary]:
    """The newest ``limit`` batches (of ``task_type`` if given), newest first, with their jobs counted."""
    rows = conn.execute(_LIST, {"t": task_type, "n": limit})
    return [BatchSummary(r.id, r.task_type, r.created_at, int(r.rows), int(r.succeeded), int(r.failed),
                         int(r.cancelled), int(r.open), Decimal(r.cost_usd), _state(r.halted, r.cancelled_batch, r.open))
            for r in rows]


@dataclass(frozen=True)
class Cancelled:
    """What ``cancel_batch`` did: jobs cancelled at once, jobs still running (they stop after their current
    request), audits skipped."""

    queued: int
    running: int
    audits: int


_CANCEL = text("UPDATE batches SET cancelled_at = coalesce(cancelled_at, now()) WHERE id = :b")
_CANCEL_JOBS = text("""
WITH stopped AS (
    UPDATE jobs SET status = 'cancelled', error = 'cancelled', finished_at = now(), not_before = NULL,
                    lease_until = NULL
    WHERE batch_id = :b AND status = 'queued'
    RETURNING id
)
SELECT (SELECT count(*) FROM stopped) AS queued,
       (SELECT count(*) FROM jobs WHERE batch_id = :b AND status = 'running') AS running
""")
_CANCEL_AUDITS = text("""
UPDATE audits SET status = 'skipped', detail = 'its batch was cancelled', finished_at = now()
WHERE status = 'queued' AND job_id IN (SELECT id FROM jobs WHERE batch_id = :b)
""")


def cancel_batch(conn: Connection, batch_id: str) -> Cancelled:
    """Cancel a batch: its queued jobs (deferred ones too) are cancelled now; a running one is cancelled when its
    stage ends, and no new request of it goes out (``start_held_attempt``); its queued audits are skipped."""
    conn.execute(_CANCEL, {"b": batch_id})
    row = conn.execute(_CANCEL_JOBS, {"b": batch_id}).one()
    audits = conn.execute(_CANCEL_AUDITS, {"b": batch_id}).rowcount
    return Cancelled(int(row.queued), int(row.running), int(audits))


# The cap a retry may raise: what the batch has spent and holds, plus the retry's own allowance. A batch without
# a cap kept no counters (both 0), so its allowance is its new cap.
_RERUN_BATCH = text("""
UPDATE batches SET cancelled_at = NULL,
                   max_cost_usd = CASE WHEN CAST(:extra AS numeric) IS NULL THEN max_cost_usd
                                       ELSE spent_usd + reserved_usd + :extra END
WHERE id = :b
RETURNING max_cost_usd
""")
_RERUN_JOBS = text("""
UPDATE jobs SET status = 'queued', tier = 1, start_tier = 1, route = 'retry', stage = 'call', output = NULL,
                error = NULL, finished_at = NULL, not_before = NULL, lease_until = NULL, published_at = now()
WHERE batch_id = :b AND status = ANY(:statuses)
RETURNING id
""")
_SUPERSEDE_ATTEMPTS = text("UPDATE attempts SET superseded = true WHERE job_id = ANY(:ids) AND NOT audit")
_SUPERSEDE_VALIDATIONS = text("UPDATE validations SET superseded = true WHERE job_id = ANY(:ids) AND NOT superseded")


def retry_jobs(conn: Connection, batch_id: str, statuses: Sequence[str],
               extra_usd: Decimal | None = None) -> tuple[list[int], Decimal | None]:
    """Run the batch's jobs in ``statuses`` (failed, cancelled) again from tier 1: the same jobs, their earlier
    requests and verdicts kept as history (``superseded``; their cost stays in the job's). The batch is no longer
    cancelled; with ``extra_usd`` its cap becomes what it has spent plus that. Returns the job ids to publish
    (tier 1, call) and the batch's cap."""
    cap = conn.execute(_RERUN_BATCH, {"b": batch_id, "extra": extra_usd}).scalar_one()
    ids = [int(i) for (i,) in conn.execute(_RERUN_JOBS, {"b": batch_id, "statuses": list(statuses)})]
    if ids:
        conn.execute(_SUPERSEDE_ATTEMPTS, {"ids": ids})
        conn.execute(_SUPERSEDE_VALIDATIONS, {"ids": ids})
    return ids, None if cap is None else Decimal(cap)
