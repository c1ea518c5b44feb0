"""The call stage's use of the request cache (``cascade.cache``): which requests of a message go out.

At claim time every cacheable request gets its key, and one statement (``store.cache.claim_keys``) says
for each distinct key: a stored answer (HIT: no request, recorded as a cached attempt), this claim's flight
(SEND: sent, then its answer filled in or its flight released when the claim's outcome is recorded), or
another claim's flight (WAIT: poll for its answer inline, briefly, then come back later). A key repeated in
one message is sent once: its other jobs FOLLOW the first and take its answer. A batch submitted with
``--no-cache`` sends everything (SEND without a flight) and still fills in its answers.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from cascade.cache import Entry, cacheable, decode, encode, request_key
from cascade.config import ResolvedTier, TaskSnapshot
from cascade.providers import Completion
from cascade.stages.context import StageContext
from cascade.stages.requests import Request, request_params, stored_cap
from cascade.store import pg_text
from cascade.store.cache import Fill, Wanted, claim_keys, poll_key, release_keys, take_keys

__all__ = [
    "Cached",
    "Role",
    "entry_of",
    "fills_of",
    "keep_answer",
    "plan_cache",
    "release_all",
    "wait_for",
]


class Role(enum.Enum):
    SEND = "send"
    HIT = "hit"
    WAIT = "wait"
    FOLLOW = "follow"


@dataclass
class Cached:
    """One request's place in the cache."""

    wanted: Wanted
    role: Role
    #: this claim's flight of the key (filled in or released when the claim's outcome is recorded)
    flight: str | None = None
    entry: Entry | None = None
    leader: Cached | None = None
    #: the answer to store (a SEND's cacheable answer): followers copy it
    answer: Completion | None = None
    contents: list[str] | None = None


def plan_cache(ctx: StageContext, conn: Connection,
               items: Sequence[tuple[TaskSnapshot, ResolvedTier, Request]]) -> list[Cached | None]:
    """Each request's place in the cache (None: its task type or model does not use the cache), after
    claiming the flights of the keys no one holds, in ``conn``'s transaction."""
    out: list[Cached | None] = []
    firsts: dict[bytes, Cached] = {}
    flight = uuid.uuid4().hex
    for snap, tier, request in items:
        if not snap.caches(tier):
            out.append(None)
            continue
        model = tier.model
        key = request_key(model.base_url, model.model, request_params(snap, tier, request), request.sample)
        wanted = Wanted(key, model.base_url.rstrip("/"), model.model, request.n, request.sample)
        if not snap.cache_reads:
            out.append(Cached(wanted, Role.SEND))
        elif key in firsts:
            out.append(Cached(wanted, Role.FOLLOW, leader=firsts[key]))
        else:
            firsts[key] = Cached(wanted, Role.SEND)
            out.append(firsts[key])
    if not firsts:
        return out
    settings = ctx.settings
    found = claim_keys(conn, [c.wanted for c in firsts.values()], flight=flight, worker=ctx.worker_id, ttl_s=settings.cache_ttl_s, lease_s=settings.lease_s,
                       dead_s=settings.worker_dead_after_s)
    undecodable: list[bytes] = []
    for key, first in firsts.items():
        row = found[key]
        if row.mine:
            first.flight = flight
        elif row.answer is not None:
            first.entry = decode(row, first.wanted.n)
            if first.entry is None:
                undecodable.append(key)
                first.flight = flight
            else:
                first.role = Role.HIT
        else:
            first.role = Role.WAIT
    take_keys(conn, undecodable, flight=flight, worker=ctx.worker_id)
    return out


def wait_for(ctx: StageContext, cached: Cached) -> Entry | None:
    """Poll for the answer of another claim's flight of the key, up to the inline wait bound; None when it
    ended without one or is still in flight then (the job comes back later)."""
    settings = ctx.settings
    deadline = time.monotonic() + settings.max_inline_wait_s
    pause = 0.005
    while True:
        with ctx.engine.connect() as conn:
            row = poll_key(conn, cached.wanted.key, ttl_s=settings.cache_ttl_s, lease_s=settings.lease_s,
                           dead_s=settings.worker_dead_after_s)
        if row.answer is not None:
            return decode(row, cached.wanted.n)
        if not row.flying or time.monotonic() + pause > deadline:
            return None
        ctx.sleep(pause)
        pause = min(2 * pause, 0.2)


def keep_answer(cached: Cached, snap: TaskSnapshot, done: Completion) -> None:
    """Remember a sent request's answer for the cache when it is one to store."""
    if cacheable(done, cached.wanted.n, stored_cap(snap)):
        cached.answer = done
        cached.contents = [pg_text(c or "") for c in done.contents]


def entry_of(cached: Cached, snap: TaskSnapshot, tier: ResolvedTier) -> Entry | None:
    """What a follower takes from its leader: the leader's stored answer or the one it just got."""
    leader = cached.leader
    if leader is None:
        return None
    if leader.entry is not None:
        return leader.entry
    done = leader.answer
    if done is None or leader.contents is None:
        return None
    return Entry(leader.contents, list(done.finish_reasons), done.input_tokens, done.output_tokens,
                 done.cached_tokens, done.reasoning_tokens, done.served_model,
                 tier.model.price.cost(done.input_tokens, done.output_tokens, done.cached_tokens))


def fills_of(cached: Sequence[tuple[Cached, TaskSnapshot, ResolvedTier]]) -> list[Fill]:
    """The answers to store: each sent request's cacheable answer, priced as the model bills it."""
    fills: list[Fill] = []
    for c, _, tier in cached:
        if c.answer is not None and c.contents is not None:
            done = c.answer
            fills.append(Fill(c.wanted, encode(c.contents, list(done.finish_reasons)), done.input_tokens,
                              done.output_tokens, done.cached_tokens, done.reasoning_tokens, done.served_model,
                              tier.model.price.cost(done.input_tokens, done.output_tokens, done.cached_tokens)))
    return fills


def release_all(conn: Connection, cached: Sequence[Cached]) -> None:
    """End this claim's flights of ``cached`` without storing an answer (its claim moved on without sending,
    the answer was not one to store, or the stage failed): the next claim of such a key sends it."""
    flights: dict[str, list[bytes]] = {}
    for c in cached:
        if c.flight is not None:
            flights.setdefault(c.flight, []).append(c.wanted.key)
    for flight, keys in flights.items():
        release_keys(conn, keys, flight=flight)
