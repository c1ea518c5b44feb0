"""A model's ``rate_limit_rpm``, shared by every worker process: a GCRA token bucket in one Redis script.

Each request reserves a slot before it goes out. A slot within ``max_wait_s`` is granted and the
caller sleeps until it (gevent-cooperative); a later one is denied, and the caller hands the job back
to Postgres (``not_before``) instead of holding a worker slot. A denial made with a ``hold`` key still
books the slots and remembers them under that key, so the job's next claim gets exactly those slots:
a backlog of N jobs is spread over N slots instead of coming back all at once, again and again.

The bucket's key is ``<key_prefix>cascade:ratelimit:<model>``; its state is the theoretical arrival
time (TAT) of the next request, in Redis's own clock (``TIME``), so processes on several hosts agree.
Burst capacity is one second of traffic (``burst_of``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.connection import URL_QUERY_ARGUMENT_PARSERS

__all__ = ["UNLIMITED", "RateLimiter", "RedisRateLimiter", "Reservation", "burst_of", "redis_url"]

log = logging.getLogger(__name__)

# KEYS[1]: the model's bucket (TAT, µs); KEYS[2]: this job's held slots (a hash: first, count).
# ARGV: interval µs, burst, count, max_wait µs, use_hold (0/1). Returns {granted, µs until the first slot}.
_GCRA = """
local interval, burst, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait, use_hold = tonumber(ARGV[4]), ARGV[5] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if use_hold then
  local held = redis.call('HMGET', KEYS[2], 'first', 'count')
  if held[1] then
    local first = tonumber(held[1])
    if first >= now and tonumber(held[2]) >= count then
      if first - now <= max_wait then redis.call('DEL', KEYS[2]) return {1, first - now} end
      return {0, first - now}
    end
    redis.call('DEL', KEYS[2])  -- missed (the job came back late) or too small: book afresh
  end
end
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local first = tat - (burst - 1) * interval
if first - now > max_wait and use_hold then
  first = tat  -- held slots are spaced strictly, so the job can always arrive before the first one
elseif first - now > max_wait then
  return {0, first - now}
end
local after = tat + count * interval
redis.call('SET', KEYS[1], string.format('%d', after), 'PX', math.ceil((after - now) / 1000) + 1000)
if first - now > max_wait then
  redis.call('HSET', KEYS[2], 'first', string.format('%d', first), 'count', count)
  redis.call('PEXPIRE', KEYS[2], math.ceil((first - now) / 1000) + 3600000)
  return {0, first - now}
end
return {1, first - now}
"""

_US = 1_000_000


def burst_of(rpm: int) -> int:
    """The bucket's capacity: one second of traffic, at least one request."""
    return max(1, math.ceil(rpm / 60))


@dataclass(frozen=True)
class Reservation:
    """The answer to ``reserve``.

    Attributes:
        granted: the slots are the caller's; it sleeps ``wait_s(i)`` before its i-th request.
        first_s: seconds from now until the first slot (negative: the burst allows it now).
        interval_s: spacing of the following slots.
    """

    granted: bool
    first_s: float
    interval_s: float

    def wait_s(self, index: int) -> float:
        """Seconds to wait before the ``index``-th (0-based) request of this reservation."""
        return max(0.0, self.first_s + index * self.interval_s)


#: Lets every request through at once (no limit configured, or the limiter is unavailable).
UNLIMITED = Reservation(True, 0.0, 0.0)


class RateLimiter(Protocol):
    def reserve(self, model: str, rpm: int, *, count: int, max_wait_s: float, hold: str | None) -> Reservation:
        """Reserve ``count`` request slots of ``model`` under ``rpm`` requests per minute."""


def redis_url(broker_url: str) -> str:
    """The redis-py URL of a kombu broker URL.

    ``redis+socket:///path/redis.sock?virtual_host=N`` becomes ``unix:///path/redis.sock?db=N``; for
    ``redis://`` and ``rediss://`` the database is the path (or ``virtual_host``). Query options that
    redis-py does not know (kombu's transport options) are dropped; ``ssl_*`` ones are kept.

    Raises:
        ValueError: the URL is not a Redis URL.
    """
    parts = urlsplit(broker_url)
    query = dict(parse_qsl(parts.query))
    db = query.pop("virtual_host", None) or query.pop("db", None)
    kept = {k: v for k, v in query.items() if k in URL_QUERY_ARGUMENT_PARSERS or k.startswith("ssl_")}
    if parts.scheme in ("redis+socket", "socket", "unix"):
        netloc = parts.netloc.rpartition("@")[0]
        auth = f"{netloc}@" if netloc else ""
        return f"unix://{auth}{parts.path}?" + urlencode({**kept, "db": db or "0"})
    if parts.scheme in ("redis", "rediss"):
        db = db or parts.path.strip("/") or "0"
        return f"{parts.scheme}://{parts.netloc}/{db}" + (f"?{urlencode(kept)}" if kept else "")
    raise ValueError(f"not a Redis broker URL: scheme {parts.scheme!r}")


class RedisRateLimiter:
    """GCRA buckets in Redis; one instance per process (its connection pool is shared by greenlets).

    A Redis error lets the request through with a warning: the provider's own 429s still bound the
    rate, and the broker being down stops the workers anyway.
    """

    def __init__(self, client: redis.Redis, *, key_prefix: str = "") -> None:
        self._client = client
        self._prefix = key_prefix + "cascade:ratelimit:"
        self._script = client.register_script(_GCRA)

    @classmethod
    def from_broker(cls, broker_url: str, *, key_prefix: str = "") -> RedisRateLimiter:
        """A limiter on the broker's Redis, under the broker's key prefix."""
        client = redis.Redis.from_url(redis_url(broker_url), socket_timeout=5, socket_connect_timeout=5)
        return cls(client, key_prefix=key_prefix)

    def reserve(self, model: str, rpm: int, *, count: int, max_wait_s: float, hold: str | None) -> Reservation:
        """Reserve ``count`` slots; granted when the first is at most ``max_wait_s`` away.

        With ``hold`` (e.g. ``"<job>:<tier>"``), a denial books the slots for that job's next call.
        """
        interval = max(1, round(60 * _US / rpm))
        keys = [self._prefix + model, f"{self._prefix}{model}:hold:{hold or ''}"]
        args = [interval, burst_of(rpm), count, round(max_wait_s * _US), 1 if hold else 0]
        try:
            granted, first = self._script(keys=keys, args=args)
        except redis.RedisError as exc:
            log.warning("rate limiter for model %r unavailable, not limiting: %s", model, exc)
            return UNLIMITED
        return Reservation(bool(granted), int(first) / _US, interval / _US)

    def close(self) -> None:
        self._client.close()
