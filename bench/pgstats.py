"""Postgres' own view of a benchmark run: rows written per table (HOT share), WAL, checkpoints, connections and
wait events of one application name, read through a monitoring connection of its own.

Statistics are flushed lazily: a backend adds its row counters to shared memory at most once a second while
busy, and always when it exits (PostgreSQL 15+). ``Monitor.wait_gone`` waits until an application's backends
have exited, after which ``snapshot`` reads counters that hold every row those backends wrote.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil
from sqlalchemy import Connection, NullPool, create_engine, text
from sqlalchemy.exc import DBAPIError

from cascade.store.engine import normalize_url

__all__ = ["Activity", "Monitor", "PgDelta", "PgSnapshot", "TableWrites"]

MONITOR_APP = "cascade-bench-monitor"


@dataclass(frozen=True)
class TableWrites:
    """pg_stat_user_tables counters of one table (or their difference over a run)."""

    inserted: int = 0
    updated: int = 0
    hot: int = 0
    deleted: int = 0

    @property
    def written(self) -> int:
        return self.inserted + self.updated + self.deleted

    def minus(self, other: TableWrites) -> TableWrites:
        return TableWrites(self.inserted - other.inserted, self.updated - other.updated, self.hot - other.hot,
                           self.deleted - other.deleted)

    def plus(self, other: TableWrites) -> TableWrites:
        return TableWrites(self.inserted + other.inserted, self.updated + other.updated, self.hot + other.hot,
                           self.deleted + other.deleted)


@dataclass(frozen=True)
class PgSnapshot:
    """Counters at one moment: per table of the schema, the WAL position and (where the server has them)
    pg_stat_wal's records and full-page images, the checkpoint count and autovacuum/autoanalyze runs."""

    tables: dict[str, TableWrites]
    lsn: str
    wal_records: int | None
    wal_fpi: int | None
    checkpoints: int | None
    autovacuums: int


@dataclass(frozen=True)
class PgDelta:
    tables: dict[str, TableWrites]
    wal_bytes: int
    wal_records: int | None
    wal_fpi: int | None
    checkpoints: int | None
    autovacuums: int

    @property
    def total(self) -> TableWrites:
        out = TableWrites()
        for t in self.tables.values():
            out = out.plus(t)
        return out


@dataclass
class Activity:
    """pg_stat_activity samples of one application name: connections (peak), and what its non-idle backends were
    doing (state and wait event) and in which statement (its first words), counted only while ``in_window``."""

    rounds: int = 0
    peak_connections: int = 0
    events: Counter[str] = field(default_factory=Counter)
    statements: Counter[str] = field(default_factory=Counter)

    def add(self, rows: list[tuple[str | None, str | None, str | None, str | None]], *, in_window: bool) -> None:
        self.peak_connections = max(self.peak_connections, len(rows))
        if not in_window:
            return
        self.rounds += 1
        for state, kind, event, query in rows:
            if state == "idle":
                continue
            self.events[f"{state} {kind}:{event}" if kind else f"{state} on CPU"] += 1
            self.statements[_statement(query)] += 1

    @property
    def mean_busy(self) -> float:
        """Mean number of non-idle backends per sample."""
        return sum(self.events.values()) / self.rounds if self.rounds else 0.0

    def top(self, k: int = 5, *, by: str = "events") -> list[tuple[str, float]]:
        """The ``k`` most frequent wait events (or statements) with their share of non-idle backend samples."""
        counts: Counter[str] = getattr(self, by)
        busy = sum(counts.values())
        return [(name, n / busy) for name, n in counts.most_common(k)] if busy else []


def _statement(query: str | None) -> str:
    """The first words of a statement, enough to tell cascade's statements apart."""
    words = " ".join((query or "").split())
    return words[:40] if not words.startswith("WITH") else words[:60]


