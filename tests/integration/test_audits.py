"""Quality audits end to end: a cheap model that is confidently wrong on a known subset is caught by the audit
model, routing_accuracy counts it exactly, and `cascade audit report` raises the drift alarm."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pytest
import yaml

from cascade import store
from cascade.client import Client
from cascade.config import parse_config, render
from cascade.publish import CeleryPublisher
from cascade.routing import audited
from cascade.sim import SimConfig, SimModel
from cascade.store import Stage
from cascade.sweeper import sweep
from tests.conftest import wait_for
from tests.integration.test_cli import _cli

pytestmark = pytest.mark.integration

SCHEMA = {"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}
PROMPT = "Ticket {id}: {text}"


def _config(sim_url, rate=1.0):
    models = [{"name": name, "base_url": sim_url, "model": f"sim-{name}", "timeout_s": 10,
               "price": {"input_per_mtok": price, "output_per_mtok": price}}
              for name, price in (("small", "1"), ("large", "20"), ("auditor", "20"))]
    task = {"prompt": PROMPT, "output": "json", "schema": SCHEMA,
            "self_consistency": {"samples": 3, "min_agreement": 1.0, "fields": ["label"]},
            "tiers": ["small", {"model": "large", "samples": 1}], "audit": {"rate": rate, "model": "auditor"}}
    return {"models": models, "task_types": [{"name": "label", **task}, {"name": "clean", **task}]}


def _rows(task, n, bad):
    """``n`` rows; the first ``bad`` mention a jammed printer (the small model is confidently wrong on those)."""
    return [{"id": f"{task}-{i}", "text": "printer jammed" if i < bad else f"password reset {i}"} for i in range(n)]


def _wilson(agreed, n, z=1.959963984540054):
    p = agreed / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return round((centre - half) / (1 + z * z / n), 4), round((centre + half) / (1 + z * z / n), 4)


def test_audits_catch_a_confidently_wrong_model_and_count_it_exactly(env, sim, workers, tmp_path):
    # Given a small model that answers every "jammed" ticket with one wrong label in all three samples (valid,
    # unanimous: the validator accepts it), and is otherwise right except for some invalid samples (those jobs
    # escalate to the large model, with a rejected but correct majority); a slow auditor (a model no tier uses,
    # so it runs with the task type's settings: 3 samples, all must agree) audits every answer accepted at tier 1
    sim_cfg = SimConfig(seed=7, models={
        "small": SimModel(p_invalid_json=0.3, confidently_wrong="jammed"), "large": SimModel(),
        "auditor": SimModel(latency_ms=2000)})
    server = sim(sim_cfg)
    config = _config(server.url)
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=parse_config(config, "test.yaml"),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    workers(concurrency=32)
    rows = _rows("label", 30, bad=8)

    # When the batch runs
    batch = client.submit("label", rows, key_field="id").batch_id
    assert client.wait(batch, timeout=60, poll_s=0.05).is_done

    # Then waiting for the batch did not wait for its audits (the auditor takes 2 s a request)
    assert env.scalar("SELECT count(*) FROM audits WHERE status <> 'done'") > 0
    wait_for(lambda: env.scalar("SELECT count(*) FROM audits WHERE status <> 'done'") == 0, 60, "audits done")

    # And what the sim's draws predict holds: jammed rows pass tier 1 with a wrong label, other rows pass tier 1
    # when all three samples are valid and escalate otherwise
    def valid(row, sample):
        return sim_cfg.outcome("small", render(PROMPT, row), sample) != "invalid_json"

    bad = [r["id"] for r in rows if "jammed" in r["text"]]
    clean_pass = [r["id"] for r in rows if r["id"] not in bad and all(valid(r, s) for s in range(3))]
    escalated = [r["id"] for r in rows if r["id"] not in bad and r["id"] not in clean_pass
                 and any(valid(r, s) for s in range(3))]
    assert len(bad) == 8 and clean_pass and escalated
    tiers = {r["key"]: r["tier"] for r in client.results(batch)}
    assert {k for k, t in tiers.items() if t == 1} == set(bad) | set(clean_pass)

    # And every answer accepted at tier 1 was audited once; exactly the jammed ones disagree
    audits = {key: (agreed, tier, model, auditor, output) for key, agreed, tier, model, auditor, output in env.rows(
        "SELECT j.key, a.agreed, a.tier, a.model, a.auditor_model, a.auditor_output FROM audits a "
        "JOIN jobs j ON j.id = a.job_id")}
    assert set(audits) == set(bad) | set(clean_pass)
    assert {k for k, a in audits.items() if a[0] is False} == set(bad)
    assert all(a[1:4] == (1, "small", "auditor") for a in audits.values())
    outputs = {r["key"]: r["output"] for r in client.results(batch)}
    assert all(audits[k][4] != outputs[k] for k in bad) and all(audits[k][4] == outputs[k] for k in clean_pass)

    # And routing_accuracy equals the hand count: 8 wrong of the audited, Wilson interval by hand; every
    # escalated job's rejected tier-1 majority was the right label, which the large model then accepted
    got = {(r["tier"], r["model"]): r for r in client.routing_accuracy("label")}
    small, large = got[(1, "small")], got[(2, "large")]
    n, agreed = len(bad) + len(clean_pass), len(clean_pass)
    assert (small["accepted"], small["audited"], small["agreed"]) == (n, n, agreed)
    assert small["agreement_rate"] == round(Decimal(agreed) / n, 4)
    assert (float(small["ci_low"]), float(small["ci_high"])) == _wilson(agreed, n)
    assert (small["escalated"], small["escalated_agreement"]) == (len(escalated), Decimal(1))
    assert (large["accepted"], large["audited"], large["ci_low"]) == (len(escalated), 0, None)

    # And audit spend is recorded as audit work at tier 0, never in the jobs' cost
    assert env.scalar("SELECT count(*) FROM attempts WHERE audit AND (tier <> 0 OR model <> 'auditor')") == 0
    assert env.scalar("SELECT sum(cost_usd) FROM audits") == env.scalar(
        "SELECT sum(cost_usd) FROM attempts WHERE audit") > 0
    assert env.scalar("SELECT sum(cost_usd) FROM jobs") == env.scalar(
        "SELECT sum(cost_usd) FROM attempts WHERE NOT audit")

    # And the batch's status says how its audits went
    status = _cli(env, path, "status", batch)
    assert f"audits: {len(clean_pass)} agreed, {len(bad)} disagreed, 0 waiting" in status.stdout, status.stdout

    # When the drift alarm runs with a minimum of 0.9
    report = _cli(env, path, "audit", "report", "--task-type", "label", "--min-agreement", "0.9")
    # Then it exits 1 naming the tier
    assert report.returncode == 1, report.stderr
    assert "drift: label tier 1 (small)" in report.stderr and "routing_accuracy" in report.stdout

    # And on a model that is right (no jammed printers in these rows) it exits 0
    clean = client.submit("clean", _rows("clean", 12, bad=0), key_field="id").batch_id
    assert client.wait(clean, timeout=60, poll_s=0.05).is_done
    wait_for(lambda: env.scalar("SELECT count(*) FROM audits WHERE status <> 'done'") == 0, 60, "audits done")
    ok = _cli(env, path, "audit", "report", "--task-type", "clean", "--min-agreement", "0.6", "--json")
    assert ok.returncode == 0, ok.stderr
    clean_rows = json.loads(ok.stdout)
    assert clean_rows and all(r["audited"] == r["agreed"] for r in clean_rows)


def test_the_audit_rate_picks_a_stable_share_and_budgets_count_audits(env, sim, workers):
    # Given half of the accepted answers audited, under a batch cap
    server = sim(SimConfig(seed=3, unknown_models="default"))
    config = parse_config(_config(server.url, rate=0.5), "test.yaml")
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=config,
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    workers(concurrency=32)
    batch = client.submit("label", _rows("label", 40, bad=0), key_field="id", max_cost=Decimal(1)).batch_id
    assert client.wait(batch, timeout=60, poll_s=0.05).is_done
    wait_for(lambda: env.scalar("SELECT count(*) FROM audits WHERE status <> 'done'") == 0, 60, "audits done")

    # Then the audited jobs are exactly those the stable hash of their id picks (about half)
    jobs = [job_id for (job_id,) in env.rows("SELECT id FROM jobs WHERE batch_id = :b", b=batch)]
    picked = {job_id for job_id in jobs if audited(job_id, Decimal("0.5"))}
    assert {job_id for (job_id,) in env.rows("SELECT job_id FROM audits")} == picked
    assert 10 <= len(picked) <= 30
    # And the batch's spend counts its audits (nothing left reserved)
    spent, reserved = env.rows("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b", b=batch)[0]
    assert reserved == 0
    assert spent == env.scalar("SELECT sum(cost_usd) FROM attempts") > env.scalar("SELECT sum(cost_usd) FROM jobs")


def test_lost_and_abandoned_audits_come_back(env, sim, run):
    # Given a batch run in this process whose audit messages were all lost
    server = sim(SimConfig(seed=5, unknown_models="default"))
    r = run(parse_config(_config(server.url), "test.yaml"))
    batch = r.submit(_rows("label", 12, bad=0))
    r.drive(batch)
    audit_ids = [i for i, _, stage in r.publisher.due if stage is Stage.AUDIT]
    assert len(audit_ids) == 12
    r.publisher.due = []
    # And one of them claimed by a worker that died before its requests came back
    with env.engine.begin() as conn:
        [held] = store.claim_audits(conn, audit_ids[:1], 300, "dead-worker")
        store.start_attempts(conn, [store.NewAttempt(held.job_id, 0, "auditor", None, 0, 3, audit=True)])

    # When the sweeper runs (nothing published lately, no message queued; the dead worker has no heartbeat)
    sweep(env.engine, r.publisher, stalled_after_s=0, dead_after_s=15)
    # Then every audit is published again, and once run each is done with one answer per sample
    assert {i for i, _, _ in r.publisher.due} == set(audit_ids)
    r.drive(batch)
    assert env.rows("SELECT status, agreed, count(*) FROM audits GROUP BY 1, 2") == [("done", True, 12)]
    assert env.scalar("SELECT count(*) FROM attempts WHERE audit AND error IS NULL") == 12
    assert env.scalar("SELECT count(*) FROM attempts WHERE audit AND error = 'interrupted'") == 1


def test_an_auditor_that_cannot_be_called_ends_its_audits_without_a_verdict(env, sim, run):
    # Given an audit model whose API key variable is not set in this worker
    server = sim(SimConfig(seed=5, unknown_models="default"))
    config = _config(server.url)
    config["models"][2]["api_key_env"] = "CASCADE_TEST_UNSET_AUDITOR_KEY"
    r = run(parse_config(config, "test.yaml"))
    # When a batch runs and its audits are worked
    batch = r.submit(_rows("label", 4, bad=0))
    r.drive(batch)
    r.drive(batch)
    # Then the jobs succeed, and each audit is done without a verdict, saying why, having cost nothing
    assert {row["status"] for row in r.client.results(batch)} == {"succeeded"}
    audits = env.rows("SELECT status, agreed, detail, cost_usd FROM audits")
    assert len(audits) == 4
    assert all(a.status == "done" and a.agreed is None and "CASCADE_TEST_UNSET_AUDITOR_KEY" in a.detail
               and a.cost_usd == 0 for a in audits)
