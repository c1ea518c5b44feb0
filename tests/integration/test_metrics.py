"""`cascade metrics` end to end: a real cascade runs (escalations, a routed start tier, cache hits, audits, a daily
budget, a capped batch cut off by a dead worker, a cancelled batch, messages left waiting), then every figure the
exporter serves over HTTP equals what SQL computes from the ledger; a failing database answers 500 and the next
scrape works. Then the tallies' watermark against a transaction that commits late, and a retried job's history."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cascade.client import Client
from cascade.config import parse_config
from cascade.metrics import CascadeCollector, families
from cascade.publish import CeleryPublisher
from cascade.sim import SimConfig, SimModel
from tests.conftest import ROOT, wait_for
from tests.integration.scenario import LABEL_SCHEMA

pytestmark = pytest.mark.integration

PRICES = {"small": "0.5", "medium": "2", "large": "8", "slow": "0.5"}


def _config(sim_url):
    models = [{"name": name, "base_url": sim_url, "model": f"sim-{name}", "timeout_s": 10,
               "price": {"input_per_mtok": price, "output_per_mtok": price}} for name, price in PRICES.items()]
    label = {"name": "label", "prompt": "Ticket {id}: {text}", "output": "json", "schema": LABEL_SCHEMA,
             "self_consistency": {"samples": 3, "min_agreement": 0.6, "fields": ["label"]},
             "tiers": ["small", "medium", {"model": "large", "samples": 1}],
             "route": [{"when": {"field": "vip", "equals": "yes"}, "start_tier": 2}],
             "audit": {"rate": 1.0, "model": "large"}, "budget": {"per_day_usd": 100}}
    summary = {"name": "summary", "prompt": "Summarize in one line: {text}", "output": "text",
               "length": {"min_chars": 3, "max_chars": 400}, "tiers": ["small", "medium", "large"]}
    slow = {"name": "slow", "prompt": "Summarize slowly: {text}", "output": "text", "tiers": ["slow", "large"]}
    return {"models": models, "task_types": [label, summary, slow]}


def _rows(task, n, vip=0):
    return [{"id": f"{task}-{i}", "text": f"row {i} of {task}: printer on floor {i % 5} is jammed",
             "vip": "yes" if i < vip else "no"} for i in range(n)]


def _client(env, config, **settings):
    s = env.settings(**settings)
    return Client(s, engine=env.engine, config=config, publisher=CeleryPublisher.connect(s, s.broker_url))


def _scrape(port):
    """(status, body) of GET /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _parse(body):
    """{metric sample name: {frozenset of labels: value}}."""
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def _by(got, name, *labels):
    """A sample family keyed by the values of ``labels``."""
    return {tuple(dict(k)[label] for label in labels): v for k, v in got.get(name, {}).items()}


def _money(rows):
    return {tuple(r[:-1]): pytest.approx(float(r[-1]), rel=1e-9, abs=1e-12) for r in rows}


def _start_exporter(env, config_path):
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", "metrics", "--port", "0"], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env.environ(CASCADE_CONFIG=str(config_path)))
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if "serving http://" in line:
            return proc, int(line.split("/metrics")[0].rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("cascade metrics did not start: " + "".join(seen))


def _run_ledger(env, sim, workers, tmp_path):
    """Run the batches and leave the ledger still: returns (client, config path, capped batch id)."""
    server = sim(SimConfig(seed=5, models={
        "small": SimModel(p_correct=0.6, p_invalid_json=0.1, p_too_short=0.1), "medium": SimModel(p_correct=0.8),
        "large": SimModel(), "slow": SimModel(latency_ms=1000)}))
    data = _config(server.url)
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(data))
    config = parse_config(data, str(path))
    client = _client(env, config)
    worker = workers(concurrency=16)
    # Escalations (some rows start at tier 2 by a route), audits of every answer accepted below the top tier,
    # a daily budget's ledger; then the same summary rows twice: the second batch is answered from the cache
    for task, rows, key in (("label", _rows("label", 24, vip=4), None), ("summary", _rows("summary", 12), None),
                            ("summary", _rows("summary", 12), "again")):
        batch = client.submit(task, rows, key_field="id", idempotency_key=key).batch_id
        assert client.wait(batch, timeout=60, poll_s=0.05).is_done
    wait_for(lambda: env.scalar("SELECT count(*) FROM audits WHERE status IN ('queued', 'running')") == 0, 60,
             "audits done")
    # A capped batch whose worker dies once it has spent: running jobs, requests in flight, a reservation left
    one_per_message = _client(env, config, jobs_per_message=1)
    capped = one_per_message.submit("slow", _rows("slow", 40), key_field="id", max_cost="1").batch_id
    wait_for(lambda: env.scalar("SELECT spent_usd FROM batches WHERE id = :b", b=capped) > 0, 30, "a settled request")
    worker.kill()
    # Messages nobody consumes, for a batch cancelled meanwhile and one left queued
    client.cancel(client.submit("summary", _rows("cancelled", 3), key_field="id").batch_id)
    client.submit("summary", _rows("late", 5), key_field="id")
    return client, path, capped


