"""Recovery in seconds: a dead worker's jobs come back fast, a slow live worker keeps its work.

Workers refresh a heartbeat row (cascade.liveness); the sweeper takes back the running jobs of a worker
whose heartbeat stopped and re-publishes what the broker no longer holds. These tests run real worker
processes and a real `cascade sweep --every` loop, inject the fault mid-batch, and end with the audit of
test_crashes (every row as the sim predicts, one validation per tier, no answer counted twice, job costs
equal to their attempts).
"""

from __future__ import annotations

import signal
import time

import pytest

from cascade.config import CascadeSettings
from cascade.sim import SimConfig, SimModel
from tests.conftest import wait_for
from tests.integration import scenario
from tests.integration.audit import audit, cost_equals_tokens_times_price
from tests.integration.audit import client as make_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEFAULTS = CascadeSettings()
#: Fast liveness for the tests that are about correctness, not the default timings.
QUICK = {"CASCADE_HEARTBEAT_S": "0.5", "CASCADE_WORKER_DEAD_AFTER_S": "2"}


def _sim(seed: int, latency_ms: float, jitter_ms: float = 0) -> SimConfig:
    base = scenario.sim_config(seed)
    return SimConfig(seed=seed, models={
        name: SimModel(**{**base.model(name).model_dump(), "latency_ms": latency_ms, "latency_jitter_ms": jitter_ms})
        for name in ("small", "medium", "large")})


def _finished(env, batch_id: str) -> int:
    return env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status IN ('succeeded', 'failed')",
                      b=batch_id)


def _worker_id(env, pid: int) -> str:
    wait_for(lambda: env.scalar("SELECT count(*) FROM workers WHERE pid = :p", p=pid) == 1, 30, "the heartbeat row")
    return env.scalar("SELECT id FROM workers WHERE pid = :p", p=pid)


def _held_by(env, worker_id: str) -> int:
    return env.scalar("SELECT count(*) FROM jobs WHERE status = 'running' AND worker_id = :w", w=worker_id)


@pytest.mark.parametrize("flush", [False, True], ids=["kill-9", "kill-9+flushall"])
def test_a_killed_workers_jobs_are_back_in_seconds_with_default_settings(env, sim, workers, sweeper, own_redis,
                                                                         flush):
    # Given 1,000 jobs, one worker and a sweeper, all with the default lease, heartbeat and sweep timings
    assert (DEFAULTS.lease_s, DEFAULTS.heartbeat_s, DEFAULTS.worker_dead_after_s) == (300, 5.0, 15.0)
    sim_cfg = _sim(51, latency_ms=150, jitter_ms=50)
    client = make_client(env, sim(sim_cfg).url)
    from cascade.publish import CeleryPublisher

    client._publisher = CeleryPublisher.connect(env.settings(broker_url=own_redis.url), own_redis.url)
    broker = {"CASCADE_BROKER_URL": own_redis.url}
    victim = workers(concurrency=32, **broker)
    sweeper(every=DEFAULTS.sweep_every_s, stalled_after=DEFAULTS.stalled_after_s, **broker)
    rows = scenario.rows(1000, "label")
    batch = client.submit("label", rows, key_field="id").batch_id
    dead = _worker_id(env, victim.proc.pid)
    # When the worker is killed with -9 while it holds jobs (and the broker is flushed, for the second case)
    wait_for(lambda: _finished(env, batch) >= 100 and _held_by(env, dead) >= 20, 60, "a worker holding jobs")
    held = _held_by(env, dead)
    victim.kill()
    killed_at = time.monotonic()
    if flush:
        own_redis.client().flushall()
    workers(concurrency=32, **broker)
    # Then every job the dead worker held is back in a queue within 30 s ...
    wait_for(lambda: _held_by(env, dead) == 0, 30, "the dead worker's jobs to be taken back", poll=0.1)
    back_s = time.monotonic() - killed_at
    # ... and the whole batch is finished within 60 s of the kill, exactly as the sim predicts
    state = client.wait(batch, timeout=60 - (time.monotonic() - killed_at), poll_s=0.2)
    done_s = time.monotonic() - killed_at
    assert state.is_done, state
    audit(env, client, batch, client.config.snapshot("label"), sim_cfg, rows)
    cost_equals_tokens_times_price(env)
    print(f"kill -9{' + FLUSHALL' if flush else ''}: {held} jobs held; back in a queue after {back_s:.1f} s, "
          f"batch finished {done_s:.1f} s after the kill")


