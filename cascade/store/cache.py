"""The request cache's rows (``request_cache``): claim a flight or read an answer, fill, release, prune.

A row is one request key. With an ``answer`` it is a hit (unless older than the TTL); without one it is a
request in flight, owned by the claim named in ``flight``. A flight is taken over when it was released,
when its worker stopped heartbeating, or when it is older than the lease: a crashed sender never blocks
the key. Keys are claimed in sorted order, so two claims of overlapping keys never deadlock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

__all__ = ["FILL_SQL", "CacheRow", "Fill", "Wanted", "claim_keys", "fill_keys", "fill_param", "poll_key", "prune_cache", "release_keys", "take_keys"]


@dataclass(frozen=True)
class Wanted:
    """A key a claim wants, with what is stored beside it (for people reading the table)."""

    key: bytes
    endpoint: str
    model: str
    n: int
    sample: int


@dataclass(frozen=True)
class CacheRow:
    """What a claim or a poll found for one key: ``mine`` (this claim sends it), an ``answer`` to decode (a hit),
    or neither (another claim's request is in flight: ``flying``; or it is gone without an answer)."""

    key: bytes
    mine: bool
    answer: Any  # Any: the stored JSON, decoded by cascade.cache
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    served_model: str | None = None
    cost_usd: Decimal | None = None
    flying: bool = False


@dataclass(frozen=True)
class Fill:
    """An answer to store under ``wanted.key`` (``answer``: its JSON value)."""

    wanted: Wanted
    answer: dict[str, Any]  # Any: JSON
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    served_model: str | None
    cost_usd: Decimal


def _wanted_json(w: Wanted) -> dict[str, Any]:  # Any: JSON
    return {"key": w.key.hex(), "endpoint": w.endpoint, "model": w.model, "n": w.n, "sample": w.sample}


# A fresh answer, or a live flight (its worker heartbeats, or it has none and is younger than the lease).
_FRESH = "c.answer IS NOT NULL AND (CAST(:ttl_s AS float8) IS NULL OR c.answered_at > now() - make_interval(secs => :ttl_s))"
_FLYING = """c.flight IS NOT NULL AND c.flight_at > now() - make_interval(secs => :lease_s)
    AND (c.flight_worker IS NULL OR EXISTS (SELECT 1 FROM workers w WHERE w.id = c.flight_worker
                                            AND w.seen_at > now() - make_interval(secs => :dead_s)))"""

# The INSERT sees the latest committed row (waiting for a concurrent claim of the same key to commit); the
# SELECT below it reads the statement's snapshot, so a key another claim just took reads as in flight.
_CLAIM = text(f"""
WITH wanted AS (
    SELECT decode(w.key, 'hex') AS key, w.endpoint, w.model, w.n, w.sample
    FROM jsonb_to_recordset(CAST(:wanted AS jsonb)) AS w(key text, endpoint text, model text, n int, sample int)
), mine AS (
    INSERT INTO request_cache AS c (key, endpoint, model, n, sample, flight, flight_worker, flight_at)
    SELECT key, endpoint, model, n, sample, :flight, :worker, now() FROM wanted ORDER BY key
    ON CONFLICT (key) DO UPDATE SET flight = excluded.flight, flight_worker = excluded.flight_worker,
                                    flight_at = excluded.flight_at
    WHERE NOT ({_FRESH}) AND NOT ({_FLYING})
    RETURNING c.key
)
SELECT w.key, m.key IS NOT NULL AS mine, CASE WHEN {_FRESH} THEN c.answer END AS answer,
       c.input_tokens, c.output_tokens, c.cached_tokens, c.reasoning_tokens, c.served_model, c.cost_usd
FROM wanted w LEFT JOIN mine m ON m.key = w.key
LEFT JOIN LATERAL (SELECT * FROM request_cache c WHERE c.key = w.key) c ON true
""")


def claim_keys(conn: Connection, wanted: Sequence[Wanted], *, flight: str, worker: str | None, ttl_s: float | None,
               lease_s: float, dead_s: float) -> dict[bytes, CacheRow]:
    """For each distinct key: a fresh answer (a hit), this claim's new flight (``mine``: send it, then fill or
    release it), or neither (another claim is sending it). One statement."""
    if not wanted:
        return {}
    params = {"wanted": json.dumps([_wanted_json(w) for w in wanted]), "flight": flight, "worker": worker, "ttl_s": ttl_s, "lease_s": lease_s, "dead_s": dead_s}
    out: dict[bytes, CacheRow] = {}
    for row in conn.execute(_CLAIM, params):
        key = bytes(row.key)
        out[key] = CacheRow(key, bool(row.mine), None if row.mine else row.answer, row.input_tokens,
                            row.output_tokens, row.cached_tokens, row.reasoning_tokens, row.served_model, row.cost_usd,
                            flying=not row.mine and row.answer is None)
    return out


_TAKE = text("""
UPDATE request_cache SET answer = NULL, answered_at = NULL, flight = :flight, flight_worker = :worker,
                         flight_at = now()
WHERE key = ANY(:keys)
""")


def take_keys(conn: Connection, keys: Sequence[bytes], *, flight: str, worker: str | None) -> None:
    """Make this claim the sender of ``keys`` whatever their rows hold (an answer that cannot be decoded)."""
    if keys:
        conn.execute(_TAKE, {"keys": list(keys), "flight": flight, "worker": worker})


_POLL = text(f"""
SELECT CASE WHEN {_FRESH} THEN c.answer END AS answer, c.input_tokens, c.output_tokens, c.cached_tokens,
       c.reasoning_tokens, c.served_model, c.cost_usd, ({_FLYING}) AS flying
FROM request_cache c WHERE c.key = :key
""")


def poll_key(conn: Connection, key: bytes, *, ttl_s: float | None, lease_s: float, dead_s: float) -> CacheRow:
    """The key's row now: an answer, a live flight (``flying``), or neither (released or abandoned)."""
    row = conn.execute(_POLL, {"key": key, "ttl_s": ttl_s, "lease_s": lease_s, "dead_s": dead_s}).first()
    if row is None:
        return CacheRow(key, False, None)
    return CacheRow(key, False, row.answer, row.input_tokens, row.output_tokens, row.cached_tokens,
                    row.reasoning_tokens, row.served_model, row.cost_usd,
                    flying=row.answer is None and bool(row.flying))


# Concurrent writers of one key leave one row: the last answer wins (both are answers to the same request).
FILL_SQL = """
INSERT INTO request_cache AS c (key, endpoint, model, n, sample, answer, input_tokens, output_tokens, cached_tokens,
                                reasoning_tokens, served_model, cost_usd, answered_at)
SELECT decode(f.key, 'hex'), f.endpoint, f.model, f.n, f.sample, f.answer, f.input_tokens, f.output_tokens,
       f.cached_tokens, f.reasoning_tokens, f.served_model, f.cost_usd, now()
FROM jsonb_to_recordset(CAST(:fills AS jsonb))
     AS f(key text, endpoint text, model text, n int, sample int, answer jsonb, input_tokens int, output_tokens int,
          cached_tokens int, reasoning_tokens int, served_model text, cost_usd numeric)
ORDER BY f.key
ON CONFLICT (key) DO UPDATE SET answer = excluded.answer, input_tokens = excluded.input_tokens,
    output_tokens = excluded.output_tokens, cached_tokens = excluded.cached_tokens,
    reasoning_tokens = excluded.reasoning_tokens, served_model = excluded.served_model,
    cost_usd = excluded.cost_usd, answered_at = excluded.answered_at,
    flight = NULL, flight_worker = NULL, flight_at = NULL
"""
_FILL = text(FILL_SQL)


def fill_keys(conn: Connection, fills: Sequence[Fill]) -> None:
    """Store answers (one per key: the first of duplicates is kept), ending their flights. ``FILL_SQL`` with
    ``fill_param`` does the same inside another statement (``store.end_attempts``: one round trip less)."""
    if fills:
        conn.execute(_FILL, {"fills": fill_param(fills)})


def fill_param(fills: Sequence[Fill]) -> str:
    """``FILL_SQL``'s one parameter, ``:fills``: adapting a dozen arrays cost more client CPU than the
    statement itself."""
    unique = list({f.wanted.key: f for f in reversed(fills)}.values())
    return json.dumps([
        {**_wanted_json(f.wanted), "answer": f.answer, "input_tokens": f.input_tokens, "output_tokens": f.output_tokens,
         "cached_tokens": f.cached_tokens, "reasoning_tokens": f.reasoning_tokens, "served_model": f.served_model,
         "cost_usd": str(f.cost_usd)} for f in unique])


_RELEASE = text("""
UPDATE request_cache SET flight = NULL, flight_worker = NULL, flight_at = NULL
WHERE key = ANY(:keys) AND flight = :flight
""")


def release_keys(conn: Connection, keys: Sequence[bytes], *, flight: str) -> None:
    """End this claim's flights of ``keys`` without an answer (the next claim of a key sends it)."""
    if keys:
        conn.execute(_RELEASE, {"keys": sorted(set(keys)), "flight": flight})


_PRUNE = text("""
DELETE FROM request_cache
WHERE CAST(:older_than_s AS float8) IS NULL
   OR coalesce(answered_at, flight_at, '-infinity') < now() - make_interval(secs => :older_than_s)
""")


def prune_cache(conn: Connection, older_than_s: float | None) -> int:
    """Delete entries answered more than ``older_than_s`` ago (None: every entry); returns how many."""
    return int(conn.execute(_PRUNE, {"older_than_s": older_than_s}).rowcount)