def _expected_jobs(env):
    jobs = {(t, s): 0 for (t,) in env.rows("SELECT DISTINCT task_type FROM jobs")
            for s in ("queued", "running", "succeeded", "failed", "cancelled")}
    jobs.update({(t, s): n for t, s, n in env.rows("SELECT task_type, status, count(*) FROM jobs GROUP BY 1, 2")})
    escalations = {(t, str(tier)): 0 for t, n in env.rows("SELECT task_type, max(tiers) FROM batches GROUP BY 1")
                   for tier in range(2, n + 1)}
    escalations.update({(t, str(tier)): n for t, tier, n in env.rows(
        "SELECT j.task_type, t, count(*) FROM jobs j, generate_series(2, 3) t WHERE j.start_tier < t AND j.tier >= t "
        "GROUP BY 1, 2")})
    return jobs, escalations


def _check_jobs(env, got):
    jobs, escalations = _expected_jobs(env)
    assert _by(got, "cascade_jobs", "task_type", "status") == jobs
    assert _by(got, "cascade_jobs_submitted_total", "task_type") == {
        (t,): n for t, n in env.rows("SELECT task_type, count(*) FROM jobs GROUP BY 1")}
    assert _by(got, "cascade_verdicts_total", "task_type", "tier", "verdict") == {
        (t, str(tier), "passed" if passed else "rejected"): n for t, tier, passed, n in env.rows(
            "SELECT j.task_type, v.tier, v.passed, count(*) FROM validations v JOIN jobs j ON j.id = v.job_id "
            "GROUP BY 1, 2, 3")}
    assert _by(got, "cascade_cost_usd_total", "task_type") == _money(
        env.rows("SELECT task_type, sum(cost_usd) FROM jobs GROUP BY 1"))
    assert _by(got, "cascade_escalations_total", "task_type", "tier") == escalations
    assert jobs[("summary", "cancelled")] == 3 and jobs[("summary", "queued")] == 5
    # the run did escalate, and some jobs started at tier 2 without counting as escalated into it
    assert escalations[("label", "2")] > 0 and escalations[("label", "3")] > 0
    assert env.scalar("SELECT count(*) FROM jobs WHERE start_tier = 2") == 4


def _check_requests(env, got):
    assert _by(got, "cascade_model_requests_total", "model", "error") == {
        (m, e): n for m, e, n in env.rows("SELECT model, coalesce(error, 'none'), count(*) FROM attempts "
                                          "WHERE NOT cached AND error IS DISTINCT FROM 'in_flight' GROUP BY 1, 2")}
    in_flight = _by(got, "cascade_model_requests_in_flight", "model")
    assert in_flight == {(m,): n for m, n in env.rows(
        "SELECT model, count(*) FILTER (WHERE error = 'in_flight') FROM attempts GROUP BY 1")}
    assert in_flight[("slow",)] > 0  # the dead worker's requests
    assert _by(got, "cascade_model_cost_usd_total", "model") == _money(
        env.rows("SELECT model, sum(cost_usd) FROM attempts GROUP BY 1"))
    tokens = env.rows("SELECT model, sum(input_tokens), sum(output_tokens) FROM attempts "
                      "WHERE NOT cached AND error IS DISTINCT FROM 'in_flight' GROUP BY 1")
    assert _by(got, "cascade_model_tokens_total", "model", "direction") == {
        **{(m, "input"): i for m, i, _ in tokens}, **{(m, "output"): o for m, _, o in tokens}}
    # the request cache, as the cache_stats view counts it
    stats = env.rows("SELECT task_type, hits, misses, saved_usd FROM cache_stats")
    assert _by(got, "cascade_cache_hits_total", "task_type") == {(t,): h for t, h, _, _ in stats}
    assert _by(got, "cascade_cache_misses_total", "task_type") == {(t,): m for t, _, m, _ in stats}
    assert _by(got, "cascade_cache_saved_usd_total", "task_type") == _money([(t, s) for t, _, _, s in stats])
    assert {t: h for t, h, _, _ in stats}["summary"] > 0


