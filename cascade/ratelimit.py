"""A model's ``rate_limit_rpm`` and ``rate_limit_tpm``, shared by every worker process: GCRA buckets in Redis.

Each job reserves its requests before they go out: one slot per request under the RPM limit, and their
upper-bound tokens (``upper_bound_tokens``: prompt bytes plus ``max_tokens × n``) under the TPM limit, in one
script call. A reservation within ``max_wait_s`` is granted and the caller sleeps until it
(gevent-cooperative); a later one is denied, and the caller hands the job back to Postgres (``not_before``)
instead of holding a worker slot. A denial made with a ``hold`` key still books the slots and remembers them
under that key, so the job's next claim gets exactly those slots: a backlog of N jobs is spread over N slots
instead of coming back all at once, again and again. After each answer ``settle`` (one more script call)
gives back what the request reserved beyond its real usage, and, when the answer's ``x-ratelimit-remaining-*``
headers say a provider limit is nearly spent (``pause_s``), makes the next slots wait for its reset.

Keys, under ``<key_prefix>cascade:ratelimit:<model>``: the RPM bucket (a string: the theoretical arrival time,
TAT, of the next request), ``…:tpm`` (a hash: the token bucket's TAT, and ``ratio``, the mean share of the
reservation that requests really used), ``…:hold:<hold>`` (a job's held slots). Times are µs in Redis's own
clock (``TIME``), so processes on several hosts agree. Burst capacity is one second of traffic (``burst_of``),
for tokens at least one request's reservation.

A held job's tokens are booked at their expected cost (reservation × ``ratio``), not the upper bound: holds
are spaced by what requests really use, and the rest is topped up when the job comes back for its slot. Until
a model's first answer is settled there is no ratio, and a denied job books nothing (it comes back soon, once
the ratio is known).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from cascade.providers import RateLimits

__all__ = ["UNLIMITED", "RateLimiter", "RedisRateLimiter", "Reservation", "burst_of", "pause_s", "redis_url",
           "upper_bound_tokens"]

log = logging.getLogger(__name__)

# KEYS[1]: the RPM bucket (TAT, µs); KEYS[2]: this job's held slots (a hash: first, count, tokens);
# KEYS[3]: the token bucket (a hash: tat µs, ratio).
# ARGV: interval µs (0: no RPM limit), burst, count, max_wait µs, use_hold (0/1), µs per token (0: no TPM
# limit), token burst µs, tokens. Returns {granted, µs until the first slot}.
_RESERVE = """
local interval, burst, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait, use_hold = tonumber(ARGV[4]), ARGV[5] == '1'
local tau, cap, tokens = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat_r = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now)
local bucket = {false, false}
if tau > 0 then bucket = redis.call('HMGET', KEYS[3], 'tat', 'ratio') end
local tat_t = math.max(tonumber(bucket[1] or 0), now)
local function set_tokens(tat)
  redis.call('HSET', KEYS[3], 'tat', string.format('%d', math.floor(tat)))
  redis.call('PEXPIRE', KEYS[3], math.ceil((tat - now) / 1000) + 3600000)
end
if use_hold then
  local held = redis.call('HMGET', KEYS[2], 'first', 'count', 'tokens')
  if held[1] then
    local first = tonumber(held[1])
    if first >= now and tonumber(held[2]) >= count then
      if first - now > max_wait then return {0, first - now} end
      redis.call('DEL', KEYS[2])
      -- the hold booked the expected cost; book the rest of the upper bound (settled after the answer)
      if tau > 0 then set_tokens(math.max(tat_t + (tokens - tonumber(held[3] or 0)) * tau, now)) end
      return {1, first - now}
    end
    redis.call('DEL', KEYS[2])  -- missed (the job came back late) or too small: book afresh
  end
end
local function book(first, cost)
  if interval > 0 then
    local after = math.max(tat_r, first) + count * interval
    redis.call('SET', KEYS[1], string.format('%d', after), 'PX', math.ceil((after - now) / 1000) + 1000)
  end
  if tau > 0 then set_tokens(math.max(tat_t, first) + cost * tau) end
