"""CPU time per job, by process: where a run's work goes (worker, Postgres backends, sim, Redis)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil
from sqlalchemy import text

from bench.harness import Scratch

__all__ = ["CpuMeter"]


def _cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


@dataclass
class CpuMeter:
    """CPU seconds spent by named groups of processes between ``start`` and ``stop``.

    Postgres backends are those whose application_name is the scratch schema's (``cascade:<schema>``, set by
    ``store.make_engine``); a backend that exits before ``stop`` is missed, so read it while workers run.
    """

    box: Scratch
    groups: dict[str, list[int]]
    before: dict[int, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def _backends(self) -> list[int]:
        with self.box.engine.connect() as conn:
            rows = conn.execute(text("SELECT pid FROM pg_stat_activity WHERE (application_name = :app OR application_name LIKE :app || ':worker:%') "
                                     "AND pid <> pg_backend_pid()"), {"app": f"cascade:{self.box.schema}"})
            return [int(r[0]) for r in rows]

    def _redis(self) -> list[int]:
        client = self.box.redis()
        try:
            return [int(client.info("server")["process_id"])]
        finally:
            client.close()

    def _pids(self) -> dict[str, list[int]]:
        if not self.box.services.embedded:  # servers elsewhere: their pids are not ours to read
            return dict(self.groups)
        return {**self.groups, "postgres": self._backends(), "redis": self._redis()}

    def start(self) -> None:
        self.before = {pid: _cpu(pid) for pids in self._pids().values() for pid in pids}

    def stop(self) -> None:
        self.spent = {name: sum(_cpu(p) - self.before.get(p, 0.0) for p in pids)
                      for name, pids in self._pids().items()}

    def per_job_ms(self, jobs: float) -> dict[str, float]:
        return {name: 1000 * s / jobs for name, s in self.spent.items() if jobs}

    @staticmethod
    def describe(per_job: dict[str, float], order: Iterable[str] = ()) -> str:
        names = [*order, *sorted(set(per_job) - set(order))]
        return ", ".join(f"{n} {per_job[n]:.2f}" for n in names if n in per_job)