def _check_audits_and_budgets(env, got, capped):
    audits = {(t, s): 0 for (t,) in env.rows("SELECT DISTINCT task_type FROM audits")
              for s in ("queued", "running", "done", "skipped")}
    audits.update({(t, s): n for t, s, n in env.rows("SELECT task_type, status, count(*) FROM audits GROUP BY 1, 2")})
    assert _by(got, "cascade_audits", "task_type", "status") == audits
    accuracy = env.rows("SELECT task_type, tier, model, audited, agreed FROM routing_accuracy WHERE audited > 0")
    assert accuracy
    assert _by(got, "cascade_audited_total", "task_type", "tier", "model") == {
        (t, str(tier), m): a for t, tier, m, a, _ in accuracy}
    assert _by(got, "cascade_audit_agreed_total", "task_type", "tier", "model") == {
        (t, str(tier), m): g for t, tier, m, _, g in accuracy}
    assert _by(got, "cascade_audit_cost_usd_total", "task_type") == _money(
        env.rows("SELECT task_type, sum(cost_usd) FROM audits GROUP BY 1"))
    # the capped batch the dead worker left unfinished (no other batch has a cap)
    spent, reserved = env.rows("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b", b=capped)[0]
    assert spent > 0
    assert _by(got, "cascade_batch_budget_cap_usd", "batch", "task_type") == {(capped, "slow"): 1.0}
    assert _by(got, "cascade_batch_budget_spent_usd", "batch") == _money([(capped, spent)])
    assert _by(got, "cascade_batch_budget_reserved_usd", "batch") == _money([(capped, reserved)])
    # the daily budget's window, and its cap from the config
    assert _by(got, "cascade_task_budget_spent_usd", "task_type") == _money(env.rows(
        "SELECT task_type, sum(spent_usd) FROM task_budgets "
        "WHERE hour >= date_trunc('hour', now() - interval '24 hours') GROUP BY 1"))
    assert _by(got, "cascade_task_budget_per_day_usd", "task_type") == {("label",): 100.0}


def test_every_metric_equals_the_ledger_and_a_failed_scrape_is_followed_by_a_good_one(env, sim, workers, tmp_path):
    # Given a ledger with escalations, routed starts, cache hits, audits, budgets, a dead worker's open requests,
    # and messages waiting on tier1
    client, path, capped = _run_ledger(env, sim, workers, tmp_path)
    queues = client.publisher.queue_lengths()
    assert queues["tier1"] > 0

    # When `cascade metrics` starts on a free port and is scraped twice (the second reads only what is new)
    proc, port = _start_exporter(env, path)
    try:
        status, first = _scrape(port)
        assert status == 200, first
        status, body = _scrape(port)
        assert status == 200, body
        got = _parse(body)

        # Then every figure equals SQL over the ledger, and nothing moved between the two scrapes
        assert _parse(first).keys() == got.keys()
        _check_jobs(env, got)
        _check_requests(env, got)
        _check_audits_and_budgets(env, got, capped)
        assert _by(got, "cascade_queue_messages", "queue") == {(q,): n for q, n in queues.items()}
        assert _by(got, "cascade_broker_up") == {(): 1}
        # And cost per task type (jobs and audits) and cost per model are the same requests, split two ways
        per_task = sum(got["cascade_cost_usd_total"].values()) + sum(got["cascade_audit_cost_usd_total"].values())
        assert per_task == pytest.approx(sum(got["cascade_model_cost_usd_total"].values()), rel=1e-9)

        # When the database fails a statement, the scrape answers 500 with one line saying why
        with env.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE escalation_summary RENAME TO escalation_summary_away")
        status, failed = _scrape(port)
        assert status == 500 and failed.count("\n") == 1 and "escalation_summary" in failed, failed
        # And once it is back the next scrape answers the same figures
        with env.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE escalation_summary_away RENAME TO escalation_summary")
        status, again = _scrape(port)
        assert status == 200
        steady = {name: v for name, v in got.items() if name != "cascade_scrape_duration_seconds"}
        assert {name: v for name, v in _parse(again).items() if name != "cascade_scrape_duration_seconds"} == steady
    finally:
        # And SIGTERM stops it cleanly
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "stopped" in proc.stderr.read()



