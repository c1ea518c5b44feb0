"""Scale-out: jobs/s with N worker processes, against a bare Celery chain with the same N, and what each job
costs Postgres (rows per table, HOT share, WAL, CPU, connections, wait events).

    python -m bench.scale --processes 1,2 [--jobs 4000] [--concurrency 16] [--sims 2] [--json [FILE]]

For each N in ``--processes``, in a fresh Postgres schema and Redis key prefix:

1. cascade: ``--jobs`` jobs of a one-tier task type that always passes, on a sim model answering in 0 ms, run
   by N `celery -A workers.app worker -P gevent -c 16` processes consuming every queue (cascade.workercmd);
2. bare: as many 3-task chains noop → noop → done (bench/bare.py) run by N `-P gevent -c 16` workers of
   bench.bare with cascade's Celery settings.

Method. The batch (or the chains) is queued first; then the N workers start together and the clock waits until
every one has logged "ready", so interpreter start-up is never in a rate. Finished jobs (Postgres) or chains
(a Redis counter) are polled every 100 ms. The rate window opens at the first poll at which all N workers are
ready and at least 10 % of the batch is done, and closes at the first poll with at least 90 % done: the first
messages' lazy set-up (connections, config) and the drain at the end, when fewer than N × 16 messages are left,
stay outside it. CPU is read at the window's two ends, so CPU ms per job are steady-state figures: psutil over
the process trees (a process, its live descendants and the children it has reaped) of the N workers, the
postmaster (every backend, autovacuum, WAL writer, checkpointer; minus the monitoring connection's own
backend), Redis and the sims. Postgres and Redis CPU are read only for the embedded servers.

Postgres figures cover the whole batch, which makes them exact rather than sampled: the counters are read
after the submit's connections have closed and again after every worker (and so every backend, which flushes
its statistics as it exits) is gone. Rows written per job are pg_stat_user_tables' n_tup_ins, n_tup_upd and
n_tup_del of the schema's tables ÷ jobs; HOT share is n_tup_hot_upd ÷ n_tup_upd. WAL bytes per job are
pg_wal_lsn_diff between the two readings ÷ jobs, on an embedded server after a CHECKPOINT issued just before
the submit (so every point starts owing no full-page images; pg_stat_wal's records and full-page images are
reported beside it, and the number of checkpoints that fell inside the run). On a shared server the WAL
includes other sessions' writes. Connections are the peak count of pg_stat_activity rows with the workers'
application name (``cascade:<schema>``), polled every 50 ms over the whole run; wait events are those rows'
state and wait event in the rate window, as a share of non-idle backend samples.

Model server: ``--sims`` `cascade sim` processes share one port through SO_REUSEPORT (bench/simfarm.py); the
report gives the sims' share of the measured CPU and the busiest sim process's share of one core (a warning
is printed above 70 %: raise ``--sims``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import simfarm
from bench.harness import Scratch, Services, scratch
from bench.pgstats import Activity, Monitor, PgDelta
from bench.proctree import TreeMeter, machine_busy, self_cpu
from bench.scale_report import print_report
from bench.workload import bare_app, bare_chains, submit
from bench.workload import config as bench_config
from cascade.config import CascadeSettings
from cascade.publish import worker_queues
from cascade.workercmd import worker_command

__all__ = ["efficiency", "main"]

TASK = "one"
LO, HI = 0.1, 0.9
SAMPLE_S = 0.05


def config(sim_url: str) -> dict[str, Any]:  # Any: cascade.yaml
    """bench.workload's config plus ``one``: one tier, single sample, the sim's answer always passes."""
    cfg = bench_config(sim_url)
    single = next(t for t in cfg["task_types"] if t["name"] == "single")
    cfg["task_types"].append({**single, "name": TASK, "tiers": ["fast"]})
    return cfg


def efficiency(rates: dict[int, float | None]) -> dict[int, float | None]:
    """Rate at N ÷ (N × rate per process at the smallest N): 1.0 is linear scaling."""
    base_n = min(rates)
    base = rates[base_n]
    return {n: (r / n) / (base / base_n) if r and base else None for n, r in rates.items()}


@dataclass(frozen=True)
class Mark:
    """A poll: time, finished count and, at the window's ends, CPU readings."""

    t: float
    done: int
    cpu: dict[str, list[float]] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)
    driver: float = 0.0


