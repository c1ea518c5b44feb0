"""Failover within a tier: fallbacks, circuit breakers shared through Redis, and outages that end."""

from __future__ import annotations

import json
import logging
import time

import pytest

from cascade.client import Client
from cascade.config import parse_config
from cascade.health import HEALTHY, RedisHealth
from cascade.publish import CeleryPublisher
from tests.integration import scenario

pytestmark = pytest.mark.integration


def _config(sim_url, *, on_outage="wait", outage_wait_s=900):
    """The scenario's cascade with a backup of tier 1's model (``small_b``, priced alike) for ``label``."""
    data = scenario.cascade_config(sim_url).model_dump(mode="json", by_alias=True)
    small = next(m for m in data["models"] if m["name"] == "small")
    data["models"].append({**small, "name": "small_b", "model": "sim-small_b"})
    label = next(t for t in data["task_types"] if t["name"] == "label")
    label["tiers"][0] = {"model": "small", "fallbacks": ["small_b"]}
    label.update(on_outage=on_outage, outage_wait_s=outage_wait_s)
    return parse_config(data, "test.yaml")


def _sim(*, small_dead, small_b_dead=False):
    base = scenario.sim_config(seed=12)
    dead = {"p_500": 1.0}
    models = {**base.models, "small_b": base.model("small"),
              "small": base.model("small").model_copy(update=dead if small_dead else {})}
    if small_b_dead:
        models["small_b"] = models["small_b"].model_copy(update=dead)
    return base.model_copy(update={"models": models})


def _client(env, config):
    s = env.settings()
    return Client(s, engine=env.engine, config=config, publisher=CeleryPublisher.connect(s, s.broker_url))


def _run(client, rows, key):
    batch = client.submit("label", rows, key_field="id", idempotency_key=key).batch_id
    assert client.wait(batch, timeout=120, poll_s=0.1).is_done
    return batch


def _as_if(config, model):
    """The label snapshot with ``model`` as tier 1's (what a healthy tier 1 of that model gives)."""
    data = config.model_dump(mode="json", by_alias=True)
    next(t for t in data["task_types"] if t["name"] == "label")["tiers"][0] = model
    return parse_config(data, "test.yaml").snapshot("label")


def _check(env, client, batch, snap, sim_cfg, rows):
    got = {r["key"]: (r["status"], r["tier"], r["output"]) for r in client.results(batch)}
    for row in rows:
        status, tier, output = scenario.predict(snap, sim_cfg, row)
        assert got[row["id"]] == (status, tier, json.loads(output) if output else None), row
    assert env.scalar("""SELECT count(*) FROM validations v JOIN jobs j ON j.id = v.job_id, jsonb_array_elements(v.reasons) r
                         WHERE j.batch_id = :b AND r ->> 'code' LIKE 'model_error%'""", b=batch) == 0


def _to(server, model, since=0.0):
    return sum(1 for s in server.seen() if s.model == model and s.at >= since)


