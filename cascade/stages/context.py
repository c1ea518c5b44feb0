"""What stages need from the outside world, built once per worker process."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Engine

from cascade.config import CascadeSettings, ModelConfig, TaskSnapshot
from cascade.health import Health, RedisHealth
from cascade.liveness import HeldClaims
from cascade.providers import ProviderPool
from cascade.publish import Publisher
from cascade.ratelimit import RateLimiter, RedisRateLimiter

__all__ = ["StageContext", "request_threads"]

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """The engine, publisher, providers and settings a stage runs with.

    ``rate_limiter`` None means one on the shared Redis (``settings.shared_redis_url``: ``CASCADE_REDIS_URL``, or
    a Redis broker's), built on first use by a model with a rate limit; without one, in a process with no broker
    at all (a test, a CLI) no rate limit is applied, and behind a RabbitMQ broker such a model cannot be called
    (``missing_shared_state``). ``worker_id`` names
    the heartbeating process that claims (``cascade.liveness``); None means claims rely on their lease.
    ``held`` lists the claims in progress, whose leases the heartbeat renews.
    """

    engine: Engine
    publisher: Publisher
    providers: ProviderPool
    settings: CascadeSettings
    sleep: Callable[[float], None] = time.sleep
    rate_limiter: RateLimiter | None = None
    #: model health (circuit breakers); None means one on the broker's Redis, built on first use
    model_health: Health | None = None
    worker_id: str | None = None
    held: HeldClaims = field(default_factory=HeldClaims)
    #: models seen ignoring or refusing ``n`` in this process: their samples go out one request each
    n_ignored: set[str] = field(default_factory=set)
    _snapshots: OrderedDict[str, TaskSnapshot] = field(default_factory=OrderedDict)

    def ignores_n(self, model: str, how: str) -> None:
        """Remember that ``model`` does not honour ``n`` (logged once per process, naming the model)."""
        if model not in self.n_ignored:
            self.n_ignored.add(model)
            log.warning("model %r %s: its samples are sent as separate requests from now on (set supports_n: "
                        "false to say so up front)", model, how)

    def snapshot(self, batch_id: str, load: Callable[[], dict[str, Any]],  # Any: JSON
                 max_cost_usd: Decimal | None | Literal["submitted"] = "submitted") -> TaskSnapshot:
        """The batch's task snapshot; immutable once submitted, so it is cached per process. ``max_cost_usd``:
        the batch's cap as it stands now (``cascade retry --failed --max-cost`` raises it), in place of the one
        it was submitted with."""
        snap = self._snapshots.get(batch_id)
        if snap is None:
            snap = TaskSnapshot.model_validate(load())
            self._snapshots[batch_id] = snap
            if len(self._snapshots) > 256:
                self._snapshots.popitem(last=False)
        if max_cost_usd != "submitted" and max_cost_usd != snap.max_cost_usd:
            snap = snap.model_copy(update={"max_cost_usd": max_cost_usd})
        return snap

    def limiter(self) -> RateLimiter | None:
        """The process's rate limiter (see the class docstring); None when there is no broker to share."""
        url = self.settings.shared_redis_url
        if self.rate_limiter is None and url:
            self.rate_limiter = RedisRateLimiter.from_broker(url, key_prefix=self.settings.key_prefix)
        return self.rate_limiter

    def missing_shared_state(self, model: ModelConfig) -> str | None:
        """Why ``model`` cannot be called here: it has a rate limit, and the broker is not Redis and no
        ``CASCADE_REDIS_URL`` holds the limit every worker shares (None: it can)."""
        if not (model.rate_limit_rpm or model.rate_limit_tpm) or self.rate_limiter is not None:
            return None
        if self.settings.shared_redis_url or not self.settings.broker_url:
            return None
        return (f"model {model.name!r} has a rate limit, which every worker must share, but the broker is not "
                "Redis: set CASCADE_REDIS_URL to a Redis for the limits (and model health)")

    def health(self) -> Health:
        """The process's model health (``cascade.health``): shared through the shared Redis, or every model up
        when there is none."""
        if self.model_health is None:
            settings, url = self.settings, self.settings.shared_redis_url
            if url is None and settings.broker_url:
                log.warning("circuit breakers are off: the broker is not Redis and CASCADE_REDIS_URL is not set")
            self.model_health = RedisHealth.from_broker(
                url, key_prefix=settings.key_prefix, failures=settings.breaker_failures,
                cooldown_s=settings.breaker_cooldown_s) if url else Health()
        return self.model_health

    @property
    def limit_wait_s(self) -> float:
        """Longest inline wait for a rate-limit slot; a job also comes back this long before its held slot."""
        return max(0.5, self.settings.max_inline_wait_s)


_THREADS: ThreadPoolExecutor | None = None


def request_threads() -> ThreadPoolExecutor:
    """The process's request threads (greenlets under gevent), reused from message to message: starting a
    thread per request cost more than the request's own bookkeeping. Built on first use, after a gevent
    worker patched threading; idle threads cost nothing but their stack."""
    global _THREADS
    if _THREADS is None:
        _THREADS = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="cascade-request")
    return _THREADS