@dataclass(frozen=True)
class Window:
    start: Mark
    end: Mark
    first_done_t: float
    last_t: float
    total: int

    @property
    def jobs(self) -> int:
        return self.end.done - self.start.done

    @property
    def seconds(self) -> float:
        return self.end.t - self.start.t

    @property
    def rate(self) -> float | None:
        return self.jobs / self.seconds if self.seconds > 0 and self.jobs > 0 else None

    def spent(self, group: str) -> list[float]:
        """CPU seconds of each tree of ``group`` inside the window."""
        return [b - a for a, b in zip(self.start.cpu.get(group, []), self.end.cpu.get(group, []), strict=True)]

    def summary(self, groups: Sequence[str]) -> dict[str, Any]:  # Any: JSON
        """Rates and CPU ms per job by group; Postgres' figure leaves out the monitoring backend (``monitor``)."""
        per_job = {g: 1000 * sum(self.spent(g)) / self.jobs for g in groups if self.start.cpu.get(g) and self.jobs}
        monitor = 1000 * sum(self.spent("monitor")) / self.jobs if self.jobs else 0.0
        if "postgres" in per_job:  # the monitoring connection's backend is a child of the postmaster too
            per_job["postgres"] -= monitor
        busy = self.end.machine[0] - self.start.machine[0]
        total = self.end.machine[1] - self.start.machine[1]
        measured = (sum(per_job.values()) + monitor) * self.jobs / 1000
        driver = self.end.driver - self.start.driver
        sims = self.spent("sim")
        return {
            "rate": self.rate, "window_s": self.seconds, "window_jobs": self.jobs,
            "rate_first_to_last": self.total / (self.last_t - self.first_done_t) if self.last_t > self.first_done_t
            else None,
            "cpu_ms_per_job": per_job,
            "sim_share": per_job["sim"] / sum(per_job.values()) if per_job.get("sim") else None,
            "busiest_sim_core": max(sims) / self.seconds if sims and self.seconds > 0 else None,
            "machine_busy": busy / total if total else None,
            "driver_cpu_ms_per_job": 1000 * driver / self.jobs if self.jobs else None,
            "monitor_cpu_ms_per_job": monitor,
            "unmeasured_cpu_share": (busy - measured - driver) / busy if busy else None,
        }


def _mark(count: int, meter: TreeMeter | None) -> Mark:
    if meter is None:
        return Mark(time.monotonic(), count)
    return Mark(time.monotonic(), count, meter.read(), machine_busy(), self_cpu())


def watch(count: Callable[[], int], total: int, meter: TreeMeter, sample: Callable[[bool], None],
          timeout: float) -> Window:
    """Poll until ``total`` are done (see the module docstring for the window); ``sample(in_window)`` runs
    every ``SAMPLE_S`` and the count every other time."""
    deadline = time.monotonic() + timeout
    first = start = end = None
    first_done_t, last = 0.0, Mark(time.monotonic(), 0)
    for i in itertools.count():
        sample(start is not None and end is None)
        if i % 2 == 0:
            last = _mark(count(), None)
            first_done_t = first_done_t or (last.t if last.done else 0.0)
            first = first or _mark(last.done, meter)
            if start is None and last.done >= LO * total:
                start = _mark(last.done, meter)
            elif start is not None and end is None and last.done >= HI * total:
                end = _mark(last.done, meter)
            if last.done >= total:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{last.done} of {total} done after {timeout:g} s")
        time.sleep(SAMPLE_S)
    if start is None or end is None:  # a tiny batch, done within a poll or two: its figures mean little
        start, end = first, end or _mark(last.done, meter)
    assert start is not None
    return Window(start, end, first_done_t, last.t, total)


def start_workers(box: Scratch, n: int, queues: Sequence[str], *, app: str, concurrency: int,
                  tag: str) -> list[subprocess.Popen[bytes]]:
    """N `celery worker` children started at once, returned once every one has logged "ready"."""
    names = [f"{tag}-{i}" for i in range(n)]
    procs = []
    for name in names:
        cmd = worker_command(queues, concurrency, name=f"{name}-{box.schema}@%h", app=app, loglevel="info",
                             extra=("--without-heartbeat",))
        procs.append(box.start(cmd, name))

    box.wait_logged(dict(zip(names, procs, strict=True)), " ready.", 120, f"{n} workers ({tag})")
    return procs


