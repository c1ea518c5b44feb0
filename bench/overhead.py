"""Benchmark 1, overhead: jobs/s through tier1 → validate → done with an instant model (sim, 0 ms), against a
bare Celery chain of three no-op tasks on the same Redis with the same pool settings (one gevent worker,
-c 256, cascade's Celery settings). Both queues are loaded first, then the worker starts; the rate is taken
between 10 % and 90 % done (or over 25 s at most). Also reported: CPU per job by process; Postgres round
trips per job (exact, from libpq's trace, stages run in-process) and Postgres time per job with today's
statements and the proposed ones (bench.dbpath); row writes and Redis commands per job (server counters over
the worker run). The same pair is run again with bench.proposed_app against a bare chain with prefetch 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from bench import dbpath, inprocess
from bench.cpu import CpuMeter
from bench.harness import Row, Scratch, Services, scratch
from bench.workload import Progress, bare_app, bare_chains, config, submit

__all__ = ["run"]

TARGET = 0.5
POOL, CONCURRENCY = "gevent", 256


@dataclass
class Counters:
    """Server-side counters: Redis commands, Postgres commits and row writes."""

    redis_calls: int
    pg_commits: int
    pg_writes: int

    @classmethod
    def read(cls, box: Scratch) -> Counters:
        client = box.redis()
        try:
            stats: dict[str, Any] = client.info("commandstats")  # Any: redis INFO
        finally:
            client.close()
        calls = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        with box.engine.connect() as conn:
            row = conn.execute(text("SELECT xact_commit, tup_inserted + tup_updated + tup_deleted "
                                    "FROM pg_stat_database WHERE datname = current_database()")).one()
        return cls(calls, int(row[0]), int(row[1]))

    def minus(self, other: Counters) -> Counters:
        return Counters(self.redis_calls - other.redis_calls, self.pg_commits - other.pg_commits,
                        self.pg_writes - other.pg_writes)

    def scaled(self, jobs: int) -> PerJob:
        jobs = max(jobs, 1)
        return PerJob(self.redis_calls / jobs, self.pg_commits / jobs, self.pg_writes / jobs)


@dataclass(frozen=True)
class PerJob:
    redis_calls: float
    pg_commits: float
    pg_writes: float


def _finished(box: Scratch) -> int:
    return int(box.scalar("SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed')"))


@dataclass
class Drain:
    rate: float
    counters: PerJob
    cpu_ms: dict[str, float]


def _drain(box: Scratch, worker: Any, count: Any, n: int, groups: dict[str, list[int]],
           limit_s: float) -> Drain:
    """Watch a loaded queue drain for at most ``limit_s``; counters and CPU per finished job."""
    before = Counters.read(box)
    meter = CpuMeter(box, {"worker": [worker.pid], **groups})
    meter.start()
    progress = Progress()
    progress.watch(count, n, timeout=limit_s)
    meter.stop()
    done = count()
    box.stop(worker)
    counters = Counters.read(box).minus(before)
    return Drain(progress.rate(n), counters.scaled(done), meter.per_job_ms(done))


def cascade_rate(box: Scratch, n: int, sim_pid: int, *, app: str, limit_s: float) -> Drain:
    submit(box, "single", n)
    worker = box.worker("tier1,validate", name=f"overhead-{app}", app=app, pool=POOL, concurrency=CONCURRENCY)
    try:
        return _drain(box, worker, lambda: _finished(box), n, {"sim": [sim_pid]}, limit_s)
    finally:
        _reset(box)


def bare_rate(box: Scratch, n: int, *, extra: tuple[str, ...], limit_s: float) -> Drain:
    app = bare_app(box)
    bare_chains(app, n)
    app.close()
    client = box.redis()
    worker = box.worker("bare1,bare2,bare3", name=f"overhead-bare{len(extra)}", app="bench.bare", pool=POOL,
                        concurrency=CONCURRENCY, extra=extra)
    try:
        return _drain(box, worker, lambda: int(client.get(box.prefix + "bench:done") or 0), n, {}, limit_s)
    finally:
        client.close()
        box.delete_keys()


def _reset(box: Scratch) -> None:
    with box.engine.begin() as conn:
        conn.execute(text("TRUNCATE validations, attempts, jobs, batches CASCADE"))
    box.delete_keys()


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    n, limit = (100, 15.0) if tiny else (4000, 25.0)
    proposed = ("--prefetch-multiplier", "4")
    with scratch(svc, "overhead") as box:
        sim = box.sim({"fast": {"latency_ms": 0}})
        box.write_config(config(sim.url))
        bare = bare_rate(box, n, extra=(), limit_s=limit)
        casc = cascade_rate(box, n, sim.pid, app="workers.app", limit_s=limit)
        bare4 = bare_rate(box, n, extra=proposed, limit_s=limit)
        casc4 = cascade_rate(box, n, sim.pid, app="bench.proposed_app", limit_s=limit)
        stages = inprocess.run_stages(box, "single", 20 if tiny else 400, profile=profile)
        paths = dbpath.compare(box, 10 if tiny else 300)
    if profile:
        print(stages.profile)
    trips = stages.trips.total / stages.jobs
    kinds = ", ".join(f"{k} {v / stages.jobs:g}" for k, v in stages.trips.kinds.most_common())
    order = ("worker", "postgres", "sim", "redis")
    settings = f"{POOL} -c {CONCURRENCY}, one worker for all queues"
    return [
        Row("1 overhead: jobs/s tier1→validate→done (0 ms model)", casc.rate, bare.rate, "jobs/s",
            f"ratio ≥ {TARGET:.2f}", casc.rate >= TARGET * bare.rate,
            f"{settings}; baseline: bare chain of 3 no-op tasks; shipped settings (prefetch multiplier 1)"),
        Row("1 overhead, proposed changes: jobs/s", casc4.rate, bare4.rate, "jobs/s", f"ratio ≥ {TARGET:.2f}",
            casc4.rate >= TARGET * bare4.rate, "bench.proposed_app (prefetch 4, sharded httpx, no pre-ping) vs "
            "the bare chain with prefetch 4"),
        Row("1 overhead: CPU ms per job, all processes", sum(casc.cpu_ms.values()), sum(bare.cpu_ms.values()),
            "CPU ms", "report", None, f"cascade: {CpuMeter.describe(casc.cpu_ms, order)}; "
            f"bare: {CpuMeter.describe(bare.cpu_ms, order)}; proposed: {CpuMeter.describe(casc4.cpu_ms, order)}"),
        Row("1 overhead: Postgres round trips per job", trips, None, "round trips", "report", None,
            f"in-process, libpq trace: {kinds}; {stages.seconds / stages.jobs * 1000:.2f} ms/job serial"),
        Row("1 overhead: Postgres work per job, proposed SQL (same transactions)", paths[1].ms_per_job,
            paths[0].ms_per_job, "ms", "report", None,
            f"serial, in-process (bench/dbpath.py): round trips {paths[0].trips_per_job:.0f} → "
            f"{paths[1].trips_per_job:.0f}; all-autocommit variant {paths[2].ms_per_job:.2f} ms, "
            f"{paths[2].trips_per_job:.0f} round trips, 5 commits instead of 3"),
        Row("1 overhead: Postgres rows written per job", casc.counters.pg_writes, None, "rows", "report", None,
            "pg_stat_database tup_inserted+updated+deleted over the worker run"),
        Row("1 overhead: Redis commands per job", casc.counters.redis_calls, bare.counters.redis_calls,
            "commands", "report", None, "INFO commandstats over the worker run (whole server)"),
    ]