def _seed_jobs(env, n):
    """A batch of ``n`` queued jobs of task type ``t`` written directly (no workers): their ids."""
    with env.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO batches (id, task_type, content_hash, config, config_hash, rows, tiers, "
                             "top_input_per_mtok, top_output_per_mtok) VALUES ('b', 't', '', '{}', '', 0, 3, 1, 1)")
        return [r[0] for r in conn.exec_driver_sql(
            f"INSERT INTO jobs (batch_id, task_type, key, input) SELECT 'b', 't', i::text, '{{}}' "
            f"FROM generate_series(1, {n}) i RETURNING id")]


def _requests(collector):
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in families(collector.read()) for s in m.samples}
    answered = got.get(("cascade_model_requests_total", (("error", "none"), ("model", "m"))), 0)
    return answered, got.get(("cascade_model_requests_in_flight", (("model", "m"),)), 0), got


def test_the_watermark_never_passes_a_row_that_commits_late(env):
    # Given jobs, and a collector that has read the (empty) ledger
    job, other = _seed_jobs(env, 2)
    collector = CascadeCollector(env.engine)
    collector.warm_up()
    insert = ("INSERT INTO attempts (job_id, tier, model, sample, n, error, cost_usd) "
              "VALUES ({job}, 1, 'm', {sample}, 1, {error}, 0.5)")
    # When one transaction takes a request id and stays open while a later id commits
    late = env.engine.connect()
    late.exec_driver_sql(insert.format(job=job, sample=0, error="NULL"))
    with env.engine.begin() as conn:
        conn.exec_driver_sql(insert.format(job=other, sample=0, error="NULL"))
        conn.exec_driver_sql(insert.format(job=other, sample=1, error="'in_flight'"))
    # Then scrapes and marks taken meanwhile see the committed rows only
    for _ in range(3):
        collector.mark()
        assert _requests(collector)[:2] == (1, 1)
    # And once the late one commits, it is counted, however far the watermark could have moved meanwhile
    late.commit()
    late.close()
    for _ in range(3):
        collector.mark()
        assert _requests(collector)[:2] == (2, 1)
    assert collector._tallies["attempts"].upto >= env.scalar("SELECT max(id) FROM attempts") - 1
    # And a request folded while in flight is counted when it ends
    with env.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE attempts SET error = NULL WHERE error = 'in_flight'")
    assert _requests(collector)[:2] == (3, 0)


def test_a_verdict_of_a_retried_job_keeps_its_escalation_after_a_restart(env):
    # Given a job escalated from tier 1 to tier 2, then run again from tier 1 by a retry: its verdict and its
    # tier-2 request are history (superseded), the job is back at tier 1
    (job,) = _seed_jobs(env, 1)
    with env.engine.begin() as conn:
        conn.exec_driver_sql(f"INSERT INTO validations (job_id, tier, model, passed, reasons, superseded) "
                             f"VALUES ({job}, 1, 'm', false, '[]', true)")
        conn.exec_driver_sql(f"INSERT INTO attempts (job_id, tier, model, sample, n, superseded) "
                             f"VALUES ({job}, 2, 'm', 0, 1, true)")
    # When a collector starts (reading the ledger whole)
    collector = CascadeCollector(env.engine)
    collector.warm_up()
    got = _requests(collector)[2]
    # Then the escalation of the earlier run is counted, and the job is queued at tier 1 now
    assert got[("cascade_escalations_total", (("task_type", "t"), ("tier", "2")))] == 1
    assert got[("cascade_jobs", (("status", "queued"), ("task_type", "t")))] == 1