def test_a_slow_request_is_never_taken_from_a_live_worker(env, sim, workers, sweeper):
    # Given a model slower than both the lease and the dead-after bound, and an eager sweeper
    sim_cfg = _sim(53, latency_ms=5000)
    client = make_client(env, sim(sim_cfg).url)
    quick = {**QUICK, "CASCADE_LEASE_S": "2"}
    workers(concurrency=8, **quick)
    sweeper(every=0.5, stalled_after=1, **quick)
    rows = scenario.rows(6, "summary")
    # When the batch runs to its end
    batch = client.submit("summary", rows, key_field="id").batch_id
    state = client.wait(batch, timeout=120, poll_s=0.5)
    # Then no request was interrupted or sent twice: each tier's call was claimed once (a validation locks its
    # jobs for its one transaction, no claim)
    assert state.is_done, state
    assert env.scalar("SELECT count(*) FROM attempts WHERE error IS NOT NULL") == 0
    assert env.scalar("SELECT count(*) FROM jobs WHERE claim_no <> tier") == 0
    audit(env, client, batch, client.config.snapshot("summary"), sim_cfg, rows)


def test_a_frozen_worker_loses_its_jobs_and_counts_nothing_twice_when_it_resumes(env, sim, workers, sweeper):
    # Given a worker whose requests take 1.5 s, holding jobs with requests in flight
    sim_cfg = _sim(57, latency_ms=1500)
    client = make_client(env, sim(sim_cfg).url)
    frozen = workers(queues="tier1,tier2,tier3", concurrency=8, **QUICK)
    workers(queues="validate", concurrency=8, **QUICK)
    sweeper(every=0.5, stalled_after=2, **QUICK)
    rows = scenario.rows(200, "label")
    batch = client.submit("label", rows, key_field="id").batch_id
    stopped = _worker_id(env, frozen.proc.pid)
    wait_for(lambda: env.scalar("SELECT count(*) FROM attempts WHERE error = 'in_flight'") >= 8, 30,
             "requests in flight")
    # When it is frozen (SIGSTOP) far longer than the dead-after bound while another worker takes over
    frozen.proc.send_signal(signal.SIGSTOP)
    held = _held_by(env, stopped)
    try:
        workers(queues="tier1,tier2,tier3", concurrency=8, **QUICK)
        wait_for(lambda: _held_by(env, stopped) == 0, 20, "the frozen worker's jobs to be taken back")
        state = client.wait(batch, timeout=120, poll_s=0.5)
        assert state.is_done, state
    finally:
        # And then resumes, its requests' answers waiting in its sockets
        frozen.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: env.scalar("SELECT count(*) FROM attempts WHERE detail LIKE 'came back after%'") >= 1, 20,
             "the resumed worker to record its late answers")
    time.sleep(2)  # let it finish whatever else it was doing
    # Then its late answers are recorded as interrupted (paid, never counted), and every job is as predicted
    late = env.scalar("SELECT count(*) FROM attempts WHERE detail LIKE 'came back after%' AND error = 'interrupted'")
    assert frozen.proc.poll() is None, "the resumed worker is still alive"
    audit(env, client, batch, client.config.snapshot("label"), sim_cfg, rows)
    cost_equals_tokens_times_price(env)
    print(f"SIGSTOP: {held} jobs held by the frozen worker; {late} late answers recorded, none counted")
