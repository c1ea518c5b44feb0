"""Workloads the benchmarks share: the bench's cascade.yaml, submitting jobs, counting and rating progress."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, chain
from kombu import Queue

from bench.harness import Scratch, models
from cascade import producer
from cascade.config import load_config
from cascade.publish import CeleryPublisher, Due, celery_config

__all__ = ["ListPublisher", "Progress", "bare_app", "config", "submit"]

#: bench.bare's queues: the chain's three links and the bare HTTP call.
BARE_QUEUES = ["bare1", "bare2", "bare3", "barehttp"]
SCHEMA = {"type": "object", "required": ["label"], "properties": {"label": {"enum": ["a", "b", "c"]}}}


def config(sim_url: str) -> dict[str, Any]:  # Any: cascade.yaml
    """Task types: ``single`` (one sample, passes at tier 1), ``sc3`` (three samples sent as three concurrent
    requests: supports_n false), ``hops`` (tiers 1 and 2 always answer invalid JSON: two escalations)."""
    task = {"system": "Label the text. Answer with JSON only.", "prompt": "Text {id}: {text}", "output": "json",
            "schema": SCHEMA, "max_tokens": 16, "temperature": 0.7}
    return {
        "models": models(sim_url, fast={}, fast_non={"supports_n": False}, bad={}, large={}),
        "task_types": [
            {"name": "single", **task, "tiers": ["fast", "large"]},
            {"name": "sc3", **task, "self_consistency": {"samples": 3, "min_agreement": 0.6},
             "tiers": ["fast_non", "large"]},
            {"name": "hops", **task, "tiers": ["bad", "bad", "fast"]},
        ],
    }


def rows(n: int, start: int = 0, tag: str = "") -> list[tuple[int, dict[str, Any]]]:  # Any: a row
    return [(i + 1, {"id": i, "text": f"row {i} of the benchmark{tag}"}) for i in range(start, start + n)]


@dataclass
class ListPublisher:
    """Collects what would be published (in-process runs and preloading without a broker)."""

    sent: list[Due] = field(default_factory=list)

    def publish(self, due: Sequence[Due]) -> None:
        self.sent.extend(due)

    def queue_lengths(self) -> dict[str, int]:
        return {}


def submit(box: Scratch, task: str, n: int, publisher: Any = None, *,  # Any: a Publisher
           jobs_per_message: int | None = None, tag: str | None = None) -> str:
    """Insert and publish ``n`` jobs of ``task`` the way `cascade submit` does; returns the batch id. The rows
    are new ones (never seen by the request cache, as in an ETL run over new data) unless ``tag`` is given:
    the same tag gives the same rows."""
    if tag is None:
        tag = f" (run {uuid.uuid4().hex[:12]})"
    settings = box.settings(**({"jobs_per_message": jobs_per_message} if jobs_per_message else {}))
    snap = load_config(settings.config).snapshot(task)
    own = publisher is None
    pub = CeleryPublisher.connect(settings, box.services.broker_url) if own else publisher
    try:
        return producer.submit_rows(box.engine, pub, snap, rows(n, tag=tag), source=f"<bench {task}>").batch_id
    finally:
        if own:
            pub.close()


def bare_app(box: Scratch) -> Celery:
    """A sending-only app for bench.bare's tasks, with cascade's Celery settings."""
    settings = box.settings()
    app = Celery("bench-driver", set_as_current=False)
    app.conf.update({**celery_config(settings, box.services.broker_url),
                     "task_queues": [Queue(q) for q in BARE_QUEUES], "task_default_queue": "bare1"})
    return app


def bare_chains(app: Celery, n: int) -> None:
    """Publish ``n`` chains noop → noop → done (bench.bare)."""
    sig = chain(app.signature("bare.noop", immutable=True, queue="bare1"),
                app.signature("bare.noop", immutable=True, queue="bare2"),
                app.signature("bare.done", immutable=True, queue="bare3"))
    with app.producer_or_acquire() as prod:
        for _ in range(n):
            sig.apply_async(producer=prod)


@dataclass
class Progress:
    """Samples of (time, finished count) while a run drains; rates come from its middle part."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def watch(self, count: Callable[[], int], total: int, timeout: float, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = count()
            self.samples.append((time.monotonic(), done))
            if done >= total or time.monotonic() > deadline:
                return
            time.sleep(poll)

    def rate(self, total: int, lo: float = 0.1, hi: float = 0.9) -> float:
        """Finished per second from the last sample at or below ``lo`` of ``total`` to the first at or above
        ``hi`` (or the last sample): whole messages finish at once, so counts move in steps."""
        start = next(((t, d) for t, d in reversed(self.samples) if d <= lo * total), None)
        end = next(((t, d) for t, d in self.samples if d >= hi * total), self.samples[-1] if self.samples else None)
        if start is None or end is None or end[0] <= start[0]:
            return 0.0
        return (end[1] - start[1]) / (end[0] - start[0])
