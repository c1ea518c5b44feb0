"""The sweeper's statements; ``cascade.sweeper`` decides what to re-publish and publishes it.

Every UPDATE stamps ``published_at`` and skips rows another transaction holds (``SKIP LOCKED``): a
frozen worker's open transaction delays its own jobs only, never the sweep. One sweeper at a time per
schema: a Postgres advisory lock, held by the connection that took it.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from cascade.store.jobs import HAND_BACK, Stage

__all__ = [
    "forget_workers",
    "stamp_deferred_due",
    "stamp_stalled",
    "take_back_expired",
    "take_sweep_lock",
    "waiting_jobs",
]

# One lock per schema, so test runs (one schema each) sweep independently. A transaction lock, held by the
# transaction that took it for the whole pass: it works through PgBouncer's transaction pooling, where a session
# lock would stay on a server connection that other clients then use.
_LOCK = text("SELECT pg_try_advisory_xact_lock(hashtext('cascade.sweep.' || current_schema()))")

# A job of a cancelled batch is not queued again: it is cancelled (HAND_BACK).
_EXPIRED = text(f"""
UPDATE jobs j SET {HAND_BACK}, lease_until = NULL, published_at = now()
FROM batches b
WHERE b.id = j.batch_id AND j.id IN (
    SELECT x.id FROM jobs x
    WHERE x.status = 'running'
      AND (x.lease_until < now()
           OR x.worker_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = x.worker_id
                                                      AND w.seen_at >= now() - make_interval(secs => :dead_after)))
    FOR UPDATE SKIP LOCKED)
RETURNING j.id, j.tier, j.stage, j.status
""")

_DUE = text("""
UPDATE jobs SET published_at = now()
WHERE id IN (SELECT id FROM jobs
             WHERE status = 'queued' AND published_at IS NULL AND not_before IS NOT NULL AND not_before <= now()
               AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = jobs.batch_id AND b.halted_at IS NOT NULL)
             FOR UPDATE SKIP LOCKED)
RETURNING id, tier, stage
""")

_WAITING = text("""
SELECT tier, stage, count(*) AS waiting FROM jobs
WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())
  AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = jobs.batch_id AND b.halted_at IS NOT NULL)
GROUP BY tier, stage
""")

_STALLED = text("""
UPDATE jobs SET published_at = now()
WHERE id IN (SELECT id FROM jobs
             WHERE status = 'queued' AND tier = :tier AND stage = :stage
               AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = jobs.batch_id AND b.halted_at IS NOT NULL)
               AND (not_before IS NULL OR not_before <= now())
               AND coalesce(published_at, created_at) < now() - make_interval(secs => :stalled_after)
             ORDER BY coalesce(published_at, created_at), id
             LIMIT :missing
             FOR UPDATE SKIP LOCKED)
RETURNING id, tier, stage
""")

# Workers gone for a day hold nothing any more (their jobs were taken back long ago): forget them.
_FORGET = text("DELETE FROM workers WHERE seen_at < now() - interval '1 day'")


def _due(rows: list[tuple[int, int, str]]) -> list[tuple[int, int, Stage]]:
    return [(job_id, tier, Stage(stage)) for job_id, tier, stage in rows]


def take_sweep_lock(conn: Connection) -> bool:
    """Take this schema's sweep lock until ``conn``'s transaction ends; False when another sweeper holds it."""
    return bool(conn.execute(_LOCK).scalar())


def take_back_expired(conn: Connection, dead_after_s: float) -> list[tuple[int, int, Stage]]:
    """Queue again the running jobs whose worker's heartbeat is older than ``dead_after_s``, or whose lease
    expired (a heartbeat renews the leases of the claims its worker holds); returns the (job, tier, stage)s
    to publish."""
    rows = conn.execute(_EXPIRED, {"dead_after": dead_after_s}).all()
    return _due([(job_id, tier, stage) for job_id, tier, stage, status in rows if status == "queued"])


def stamp_deferred_due(conn: Connection) -> list[tuple[int, int, Stage]]:
    """Stamp the deferred jobs whose ``not_before`` has come; returns the (job, tier, stage)s to publish."""
    return _due([tuple(r) for r in conn.execute(_DUE).all()])


def waiting_jobs(conn: Connection) -> list[tuple[int, Stage, int]]:
    """(tier, stage, count) of the queued jobs that are due, per (tier, stage) that has any."""
    return [(tier, Stage(stage), waiting) for tier, stage, waiting in conn.execute(_WAITING).all()]


def stamp_stalled(conn: Connection, tier: int, stage: Stage, stalled_after_s: float,
                  missing: int) -> list[tuple[int, int, Stage]]:
    """Stamp up to ``missing`` due jobs of (tier, stage) last published over ``stalled_after_s`` ago, the
    longest-waiting first; returns the (job, tier, stage)s to publish."""
    rows = conn.execute(_STALLED, {"tier": tier, "stage": stage.value, "stalled_after": stalled_after_s,
                                   "missing": missing}).all()
    return _due([tuple(r) for r in rows])


def forget_workers(conn: Connection) -> None:
    """Delete the heartbeat rows of workers gone for a day."""
    conn.execute(_FORGET)
