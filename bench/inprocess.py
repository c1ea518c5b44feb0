"""Stages called directly in this process (no Celery): Postgres round trips per job, and where the time goes.

Round trips are counted exactly from libpq's protocol trace (``PGconn.trace``): every frontend ``Query``
(simple protocol: BEGIN, COMMIT, the pool's pre-ping ``;``) and every ``Sync`` (the end of one extended-protocol
statement) is one round trip to the server.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import pq
from sqlalchemy import Engine, event

from bench.harness import Scratch
from bench.workload import ListPublisher, submit
from cascade.providers import ProviderPool
from cascade.publish import messages
from cascade.stages import StageContext, run_calls, run_validates
from cascade.store import Stage, make_engine

__all__ = ["Trips", "run_stages", "traced_engine"]


@dataclass
class Trips:
    """Round trips seen in a trace file, by the first words of each statement."""

    total: int = 0
    kinds: Counter[str] = field(default_factory=Counter)


def _kind(statement: str) -> str:
    flat = re.sub(r"\s+", " ", statement.strip('" ')).strip()
    if flat.startswith("UPDATE jobs SET"):
        return "claim (UPDATE jobs)" if "claim_no + 1" in flat else "move (UPDATE jobs)"
    return {";": "pre-ping"}.get(flat, " ".join(flat.split(" ")[:4])[:48])


_MESSAGE = re.compile(r"\n(?=[FB]\t)")
_PARSE = re.compile(r'^"([^"]*)" "(.*)" \d+', re.DOTALL)
_BIND = re.compile(r'^"[^"]*" "([^"]*)"')


def read_trips(path: Path) -> Trips:
    """Round trips in one connection's trace, each named by its statement (prepared ones by their text)."""
    trips, pending, named = Trips(), "", {}
    for message in _MESSAGE.split(path.read_text(errors="replace")):
        parts = message.split("\t", 3)
        if len(parts) < 3 or parts[0] != "F":
            continue
        kind, rest = parts[2], parts[3].strip() if len(parts) > 3 else ""
        if kind == "Query":
            trips.total += 1
            trips.kinds[_kind(rest)] += 1
        elif kind == "Parse" and (m := _PARSE.match(rest)):
            named[m.group(1)] = pending = m.group(2)
        elif kind == "Bind" and (m := _BIND.match(rest)):
            pending = named.get(m.group(1), pending)
        elif kind == "Sync":
            trips.total += 1
            trips.kinds[_kind(pending)] += 1
    return trips


@contextmanager
def traced_engine(box: Scratch, directory: Path) -> Iterator[Engine]:
    """An engine on the scratch schema whose connections each write libpq's protocol trace to a file in
    ``directory`` (one file per connection: libpq buffers its trace, so files must not be shared)."""
    engine = make_engine(box.services.database_url, schema=box.schema, pool_size=4)
    directory.mkdir(parents=True, exist_ok=True)
    count = iter(range(1_000_000))

    @event.listens_for(engine, "connect")
    def _trace(dbapi_conn: Any, _record: Any) -> None:  # Any: driver objects
        with (directory / f"conn-{next(count)}.txt").open("w") as out:
            dbapi_conn.pgconn.trace(os.dup(out.fileno()))
        dbapi_conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    @event.listens_for(engine, "close")
    def _flush(dbapi_conn: Any, _record: Any) -> None:  # Any: driver objects
        dbapi_conn.pgconn.untrace()  # closes the trace file, flushing libpq's buffer

    try:
        yield engine
    finally:
        engine.dispose()


def read_dir(directory: Path) -> Trips:
    total = Trips()
    for path in sorted(directory.glob("conn-*.txt")):
        trips = read_trips(path)
        total.total += trips.total
        total.kinds.update(trips.kinds)
    return total


@dataclass
class StageRun:
    jobs: int
    trips: Trips
    seconds: float
    profile: str = ""


def run_stages(box: Scratch, task: str, n: int, *, per_message: int, profile: bool = False) -> StageRun:
    """Submit ``n`` jobs, then run their stages in this process, ``per_message`` job ids per message as the
    workers get them, one message at a time.

    One job runs first on an untraced engine (snapshot cache, HTTP keep-alive); the rest are traced.
    """
    publisher = ListPublisher()
    submit(box, task, n + 1, publisher)
    rest, publisher.sent[:] = publisher.sent[1:], publisher.sent[:1]
    providers = ProviderPool()
    warm = StageContext(engine=box.engine, publisher=publisher, providers=providers, settings=box.settings())
    drain(warm, publisher, 1)
    publisher.sent[:] = rest
    directory = box.workdir / f"trace-{task}-{per_message}"
    with traced_engine(box, directory) as engine:
        ctx = StageContext(engine=engine, publisher=publisher, providers=providers, settings=box.settings(),
                           _snapshots=warm._snapshots)
        prof = cProfile.Profile() if profile else None
        started = time.perf_counter()
        if prof:
            prof.enable()
        drain(ctx, publisher, per_message)
        if prof:
            prof.disable()
        seconds = time.perf_counter() - started
    providers.close()
    text = ""
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        text = buf.getvalue()
    return StageRun(n, read_dir(directory), seconds, text)


def drain(ctx: StageContext, publisher: ListPublisher, per_message: int) -> None:
    """Run every due message, and the messages they lead to, until nothing is due."""
    while publisher.sent:
        batch = messages(publisher.sent, per_message)
        publisher.sent.clear()
        for ids, tier, stage in batch:
            (run_calls if stage is Stage.CALL else run_validates)(ctx, ids, tier)