end
local first = now - max_wait - 1
if interval > 0 then first = tat_r - (burst - 1) * interval end
if tau > 0 then first = math.max(first, tat_t - math.max(0, cap - tokens * tau)) end
if first - now <= max_wait then
  book(first, tokens)
  return {1, first - now}
end
if not use_hold or (tau > 0 and not bucket[2]) then return {0, first - now} end
-- held slots are spaced strictly, so the job can always arrive before the first one
local cost = math.ceil(tokens * tonumber(bucket[2] or 1))
first = math.max(interval > 0 and tat_r or now, tau > 0 and tat_t or now)
book(first, cost)
redis.call('HSET', KEYS[2], 'first', string.format('%d', first), 'count', count, 'tokens', cost)
redis.call('PEXPIRE', KEYS[2], math.ceil((first - now) / 1000) + 3600000)
return {0, first - now}
"""

# KEYS[1]: the RPM bucket; KEYS[2]: the token bucket. ARGV: µs per token (0: no TPM limit), tokens reserved,
# tokens used, pause µs (0: none), interval µs, burst, token burst µs.
_SETTLE = """
local tau, reserved, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local pause, interval, burst, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if tau > 0 then
  local bucket = redis.call('HMGET', KEYS[2], 'tat', 'ratio')
  local tat = math.max(math.max(tonumber(bucket[1] or 0), now) + (used - reserved) * tau, now)
  if pause > 0 then tat = math.max(tat, now + pause + cap) end
  redis.call('HSET', KEYS[2], 'tat', string.format('%d', math.floor(tat)))
  if reserved > 0 then
    local share = math.max(0.01, math.min(1, used / reserved))
    local ratio = bucket[2] and 0.8 * tonumber(bucket[2]) + 0.2 * share or share
    redis.call('HSET', KEYS[2], 'ratio', string.format('%.4f', ratio))
  end
  redis.call('PEXPIRE', KEYS[2], math.ceil((tat - now) / 1000) + 3600000)
