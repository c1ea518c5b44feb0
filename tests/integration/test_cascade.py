"""The cascade end to end: real Postgres, Redis, `celery worker` processes and the sim over HTTP."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from cascade.publish import worker_queues
from cascade.store import Stage
from tests.conftest import BROKERS, ROOT, wait_for
from tests.integration import scenario
from tests.integration.audit import audit as _audit
from tests.integration.audit import client as _client
from tests.integration.audit import cost_equals_tokens_times_price as _cost_equals_tokens_times_price

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_small_batch_end_to_end(env, sim, workers):
    # Given a sim with known per-model quality and a worker for every queue (on Redis, and on RabbitMQ)
    sim_cfg = scenario.sim_config()
    server = sim(sim_cfg)
    client = _client(env, server.url)
    workers(concurrency=32)
    rows = scenario.rows(60, "label")
    # When a batch is submitted and run
    result = client.submit("label", rows, key_field="id")
    state = client.wait(result.batch_id, timeout=60, poll_s=0.2)
    # Then every job is terminal and equals the sim's prediction
    assert state.is_done, state
    _audit(env, client, result.batch_id, client.config.snapshot("label"), sim_cfg, rows)
    _cost_equals_tokens_times_price(env)


def _sim_requests(server):
    return httpx.get(server.url.removesuffix("/v1") + "/stats").json()["requests"]


def _snapshot_tables(env, batch_id):
    return (
        env.rows("SELECT id, status, tier, stage, output, cost_usd, finished_at FROM jobs WHERE batch_id = :b "
                 "ORDER BY id", b=batch_id),
        env.rows("SELECT a.id, a.error, a.cost_usd FROM attempts a JOIN jobs j ON j.id = a.job_id "
                 "WHERE j.batch_id = :b ORDER BY a.id", b=batch_id),
        env.rows("SELECT v.id, v.passed FROM validations v JOIN jobs j ON j.id = v.job_id WHERE j.batch_id = :b "
                 "ORDER BY v.id", b=batch_id),
    )


@pytest.mark.slow
def test_two_thousand_jobs_escalate_as_configured(env, sim, workers):
    # Given two task types over three tiers whose sim models fail with known probabilities
    sim_cfg = scenario.sim_config(seed=23)
    server = sim(sim_cfg)
    client = _client(env, server.url)
    workers(concurrency=128)
    batches = {task: (scenario.rows(1000, task), None) for task in ("label", "summary")}
    # When 2,000 jobs are submitted
    ids = {task: client.submit(task, rows, key_field="id").batch_id for task, (rows, _) in batches.items()}
    for task, batch_id in ids.items():
        assert client.wait(batch_id, timeout=240, poll_s=0.5).is_done, task
    # Then every job is terminal and equals what the sim's seed predicts
    for task, (rows, _) in batches.items():
        _audit(env, client, ids[task], client.config.snapshot(task), sim_cfg, rows)
    _cost_equals_tokens_times_price(env)
    # And the SQL view's rates match the configured probabilities within 4 standard deviations
    stats = {row["task_type"]: row for row in client.stats()}
    for task in ("label", "summary"):
        snap = client.config.snapshot(task)
        p = [scenario.pass_probability(sim_cfg.model(snap.tier(i).model.name), snap.tier(i).samples,
                                       snap.tier(i).min_agreement, snap.task_type.output) for i in (1, 2, 3)]
        expected = {"escalation_rate": 1 - p[0], "tier2_rate": 1 - p[0], "tier3_rate": (1 - p[0]) * (1 - p[1])}
        row = stats[task]
        assert row["finished"] == row["jobs"] == 1000
        for name, value in expected.items():
            sigma = (value * (1 - value) / 1000) ** 0.5
            assert abs(float(row[name]) - value) <= 4 * sigma + 1e-9, (task, name, row[name], value)
        assert row["savings_pct"] > 0
    reasons = {(r.task_type, r.tier, r.reason) for r in env.rows("SELECT * FROM escalation_reasons")}
    assert ("label", 1, "inconsistent") in reasons
    assert ("label", 1, "invalid_json") in reasons
    assert ("summary", 1, "too_short") in reasons
    tiers = env.rows("SELECT task_type, tier, model, attempts, pass_rate FROM tier_stats ORDER BY 1, 2")
    assert [(t.task_type, t.tier, t.model) for t in tiers] == [
        ("label", 1, "small"), ("label", 2, "medium"), ("label", 3, "large"),
        ("summary", 1, "small"), ("summary", 2, "medium"), ("summary", 3, "large")]


def test_same_idempotency_key_creates_one_batch(env, sim):
    # Given a batch submitted with an idempotency key
    client = _client(env, sim(scenario.sim_config()).url)
    rows = scenario.rows(20, "label")
    first = client.submit("label", rows, key_field="id", idempotency_key="nightly-2026-11-23")
    # When the same rows are submitted again with the same key
    second = client.submit("label", rows, key_field="id", idempotency_key="nightly-2026-11-23")
    # Then it is the same batch, and no job was added
    assert (first.created, second.created) == (True, False)
    assert second.batch_id == first.batch_id
    assert env.scalar("SELECT count(*) FROM batches") == 1
    assert env.scalar("SELECT count(*) FROM jobs") == 20
    # And other rows under the same key are refused, naming the first batch
    from cascade.errors import IdempotencyConflict

    with pytest.raises(IdempotencyConflict, match=first.batch_id):
        client.submit("label", rows[:19], key_field="id", idempotency_key="nightly-2026-11-23")
    assert env.scalar("SELECT count(*) FROM jobs") == 20


def test_redelivered_messages_change_nothing(env, sim, workers):
    # Given a batch whose every message is sent twice on purpose
    sim_cfg = scenario.sim_config(seed=5)
    server = sim(sim_cfg)
    client = _client(env, server.url)
    rows = scenario.rows(40, "label")
    batch = client.submit("label", rows, key_field="id").batch_id
    job_ids = [r[0] for r in env.rows("SELECT id FROM jobs WHERE batch_id = :b", b=batch)]
    client.publisher.publish([(j, 1, Stage.CALL) for j in job_ids])
    # When workers run it
    workers(concurrency=32)
    assert client.wait(batch, timeout=60, poll_s=0.2).is_done
    # Then the outcome is what the sim predicts, with one answer per sample and one validation per tier
    _audit(env, client, batch, client.config.snapshot("label"), sim_cfg, rows)
    before = _snapshot_tables(env, batch)
    requests_before = _sim_requests(server)
    # When every call and validate message of every tier is delivered again after the jobs finished
    again = [(j, t, s) for j in job_ids for t in (1, 2, 3) for s in (Stage.CALL, Stage.VALIDATE)]
    client.publisher.publish(again)
    wait_for(lambda: sum(client.publisher.queue_lengths().values()) == 0, 30, "the redelivered messages to drain")
    # Then nothing changed: no new attempt, validation, cost or model request
    assert _snapshot_tables(env, batch) == before
    assert _sim_requests(server) == requests_before


def test_a_worker_started_without_a_pool_runs_gevent(env, sim, tmp_path):
    # Given the short command a user remembers: no -P
    server = sim(scenario.sim_config())
    client = _client(env, server.url)
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", ",".join(worker_queues()), "-c", "32",
           "-n", f"plain-{env.schema}@%h", "--without-gossip", "--without-mingle", "-l", "info"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env.environ(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        # When a batch runs on it
        rows = scenario.rows(40, "label")
        batch = client.submit("label", rows, key_field="id").batch_id
        assert client.wait(batch, timeout=60, poll_s=0.2).is_done
    finally:
        proc.kill()
        proc.wait(10)
    # Then it ran the gevent pool (the one the reliability tests pass with), and the batch is right
    text = log.read_text(errors="replace")
    assert "(gevent)" in text and "Traceback" not in text, text[-3000:]
    _audit(env, client, batch, client.config.snapshot("label"), scenario.sim_config(), rows)
