"""Benchmark 3, escalation path latency: time from a stage's publish to the next stage's start (enqueue →
start), p50 and p95, on an idle system: one job at a time through tier1 → validate → tier2 → validate →
tier3 → validate (tiers 1 and 2 answer invalid JSON, 0 ms), one gevent worker on every queue.

The hop probe (bench.probe) stamps each message in ``before_task_publish`` and records the wait in
``task_prerun``; the workers run ``bench.probe_app`` (the real app plus the probe). Baseline: the same probe
on a bare chain of three no-op tasks, one chain at a time, same pool settings.
"""

from __future__ import annotations

import os
import time

from bench import probe
from bench.harness import Row, Scratch, Services, percentile, scratch, wait_for
from bench.workload import bare_app, bare_chains, config, submit
from cascade.publish import worker_queues

__all__ = ["run"]

TARGET_P50_MS = 5.0


def _samples(box: Scratch) -> list[tuple[str, float]]:
    client = box.redis()
    try:
        raw = client.lrange(box.prefix + "bench:hops", 0, -1)
        client.delete(box.prefix + "bench:hops")
    finally:
        client.close()
    out = []
    for item in raw:
        name, _tier, ms = item.decode().split("|")
        out.append((name, float(ms)))
    return out


def _status(box: Scratch, batch: str) -> str:
    return str(box.scalar("SELECT status FROM jobs WHERE batch_id = :b", b=batch))


def cascade_hops(box: Scratch, jobs: int) -> list[float]:
    worker = box.worker(worker_queues(), name="hops-cascade", app="bench.probe_app", BENCH_PROBE="1")
    try:
        for _ in range(jobs):
            batch = submit(box, "hops", 1)
            wait_for(lambda b=batch: _status(box, b) in ("succeeded", "failed"), 30, "a job", poll=0.005)
            time.sleep(0.02)  # idle between jobs
    finally:
        box.stop(worker)
    return [ms for _, ms in _samples(box)]


def bare_hops(box: Scratch, chains: int) -> list[float]:
    worker = box.worker("bare1,bare2,bare3", name="hops-bare", app="bench.bare", BENCH_PROBE="1")
    app = bare_app(box)
    client = box.redis()
    try:
        for i in range(chains):
            bare_chains(app, 1)
            wait_for(lambda i=i: int(client.get(box.prefix + "bench:done") or 0) > i, 30, "a chain", poll=0.005)
            time.sleep(0.02)
    finally:
        app.close()
        client.close()
        box.stop(worker)
    return [ms for _, ms in _samples(box)]


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    jobs = 5 if tiny else 80
    os.environ["BENCH_PROBE"] = "1"  # this process publishes the first message of each job and chain
    try:
        with scratch(svc, "hops") as box:
            probe.install(bare_app(box), box.prefix)
            sim = box.sim({"bad": {"p_invalid_json": 1.0, "latency_ms": 0}, "fast": {"latency_ms": 0}})
            box.write_config(config(sim.url))
            base = bare_hops(box, jobs * 2)
            hops = cascade_hops(box, jobs)
    finally:
        os.environ.pop("BENCH_PROBE", None)
        probe.uninstall()
    p50, p95 = percentile(hops, 0.5), percentile(hops, 0.95)
    b50, b95 = percentile(base, 0.5), percentile(base, 0.95)
    return [
        Row("3 hop latency p50 (enqueue → start)", p50, b50, "ms", f"≤ {TARGET_P50_MS:g} ms", p50 <= TARGET_P50_MS,
            f"{len(hops)} hops of {jobs} jobs (6 per job), idle, gevent -c 256; baseline {len(base)} bare hops"),
        Row("3 hop latency p95 (enqueue → start)", p95, b95, "ms", "report", None, f"max {max(hops, default=0):.1f} ms"),
    ]
