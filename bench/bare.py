"""The baselines' Celery app: no-op tasks and one bare HTTP call, with exactly cascade's Celery settings.

    celery -A bench.bare worker -P gevent -c 256 -Q bare1,bare2,bare3,barehttp

Settings come from CASCADE_BROKER_URL / CASCADE_KEY_PREFIX as for the real workers; only the queues and task
names differ. ``bench.probe`` hooks the hop probe into this app too.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from kombu import Queue

from bench import probe
from bench.workload import BARE_QUEUES
from cascade.config import ModelConfig, load_settings
from cascade.providers import ChatProvider
from cascade.publish import celery_config
from cascade.ratelimit import redis_url

settings = load_settings()
assert settings.broker_url, "CASCADE_BROKER_URL is not set"
app = Celery("bench-bare", set_as_current=False)
app.conf.update({**celery_config(settings, settings.broker_url), "task_queues": [Queue(q) for q in BARE_QUEUES],
                 "task_default_queue": "bare1"})
probe.install(app, settings.key_prefix)

_redis: redis.Redis | None = None


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
    """One chat request through cascade's own HTTP client (ChatProvider), nothing else."""
    global _provider
    if _provider is None:
        _provider = ChatProvider(ModelConfig(name="fast", base_url=url.removesuffix("/chat/completions"),
                                             model="fast"))
    _provider.complete(body["messages"], n=1, max_tokens=body["max_tokens"], temperature=0.7,
                       response_format=None, headers={"X-Cascade-Model": "fast"})


_provider: ChatProvider | None = None