class Monitor:
    """One autocommit connection named ``cascade-bench-monitor`` (so it never counts as the application's)."""

    def __init__(self, database_url: str) -> None:
        self._engine = create_engine(normalize_url(database_url), poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                     connect_args={"application_name": MONITOR_APP})
        self.conn: Connection = self._engine.connect()
        self.backend_pid = int(self.scalar("SELECT pg_backend_pid()"))

    def close(self) -> None:
        self.conn.close()
        self._engine.dispose()

    def scalar(self, sql: str, **params: Any) -> Any:  # Any: a SQL value
        return self.conn.execute(text(sql), params).scalar()

    def postmaster_pid(self) -> int | None:
        """The server's postmaster, the parent of this connection's backend, if it runs on this machine."""
        try:
            parent = psutil.Process(self.backend_pid).parent()
            return parent.pid if parent is not None and parent.name() in ("postgres", "postmaster") else None
        except psutil.Error:
            return None

    def checkpoint(self) -> bool:
        """CHECKPOINT now, so a run starts with no full-page images owed; False if not allowed."""
        try:
            self.conn.execute(text("CHECKPOINT"))
            return True
        except DBAPIError:
            self.conn.rollback()
            return False

    def connections(self, app: str) -> list[tuple[str | None, str | None, str | None, str | None]]:
        """(state, wait event type, wait event, first 80 characters of the query) of each backend of ``app``."""
        rows = self.conn.execute(text("SELECT state, wait_event_type, wait_event, left(query, 80) "
                                      "FROM pg_stat_activity WHERE application_name = :app "
                                      "OR application_name LIKE :app || ':worker:%'"), {"app": app})
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def wait_gone(self, app: str, timeout: float = 30.0) -> None:
        """Wait until no backend of ``app`` is left (each flushes its statistics as it exits)."""
        deadline = time.monotonic() + timeout
        while self.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app "
                          "OR application_name LIKE :app || ':worker:%'", app=app):
            if time.monotonic() > deadline:
                raise TimeoutError(f"backends of {app!r} still connected after {timeout:g} s")
            time.sleep(0.05)

    def snapshot(self, schema: str) -> PgSnapshot:
        self._flush()
        rows = self.conn.execute(text(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del, autovacuum_count + autoanalyze_count "
            "FROM pg_stat_user_tables WHERE schemaname = :schema"), {"schema": schema}).all()
        tables = {r[0]: TableWrites(int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}
        wal = self._optional("SELECT wal_records, wal_fpi FROM pg_stat_wal")
        return PgSnapshot(tables, str(self.scalar("SELECT pg_current_wal_lsn()")),
                          int(wal[0]) if wal else None, int(wal[1]) if wal else None, self._checkpoints(),
                          sum(int(r[5]) for r in rows))

    def indexes(self, schema: str) -> dict[str, int]:
        """Indexes per table of ``schema``: a non-HOT update writes an entry into each of them."""
        rows = self.conn.execute(text("SELECT tablename, count(*) FROM pg_indexes WHERE schemaname = :schema "
                                      "GROUP BY tablename"), {"schema": schema})
        return {r[0]: int(r[1]) for r in rows}

    def delta(self, before: PgSnapshot, after: PgSnapshot) -> PgDelta:
        names = set(before.tables) | set(after.tables)
        tables = {n: after.tables.get(n, TableWrites()).minus(before.tables.get(n, TableWrites())) for n in names}
        wal_bytes = int(self.scalar("SELECT pg_wal_lsn_diff(:a, :b)", a=after.lsn, b=before.lsn))

        def diff(a: int | None, b: int | None) -> int | None:
            return a - b if a is not None and b is not None else None

        return PgDelta({n: t for n, t in sorted(tables.items()) if t.written}, wal_bytes,
                       diff(after.wal_records, before.wal_records), diff(after.wal_fpi, before.wal_fpi),
                       diff(after.checkpoints, before.checkpoints), after.autovacuums - before.autovacuums)

    def _flush(self) -> None:
        # This connection's own pending counters (PostgreSQL 15+); other backends' are flushed as they exit.
        self._optional("SELECT pg_stat_force_next_flush()")
        self._optional("SELECT pg_stat_clear_snapshot()")

    def _checkpoints(self) -> int | None:
        row = self._optional("SELECT num_timed + num_requested FROM pg_stat_checkpointer")  # PostgreSQL 17+
        row = row or self._optional("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        return int(row[0]) if row else None

    def _optional(self, sql: str) -> Any:  # Any: a row, or None where the server lacks the view or function
        try:
            return self.conn.execute(text(sql)).first()
        except DBAPIError:
            self.conn.rollback()
            return None
