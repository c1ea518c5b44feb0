"""Batch control end to end: `cascade batches`, `cascade cancel` under load, `cascade retry --failed`."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
import yaml

from cascade.sim import SimConfig, SimModel
from tests.conftest import wait_for
from tests.integration import scenario
from tests.integration.audit import client as make_client
from tests.integration.test_cli import _cli

pytestmark = pytest.mark.integration


def _config_path(tmp_path, sim_url):
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(scenario.cascade_config(sim_url).model_dump(mode="json", by_alias=True)))
    return path


def _counts(env, batch):
    return dict(env.rows("SELECT status, count(*) FROM jobs WHERE batch_id = :b GROUP BY 1", b=batch))


@pytest.mark.slow
def test_cancel_under_load_stops_every_request(env, sim, workers, sweeper, tmp_path):
    # Given 1,000 jobs on a 300 ms model, 64 worker slots and a sweeper
    slow = SimModel(latency_ms=300)
    server = sim(SimConfig(seed=9, models={"small": slow, "medium": slow, "large": slow}))
    client = make_client(env, server.url)
    path = _config_path(tmp_path, server.url)
    workers(concurrency=64)
    sweeper(stalled_after=3)
    batch = client.submit("label", scenario.rows(1000, "label"), key_field="id").batch_id
    wait_for(lambda: env.scalar("SELECT count(*) FROM attempts WHERE error = 'in_flight'") > 20, 30,
             "requests in flight")

    # When it is cancelled mid-flight
    cancelled_at = time.monotonic()
    done = _cli(env, path, "cancel", batch[:10], "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["batch_id"] == batch and report["cancelled"] > 0

    # Then `cascade wait` returns, exit 1, naming the cancelled jobs; nothing is left queued or running
    waited = _cli(env, path, "wait", batch, "--timeout", "60")
    assert waited.returncode == 1, waited.stderr
    assert "cancelled" in waited.stderr
    counts = _counts(env, batch)
    assert counts.get("queued", 0) == counts.get("running", 0) == 0
    assert counts["cancelled"] >= report["cancelled"] and sum(counts.values()) == 1000
    assert env.scalar("SELECT count(*) FROM attempts WHERE error = 'in_flight'") == 0
    # And the sim sees no request 10 s after the cancel (checked 12 s after it)
    time.sleep(max(0.0, cancelled_at + 12 - time.monotonic()))
    assert max(r.at for r in server.seen()) < cancelled_at + 10
    # And no message of it is left doing work: every cancelled job has its error, and its finish time
    assert env.scalar("SELECT count(*) FROM jobs WHERE status = 'cancelled' AND (error <> 'cancelled' "
                      "OR finished_at IS NULL)") == 0

    # And `cascade batches` shows it cancelled with the counts of the jobs table
    listed = _cli(env, path, "batches", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert (row["id"], row["state"], row["rows"], row["open"]) == (batch, "cancelled", 1000, 0)
    assert (row["succeeded"], row["failed"], row["cancelled"]) == (
        counts.get("succeeded", 0), counts.get("failed", 0), counts["cancelled"])
    assert Decimal(row["cost_usd"]) == env.scalar("SELECT sum(cost_usd) FROM jobs")


def test_retry_runs_the_rows_a_budget_cut_off_in_the_same_jobs(env, sim, workers, tmp_path):
    # Given a batch whose cap cut some rows off (budget_exhausted)
    server = sim(scenario.sim_config(seed=12))
    client = make_client(env, server.url)
    path = _config_path(tmp_path, server.url)
    workers(concurrency=32)
    rows = scenario.rows(40, "label")
    batch = client.submit("label", rows, key_field="id", max_cost=Decimal("0.0012")).batch_id
    assert client.wait(batch, timeout=60, poll_s=0.1).is_done
    cut = {r["key"] for r in client.results(batch) if r["status"] == "failed"}
    assert cut and env.scalar("SELECT count(*) FROM jobs WHERE error = 'budget_exhausted'") == len(cut)
    jobs_before = env.rows("SELECT id, key FROM jobs WHERE batch_id = :b ORDER BY id", b=batch)
    paid_before = env.scalar("SELECT sum(cost_usd) FROM attempts")

    # When its failed rows are run again with room to spend
    retried = _cli(env, path, "retry", batch, "--failed", "--max-cost", "1")
    assert retried.returncode == 0, retried.stderr
    assert f"{len(cut)} failed jobs run again from tier 1" in retried.stderr
    assert client.wait(batch, timeout=60, poll_s=0.1).is_done

    # Then every row of the batch succeeded or failed on its merits (none for the budget), in the same job rows
    after = {r["key"]: r for r in client.results(batch)}
    assert env.rows("SELECT id, key FROM jobs WHERE batch_id = :b ORDER BY id", b=batch) == jobs_before
    assert env.scalar("SELECT count(*) FROM jobs WHERE error = 'budget_exhausted'") == 0
    snap = client.config.snapshot("label")
    for row in rows:
        if row["id"] in cut:
            status, tier, _ = scenario.predict(snap, scenario.sim_config(seed=12), row)
            assert (after[row["id"]]["status"], after[row["id"]]["tier"]) == (status, tier), row
    # And the first run is history: its requests and verdicts are kept as superseded, and still cost
    assert env.scalar("SELECT count(*) FROM validations WHERE superseded") >= len(cut)
    assert env.scalar("SELECT count(*) FROM jobs j WHERE (SELECT count(*) FROM validations v WHERE v.job_id = j.id "
                      "AND NOT v.superseded) <> j.tier") == 0
    assert env.scalar("SELECT sum(cost_usd) FROM attempts") > paid_before
    assert env.scalar("SELECT count(*) FROM jobs j WHERE cost_usd <> (SELECT coalesce(sum(cost_usd), 0) "
                      "FROM attempts WHERE job_id = j.id AND NOT audit)") == 0
    # And the batch's spend stayed within its raised cap: what it had spent, plus 1 USD
    spent, reserved, cap = env.rows("SELECT spent_usd, reserved_usd, max_cost_usd FROM batches")[0]
    assert reserved == 0 and spent <= cap <= paid_before + 1
    assert spent == env.scalar("SELECT sum(cost_usd) FROM attempts")


def test_a_retry_without_failed_rows_and_bad_flags(env, sim, workers, tmp_path):
    server = sim(scenario.sim_config(seed=3))
    client = make_client(env, server.url)
    path = _config_path(tmp_path, server.url)
    batch = client.submit("summary", scenario.rows(3, "summary"), key_field="id").batch_id
    # --max-cost without --failed is refused
    bad = _cli(env, path, "retry", batch, "--max-cost", "1")
    assert bad.returncode == 2 and "--failed" in bad.stderr
    # an unknown batch is exit 2 naming it
    unknown = _cli(env, path, "cancel", "nosuchbatch")
    assert unknown.returncode == 2 and "nosuchbatch" in unknown.stderr
    # a cancelled batch, retried with --cancelled, runs its rows after all
    assert _cli(env, path, "cancel", batch).returncode == 0
    assert _counts(env, batch) == {"cancelled": 3}
    workers(concurrency=8)
    again = _cli(env, path, "retry", batch, "--failed", "--cancelled")
    assert again.returncode == 0, again.stderr
    state = client.wait(batch, timeout=60, poll_s=0.1)
    assert state.is_done and not state.cancelled and "cancelled" not in state.counts
