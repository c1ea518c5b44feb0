"""The baselines' Celery app: no-op tasks and one bare HTTP call, with exactly cascade's Celery settings.

    celery -A bench.bare worker -P gevent -c 256 -Q bare1,bare2,bare3,barehttp

Settings come from CASCADE_BROKER_URL / CASCADE_KEY_PREFIX as for the real workers; only the queues and task
names differ. ``bench.probe`` hooks the hop probe into this app too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import redis
from celery import Celery
from kombu import Queue

from bench import probe
from bench.workload import BARE_QUEUES
from cascade.config import load_settings
from cascade.publish import celery_config
from cascade.ratelimit import redis_url

settings = load_settings()
assert settings.broker_url, "CASCADE_BROKER_URL is not set"
app = Celery("bench-bare", set_as_current=False)
app.conf.update({**celery_config(settings, settings.broker_url), "task_queues": [Queue(q) for q in BARE_QUEUES],
                 "task_default_queue": "bare1"})
probe.install(app, settings.key_prefix)

_redis: redis.Redis | None = None
_http: httpx.Client | None = None


def _client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(redis_url(settings.broker_url or ""))
    return _redis


@app.task(name="bare.noop")
def noop() -> None:
    """Does nothing: the chain's first two links."""


@app.task(name="bare.done")
def done() -> None:
    """The chain's last link: counts one finished chain."""
    _client().incr(settings.key_prefix + "bench:done")


@app.task(name="bare.http")
def http(url: str, body: dict[str, Any]) -> None:  # Any: a chat request body
    """One chat request, nothing else: with one shared httpx client configured as ChatProvider builds it, or
    (BENCH_HTTP) sixteen httpx clients taken in turn (``httpx-shard``) or a urllib3 pool (``urllib3``)."""
    global _http
    kind = os.environ.get("BENCH_HTTP", "httpx")
    if kind == "urllib3":
        _urllib3_post(url, body)
        return
    if kind == "httpx-shard":
        _sharded().post(url, json=body, headers={"X-Cascade-Model": "fast"}).raise_for_status()
        return
    if _http is None:
        _http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=1024, max_keepalive_connections=512))
    _http.post(url, json=body, headers={"X-Cascade-Model": "fast"}).raise_for_status()


_pool: Any = None  # Any: a urllib3 PoolManager
_shards: list[httpx.Client] = []
_turn = [0]


def _sharded() -> httpx.Client:
    """16 httpx clients taken in turn: each pool scans 1/16 of the connections per request."""
    if not _shards:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        _shards.extend(httpx.Client(timeout=30, limits=limits) for _ in range(16))
    _turn[0] += 1
    return _shards[_turn[0] % len(_shards)]


def _urllib3_post(url: str, body: dict[str, Any]) -> None:  # Any: a chat request body
    import urllib3

    global _pool
    if _pool is None:
        _pool = urllib3.PoolManager(maxsize=1024, block=False, timeout=30)
    response = _pool.request("POST", url, body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json", "X-Cascade-Model": "fast"})
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")

