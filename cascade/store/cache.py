"""The request cache's rows (``request_cache``): claim a flight or read an answer, fill, release, prune.

A row is one request key. With an ``answer`` it is a hit (unless older than the TTL); without one it is a
request in flight, owned by the claim named in ``flight``. A flight is taken over when it was released,
when its worker stopped heartbeating, or when it is older than the lease: a crashed sender never blocks
the key. Keys are claimed in sorted order, so two claims of overlapping keys never deadlock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

__all__ = ["CacheRow", "Fill", "Wanted", "claim_keys", "fill_keys", "poll_key", "prune_cache", "release_keys", "take_keys"]


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
    """An answer to store under ``wanted.key`` (``answer``: JSON text)."""

    wanted: Wanted
    answer: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    served_model: str | None
    cost_usd: Decimal


# A fresh answer, or a live flight (its worker heartbeats, or it has none and is younger than the lease).
_FRESH = "c.answer IS NOT NULL AND (CAST(:ttl_s AS float8) IS NULL OR c.answered_at > now() - make_interval(secs => :ttl_s))"
_FLYING = """c.flight IS NOT NULL AND c.flight_at > now() - make_interval(secs => :lease_s)
    AND (c.flight_worker IS NULL OR EXISTS (SELECT 1 FROM workers w WHERE w.id = c.flight_worker
                                            AND w.seen_at > now() - make_interval(secs => :dead_s)))"""

# The INSERT sees the latest committed row (waiting for a concurrent claim of the same key to commit); the
# SELECT below it reads the statement's snapshot, so a key another claim just took reads as in flight.
_CLAIM = text(f"""
WITH wanted AS (
    SELECT * FROM unnest(CAST(:keys AS bytea[]), CAST(:endpoints AS text[]), CAST(:models AS text[]),
                         CAST(:ns AS int[]), CAST(:samples AS int[])) AS w(key, endpoint, model, n, sample)
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
FROM wanted w LEFT JOIN mine m ON m.key = w.key LEFT JOIN request_cache c ON c.key = w.key
""")


def claim_keys(conn: Connection, wanted: Sequence[Wanted], *, flight: str, worker: str | None, ttl_s: float | None,
               lease_s: float, dead_s: float) -> dict[bytes, CacheRow]:
    """For each distinct key: a fresh answer (a hit), this claim's new flight (``mine``: send it, then fill or
    release it), or neither (another claim is sending it). One statement."""
    if not wanted:
        return {}
    params = {"keys": [w.key for w in wanted], "endpoints": [w.endpoint for w in wanted],
              "models": [w.model for w in wanted], "ns": [w.n for w in wanted], "samples": [w.sample for w in wanted],
              "flight": flight, "worker": worker, "ttl_s": ttl_s, "lease_s": lease_s, "dead_s": dead_s}
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
_FILL = text("""
INSERT INTO request_cache AS c (key, endpoint, model, n, sample, answer, input_tokens, output_tokens, cached_tokens,
                                reasoning_tokens, served_model, cost_usd, answered_at)
SELECT key, endpoint, model, n, sample, CAST(answer AS jsonb), input_tokens, output_tokens, cached_tokens,
       reasoning_tokens, served_model, cost_usd, now()
FROM unnest(CAST(:keys AS bytea[]), CAST(:endpoints AS text[]), CAST(:models AS text[]), CAST(:ns AS int[]),
            CAST(:samples AS int[]), CAST(:answers AS text[]), CAST(:input_tokens AS int[]),
            CAST(:output_tokens AS int[]), CAST(:cached_tokens AS int[]), CAST(:reasoning_tokens AS int[]),
            CAST(:served_models AS text[]), CAST(:costs AS numeric[]))
     AS f(key, endpoint, model, n, sample, answer, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
          served_model, cost_usd)
ORDER BY key
ON CONFLICT (key) DO UPDATE SET answer = excluded.answer, input_tokens = excluded.input_tokens,
    output_tokens = excluded.output_tokens, cached_tokens = excluded.cached_tokens,
    reasoning_tokens = excluded.reasoning_tokens, served_model = excluded.served_model,
    cost_usd = excluded.cost_usd, answered_at = excluded.answered_at,
    flight = NULL, flight_worker = NULL, flight_at = NULL
""")


def fill_keys(conn: Connection, fills: Sequence[Fill]) -> None:
    """Store answers (one per key: the first of duplicates is kept), ending their flights."""
    unique = list({f.wanted.key: f for f in reversed(fills)}.values())
    if not unique:
        return
    conn.execute(_FILL, {
        "keys": [f.wanted.key for f in unique], "endpoints": [f.wanted.endpoint for f in unique],
        "models": [f.wanted.model for f in unique], "ns": [f.wanted.n for f in unique],
        "samples": [f.wanted.sample for f in unique], "answers": [f.answer for f in unique],
        "input_tokens": [f.input_tokens for f in unique], "output_tokens": [f.output_tokens for f in unique],
        "cached_tokens": [f.cached_tokens for f in unique], "reasoning_tokens": [f.reasoning_tokens for f in unique],
        "served_models": [f.served_model for f in unique], "costs": [f.cost_usd for f in unique]})


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
