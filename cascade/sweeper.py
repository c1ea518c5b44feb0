"""Re-publishes from Postgres what the broker lost or a dead worker dropped (``cascade sweep``).

Three cases, each an UPDATE ... RETURNING that stamps ``published_at`` and then publishes:

- a running job whose worker is dead: its heartbeat (``workers.seen_at``, see ``cascade.liveness``) is
  older than ``dead_after_s``; a job claimed outside a heartbeating worker falls back to its lease. A live
  worker keeps its jobs however long their requests take.
- a deferred job whose ``not_before`` is due;
- a queued job whose last publish is older than the stall timeout while its broker queue holds too few
  messages for the jobs Postgres has due on it (fewer than due ÷ jobs_per_message: a message was lost in
  a Redis flush, or sits in a dead worker's unacknowledged set). Only that shortfall is re-published, the
  longest-waiting jobs first: queues are FIFO, so the jobs no queue holds any more are the oldest ones. A
  long, healthy backlog is never re-published; a lost message hidden behind a backlog of part-filled
  messages is found once that backlog drains.

Every UPDATE skips rows another transaction holds (``SKIP LOCKED``): a frozen worker's open transaction
delays its own jobs only, never the sweep. One sweeper at a time: a Postgres advisory lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text

from cascade.publish import Due, Publisher, queue_for
from cascade.store import Stage

__all__ = ["SweepReport", "sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    locked: bool  # False: another sweeper holds the lock; nothing was done
    expired: int = 0
    due: int = 0
    stalled: int = 0


# One lock per schema, so test runs (one schema each) sweep independently.
_LOCK = text("SELECT pg_try_advisory_lock(hashtext('cascade.sweep.' || current_schema()))")
_UNLOCK = text("SELECT pg_advisory_unlock(hashtext('cascade.sweep.' || current_schema()))")

_EXPIRED = text("""
UPDATE jobs SET status = 'queued', lease_until = NULL, published_at = now()
WHERE id IN (
    SELECT j.id FROM jobs j
    WHERE j.status = 'running'
      AND CASE WHEN j.worker_id IS NULL THEN j.lease_until < now()
               ELSE NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = j.worker_id
                                AND w.seen_at >= now() - make_interval(secs => :dead_after)) END
    FOR UPDATE SKIP LOCKED)
RETURNING id, tier, stage
""")

_DUE = text("""
UPDATE jobs SET published_at = now()
WHERE id IN (SELECT id FROM jobs
             WHERE status = 'queued' AND published_at IS NULL AND not_before IS NOT NULL AND not_before <= now()
             FOR UPDATE SKIP LOCKED)
RETURNING id, tier, stage
""")

_WAITING = text("""
SELECT tier, stage, count(*) AS waiting FROM jobs
WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())
GROUP BY tier, stage
""")

_STALLED = text("""
UPDATE jobs SET published_at = now()
WHERE id IN (SELECT id FROM jobs
             WHERE status = 'queued' AND tier = :tier AND stage = :stage
               AND (not_before IS NULL OR not_before <= now())
               AND coalesce(published_at, created_at) < now() - make_interval(secs => :stalled_after)
             ORDER BY coalesce(published_at, created_at), id
             LIMIT :missing
             FOR UPDATE SKIP LOCKED)
RETURNING id, tier, stage
""")

# Workers gone for a day hold nothing any more (their jobs were taken back long ago): forget them.
_FORGET = text("DELETE FROM workers WHERE seen_at < now() - interval '1 day'")


def _due(rows: list[tuple[int, int, str]]) -> list[Due]:
    return [(job_id, tier, Stage(stage)) for job_id, tier, stage in rows]


def _stalled(conn: Connection, publisher: Publisher, stalled_after_s: float, jobs_per_message: int) -> list[Due]:
    lengths = publisher.queue_lengths()
    out: list[Due] = []
    for tier, stage, waiting in conn.execute(_WAITING).all():
        missing = waiting - lengths.get(queue_for(tier, Stage(stage)), 0) * jobs_per_message
        if missing <= 0:
            continue  # the broker holds a message for every due job: a healthy backlog
        rows = conn.execute(_STALLED, {"tier": tier, "stage": stage, "stalled_after": stalled_after_s,
                                       "missing": missing}).all()
        out += _due([tuple(r) for r in rows])
    return out


def sweep(engine: Engine, publisher: Publisher, *, stalled_after_s: float = 20.0, dead_after_s: float = 15.0,
          jobs_per_message: int = 1) -> SweepReport:
    """One pass. Publishing happens after each UPDATE committed; a failed publish is retried by a later pass
    (the job's ``published_at`` then ages past the stall timeout again)."""
    with engine.connect() as lock_conn:
        if not lock_conn.execute(_LOCK).scalar():
            return SweepReport(locked=False)
        try:
            with engine.begin() as conn:
                expired = _due([tuple(r) for r in conn.execute(_EXPIRED, {"dead_after": dead_after_s}).all()])
                due = _due([tuple(r) for r in conn.execute(_DUE).all()])
                conn.execute(_FORGET)
            publisher.publish(expired + due)
            with engine.begin() as conn:
                stalled = _stalled(conn, publisher, stalled_after_s, jobs_per_message)
            publisher.publish(stalled)
        finally:
            lock_conn.execute(_UNLOCK)
            lock_conn.commit()
    if expired or due or stalled:
        log.info("sweep: %d taken back from dead workers or expired leases, %d deferred due, %d stalled "
                 "re-published", len(expired), len(due), len(stalled))
    return SweepReport(True, len(expired), len(due), len(stalled))
