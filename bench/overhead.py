"""Benchmark 1, overhead: jobs/s through tier1 → validate → done with an instant model (sim, 0 ms), against a
bare Celery chain of three no-op tasks on the same Redis with the same pool settings (one gevent worker,
-c 256, cascade's Celery settings). Both queues are loaded first, then the worker starts; the rate is taken
between 10 % and 90 % done (or over 25 s at most). Cascade runs as shipped (``jobs_per_message`` 16) and
with one job per message (``CASCADE_JOBS_PER_MESSAGE=1``: what the per-message path costs). Also reported:
CPU per job by process; Postgres round trips per job (exact, from libpq's trace, stages run in-process, for
both message sizes); row writes and Redis commands per job (server counters over the worker run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from bench import inprocess
from bench.cpu import CpuMeter
from bench.harness import Row, Scratch, Services, scratch
from bench.workload import Progress, bare_app, bare_chains, config, submit
from cascade.config import CascadeSettings

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


def cascade_rate(box: Scratch, n: int, sim_pid: int, *, per_message: int, limit_s: float) -> Drain:
    submit(box, "single", n, jobs_per_message=per_message)
    worker = box.worker("tier1,validate", name=f"overhead-{per_message}", pool=POOL, concurrency=CONCURRENCY,
                        CASCADE_JOBS_PER_MESSAGE=str(per_message))
    try:
        return _drain(box, worker, lambda: _finished(box), n, {"sim": [sim_pid]}, limit_s)
    finally:
        _reset(box)


def bare_rate(box: Scratch, n: int, *, limit_s: float) -> Drain:
    app = bare_app(box)
    bare_chains(app, n)
    app.close()
    client = box.redis()
    worker = box.worker("bare1,bare2,bare3", name="overhead-bare", app="bench.bare", pool=POOL,
                        concurrency=CONCURRENCY)
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
    n, limit = (100, 15.0) if tiny else (6000, 25.0)
    shipped = CascadeSettings.model_fields["jobs_per_message"].default
    with scratch(svc, "overhead") as box:
        sim = box.sim({"fast": {"latency_ms": 0}})
        box.write_config(config(sim.url))
        bare = bare_rate(box, n, limit_s=limit)
        casc = cascade_rate(box, n, sim.pid, per_message=shipped, limit_s=limit)
        one = cascade_rate(box, n // 3, sim.pid, per_message=1, limit_s=limit)
        stages = inprocess.run_stages(box, "single", 32 if tiny else 480, per_message=shipped, profile=profile)
        single = inprocess.run_stages(box, "single", 20 if tiny else 300, per_message=1)
    if profile:
        print(stages.profile)
    order = ("worker", "postgres", "sim", "redis")
    settings = f"{POOL} -c {CONCURRENCY}, one worker for both queues"

    def trips(run: inprocess.StageRun) -> str:
        kinds = ", ".join(f"{k} {v / run.jobs:.2g}" for k, v in run.trips.kinds.most_common())
        return f"{kinds}; {run.seconds / run.jobs * 1000:.2f} ms/job serial"

    return [
        Row("1 overhead: jobs/s tier1→validate→done (0 ms model)", casc.rate, bare.rate, "jobs/s",
            f"ratio ≥ {TARGET:.2f}", casc.rate >= TARGET * bare.rate,
            f"{settings}, {shipped} jobs per message (shipped); baseline: bare chain of 3 no-op tasks"),
        Row("1 overhead, one job per message: jobs/s", one.rate, bare.rate, "jobs/s", "report", None,
            f"{settings}, CASCADE_JOBS_PER_MESSAGE=1 (the per-message path alone; {n // 3} jobs)"),
        Row("1 overhead: CPU ms per job, all processes", sum(casc.cpu_ms.values()), sum(bare.cpu_ms.values()),
            "CPU ms", "report", None, f"cascade: {CpuMeter.describe(casc.cpu_ms, order)}; "
            f"bare: {CpuMeter.describe(bare.cpu_ms, order)}; one per message: {CpuMeter.describe(one.cpu_ms, order)}"),
        Row("1 overhead: Postgres round trips per job", stages.trips.total / stages.jobs,
            single.trips.total / single.jobs, "round trips", "report", None,
            f"libpq trace, stages in-process; baseline column: one job per message. {shipped} per message: "
            f"{trips(stages)}. One per message: {trips(single)}"),
        Row("1 overhead: Postgres rows written per job", casc.counters.pg_writes, None, "rows", "report", None,
            "pg_stat_database tup_inserted+updated+deleted over the worker run"),
        Row("1 overhead: Redis commands per job", casc.counters.redis_calls, bare.counters.redis_calls,
            "commands", "report", None, "INFO commandstats over the worker run (whole server)"),
    ]