def test_a_dead_model_fails_over_and_its_breaker_sends_only_probes_until_it_answers(env, sim, workers):
    # Given tier 1's model answering 5xx to everything while its backup answers, and a 3 s cooldown
    sim_cfg = _sim(small_dead=True)
    server = sim(sim_cfg)
    config = _config(server.url)
    client = _client(env, config)
    workers(concurrency=16, CASCADE_BREAKER_COOLDOWN_S="3")
    rows = scenario.rows(120, "label")
    healthy_b = _as_if(config, "small_b")

    # When a batch runs: its first requests to the dead model fail over to the backup, then the breaker opens
    first = _run(client, rows[:40], "a")
    # Then every job ends exactly as with a healthy tier 1 of the backup's: no model_error, no escalation for it
    _check(env, client, first, healthy_b, sim_cfg, rows[:40])
    assert env.scalar("SELECT count(*) FROM attempts WHERE model = 'small_b' AND error IS NULL") > 0
    assert env.scalar("SELECT count(*) FROM attempts WHERE model = 'small' AND error IS NULL") == 0

    # When the next batch runs while the model stays dead
    started = time.monotonic()
    second = _run(client, rows[40:80], "b")
    took = time.monotonic() - started
    # Then no request reached the dead model but the probes, at most one per cooldown
    _check(env, client, second, healthy_b, sim_cfg, rows[40:80])
    probes = _to(server, "small", since=started)
    assert probes <= 1 + int(took / 3), (probes, took)
    # And status says which model is down
    assert any(n.startswith("model 'small' is down") for n in client.status(second, notes=True).notes)

    # When the model comes back and its cooldown passes
    server.reconfigure(_sim(small_dead=False))
    time.sleep(3.5)
    _run(client, rows[80:82], "probe")  # its first job is the probe: an answer closes the breaker
    third = _run(client, rows[82:], "c")
    # Then the probe closed the breaker and tier 1's traffic went back to the model
    by_model = dict(env.rows("""SELECT a.model, count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id
                                WHERE j.batch_id = :b AND a.tier = 1 AND a.error IS NULL GROUP BY 1""", b=third))
    assert by_model == {"small": 38}, by_model
    # And tier_stats shows each model of the tier apart
    models = {(r.tier, r.model) for r in env.rows("SELECT tier, model FROM tier_stats WHERE task_type = 'label'")}
    assert {(1, "small"), (1, "small_b")} <= models


def test_a_tier_with_every_model_down_waits_and_finishes_without_escalating(env, sim, workers, sweeper):
    # Given both models of tier 1 answering 5xx to everything, a 2 s cooldown, and a sweeper
    server = sim(_sim(small_dead=True, small_b_dead=True))
    config = _config(server.url)
    client = _client(env, config)
    workers(concurrency=16, CASCADE_BREAKER_COOLDOWN_S="2", CASCADE_MAX_INLINE_WAIT_S="0.5")
    sweeper(every=0.5)
    rows = scenario.rows(30, "label")
    # When a batch runs: its first requests fail and escalate; then both breakers open and the rest wait
    batch = client.submit("label", rows, key_field="id").batch_id
    deadline = time.monotonic() + 30
    while "every model of tier 1 is down" not in " ".join(
            e or "" for (e,) in env.rows("SELECT error FROM jobs WHERE batch_id = :b", b=batch)):
        assert time.monotonic() < deadline, "no job waited for the tier"
        time.sleep(0.2)
    waited = env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status = 'queued' AND tier = 1", b=batch)
    # And the models come back after 20 s
    time.sleep(20)
    server.reconfigure(_sim(small_dead=False))
    # Then the waiting jobs finish at tier 1's answers, none escalated as unavailable
    assert client.wait(batch, timeout=90, poll_s=0.2).is_done
    assert waited > 0
    unavailable = env.scalar("""SELECT count(*) FROM validations v, jsonb_array_elements(v.reasons) r
                                WHERE r ->> 'code' = 'model_error:unavailable'""")
    assert unavailable == 0
    answered = env.scalar("""SELECT count(DISTINCT a.job_id) FROM attempts a JOIN jobs j ON j.id = a.job_id
                             WHERE j.batch_id = :b AND a.tier = 1 AND a.error IS NULL""", b=batch)
    assert answered >= waited


def test_on_outage_escalate_moves_on_at_once(env, sim, workers):
    # Given both models of tier 1 down, their breakers open, and on_outage: escalate
    server = sim(_sim(small_dead=True, small_b_dead=True))
    config = _config(server.url, on_outage="escalate")
    health = RedisHealth.from_broker(env.services.broker_url, key_prefix=env.prefix, failures=1, cooldown_s=60)
    for model in ("small", "small_b"):
        health.report(model, ok=False)
    health.close()
    client = _client(env, config)
    workers(concurrency=16)
    rows = scenario.rows(10, "label")
    # When a batch runs
    batch = _run(client, rows, "x")
    # Then no request reached tier 1 and every job escalated as model_error:unavailable
    assert _to(server, "small") == _to(server, "small_b") == 0
    codes = {r for (r,) in env.rows("""SELECT DISTINCT r ->> 'code' FROM validations v JOIN jobs j ON j.id = v.job_id,
                                       jsonb_array_elements(v.reasons) r WHERE j.batch_id = :b AND v.tier = 1""",
                                    b=batch)}
    assert codes == {"model_error:unavailable"}