end
if pause > 0 and interval > 0 then
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or 0), now + pause + (burst - 1) * interval)
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return 1
"""

#: A provider limit counts as nearly spent when less than this share of it remains (``pause_s``).
LOW_SHARE = 0.03
#: Tokens counted per message on top of its UTF-8 bytes (role and separators), and per request.
MESSAGE_OVERHEAD, REQUEST_OVERHEAD = 4, 3
#: The longest pause an answer's reset headers may impose.
MAX_PAUSE_S = 60.0
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
    def reserve(self, model: str, rpm: int | None, *, count: int, max_wait_s: float, hold: str | None,
                tpm: int | None = None, tokens: int = 0) -> Reservation:
        """Reserve ``count`` request slots of ``model`` under ``rpm`` and ``tokens`` under ``tpm``."""

    def settle(self, model: str, *, rpm: int | None, tpm: int | None, reserved: int, used: int,
               pause_s: float) -> None:
        """Give back what a request reserved beyond ``used``; make the next slots wait ``pause_s``."""

    def paused_s(self, model: str) -> float:
        """Seconds this process still waits before sending to ``model`` (a pause its answers asked for)."""


def upper_bound_tokens(messages: Iterable[Mapping[str, object]], *, n: int, max_tokens: int) -> int:
    """The most tokens one request can use: its prompt's UTF-8 bytes (a token is never shorter than a byte)
    plus a small overhead per message, and ``max_tokens`` for each of its ``n`` choices."""
    prompt = sum(len(str(m.get("content") or "").encode()) + MESSAGE_OVERHEAD for m in messages)
    return prompt + REQUEST_OVERHEAD + max_tokens * n


def pause_s(limits: RateLimits) -> float:
    """How long to hold every request back after an answer with these ``x-ratelimit-*`` headers: until the
    reset of each limit that is nearly spent (less than ``LOW_SHARE`` of it, or nothing, remains), else 0."""
    waits = [0.0]
    for limit, remaining, reset in ((limits.limit_requests, limits.remaining_requests, limits.reset_requests_s),
                                    (limits.limit_tokens, limits.remaining_tokens, limits.reset_tokens_s)):
        if remaining is not None and reset is not None and remaining <= (limit or 0) * LOW_SHARE:
            waits.append(reset)
    return min(max(waits), MAX_PAUSE_S)


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

    A Redis error lets the request through, logged once until Redis answers again: the provider's own 429s
    still bound the rate, and the broker being down stops the workers anyway.
    """

    def __init__(self, client: redis.Redis, *, key_prefix: str = "") -> None:
        self._client = client
        self._prefix = key_prefix + "cascade:ratelimit:"
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._failing = False
        self._paused: dict[str, float] = {}  # model → time.monotonic() until which this process holds back

    @classmethod
    def from_broker(cls, broker_url: str, *, key_prefix: str = "") -> RedisRateLimiter:
        """A limiter on the broker's Redis, under the broker's key prefix."""
        client = redis.Redis.from_url(redis_url(broker_url), socket_timeout=5, socket_connect_timeout=5)
        return cls(client, key_prefix=key_prefix)

    def reserve(self, model: str, rpm: int | None, *, count: int, max_wait_s: float, hold: str | None,
                tpm: int | None = None, tokens: int = 0) -> Reservation:
        """Reserve ``count`` slots under ``rpm`` and ``tokens`` (their upper bound) under ``tpm``; granted when
        the first slot is at most ``max_wait_s`` away. Either limit may be None (not limited).

        With ``hold`` (e.g. ``"<job>:<tier>"``), a denial books the slots for that job's next call.
        """
        interval = max(1, round(60 * _US / rpm)) if rpm else 0
        keys = [self._prefix + model, f"{self._prefix}{model}:hold:{hold or ''}", f"{self._prefix}{model}:tpm"]
        args = [interval, burst_of(rpm) if rpm else 1, count, round(max_wait_s * _US), 1 if hold else 0,
                _per_token_us(tpm), _US, tokens]
        try:
            granted, first = self._reserve(keys=keys, args=args)
        except redis.RedisError as exc:
            self._unavailable(model, exc)
            return UNLIMITED
        self._failing = False
        return Reservation(bool(granted), int(first) / _US, interval / _US)

    def settle(self, model: str, *, rpm: int | None, tpm: int | None, reserved: int, used: int,
               pause_s: float) -> None:
        """After an answer: count ``used`` tokens instead of the ``reserved`` ones, and when ``pause_s`` > 0
        (``pause_s``) make the next slots of every process wait that long (this process's requests too)."""
        if pause_s > 0:
            self._paused[model] = max(self._paused.get(model, 0.0), time.monotonic() + pause_s)
        interval = max(1, round(60 * _US / rpm)) if rpm else 0
        args = [_per_token_us(tpm), reserved, used, round(pause_s * _US), interval, burst_of(rpm) if rpm else 1, _US]
        try:
            self._settle(keys=[self._prefix + model, f"{self._prefix}{model}:tpm"], args=args)
        except redis.RedisError as exc:
            self._unavailable(model, exc)
            return
        self._failing = False

    def paused_s(self, model: str) -> float:
        """Seconds left of the last pause an answer of ``model`` asked this process for (0: none)."""
        return max(0.0, self._paused.get(model, 0.0) - time.monotonic())

    def _unavailable(self, model: str, exc: redis.RedisError) -> None:
        if not self._failing:
            log.warning("rate limiter for model %r unavailable, not limiting until Redis answers again: %s",
                        model, exc)
        self._failing = True

    def close(self) -> None:
        self._client.close()


def _per_token_us(tpm: int | None) -> float:
    return 60 * _US / tpm if tpm else 0.0
