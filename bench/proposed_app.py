"""The real worker app with the proposed hot-path changes applied, to measure their gain before they are made:
`celery -A bench.proposed_app worker ...`. Benchmarks only. Changes 1-3 below have landed in cascade/ (they are
kept here as history of what was measured); what this module still applies is change 4:

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

import os

from cascade import publish

if os.environ.get("BENCH_PUBLISH_ALL_BULK") == "1":
    publish.BULK_MIN = 1

import workers.tasks  # noqa: F401  (registers the tasks)
from workers.app import app

__all__ = ["app"]
