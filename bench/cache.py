"""Benchmark 7, request cache: what a hit costs against a miss, and what the cache adds to a miss.

Stages run in this process (no Celery: the worker's own work, without broker noise), 16 jobs per message
as shipped, on an instant model (sim, 0 ms, its own process). Three runs per round, rounds interleaved so
drift hits all three alike (off and miss take turns going first); medians over rounds:

- off:  new rows of a task type with ``cache: false`` (the request path as it was before the cache);
- miss: new rows of the same task with the cache on (key, flight claim, fill);
- hit:  the miss run's rows again (every request answered from the cache).

Per job: wall ms (serial, so Postgres round trips count) and this process's CPU ms (the sim's and
Postgres's CPU are elsewhere). Target: a miss is at most 5 % slower per job than with the cache off.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass

from bench.harness import Row, Scratch, Services, scratch
from bench.inprocess import drain
from bench.workload import ListPublisher, config, submit
from cascade.config import CascadeSettings
from cascade.providers import ProviderPool
from cascade.stages import StageContext

__all__ = ["run"]

TARGET = 1.05


@dataclass(frozen=True)
class Sample:
    wall_ms: float  # per job
    cpu_ms: float  # per job, this process
    hits: int


def _measure(box: Scratch, providers: ProviderPool, task: str, n: int, tag: str) -> Sample:
    publisher = ListPublisher()
    batch = submit(box, task, n, publisher, tag=tag)
    ctx = StageContext(engine=box.engine, publisher=publisher, providers=providers, settings=box.settings())
    per_message = CascadeSettings.model_fields["jobs_per_message"].default
    wall, cpu = time.perf_counter(), time.process_time()
    drain(ctx, publisher, per_message)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done = box.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status = 'succeeded'", b=batch)
    if done != n:
        raise RuntimeError(f"{task}: {done} of {n} jobs succeeded")
    hits = box.scalar("SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id "
                      "WHERE j.batch_id = :b AND a.cached", b=batch)
    return Sample(wall / n * 1000, cpu / n * 1000, int(hits))


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    n, rounds = (24, 1) if tiny else (320, 12)
    with scratch(svc, "cache") as box:
        sim = box.sim({"fast": {"latency_ms": 0}})
        cfg = config(sim.url)
        single = next(t for t in cfg["task_types"] if t["name"] == "single")
        cfg["task_types"].append({**single, "name": "single_off", "cache": False})
        box.write_config(cfg)
        providers = ProviderPool()
        try:
            _measure(box, providers, "single_off", 16, "warm")  # snapshots, HTTP keep-alive, plans
            _measure(box, providers, "single", 16, "warm")
            off, miss, hit = [], [], []
            for i in range(rounds):
                tag = f" ({uuid.uuid4().hex[:12]})"
                if i % 2:  # alternate which of off and miss goes first
                    miss.append(_measure(box, providers, "single", n, tag))
                    off.append(_measure(box, providers, "single_off", n, tag + " off"))
                else:
                    off.append(_measure(box, providers, "single_off", n, tag + " off"))
                    miss.append(_measure(box, providers, "single", n, tag))
                hit.append(_measure(box, providers, "single", n, tag))
        finally:
            providers.close()
    if any(s.hits for s in off + miss) or any(s.hits != n for s in hit):
        raise RuntimeError("the cache answered a run it should not have (or missed one it should have)")

    def med(samples: list[Sample], what: str) -> float:
        return statistics.median(getattr(s, what) for s in samples)

    def spread(samples: list[Sample], what: str) -> str:
        values = sorted(getattr(s, what) for s in samples)
        return f"{values[0]:.3g}–{values[-1]:.3g}"

    miss_wall, off_wall = med(miss, "wall_ms"), med(off, "wall_ms")
    where = f"stages in-process, 16 jobs per message, 0 ms sim, {n} jobs × {rounds} rounds, medians"
    return [
        Row("7 cache: CPU ms per job, hit vs miss", med(hit, "cpu_ms"), med(miss, "cpu_ms"), "CPU ms", "report",
            None, f"{where}; this process's CPU (hit {spread(hit, 'cpu_ms')}, miss {spread(miss, 'cpu_ms')}); "
            f"wall ms per job: hit {med(hit, 'wall_ms'):.3g}, miss {miss_wall:.3g}"),
        Row("7 cache: ms per job on a miss, cache on vs off", miss_wall, off_wall, "ms", f"ratio ≤ {TARGET:.2f}",
            miss_wall <= TARGET * off_wall,
            f"{where}; serial wall time per job (miss {spread(miss, 'wall_ms')}, off {spread(off, 'wall_ms')}); "
            f"CPU ms per job: miss {med(miss, 'cpu_ms'):.3g}, off {med(off, 'cpu_ms'):.3g}"),
    ]
