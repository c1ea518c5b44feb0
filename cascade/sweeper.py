"""Re-publishes from Postgres what the broker lost or a dead worker dropped (``cascade sweep``).

Three cases, each an UPDATE ... RETURNING that stamps ``published_at`` and then publishes:

- a running job whose worker is dead: its heartbeat (``workers.seen_at``, see ``cascade.liveness``) is
  older than ``dead_after_s``; or whose lease expired: a live worker's heartbeat renews the leases of the
  claims it is working on, so only a claim no process holds any more (one that leaked, or was made
  outside a worker) ever reaches its lease. A live worker keeps its jobs however long their requests take.
- a deferred job whose ``not_before`` is due;
- a queued job whose last publish is older than the stall timeout while its broker queue holds too few
  messages for the jobs Postgres has due on it (fewer than due ÷ jobs_per_message: a message was lost in
  a Redis flush, or sits in a dead worker's unacknowledged set). Only that shortfall is re-published, the
  longest-waiting jobs first: queues are FIFO, so the jobs no queue holds any more are the oldest ones. A
  long, healthy backlog is never re-published; a lost message hidden behind a backlog of part-filled
  messages is found once that backlog drains.

Audits (``cascade.stages.audit``) are swept the same three ways.

Every UPDATE skips rows another transaction holds (``SKIP LOCKED``): a frozen worker's open transaction
delays its own jobs only, never the sweep. One sweeper at a time: a Postgres advisory lock. The statements
live in ``cascade.store.sweep``; this module decides what to re-publish and publishes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Connection, Engine

from cascade import store
from cascade.publish import AUDIT_QUEUE, Due, Publisher, queue_for
from cascade.store import Stage

__all__ = ["SweepReport", "sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    locked: bool  # False: another sweeper holds the lock; nothing was done
    expired: int = 0
    due: int = 0
    stalled: int = 0


def _audits(ids: list[int]) -> list[Due]:
    return [(audit_id, store.AUDIT_TIER, Stage.AUDIT) for audit_id in ids]


def _stalled(conn: Connection, publisher: Publisher, stalled_after_s: float, jobs_per_message: int) -> list[Due]:
    lengths = publisher.queue_lengths()
    out: list[Due] = []
    for tier, stage, waiting in store.waiting_jobs(conn):
        missing = waiting - lengths.get(queue_for(tier, stage), 0) * jobs_per_message
        if missing <= 0:
            continue  # the broker holds a message for every due job: a healthy backlog
        out += store.stamp_stalled(conn, tier, stage, stalled_after_s, missing)
    missing = store.waiting_audits(conn) - lengths.get(AUDIT_QUEUE, 0) * jobs_per_message
    if missing > 0:  # audits, the same way
        out += _audits(store.stamp_stalled_audits(conn, stalled_after_s, missing))
    return out


def sweep(engine: Engine, publisher: Publisher, *, stalled_after_s: float = 20.0, dead_after_s: float = 15.0,
          jobs_per_message: int = 1) -> SweepReport:
    """One pass. Publishing happens after each UPDATE committed; a failed publish is retried by a later pass
    (the job's ``published_at`` then ages past the stall timeout again)."""
    with engine.begin() as lock_conn:  # the lock lasts as long as this transaction: the whole pass
        if not store.take_sweep_lock(lock_conn):
            return SweepReport(locked=False)
        with engine.begin() as conn:
            expired = store.take_back_expired(conn, dead_after_s)
            expired += _audits(store.take_back_audits(conn, dead_after_s))
            due = store.stamp_deferred_due(conn) + _audits(store.stamp_audits_due(conn))
            store.forget_workers(conn)
        publisher.publish(expired + due)
        with engine.begin() as conn:
            stalled = _stalled(conn, publisher, stalled_after_s, jobs_per_message)
        publisher.publish(stalled)
    if expired or due or stalled:
        log.info("sweep: %d taken back from dead workers or expired leases, %d deferred due, %d stalled "
                 "re-published", len(expired), len(due), len(stalled))
    return SweepReport(True, len(expired), len(due), len(stalled))
