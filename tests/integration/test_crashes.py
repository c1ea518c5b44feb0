"""Nothing lost, nothing paid twice: worker kill -9, broker loss and Postgres blips mid-batch.

Each test runs real worker processes and a real `cascade sweep` process, injects the fault while jobs are in
flight (tier 1 with a fallback, the batch with a budget), and ends with the audit: one terminal job per row equal to the sim's prediction, one validation per
tier reached, no duplicate answer per (job, tier, sample), job costs equal to their attempts' sums.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from decimal import Decimal

import pytest
from sqlalchemy import text

from cascade.sim import SimConfig, SimModel
from cascade.store import make_engine
from tests.conftest import BROKERS, ROOT, wait_for
from tests.integration import scenario
from tests.integration.audit import audit, cost_equals_tokens_times_price
from tests.integration.audit import client as make_client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Every batch here has tier 1 fallbacks and a budget that never binds: the audit checks its ledger too.
CAP = Decimal(1000)
#: A dead worker is noticed within two seconds (the defaults take fifteen: test_recovery times those).
FAST_LIVENESS = {"CASCADE_HEARTBEAT_S": "0.5", "CASCADE_WORKER_DEAD_AFTER_S": "2"}


def _slow_sim(seed: int) -> SimConfig:
    """The scenario's models with latency, so many calls are in flight when the fault hits."""
    base = scenario.sim_config(seed)
    return SimConfig(seed=seed, models={
        name: SimModel(**{**base.model(name).model_dump(), "latency_ms": 120, "latency_jitter_ms": 60})
        for name in ("small", "medium", "large")})


def _finished(env, batch_id: str) -> int:
    return env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status IN ('succeeded', 'failed')",
                      b=batch_id)


def _in_flight(env) -> dict[str, int]:
    return {
        "running": env.scalar("SELECT count(*) FROM jobs WHERE status = 'running'"),
        "requests": env.scalar("SELECT count(*) FROM attempts WHERE error = 'in_flight'"),
        "queued": env.scalar("SELECT count(*) FROM jobs WHERE status = 'queued'"),
    }


def _run_to_end(env, client, batch_id, rows, sim_cfg, timeout=240):
    state = client.wait(batch_id, timeout=timeout, poll_s=0.5)
    assert state.is_done, (state, _in_flight(env))
    audit(env, client, batch_id, client.config.snapshot("label", max_cost_usd=CAP), sim_cfg, rows)
    cost_equals_tokens_times_price(env)


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_worker_kill_9_mid_call_and_mid_validation(env, sim, workers, sweeper, broker):
    # Given 1,000 jobs, call stages and validation in separate worker processes, and a sweeper (on Redis, and on
    # RabbitMQ, which hands a dead consumer's unacknowledged messages back at once)
    sim_cfg = _slow_sim(31)
    client = make_client(env, sim(sim_cfg).url, fallbacks=True)
    callers = workers(queues="tier1,tier2,tier3", concurrency=64, **FAST_LIVENESS)
    validators = workers(queues="validate", concurrency=16, **FAST_LIVENESS)
    sweeper(stalled_after=3, **FAST_LIVENESS)
    rows = scenario.rows(1000 if broker == "redis" else 600, "label")  # RabbitMQ: the same faults, a shorter run
    batch = client.submit("label", rows, key_field="id", max_cost=CAP).batch_id
    # When the call worker is killed with -9 while requests are in flight
    wait_for(lambda: _finished(env, batch) >= 150, 120, "150 finished jobs")
    wait_for(lambda: _in_flight(env)["requests"] > 10, 30, "requests in flight")
    hit_calls = _in_flight(env)
    callers.kill()
    workers(queues="tier1,tier2,tier3", concurrency=64, **FAST_LIVENESS)
    # And the validation worker is killed with -9 later
    wait_for(lambda: _finished(env, batch) >= 500, 120, "500 finished jobs")
    hit_validation = _in_flight(env)
    validators.kill()
    workers(queues="validate", concurrency=16, **FAST_LIVENESS)
    # Then every job still finishes exactly once, as the sim predicts
    _run_to_end(env, client, batch, rows, sim_cfg)
    print(f"kill -9 of the call worker hit {hit_calls}; of the validator {hit_validation}")
    # And the requests the dead worker had in flight are recorded as interrupted retries, not answers; their
    # cost is their reserved bound, marked as an estimate, so the ledger never counts less than was spent
    assert env.scalar("SELECT count(*) FROM attempts WHERE error = 'interrupted'") >= 1
    assert env.scalar("SELECT count(*) FROM attempts WHERE error = 'in_flight'") == 0
    assert env.scalar("SELECT count(*) FROM attempts WHERE error = 'interrupted' AND cost_estimated "
                      "AND cost_usd = reserved_usd AND cost_usd > 0") >= 1