def test_the_breaker_opens_probes_once_and_closes(env):
    # Given a breaker that opens after 3 faults with a 0.3 s cooldown
    health = RedisHealth.from_broker(env.services.broker_url, key_prefix=env.prefix, failures=3, cooldown_s=0.3)
    try:
        # When the model fails twice, then answers: it stays up and its count resets
        assert not health.report("m", ok=False) and not health.report("m", ok=False)
        assert health.states(["m"], probe_lease_s=5)[0].fails == 2
        health.report("m", ok=True)
        assert health.states(["m"], probe_lease_s=5)[0] == HEALTHY
        # When it fails three times in a row: it is down, no probe during the cooldown
        for _ in range(3):
            down = health.report("m", ok=False)
        assert down and not health.states(["m"], probe_lease_s=5)[0].usable
        time.sleep(0.35)
        # After the cooldown exactly one caller gets the probe
        first, second = (health.states(["m"], probe_lease_s=5)[0] for _ in range(2))
        assert first.probe and not second.usable
        # A failed probe opens it again; after the next cooldown a probe that answers closes it
        assert health.report("m", ok=False, probe=True)
        assert not health.states(["m"], probe_lease_s=5)[0].usable
        time.sleep(0.35)
        assert health.states(["m"], probe_lease_s=5)[0].probe
        assert not health.report("m", ok=True, probe=True)
        assert health.states(["m"], probe_lease_s=5)[0] == HEALTHY
    finally:
        health.close()


def test_health_fails_open_when_redis_is_down(caplog):
    # Given health on a Redis where nothing listens
    health = RedisHealth.from_broker("redis://127.0.0.1:9/0")
    with caplog.at_level(logging.WARNING, logger="cascade.health"):
        # When it is read and reported to twice
        states = [health.states(["a", "b"], probe_lease_s=1), health.states(["a"], probe_lease_s=1)]
        down = health.report("a", ok=False)
    # Then every model is up, nothing raised, and it was logged once
    assert states == [[HEALTHY, HEALTHY], [HEALTHY]] and not down
    assert sum("model health unavailable" in r.message for r in caplog.records) == 1
    health.close()


def test_jobs_waiting_past_outage_wait_s_escalate_as_unavailable(env, sim, workers):
    # Given both models of tier 1 down for longer than the task's outage_wait_s (1 s)
    server = sim(_sim(small_dead=True, small_b_dead=True))
    config = _config(server.url, outage_wait_s=1)
    health = RedisHealth.from_broker(env.services.broker_url, key_prefix=env.prefix, failures=1, cooldown_s=60)
    for model in ("small", "small_b"):
        health.report(model, ok=False)
    health.close()
    time.sleep(1.2)
    client = _client(env, config)
    workers(concurrency=16)
    # When a batch runs
    batch = _run(client, scenario.rows(6, "label"), "late")
    # Then nothing waited any longer: every job escalated from tier 1 as model_error:unavailable
    assert _to(server, "small") == _to(server, "small_b") == 0
    codes = {r for (r,) in env.rows("""SELECT DISTINCT r ->> 'code' FROM validations v JOIN jobs j ON j.id = v.job_id,
                                       jsonb_array_elements(v.reasons) r WHERE j.batch_id = :b AND v.tier = 1""",
                                    b=batch)}
    assert codes == {"model_error:unavailable"}