@dataclass
class Point:
    processes: int
    cascade: dict[str, Any]  # Any: JSON
    bare: dict[str, Any]  # Any: JSON


def _timeout(jobs: int) -> float:
    return 120 + jobs / 20


def run_cascade(box: Scratch, mon: Monitor, n: int, jobs: int, concurrency: int,
                servers: dict[str, list[int]], sims: simfarm.SimFarm) -> dict[str, Any]:  # Any: JSON
    app_name = f"cascade:{box.schema}"
    checkpointed = box.services.embedded and mon.checkpoint()
    submit(box, TASK, jobs)
    box.engine.dispose()  # its backends exit and flush their counters: the submit stays out of the figures
    mon.wait_gone(app_name)
    before = mon.snapshot(box.schema)
    procs = start_workers(box, n, worker_queues(), app="workers.app", concurrency=concurrency, tag="cascade")
    activity = Activity()
    meter = TreeMeter({"worker": [p.pid for p in procs], **servers, "sim": sims.pids, "monitor": [mon.backend_pid]})
    finished = f'SELECT count(*) FROM "{box.schema}".jobs WHERE status IN (\'succeeded\', \'failed\')'
    window = watch(lambda: int(mon.scalar(finished)), jobs, meter,
                   lambda in_window: activity.add(mon.connections(app_name), in_window=in_window), _timeout(jobs))
    for proc in procs:
        box.stop(proc)
    mon.wait_gone(app_name)
    delta = mon.delta(before, mon.snapshot(box.schema))
    failed = int(mon.scalar(f'SELECT count(*) FROM "{box.schema}".jobs WHERE status <> \'succeeded\''))
    out = window.summary(["worker", "postgres", "redis", "sim"])
    return {"jobs": jobs, "not_succeeded": failed, "checkpoint_before": bool(checkpointed), **out,
            "postgres": _pg_summary(delta, activity, jobs, mon.indexes(box.schema))}


def _pg_summary(delta: PgDelta, activity: Activity, jobs: int,
                indexes: dict[str, int]) -> dict[str, Any]:  # Any: JSON
    total = delta.total

    def per(value: int | None) -> float | None:
        return value / jobs if value is not None else None

    return {
        "peak_connections": activity.peak_connections,
        "wal_bytes_per_job": delta.wal_bytes / jobs,
        "wal_records_per_job": per(delta.wal_records),
        "wal_fpi_per_job": per(delta.wal_fpi),
        "checkpoints_during_run": delta.checkpoints,
        "autovacuum_runs": delta.autovacuums,
        "rows_written_per_job": total.written / jobs,
        "hot_share": total.hot / total.updated if total.updated else None,
        "tables": {name: {"inserted": t.inserted / jobs, "updated": t.updated / jobs, "deleted": t.deleted / jobs,
                          "hot_share": t.hot / t.updated if t.updated else None, "indexes": indexes.get(name, 0)}
                   for name, t in delta.tables.items()},
        "wait_events": [[name, share] for name, share in activity.top(6)],
        "busy_statements": [[name, share] for name, share in activity.top(6, by="statements")],
        "mean_busy_backends": activity.mean_busy,
    }


def run_bare(box: Scratch, n: int, chains: int, concurrency: int,
             servers: dict[str, list[int]]) -> dict[str, Any]:  # Any: JSON
    box.delete_keys()
    app = bare_app(box)
    bare_chains(app, chains)
    app.close()
    client = box.redis()
    procs = start_workers(box, n, ["bare1", "bare2", "bare3"], app="bench.bare", concurrency=concurrency, tag="bare")
    try:
        meter = TreeMeter({"worker": [p.pid for p in procs], **{k: v for k, v in servers.items() if k == "redis"}})
        window = watch(lambda: int(client.get(box.prefix + "bench:done") or 0), chains, meter, lambda _: None,
                       _timeout(chains))
    finally:
        client.close()
        for proc in procs:
            box.stop(proc)
        box.delete_keys()
    return {"chains": chains, **window.summary(["worker", "redis"])}


