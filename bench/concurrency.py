"""Benchmark 2, I/O concurrency: sim latency 200 ms, one worker process per queue (tier1 under test, validate
beside it). Does one process keep ≥ 256 model calls in flight, and reach ≥ 80 % of slots ÷ latency?

Run for single samples (``-c 256``: 256 calls) and self-consistency (three samples sent as three concurrent
requests, supports_n false; ``-c 86``: 258 calls), each on the gevent and the threads pool. In-flight calls
and completed calls are read from the sim's own counters (``/stats``) every 100 ms over a steady window. The
baseline row is a bare Celery task that makes one HTTP call (bench.bare, gevent -c 256): the ceiling of
Celery + sim on this machine without any cascade bookkeeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from bench.cpu import CpuMeter
from bench.harness import Row, Scratch, Services, Sim, scratch
from bench.workload import bare_app, config, submit

__all__ = ["run"]

LATENCY_MS = 200
MIN_IN_FLIGHT = 256
TARGET = 0.8


@dataclass(frozen=True)
class Variant:
    task: str
    samples: int
    pool: str
    concurrency: int
    app: str = "workers.app"

    @property
    def slots(self) -> int:
        return self.samples * self.concurrency

    @property
    def ideal(self) -> float:
        """Calls per second if every slot always had a call waiting on the model."""
        return self.slots / (LATENCY_MS / 1000)

    @property
    def label(self) -> str:
        kind = "single" if self.samples == 1 else f"self-consistency k={self.samples}"
        proposed = ", proposed changes" if self.app != "workers.app" else ""
        return f"{self.pool} -c {self.concurrency}, {kind}{proposed}"


@dataclass
class Window:
    calls_per_s: float
    mean_in_flight: float
    peak_in_flight: int
    cpu_ms: dict[str, float]


def measure(sim: Sim, warmup: float, window: float, meter: CpuMeter | None = None) -> Window:
    """Sim counters sampled every 100 ms: completed calls/s and mean in-flight calls after ``warmup``."""
    time.sleep(warmup)
    sim.reset()
    first = sim.stats()
    if meter:
        meter.start()
    t0, samples = time.monotonic(), []
    while time.monotonic() - t0 < window:
        time.sleep(0.1)
        samples.append(sim.stats())
    elapsed = time.monotonic() - t0
    if meter:
        meter.stop()
    done = samples[-1]["requests"] - first["requests"]
    in_flight = [s["in_flight"] for s in samples]
    return Window(done / elapsed, sum(in_flight) / len(in_flight), max(s["max_in_flight"] for s in samples),
                  meter.per_job_ms(done) if meter else {})


def _reset(box: Scratch) -> None:
    with box.engine.begin() as conn:
        conn.execute(text("TRUNCATE validations, attempts, jobs, batches CASCADE"))
    box.delete_keys()


def run_variant(box: Scratch, sim: Sim, v: Variant, *, warmup: float, window: float) -> Window:
    jobs = int(v.ideal / v.samples * (warmup + window) * 1.2) + 50
    submit(box, v.task, jobs)
    tag = f"{v.pool}-{v.task}-{v.app}"
    validate = box.worker("validate", name=f"validate-{tag}", app=v.app, concurrency=256)
    tier1 = box.worker("tier1", name=f"tier1-{tag}", app=v.app, pool=v.pool, concurrency=v.concurrency)
    try:
        return measure(sim, warmup, window, CpuMeter(box, {"tier1 worker": [tier1.pid]}))
    finally:
        box.stop(tier1)
        box.stop(validate)
        _reset(box)


def run_bare(box: Scratch, sim: Sim, *, concurrency: int, warmup: float, window: float,
             proposed: bool = False) -> Window:
    app = bare_app(box)
    body: dict[str, Any] = {"model": "fast", "messages": [{"role": "user", "content": "Text 1: bare"}],  # Any: JSON
                            "max_tokens": 16}
    jobs = int(concurrency / (LATENCY_MS / 1000) * (warmup + window) * 1.2)
    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            app.send_task("bare.http", args=[sim.url + "/chat/completions", body], queue="barehttp",
                          producer=producer)
    app.close()
    extra, env = (("--prefetch-multiplier", "4"), {"BENCH_HTTP": "httpx-shard"}) if proposed else ((), {})
    worker = box.worker("barehttp", name=f"bare-http-{proposed}", app="bench.bare", concurrency=concurrency,
                        extra=extra, **env)
    try:
        return measure(sim, warmup, window)
    finally:
        box.stop(worker)
        box.delete_keys()


def variants(tiny: bool) -> list[Variant]:
    c1, c3 = (16, 6) if tiny else (MIN_IN_FLIGHT, -(-MIN_IN_FLIGHT // 3))
    shipped = [Variant(task, k, pool, c) for pool in ("gevent", "threads") for task, k, c in
               (("single", 1, c1), ("sc3", 3, c3))]
    proposed = [Variant(task, k, "gevent", c, app="bench.proposed_app") for task, k, c in
                (("single", 1, c1), ("sc3", 3, c3))]
    if tiny:  # the smoke test checks that the benchmark runs, not its numbers
        return [shipped[3], proposed[0]]
    return shipped + proposed


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    warmup, window = (0.5, 0.5) if tiny else (3.0, 6.0)
    slots = 16 if tiny else 256
    rows: list[Row] = []
    with scratch(svc, "concurrency") as box:
        sim = box.sim({name: {"latency_ms": LATENCY_MS} for name in ("fast", "fast_non")})
        box.write_config(config(sim.url))
        for proposed in (True,) if tiny else (False, True):
            bare = run_bare(box, sim, concurrency=slots, warmup=warmup, window=window, proposed=proposed)
            what = "16 sharded httpx clients, prefetch 4" if proposed else "one httpx client as ChatProvider's"
            rows.append(Row(f"2 I/O baseline: bare Celery HTTP task, gevent -c {slots}, {what}", bare.calls_per_s,
                            slots / (LATENCY_MS / 1000), "calls/s", "report", None,
                            f"mean in flight {bare.mean_in_flight:.0f} of {slots}"))
        for v in variants(tiny):
            w = run_variant(box, sim, v, warmup=warmup, window=window)
            rows += [
                Row(f"2 I/O {v.label}: calls in flight", w.mean_in_flight, v.slots, "calls",
                    f"≥ {MIN_IN_FLIGHT}", w.mean_in_flight >= MIN_IN_FLIGHT,
                    f"mean over {window:g} s at the sim; peak {w.peak_in_flight}"),
                Row(f"2 I/O {v.label}: calls/s vs slots÷latency", w.calls_per_s, v.ideal, "calls/s",
                    f"ratio ≥ {TARGET}", w.calls_per_s >= TARGET * v.ideal,
                    "CPU ms per call: " + CpuMeter.describe(w.cpu_ms, ("tier1 worker", "postgres", "redis"))),
            ]
    return rows
