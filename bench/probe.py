"""The hop probe: stamps every task message when it is published and records, when the task starts, how long
it waited (enqueue → start). Off unless BENCH_PROBE=1, so the other benchmarks run the workers untouched.

Times are ``time.time()`` of the publishing and the consuming process (one host, one clock). Each sample is
pushed to the Redis list ``<key prefix>bench:hops`` as ``task|tier|milliseconds``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, signals

from cascade.ratelimit import redis_url

HEADER = "bench_sent"
_state: dict[str, Any] = {}  # Any: the Redis client and key


def install(app: Celery, key_prefix: str) -> None:
    """Connect the probe's signal handlers (process-wide) when BENCH_PROBE=1."""
    if os.environ.get("BENCH_PROBE") != "1" or _state:
        return
    _state["key"] = key_prefix + "bench:hops"
    _state["url"] = redis_url(app.conf.broker_url)
    signals.before_task_publish.connect(_stamp, weak=False)
    signals.task_prerun.connect(_record, weak=False)


def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:  # Any: Celery's signal arguments
    if headers is not None:
        headers[HEADER] = time.time()


def _record(task: Any = None, args: Any = None, **_: Any) -> None:  # Any: Celery's signal arguments
    started = time.time()
    sent = getattr(task.request, HEADER, None) if task is not None else None
    if sent is None:
        return
    client = _state.get("client")
    if client is None:
        client = _state["client"] = redis.Redis.from_url(_state["url"])
    tier = args[1] if args and len(args) > 1 else 0
    client.rpush(_state["key"], f"{task.name}|{tier}|{(started - float(sent)) * 1000:.3f}")


def uninstall() -> None:
    """Disconnect the probe (a process that ran a probed benchmark goes on unprobed)."""
    if _state:
        signals.before_task_publish.disconnect(_stamp)
        signals.task_prerun.disconnect(_record)
        client = _state.get("client")
        if client is not None:
            client.close()
        _state.clear()
