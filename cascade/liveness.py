"""Worker heartbeats in Postgres: how the sweeper tells a dead worker from a slow one.

A worker process registers a row in ``workers`` under its own token before its first claim, stamps the
token on every job it claims (``jobs.worker_id``), and refreshes ``seen_at`` every ``every_s`` seconds
from a background thread (a greenlet under gevent). The sweeper hands a running job to another worker
only when its worker's ``seen_at`` is older than the dead-after bound: a kill -9, a frozen process or a
lost network all stop the refresh, while a live worker keeps its jobs however long its requests take.

A frozen worker that resumes after its jobs were taken over cannot count its work twice: its claims
carry the old ``claim_no`` (the store refuses its moves) and its late answers are recorded as
``interrupted`` attempts, which never vote (``store.end_attempts``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from cascade import store
from cascade.store import Claim

__all__ = ["Heartbeat", "HeldClaims", "new_worker_id"]

log = logging.getLogger(__name__)

_BEAT = text("""
INSERT INTO workers (id, hostname, pid) VALUES (:id, :hostname, :pid)
ON CONFLICT (id) DO UPDATE SET seen_at = now()
""")
_GONE = text("DELETE FROM workers WHERE id = :id")


class HeldClaims:
    """The claims a worker process is working on right now, for the heartbeat to renew their leases.

    A claim the process lost track of (a bug, an error path that could not hand it back) is not renewed,
    so its lease still expires and the sweeper takes it back: the lease bounds a leak, never a live request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}

    def add(self, claims: Iterable[Claim]) -> None:
        with self._lock:
            self._held.update((c.job_id, c.claim_no) for c in claims)

    def discard(self, claims: Iterable[Claim]) -> None:
        with self._lock:
            for c in claims:
                if self._held.get(c.job_id) == c.claim_no:
                    del self._held[c.job_id]

    def renew(self, conn: Connection, lease_s: float) -> None:
        """Push the leases of the held claims that are past half their lease ``lease_s`` further out."""
        with self._lock:
            held = list(self._held.items())
        store.renew_leases(conn, held, lease_s)


def new_worker_id() -> str:
    """A token naming this process for as long as it runs: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat:
    """Keeps one worker's ``workers`` row fresh, and its held claims' leases, until ``stop()``.

    ``start()`` writes the row before it returns, so no job is ever claimed under a token the sweeper
    has not seen alive. A failed refresh (a Postgres blip) is retried at once on a new connection, then
    at the next beat; the worker never stops because of it.
    """

    def __init__(self, engine: Engine, worker_id: str, every_s: float, *, held: HeldClaims | None = None,
                 lease_s: float = 300.0) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.every_s = every_s
        self.held = held if held is not None else HeldClaims()
        self.lease_s = lease_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._params = {"id": worker_id, "hostname": socket.gethostname(), "pid": os.getpid()}

    def beat(self) -> None:
        """Write ``seen_at = now()`` (the row is created if it is missing) and renew the leases of long-held
        claims. Raises DBAPIError on failure."""
        with self.engine.begin() as conn:
            conn.execute(_BEAT, self._params)
            self.held.renew(conn, self.lease_s)

    def start(self) -> Heartbeat:
        """Register the worker (raises if Postgres cannot be reached), then refresh in the background."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="cascade-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for tries_left in (1, 0):
                try:
                    self.beat()
                    break
                except DBAPIError as exc:
                    if not tries_left:
                        log.warning("heartbeat of worker %s failed: %s", self.worker_id, str(exc).splitlines()[0])

    def stop(self) -> None:
        """Stop refreshing and remove the row: jobs still held (a shutdown that could not wait for them)
        are taken back at the sweeper's next pass instead of after the dead-after bound."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.every_s + 1)
        try:
            with self.engine.begin() as conn:
                conn.execute(_GONE, {"id": self.worker_id})
        except DBAPIError as exc:
            log.warning("could not remove worker %s: %s", self.worker_id, str(exc).splitlines()[0])
