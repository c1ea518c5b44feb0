"""Model health shared by every worker process: a circuit breaker per model in Redis.

A model whose requests fail with provider faults (5xx, timeout, lost connection, a broken 200 body; never a
429, which means "later", nor our own 4xx) ``failures`` times in a row, counted across every worker, is
marked down for ``cooldown_s``. While it is down no request goes to it: its tier's jobs go to the tier's
next model (``fallbacks``), or wait when none is up. After the cooldown one caller gets a probe (its job's
requests go to the model, under a lease as long as the model's timeout); an answer closes the breaker, a
fault opens it for another cooldown. Any answer from the model resets its count.

Defaults (``CASCADE_BREAKER_FAILURES`` 5, ``CASCADE_BREAKER_COOLDOWN_S`` 30): five faults in a row are past
what the retry policy absorbs for one request (three retries) and rare for a healthy provider, so a blip does
not move traffic, while an outage moves it after five wasted requests, not after every job's retries; 30 s
is the order of providers' own Retry-After on 503s and short enough that a recovered model gets its traffic
back within half a minute, at the cost of one probe per cooldown while it stays down.

Keys: ``<key_prefix>cascade:health:<model>``, a hash (``fails``, ``open_until``, ``down_since``,
``probe_until``; µs of Redis's clock, so hosts agree), gone once the model answers again. A Redis error lets
every model through (fail open), logged once until Redis answers again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from cascade.ratelimit import redis_url

__all__ = ["HEALTHY", "Health", "ModelState", "RedisHealth"]

log = logging.getLogger(__name__)

_US = 1_000_000

# KEYS: the chain's models, in order. ARGV[1]: probe lease µs. Per model: {state, fails, µs until the cooldown
# ends, µs since it went down}; state 0 up, 1 a probe for this caller (at most one per call), 2 down.
_STATES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local out, probed = {}, false
for i, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'fails', 'open_until', 'down_since', 'probe_until')
  local fails, open_until = tonumber(h[1] or 0), tonumber(h[2] or 0)
  local down, probe_until = tonumber(h[3] or 0), tonumber(h[4] or 0)
  local state = 0
  if open_until > 0 then
    state = 2
    if now >= open_until and now >= probe_until and not probed then
      redis.call('HSET', key, 'probe_until', string.format('%d', now + lease))
      state, probed = 1, true
    end
  end
  local since = 0
  if down > 0 then since = now - down end
  out[i] = {state, fails, math.max(open_until - now, 0), since}
end
return out
"""

# KEYS[1]: the model. ARGV: ok (1/0), failures to open, cooldown µs, probe (1/0), key TTL s. Returns 1 when the
# model is down after this report.
_REPORT = """
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or 0)
local cooldown = tonumber(ARGV[3])
if open_until > 0 then
  if ARGV[4] == '1' then
    redis.call('HSET', KEYS[1], 'open_until', string.format('%d', now + cooldown), 'probe_until', '0')
  end
elseif fails >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'open_until', string.format('%d', now + cooldown), 'probe_until', '0',
             'down_since', string.format('%d', now))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
if tonumber(redis.call('HGET', KEYS[1], 'open_until') or 0) > 0 then return 1 end
return 0
"""


@dataclass(frozen=True)
class ModelState:
    """One model's health as a caller sees it."""

    up: bool
    #: this caller is given the model's probe request (its cooldown is over)
    probe: bool = False
    #: faults in a row so far
    fails: int = 0
    #: seconds until its cooldown ends (0 when up or past it)
    cooldown_left_s: float = 0.0
    #: seconds since it went down (0 when up)
    down_for_s: float = 0.0

    @property
    def usable(self) -> bool:
        return self.up or self.probe


HEALTHY = ModelState(True)


class Health:
    """Every model is up (no broker to share health through)."""

    def states(self, models: Sequence[str], *, probe_lease_s: float) -> list[ModelState]:
        return [HEALTHY for _ in models]

    def report(self, model: str, *, ok: bool, probe: bool = False) -> bool:
        """Count an answer (``ok``) or a provider fault of ``model``; True when it is down after this."""
        return False

    def peek(self, models: Sequence[str]) -> list[ModelState]:
        """Each model's state, read only (no probe is given out)."""
        return [HEALTHY for _ in models]

    def all_down(self, models: Sequence[str]) -> bool:
        """Whether every one of ``models`` is down (in its cooldown or waiting for its probe's answer)."""
        return all(not s.up for s in self.peek(models))


class RedisHealth(Health):
    """The breakers in Redis; one instance per process (its connection pool is shared by greenlets)."""

    def __init__(self, client: redis.Redis, *, key_prefix: str = "", failures: int = 5, cooldown_s: float = 30.0,
                 ttl_s: int = 86400) -> None:
        self._client = client
        self._prefix = key_prefix + "cascade:health:"
        self._states = client.register_script(_STATES)
        self._report = client.register_script(_REPORT)
        self.failures, self.cooldown_s, self._ttl_s = failures, cooldown_s, ttl_s
        self._failing = False
        #: models this process saw with faults counted or down: their next answer is reported (resets them)
        self._dirty: set[str] = set()

    @classmethod
    def from_broker(cls, broker_url: str, *, key_prefix: str = "", failures: int = 5,
                    cooldown_s: float = 30.0) -> RedisHealth:
        client = redis.Redis.from_url(redis_url(broker_url), socket_timeout=5, socket_connect_timeout=5)
        return cls(client, key_prefix=key_prefix, failures=failures, cooldown_s=cooldown_s)

    def states(self, models: Sequence[str], *, probe_lease_s: float) -> list[ModelState]:
        """Each model's state, in one script call; at most one of them is a probe granted to this caller."""
        try:
            rows = self._states(keys=[self._prefix + m for m in models], args=[round(probe_lease_s * _US)])
        except redis.RedisError as exc:
            self._unavailable(exc)
            return [HEALTHY for _ in models]
        self._failing = False
        out = []
        for model, (state, fails, left, since) in zip(models, rows, strict=True):
            if int(state) or int(fails):
                self._dirty.add(model)
            out.append(ModelState(int(state) == 0, int(state) == 1, int(fails), int(left) / _US, int(since) / _US))
        return out

    def report(self, model: str, *, ok: bool, probe: bool = False) -> bool:
        if ok and not probe and model not in self._dirty:
            return False
        try:
            down = self._report(keys=[self._prefix + model],
                                args=[1 if ok else 0, self.failures, round(self.cooldown_s * _US), 1 if probe else 0,
                                      self._ttl_s])
        except redis.RedisError as exc:
            self._unavailable(exc)
            return False
        self._failing = False
        if ok:
            self._dirty.discard(model)
        else:
            self._dirty.add(model)
        return bool(down)

    def peek(self, models: Sequence[str]) -> list[ModelState]:
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.time()
                for model in models:
                    pipe.hmget(self._prefix + model, "fails", "open_until", "down_since")
                now_s, *rows = pipe.execute()
        except redis.RedisError as exc:
            self._unavailable(exc)
            return [HEALTHY for _ in models]
        self._failing = False
        now = now_s[0] * _US + now_s[1]
        out = []
        for fails, open_until, down in rows:
            opened, since = int(open_until or 0), int(down or 0)
            out.append(ModelState(opened == 0, False, int(fails or 0), max(opened - now, 0) / _US,
                                  (now - since) / _US if since else 0.0))
        return out

    def _unavailable(self, exc: redis.RedisError) -> None:
        if not self._failing:
            log.warning("model health unavailable, treating every model as up until Redis answers again: %s", exc)
        self._failing = True

    def close(self) -> None:
        self._client.close()
