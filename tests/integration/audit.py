"""Audits shared by the integration tests: what must hold after any run, faults or not."""

from __future__ import annotations

import json
from decimal import Decimal

from cascade.client import Client
from cascade.publish import CeleryPublisher
from tests.integration import scenario


class Recorder:
    """A publisher that keeps what it was asked to publish (stages run in-process, no broker)."""

    def __init__(self):
        self.due = []

    def publish(self, due):
        self.due += list(due)

    def queue_lengths(self):
        return {}


def client(env, sim_url, **config):
    settings = env.settings()
    return Client(settings, engine=env.engine, config=scenario.cascade_config(sim_url, **config),
                  publisher=CeleryPublisher.connect(settings, settings.broker_url))


def audit(env, client, batch_id, snap, sim_cfg, rows):
    """Every row has one terminal job equal to the sim's prediction; one validation per tier reached;
    no duplicate answers; costs add up."""
    got = {r["key"]: r for r in client.results(batch_id)}
    assert len(got) == len(rows)
    for row in rows:
        status, tier, output = scenario.predict(snap, sim_cfg, row)
        job = got[row["id"]]
        assert (job["status"], job["tier"]) == (status, tier), row
        if status == "succeeded":
            expected = json.loads(output) if snap.task_type.output == "json" else output
            assert job["output"] == expected, row
    assert env.scalar("""SELECT count(*) FROM jobs j WHERE batch_id = :b AND
        (SELECT count(*) FROM validations v WHERE v.job_id = j.id) <> j.tier""", b=batch_id) == 0
    assert env.scalar("""SELECT count(*) FROM validations v JOIN jobs j ON j.id = v.job_id
        WHERE j.batch_id = :b AND v.tier > j.tier""", b=batch_id) == 0
    assert env.scalar("""SELECT count(*) FROM (SELECT 1 FROM attempts a JOIN jobs j ON j.id = a.job_id
        WHERE j.batch_id = :b AND a.error IS NULL GROUP BY a.job_id, a.tier, a.sample HAVING count(*) > 1) d""",
                      b=batch_id) == 0
    mismatched = env.scalar("""SELECT count(*) FROM jobs j WHERE batch_id = :b AND cost_usd <>
        (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = j.id AND NOT audit)""", b=batch_id)
    assert mismatched == 0
    if snap.max_cost_usd is not None:  # a capped batch: its spend is its requests' costs, nothing reserved
        spent, reserved = env.rows("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b", b=batch_id)[0]
        paid = env.scalar("SELECT coalesce(sum(a.cost_usd), 0) FROM attempts a JOIN jobs j ON j.id = a.job_id "
                          "WHERE j.batch_id = :b", b=batch_id)
        assert (spent, reserved) == (paid, 0) and paid <= snap.max_cost_usd


def cost_equals_tokens_times_price(env):
    """Every answered request costs its tokens at its model's prices; a request that never came back costs
    its reserved bound (an estimate, never less than it could have cost), a cache hit nothing."""
    for model, (pin, pout) in scenario.PRICES.items():
        tokens_in, tokens_out, cost = env.rows(
            "SELECT coalesce(sum(input_tokens),0), coalesce(sum(output_tokens),0), coalesce(sum(cost_usd),0) "
            "FROM attempts WHERE model = :m AND NOT cost_estimated AND NOT cached", m=model)[0]
        assert cost == (tokens_in * pin + tokens_out * pout) / Decimal(1_000_000), model
    assert env.scalar("SELECT count(*) FROM attempts WHERE cost_estimated AND (cost_usd <> reserved_usd "
                      "OR error <> 'interrupted' OR reserved_usd <= 0)") == 0
    assert env.scalar("SELECT count(*) FROM attempts WHERE cached AND cost_usd <> 0") == 0
