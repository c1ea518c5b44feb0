"""The real worker app with the proposed hot-path changes applied, to measure their gain before they are made:
`celery -A bench.proposed_app worker ...`. Benchmarks only; every change here is a proposal in
docs/benchmarks.md for its owner's module:

1. ``worker_prefetch_multiplier = 4`` (cascade/publish.py ``celery_config``). Under gevent, Pool.spawn blocks
   at the pool size, so a worker still holds at most concurrency + 1 messages (CELERY-NOTES §3); but with a
   multiplier of 1 the prefetch window is full whenever the pool is, and kombu's poller then sleeps a whole
   second before it looks again (kombu/transport/redis.py ``MultiChannelPoller.get``: ``_paused_brpop``).
2. Sixteen httpx clients per model, taken in turn (cascade/providers.py ``ChatProvider``). httpcore's pool
   walks every connection on each request and response (``_assign_requests_to_connections``, ``has_expired``
   → a poll per idle socket, emulated by gevent); 256 connections in one pool made that the worker's top
   cost. Sixteen pools of at most 64 connections each walk 1/16 as much.
3. No ``pool_pre_ping`` (cascade/store.py ``make_engine``): it costs a round trip on every checkout, three
   per job; a dead connection then surfaces as a DBAPIError, which the tasks already retry.
4. With BENCH_PUBLISH_ALL_BULK=1, a stage's one next message also goes through the prebuilt-envelope path of
   ``CeleryPublisher`` (``BULK_MIN = 1``) instead of ``send_task``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx

from cascade import providers, publish, store

SHARDS = 16

if os.environ.get("BENCH_PUBLISH_ALL_BULK") == "1":
    publish.BULK_MIN = 1

_make_engine = store.make_engine


def _make_engine_without_ping(url: str, **kw: Any) -> Any:  # Any: make_engine's arguments and engine
    engine = _make_engine(url, **kw)
    engine.pool._pre_ping = False
    return engine


store.make_engine = _make_engine_without_ping  # before workers.tasks binds the name


class _Sharded:
    """Looks like the one httpx.Client ChatProvider uses; sends each request through the next of SHARDS."""

    def __init__(self, clients: list[httpx.Client]) -> None:
        self.clients = clients
        self._turn: Iterator[httpx.Client] = itertools.cycle(clients)

    def stream(self, *args: Any, **kw: Any) -> AbstractContextManager[httpx.Response]:  # Any: httpx's
        return next(self._turn).stream(*args, **kw)

    def close(self) -> None:
        for client in self.clients:
            client.close()


_init = providers.ChatProvider.__init__


def _sharded_init(self: providers.ChatProvider, config: Any, *, transport: Any = None) -> None:  # Any: as above
    _init(self, config, transport=transport)
    first = self._client
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
    clients = [httpx.Client(transport=transport, headers=first.headers, timeout=first.timeout, limits=limits)
               for _ in range(SHARDS)]
    first.close()
    self._client = _Sharded(clients)  # type: ignore[assignment]


providers.ChatProvider.__init__ = _sharded_init  # type: ignore[method-assign]

import workers.tasks  # noqa: F401  (registers the tasks, with the patched make_engine)
from workers.app import app

app.conf.worker_prefetch_multiplier = 4

__all__ = ["app"]