def run_point(svc: Services, n: int, jobs: int, concurrency: int, sims: int) -> Point:
    with scratch(svc, f"scale{n}") as box:
        farm = simfarm.start(box, {"fast": {"latency_ms": 0}}, sims)
        box.write_config(config(farm.url))
        mon = Monitor(svc.database_url)
        try:
            servers = _servers(box, mon)
            cascade = run_cascade(box, mon, n, jobs, concurrency, servers, farm)
            bare = run_bare(box, n, jobs, concurrency, servers)
        finally:
            mon.close()
    return Point(n, cascade, bare)


def _servers(box: Scratch, mon: Monitor) -> dict[str, list[int]]:
    """Postgres' and Redis' process trees, for embedded servers only (a given server may be elsewhere)."""
    if not box.services.embedded:
        return {}
    client = box.redis()
    try:
        redis_pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    postmaster = mon.postmaster_pid()
    return {"redis": [redis_pid], **({"postgres": [postmaster]} if postmaster else {})}


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """CASCADE_BENCH_* (as for `python -m bench`), else CASCADE_DATABASE_URL / CASCADE_BROKER_URL, else an
    embedded Postgres and Redis in a temporary directory, stopped and deleted afterwards."""
    from cascade.stack import scratch_services

    env = os.environ
    given = (env.get("CASCADE_BENCH_DATABASE_URL") or env.get("CASCADE_DATABASE_URL"),
             env.get("CASCADE_BENCH_BROKER_URL") or env.get("CASCADE_BROKER_URL"))
    with scratch_services(*given, prefix="cascade-bench-") as (db, broker):
        yield Services(db, broker, embedded=not all(given))


def _machine(svc: Services) -> dict[str, Any]:  # Any: JSON
    mon = Monitor(svc.database_url)
    try:
        version = str(mon.scalar("SHOW server_version"))
    finally:
        mon.close()
    return {"node": platform.node(), "cpus": os.cpu_count(), "arch": platform.machine(),
            "python": platform.python_version(), "postgres": version,
            "services": "embedded" if svc.embedded else "given", "load_start": os.getloadavg()[0]}


def _document(points: list[Point], machine: dict[str, Any], settings: dict[str, Any],  # Any: JSON
              seconds: float) -> dict[str, Any]:
    eff_c = efficiency({p.processes: p.cascade["rate"] for p in points})
    eff_b = efficiency({p.processes: p.bare["rate"] for p in points})
    return {"machine": {**machine, "load_end": os.getloadavg()[0]}, "settings": settings, "duration_s": seconds,
            "points": [{"processes": p.processes, "efficiency": {"cascade": eff_c[p.processes],
                                                                 "bare": eff_b[p.processes]},
                        "cascade": p.cascade, "bare": p.bare} for p in points]}


def _processes(value: str) -> list[int]:
    try:
        counts = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--processes {value!r}: expected numbers such as 1,2,4") from None
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"--processes {value!r}: expected numbers ≥ 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=_processes, default=[1, 2], help="worker process counts (default 1,2)")
    parser.add_argument("--jobs", type=int, default=4000, help="jobs (and bare chains) per point (default 4000)")
    parser.add_argument("--concurrency", type=int, default=16, help="gevent slots per worker (default 16)")
    parser.add_argument("--sims", type=int, default=2, help="sim processes sharing the port (default 2)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the results as JSON to FILE (to stdout without FILE; tables go to stderr)")
    args = parser.parse_args(argv)
    to_stdout = args.json == "-"
    console = Console(stderr=True)
    started = time.monotonic()
    settings = {"jobs": args.jobs, "concurrency": args.concurrency, "sims": args.sims, "processes": args.processes,
                "pool": "gevent", "task": f"{TASK}: one tier, single sample, sim 0 ms",
                "jobs_per_message": CascadeSettings.model_fields["jobs_per_message"].default}
    with services() as svc:
        machine = _machine(svc)
        points = []
        for n in args.processes:
            t0 = time.monotonic()
            console.print(f"N={n}: {args.jobs:,} jobs, then {args.jobs:,} bare chains …")
            points.append(run_point(svc, n, args.jobs, args.concurrency, args.sims))
            console.print(f"N={n} took {time.monotonic() - t0:.0f} s")
    doc = _document(points, machine, settings, time.monotonic() - started)
    print_report(Console(stderr=to_stdout, width=max(160, Console().width)), doc)
    if to_stdout:
        print(json.dumps(doc, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
