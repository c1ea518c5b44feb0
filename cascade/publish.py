"""Sends "job J is due at tier T, stage S" messages: the only module of the core that knows Celery.

Messages carry ids, never rows, and are routed by ``queue=`` only (CELERY-NOTES §5: after a Redis
FLUSHALL a publish through an exchange whose binding is gone is silently dropped; the anonymous
exchange used for plain queue routing is not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from cascade.config import CascadeSettings
from cascade.store import Stage

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "CALL_TASK",
    "SWEEP_QUEUE",
    "SWEEP_TASK",
    "VALIDATE_QUEUE",
    "VALIDATE_TASK",
    "CeleryPublisher",
    "Due",
    "Publisher",
    "all_queues",
    "celery_config",
    "queue_for",
    "tier_queues",
]

CALL_TASK = "cascade.call_model"
VALIDATE_TASK = "cascade.validate"
VALIDATE_QUEUE = "validate"
SWEEP_TASK = "cascade.sweep"
#: Celery beat's periodic sweep runs here, never behind a backlog on the tier queues (CELERY-NOTES §7).
SWEEP_QUEUE = "sweep"
MAX_TIERS = 3

Due = tuple[int, int, Stage]  # (job id, tier, stage)


def tier_queues(count: int = MAX_TIERS) -> list[str]:
    return [f"tier{i}" for i in range(1, count + 1)]


def all_queues() -> list[str]:
    """Every queue cascade declares: tier1..tier3, validate and sweep."""
    return [*tier_queues(), VALIDATE_QUEUE, SWEEP_QUEUE]


def queue_for(tier: int, stage: Stage) -> str:
    """Tier N's call stage runs on queue ``tierN``; every validation on ``validate``."""
    return f"tier{tier}" if stage is Stage.CALL else VALIDATE_QUEUE


class Publisher(Protocol):
    def publish(self, due: Sequence[Due]) -> None:
        """Send one message per due (job, tier, stage)."""

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting per queue in the broker (the sweeper compares them with Postgres)."""


def celery_config(settings: CascadeSettings, broker_url: str) -> dict[str, Any]:  # Any: Celery's settings
    """The Celery settings every process (workers, producers, the sweeper) must share."""
    from kombu import Queue  # imported here: the rest of the core imports this module without Celery

    transport: dict[str, Any] = {  # Any: kombu transport options
        "visibility_timeout": settings.visibility_timeout_s,
        # gevent workers never run kombu's restore sweep (CELERY-NOTES §1); the Postgres sweeper
        # re-publishes instead, and a short restore cadence helps prefork/thread janitors.
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
    }
    if settings.key_prefix:
        transport["global_keyprefix"] = settings.key_prefix
    # Every queue is declared up front: Flower lists task_queues until it has inspected a worker.
    queues = all_queues()
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(name) for name in queues],
        "task_default_queue": VALIDATE_QUEUE,
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        "broker_pool_limit": 64,
    }


class CeleryPublisher:
    """Publishes through a Celery app (the worker's own, or a sending-only one for producers)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @classmethod
    def connect(cls, settings: CascadeSettings, broker_url: str) -> CeleryPublisher:
        from celery import Celery

        app = Celery("cascade-producer", set_as_current=False)
        app.conf.update(celery_config(settings, broker_url))
        return cls(app)

    def publish(self, due: Sequence[Due]) -> None:
        if not due:
            return
        with self.app.producer_or_acquire() as producer:
            for job_id, tier, stage in due:
                name = CALL_TASK if stage is Stage.CALL else VALIDATE_TASK
                self.app.send_task(name, args=[job_id, tier], queue=queue_for(tier, stage), producer=producer)

    def queue_lengths(self) -> dict[str, int]:
        queues = [*tier_queues(), VALIDATE_QUEUE]
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            client = getattr(channel, "client", None)
            if client is None:  # not Redis: ask the broker through a passive declare
                declare = channel.queue_declare  # type: ignore[attr-defined]  # every kombu channel has it
                return {q: declare(q, passive=True).message_count for q in queues}
            # kombu's client adds global_keyprefix to LLEN itself.
            return {q: int(client.llen(q)) for q in queues}

    def close(self) -> None:
        self.app.close()