@pytest.mark.parametrize(("fault", "size"), [("restart", 1000), ("flushall", 400)])
def test_broker_lost_mid_batch(env, sim, workers, sweeper, own_redis, fault, size):
    # Given a batch on a Redis this test owns, one worker and a sweeper
    sim_cfg = _slow_sim(41)
    settings = env.settings(broker_url=own_redis.url)
    client = make_client(env, sim(sim_cfg).url, fallbacks=True)
    from cascade.publish import CeleryPublisher

    client._publisher = CeleryPublisher.connect(settings, own_redis.url)
    workers(concurrency=64, CASCADE_BROKER_URL=own_redis.url, **FAST_LIVENESS)
    sweeper(stalled_after=3, CASCADE_BROKER_URL=own_redis.url, **FAST_LIVENESS)
    rows = scenario.rows(size, "label")
    batch = client.submit("label", rows, key_field="id", max_cost=CAP).batch_id
    # When Redis is restarted empty (or flushed) while messages are queued and in flight
    wait_for(lambda: _finished(env, batch) >= 150, 120, "150 finished jobs")
    hit = _in_flight(env)
    if fault == "restart":
        own_redis.restart()
    else:
        own_redis.client().flushall()
    # Then the sweeper re-publishes from Postgres and every job finishes exactly once
    _run_to_end(env, client, batch, rows, sim_cfg)
    print(f"Redis {fault} hit {hit}")


@pytest.mark.parametrize("fault", ["restart", "purge"])
@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_rabbitmq_lost_mid_batch(env, sim, workers, sweeper, fault):
    # Given a batch on a RabbitMQ vhost of this test's, one worker and a sweeper
    sim_cfg = _slow_sim(47)
    client = make_client(env, sim(sim_cfg).url, fallbacks=True)
    workers(concurrency=64, **FAST_LIVENESS)
    sweeper(stalled_after=3, **FAST_LIVENESS)
    rows = scenario.rows(400, "label")
    batch = client.submit("label", rows, key_field="id", max_cost=CAP).batch_id
    # When every connection to the broker is dropped (what a restart does to its clients), or every queue is
    # purged, while messages are queued and in flight
    wait_for(lambda: _finished(env, batch) >= 100, 120, "100 finished jobs")
    hit = _in_flight(env)
    assert env.vhost is not None
    if fault == "restart":
        env.vhost.drop_connections()
    else:
        env.vhost.purge()
    # Then the workers reconnect, the sweeper re-publishes what was lost, and every job finishes exactly once
    _run_to_end(env, client, batch, rows, sim_cfg)
    print(f"RabbitMQ {fault} hit {hit}")


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_postgres_connections_dropped_mid_stage(env, sim, workers, sweeper):
    # Given 400 jobs in flight
    sim_cfg = _slow_sim(43)
    client = make_client(env, sim(sim_cfg).url, fallbacks=True)
    workers(concurrency=64, **FAST_LIVENESS)
    sweeper(stalled_after=3, **FAST_LIVENESS)
    rows = scenario.rows(400, "label")
    batch = client.submit("label", rows, key_field="id", max_cost=CAP).batch_id
    # When every worker connection to Postgres is terminated, several times
    admin = make_engine(env.services.database_url)
    killed = 0
    stop = threading.Event()

    def blip() -> None:
        nonlocal killed
        while not stop.is_set() and killed < 200:
            with admin.begin() as conn:
                killed += len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE (application_name = :app OR application_name LIKE :app || ':worker:%') "
                    "AND pid <> pg_backend_pid()"), {"app": f"cascade:{env.schema}"}).all())
            time.sleep(0.7)

    wait_for(lambda: _finished(env, batch) >= 50, 60, "50 finished jobs")
    thread = threading.Thread(target=blip, daemon=True)
    thread.start()
    wait_for(lambda: _finished(env, batch) >= 250, 120, "250 finished jobs")
    stop.set()
    thread.join()
    admin.dispose()
    # Then the stages retried, nothing was acknowledged before its commit, and every job finished once
    assert killed > 0
    _run_to_end(env, client, batch, rows, sim_cfg)
    print(f"terminated {killed} Postgres connections")


class _Dropped:
    """A publisher whose messages are lost on the way (as in a broker flush right after the commit)."""

    def publish(self, due) -> None:
        pass

    def queue_lengths(self) -> dict[str, int]:
        return {}


def test_celery_beat_sweep_republishes_lost_messages(env, sim, workers, tmp_path):
    # Given a batch whose every tier-1 message was lost
    sim_cfg = scenario.sim_config(47)
    client = make_client(env, sim(sim_cfg).url, fallbacks=True)
    real = client.publisher
    client._publisher = _Dropped()
    rows = scenario.rows(50, "label")
    batch = client.submit("label", rows, key_field="id", max_cost=CAP).batch_id
    client._publisher = real
    # When Celery beat schedules the sweep (task cascade.sweep on queue `sweep`) for a worker that consumes it
    beat_env = env.environ(CASCADE_SWEEP_EVERY_S="1", CASCADE_STALLED_AFTER_S="1")
    workers(queues="tier1,tier2,tier3,validate,sweep", concurrency=32, CASCADE_STALLED_AFTER_S="1")
    with (tmp_path / "beat.log").open("wb") as log:
        beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "beat", "-s",
                                 str(tmp_path / "beat-schedule"), "-l", "warning"],
                                env=beat_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Then the sweep re-publishes them from Postgres and the batch finishes as predicted
        _run_to_end(env, client, batch, rows, sim_cfg, timeout=90)
    finally:
        beat.terminate()
        beat.wait(10)
