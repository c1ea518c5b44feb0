"""Benchmark 6, shared rate limits: the sim enforces a model's RPM and TPM limits (fixed 60 s windows, 429s
with OpenAI's headers), the cascade config sets the same ``rate_limit_rpm``/``rate_limit_tpm``, and a fleet of
two gevent worker processes (with a sweeper for the jobs that wait in Postgres) drains a backlog of
single-sample jobs, 100 ms per answer, max_tokens 64 (each request reserves about five times what it uses).

Does the fleet keep ≥ 90 % of the allowed tokens per minute busy (tokens the sim served per minute, from the
first request to the last answer, ÷ TPM) with < 1 % of requests answered 429? The limiter's Redis cost is read
from Redis's own ``INFO commandstats`` (script calls per request, and µs per call inside Redis).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text

from bench.harness import Row, Scratch, Services, models, scratch, wait_for
from bench.workload import SCHEMA, submit
from cascade.publish import CeleryPublisher, worker_queues
from cascade.sweeper import sweep

__all__ = ["run"]

TARGET_BUSY = 0.9
TARGET_429 = 0.01
LATENCY_MS = 100


def _config(sim_url: str, rpm: int, tpm: int) -> dict[str, Any]:  # Any: cascade.yaml
    task = {"system": "Label the text. Answer with JSON only.", "prompt": "Text {id}: {text}", "output": "json",
            "schema": SCHEMA, "max_tokens": 64, "temperature": 0.7}
    return {"models": models(sim_url, limited={"rate_limit_rpm": rpm, "rate_limit_tpm": tpm}, large={}),
            "task_types": [{"name": "limited", **task, "tiers": ["limited", "large"]}]}


@contextmanager
def _sweeping(box: Scratch) -> Iterator[None]:
    """``cascade sweep --every 0.25`` in a thread: deferred jobs come back when due."""
    settings = box.settings()
    publisher = CeleryPublisher.connect(settings, box.services.broker_url)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.25):
            sweep(box.engine, publisher, stalled_after_s=60)

    thread = threading.Thread(target=loop, name="sweeper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        publisher.close()


def _script_stats(box: Scratch) -> tuple[int, float]:
    """Redis's count of script calls (EVALSHA and EVAL) and their total µs."""
    client = box.redis()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval")]
    return sum(int(c.get("calls", 0)) for c in calls), sum(float(c.get("usec", 0)) for c in calls)


def _measure(box: Scratch, jobs: int, tpm: int) -> dict[str, float]:
    calls0, usec0 = _script_stats(box)
    with _sweeping(box):
        batch = submit(box, "limited", jobs)
        wait_for(lambda: box.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status IN "
                                    "('succeeded', 'failed')", b=batch) >= jobs, 600, "the batch", poll=0.2)
    calls, usec = _script_stats(box)
    with box.engine.connect() as conn:
        first, last, served, answered, limited, requests = conn.execute(text(
            "SELECT min(created_at), max(created_at + make_interval(secs => latency_ms / 1000.0)), "
            "sum(input_tokens + output_tokens) FILTER (WHERE error IS NULL), count(*) FILTER (WHERE error IS NULL), "
            "count(*) FILTER (WHERE error = 'rate_limited'), count(*) FROM attempts")).one()
    minutes = (last - first).total_seconds() / 60
    return {"busy": float(served) / minutes / tpm, "share_429": limited / requests, "seconds": minutes * 60,
            "served": float(served), "requests": float(requests), "answered": float(answered),
            "calls_per_request": (calls - calls0) / requests, "usec_per_call": (usec - usec0) / max(1, calls - calls0)}


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    tpm, rpm, jobs = (6_000, 600, 40) if tiny else (30_000, 2_000, 1_700)
    with scratch(svc, "ratelimit") as box:
        sim = box.sim({"limited": {"latency_ms": LATENCY_MS, "rpm_limit": rpm, "tpm_limit": tpm}})
        box.write_config(_config(sim.url, rpm, tpm))
        for i in (1, 2):
            box.worker(worker_queues(), name=f"ratelimit-{i}", concurrency=32)
        m = _measure(box, jobs, tpm)
    note = (f"{jobs} jobs, {m['requests']:.0f} requests ({m['answered']:.0f} answered, {m['served']:.0f} tokens) in "
            f"{m['seconds']:.1f} s; sim limits {rpm} rpm / {tpm} tpm (fixed 60 s windows), the same in cascade.yaml; "
            f"2 gevent workers -c 32; limiter: {m['calls_per_request']:.2f} Redis script calls per request, "
            f"{m['usec_per_call']:.1f} µs each inside Redis")
    return [
        Row("6 rate limits: tokens/min served ÷ TPM", m["busy"], 1.0, "share", f"≥ {TARGET_BUSY:.0%}",
            m["busy"] >= TARGET_BUSY, note),
        Row("6 rate limits: requests answered 429", m["share_429"] * 100, None, "%", f"< {TARGET_429:.0%}",
            m["share_429"] < TARGET_429, "the sim's 429s over all requests sent"),
    ]
