"""Celery tasks: one line into cascade.stages each. Messages carry job ids (a list, or one id from an older
producer), never rows."""

from __future__ import annotations

import os
import threading
from typing import Any

from celery.signals import worker_process_shutdown, worker_shutdown
from sqlalchemy.exc import DBAPIError

from cascade.liveness import Heartbeat, HeldClaims, new_worker_id
from cascade.providers import ProviderPool
from cascade.publish import AUDIT_TASK, CALL_TASK, SWEEP_TASK, VALIDATE_TASK, CeleryPublisher
from cascade.stages import StageContext, run_audits, run_calls, run_validates
from cascade.store import make_engine
from cascade.sweeper import sweep as sweep_once
from workers.app import app, settings

_context: StageContext | None = None
_heartbeat: Heartbeat | None = None
_building = threading.Lock()

# A Postgres blip raises before the stage committed; Celery then re-sends the message (short
# countdown, well under the visibility timeout) and acks the old one. The sweeper covers the rest.
RETRY: dict[str, Any] = {
    "autoretry_for": (DBAPIError,),
    "retry_backoff": 1,
    "retry_backoff_max": 10,
    "max_retries": 8,
}


def context() -> StageContext:
    """The process's StageContext, built on first use (after gevent patched the process)."""
    global _context
    with _building:  # the heartbeat's first write yields to other greenlets: build one context, not several
        if _context is None:
            _context = _build()
        return _context


def _build() -> StageContext:
    global _heartbeat
    if not settings.database_url:
        raise RuntimeError("CASCADE_DATABASE_URL is not set")
    # A few connections whatever the concurrency (CASCADE_WORKER_DB_CONNECTIONS, 2): a stage holds one only for
    # its short transactions (never across a model request), so the slots take turns, and a fleet of workers
    # stays far below Postgres' max_connections.
    # No pre-ping (a round trip per checkout, three per job): a dead connection surfaces as a
    # DBAPIError, which the tasks retry (RETRY below).
    # A process frozen inside a transaction (SIGSTOP, a stalled VM) loses that session once it has been idle
    # as long as a dead worker's jobs are kept (at least 10 s): its locks must not stall the other workers.
    engine = make_engine(settings.database_url, pool_size=settings.worker_db_connections, max_overflow=0,
                         schema=settings.db_schema, pre_ping=False,
                         idle_in_transaction_s=max(10.0, settings.worker_dead_after_s), pooler=settings.database_pooler,
                         application_name=f"cascade:{settings.db_schema}:worker:{os.getpid()}" if settings.db_schema
                         else f"cascade:worker:{os.getpid()}")
    # Registered before the first claim: the sweeper takes this process's jobs back only once its
    # heartbeat stops (cascade.liveness), never while a slow request is still running.
    # Each beat also renews the leases of claims held past half their lease.
    held = HeldClaims()
    _heartbeat = Heartbeat(engine, new_worker_id(), settings.heartbeat_s, held=held, lease_s=settings.lease_s).start()
    return StageContext(
        engine=engine,
        publisher=CeleryPublisher(app, jobs_per_message=settings.jobs_per_message),
        providers=ProviderPool(),
        settings=settings,
        worker_id=_heartbeat.worker_id,
        held=held,
    )


@worker_shutdown.connect
@worker_process_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    """After a warm shutdown finished its tasks: forget this worker, so anything it still held is swept
    back at once."""
    if _heartbeat is not None:
        _heartbeat.stop()


def _ids(job_ids: list[int] | int) -> list[int]:
    return [job_ids] if isinstance(job_ids, int) else job_ids


@app.task(name=CALL_TASK, **RETRY)
def call_model(job_ids: list[int] | int, tier: int) -> None:
    run_calls(context(), _ids(job_ids), tier)


@app.task(name=VALIDATE_TASK, **RETRY)
def validate(job_ids: list[int] | int, tier: int) -> None:
    run_validates(context(), _ids(job_ids), tier)


@app.task(name=AUDIT_TASK, **RETRY)
def audit(audit_ids: list[int], tier: int = 0) -> None:
    run_audits(context(), audit_ids)


@app.task(name=SWEEP_TASK, ignore_result=True)
def sweep() -> None:
    ctx = context()
    sweep_once(ctx.engine, ctx.publisher, stalled_after_s=settings.stalled_after_s,
               dead_after_s=settings.worker_dead_after_s, jobs_per_message=settings.jobs_per_message)
