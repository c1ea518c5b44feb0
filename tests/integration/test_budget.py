"""Budgets: a capped batch's spend never exceeds its cap, with any number of workers; at the cap work stops."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from cascade.client import Client
from cascade.config import parse_config
from cascade.errors import ConfigError
from cascade.publish import CeleryPublisher
from tests.integration import scenario
from tests.integration.audit import audit, cost_equals_tokens_times_price
from tests.integration.audit import client as make_client
from tests.integration.test_cli import _cli, _config_file

pytestmark = pytest.mark.integration


def _open(env, batch):
    return env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status IN ('queued', 'running')", b=batch)


def _paid(env, batch):
    return env.scalar("SELECT coalesce(sum(a.cost_usd), 0) FROM attempts a JOIN jobs j ON j.id = a.job_id "
                      "WHERE j.batch_id = :b", b=batch)


@pytest.mark.slow
def test_the_cap_holds_across_two_workers_and_the_rest_ends_budget_exhausted(env, sim, workers):
    # Given 1,000 jobs, two worker processes, and a cap of about half of what the batch would cost; answers
    # are short, so max_tokens 40 keeps each request's cost bound (what it reserves) near its real cost
    server = sim(scenario.sim_config(seed=14))
    data = scenario.cascade_config(server.url).model_dump(mode="json", by_alias=True)
    next(t for t in data["task_types"] if t["name"] == "summary")["max_tokens"] = 40
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=parse_config(data, "test.yaml"),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    workers(concurrency=32)
    workers(concurrency=32)
    cap = Decimal("0.005")
    batch = client.submit("summary", scenario.rows(1000, "summary"), key_field="id", max_cost=cap).batch_id
    # When it runs to the end
    state = client.wait(batch, timeout=240, poll_s=0.2)
    # Then nothing is left open, the spend is within the cap exactly, and the ledger agrees with the requests
    assert state.is_done and _open(env, batch) == 0, state
    paid = _paid(env, batch)
    spent, reserved = env.rows("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b", b=batch)[0]
    assert paid <= cap and (spent, reserved) == (paid, 0), (paid, spent, reserved)
    # And the jobs that could not afford their next request failed as budget_exhausted, with a validation saying so
    exhausted = env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND error = 'budget_exhausted'", b=batch)
    succeeded = state.counts.get("succeeded", 0)
    assert exhausted > 100 and succeeded > 100, state
    assert env.scalar("""SELECT count(*) FROM validations v JOIN jobs j ON j.id = v.job_id,
                         jsonb_array_elements(v.reasons) r
                         WHERE j.batch_id = :b AND r ->> 'code' = 'budget_exhausted'""", b=batch) == exhausted
    # And what is left is less than a few more requests could cost
    assert cap - paid < Decimal("0.0005")
    # And status shows the budget
    status = client.status(batch, notes=True)
    assert status.budget == (cap, paid, 0)


def test_a_cap_above_the_cost_changes_nothing(env, sim, workers):
    # Given a cap far above what the batch costs
    sim_cfg = scenario.sim_config(seed=15)
    client = make_client(env, sim(sim_cfg).url)
    workers(concurrency=16)
    rows = scenario.rows(60, "label")
    batch = client.submit("label", rows, key_field="id", max_cost=100).batch_id
    # When it runs
    assert client.wait(batch, timeout=90, poll_s=0.1).is_done
    # Then every job ends as the sim predicts (as without a cap), and the ledger holds
    audit(env, client, batch, client.config.snapshot("label", max_cost_usd=Decimal(100)), sim_cfg, rows)
    cost_equals_tokens_times_price(env)
    assert env.scalar("SELECT count(*) FROM jobs WHERE error = 'budget_exhausted'") == 0


def test_accept_last_keeps_an_earlier_valid_answer_at_the_cap(env, sim, workers):
    # Given a task that accepts its last answer, whose tier 1 always fails the vote, and a cap too small for tier 2
    data = scenario.cascade_config("http://x").model_dump(mode="json", by_alias=True)
    server = sim(scenario.sim_config(seed=16).model_copy(update={"models": {
        **scenario.sim_config(seed=16).models,
        "small": scenario.sim_config(seed=16).model("small").model_copy(update={"p_correct": 0.0})}}))
    for m in data["models"]:
        m["base_url"] = server.url
    label = next(t for t in data["task_types"] if t["name"] == "label")
    label["on_exhausted"] = "accept_last"
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=parse_config(data, "test.yaml"),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    workers(concurrency=16)
    # tier 1 (3 samples, small prices) fits; tier 2's bound (3 × 512 tokens at medium prices) does not
    batch = client.submit("label", scenario.rows(5, "label"), key_field="id", max_cost=Decimal("0.006")).batch_id
    assert client.wait(batch, timeout=60, poll_s=0.1).is_done
    # Then the jobs whose tier-1 samples were valid keep their tier-1 majority answer; none is left open
    results = list(client.results(batch))
    assert _open(env, batch) == 0
    kept = [r for r in results if r["status"] == "succeeded"]
    assert kept and all(r["tier"] == 2 and r["output"] is not None for r in kept), results
    assert env.scalar("SELECT count(*) FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b "
                      "AND a.tier = 2", b=batch) == 0


def test_the_cli_cap(env, sim, workers, tmp_path):
    # Given a config file
    config = _config_file(tmp_path, sim(scenario.sim_config(3)).url)
    rows = "".join(json.dumps(r) + "\n" for r in scenario.rows(4, "summary"))
    # When --max-cost is not a positive number: exit 2 naming the flag, nothing submitted
    for bad in ("0", "-1", "abc", "nan"):
        proc = _cli(env, config, "submit", "summary", "-", "--max-cost", bad, stdin=rows)
        assert proc.returncode == 2 and "--max-cost" in proc.stderr, (bad, proc.stderr)
    assert env.scalar("SELECT count(*) FROM batches") == 0
    # When a capped batch runs, status shows what is spent, reserved and left
    workers(concurrency=8)
    batch = _cli(env, config, "submit", "summary", "-", "--key-field", "id", "--max-cost", "2.5", stdin=rows).stdout
    assert _cli(env, config, "wait", batch.strip(), "--timeout", "60").returncode == 0
    shown = _cli(env, config, "status", batch.strip()).stdout
    assert "reserved" in shown and "left of $2.50" in shown, shown
    status = json.loads(_cli(env, config, "status", batch.strip(), "--json").stdout)
    assert Decimal(status["budget"]["cap_usd"]) == Decimal("2.5") and Decimal(status["budget"]["reserved_usd"]) == 0


def test_a_daily_budget_holds_across_two_batches(env, sim, workers):
    # Given a task type with a daily budget, short answers (max_tokens 40), and two worker processes
    server = sim(scenario.sim_config(seed=17))
    data = scenario.cascade_config(server.url).model_dump(mode="json", by_alias=True)
    summary = next(t for t in data["task_types"] if t["name"] == "summary")
    summary.update(max_tokens=40, budget={"per_day_usd": "0.004"})
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=parse_config(data, "test.yaml"),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    workers(concurrency=32)
    workers(concurrency=32)
    # When a first batch spends part of the day's budget, and a second one more than what is left
    first = client.submit("summary", scenario.rows(120, "summary"), key_field="id").batch_id
    assert client.wait(first, timeout=120, poll_s=0.1).is_done
    rows = [dict(r, id=f"b-{r['id']}", text=r["text"] + " (second batch)") for r in scenario.rows(400, "summary")]
    second = client.submit("summary", rows, key_field="id").batch_id
    assert client.wait(second, timeout=180, poll_s=0.1).is_done
    # Then the first ran untouched, the second stopped at the budget, and together they spent no more than it
    assert _paid(env, first) < Decimal("0.004")
    assert env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND error = 'budget_exhausted'", b=first) == 0
    assert env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND error = 'budget_exhausted'", b=second) > 0
    total = _paid(env, first) + _paid(env, second)
    assert total <= Decimal("0.004") and _open(env, first) == _open(env, second) == 0
    # And the day's ledger is the requests' costs, nothing left reserved
    spent, reserved = env.rows("SELECT sum(spent_usd), sum(reserved_usd) FROM task_budgets WHERE task_type = 'summary'")[0]
    assert (spent, reserved) == (total, 0)
    # And a batch's status shows its task type's daily budget as it stands
    assert client.status(second, notes=True).daily == (Decimal("0.004"), total, 0)
    assert client.status(second).daily is None  # read with the notes only


def test_a_daily_budget_must_be_above_zero():
    data = scenario.cascade_config("http://x").model_dump(mode="json", by_alias=True)
    data["task_types"][1]["budget"] = {"per_day_usd": 0}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "cascade.yaml")
    assert "task_types[1].budget.per_day_usd" in str(info.value)
