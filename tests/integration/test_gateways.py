"""What real providers and gateways answer, through the sim over HTTP, the stages and Postgres.

Each test runs the stages in this process (a Recorder instead of a broker, a loop instead of a worker: the
same code a worker runs) against the sim configured to behave like a gateway: a backend that ignores or
refuses ``n``, a wrong key or an unknown model, each form of Retry-After, cached prompt tokens, refusals and
filtered answers, and request options for reasoning models.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest

from cascade.config import parse_config, render
from cascade.providers import ProviderPool
from cascade.sim import SimConfig, SimModel, SimPrice
from cascade.store import Stage
from tests.conftest import ROOT
from tests.integration import scenario
from tests.integration.audit import audit

pytestmark = pytest.mark.integration

KEY_VAR = "CASCADE_TEST_GATEWAY_KEY"


def config(sim_url: str, *, task: dict[str, Any] | None = None, **model: Any):  # Any: config overrides
    """The scenario's two task types; ``model`` overrides every model, ``task`` the label task type."""
    data = scenario.cascade_config(sim_url).model_dump(mode="json", by_alias=True)
    for m in data["models"]:
        m.update(model)
    data["task_types"][0].update(task or {})
    return parse_config(data, "gateway.yaml")


# --- n: a backend that answers one choice, or refuses n ------------------------------------------------


@pytest.mark.parametrize("n_support", ["ignored", "rejected"])
def test_a_backend_that_ignores_or_refuses_n_still_gets_k_samples(env, sim, run, caplog, n_support):
    # Given tier 1's model behind a gateway that answers one choice for n=3 (or refuses n with a 400)
    base = scenario.sim_config(61)
    sim_cfg = base.model_copy(update={"models": {**base.models, "small": base.model("small").model_copy(
        update={"n_support": n_support})}})
    server = sim(sim_cfg)
    r = run(config(server.url))
    rows = scenario.rows(40, "label")
    # When a batch of 40 rows runs (three messages of up to 16 jobs)
    batch = r.submit(rows)
    r.drive(batch)
    # Then every job ends exactly as with a model that honours n: each tier-1 job voted on 3 samples
    audit(env, r.client, batch, r.config.snapshot("label"), sim_cfg, rows)
    answered = env.rows("SELECT job_id, sum(coalesce(choices, n)) FROM attempts WHERE tier = 1 AND error IS NULL "
                        "GROUP BY job_id")
    assert {n for _, n in answered} == {3}, env.rows(
        "SELECT job_id, sample, n, choices, error, detail FROM attempts WHERE tier = 1 AND job_id IN "
        "(SELECT job_id FROM attempts WHERE tier = 1 AND error IS NULL GROUP BY job_id "
        "HAVING sum(coalesce(choices, n)) <> 3) ORDER BY job_id, id")
    assert env.scalar("SELECT count(*) FROM validations WHERE tier = 1 AND samples <> 3") == 0
    # And the model was noted once, so later messages asked one sample per request from the start
    n3 = env.scalar("SELECT count(*) FROM attempts WHERE tier = 1 AND n = 3")
    assert 0 < n3 <= 16, n3
    if n_support == "rejected":
        assert env.scalar("SELECT count(*) FROM attempts WHERE error = 'n_unsupported'") == n3
    else:
        assert env.scalar("SELECT count(*) FROM attempts WHERE n = 3 AND choices = 1") == n3
    warnings = [rec for rec in caplog.records if "sent as separate requests" in rec.getMessage()]
    assert len(warnings) == 1 and "'small'" in warnings[0].getMessage()
    # And `cascade status` says so
    assert [note.split(":")[0] for note in r.client.status(batch, notes=True).notes] == ["model 'small' ignores n"]


# --- configuration faults halt the batch -----------------------------------------------------------------


def _wait_cli(env, batch: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cascade.cli", "wait", batch, "--timeout", "20"], env=env.environ(),
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_an_unknown_model_halts_the_batch_until_it_is_fixed_and_resumed(env, sim, run):
    # Given a gateway that does not serve tier 1's model (404 model_not_found)
    base = scenario.sim_config(67)
    served = {name: m for name, m in base.models.items() if name != "small"}
    server = sim(SimConfig(seed=base.seed, models=served))
    r = run(config(server.url))
    rows = scenario.rows(20, "label")
    # When the batch runs
    batch = r.submit(rows)
    r.drive(batch)
    # Then it halted on the provider's message naming the model; nothing escalated, no tier-2 request went out
    state = r.client.status(batch)
    assert state.halted and "small" in state.halted and "404" in state.halted, state
    assert env.scalar("SELECT count(*) FROM attempts WHERE tier > 1") == 0
    assert env.scalar("SELECT count(*) FROM jobs WHERE status <> 'queued' OR tier <> 1") == 0
    assert env.scalar("SELECT count(*) FROM validations") == 0
    before = len(server.seen())
    # And `cascade wait` exits 2 naming the fault and the way out
    waited = _wait_cli(env, batch)
    assert waited.returncode == 2, waited
    assert "halted" in waited.stderr and "small" in waited.stderr and f"cascade retry {batch}" in waited.stderr
    # And while it is halted, its messages and sweeps send nothing
    r.publisher.due = [(j, 1, Stage.CALL) for (j,) in env.rows("SELECT id FROM jobs")]
    r.drive(batch)
    assert len(server.seen()) == before
    # When the gateway serves the model and the batch is resumed with `cascade retry`
    server.reconfigure(base)
    retried = subprocess.run([sys.executable, "-m", "cascade.cli", "retry", batch], env=env.environ(), cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
    assert retried.returncode == 0 and "20 queued jobs published again" in retried.stderr, retried
    # (the CLI published to the broker; this test's in-process worker takes the same jobs from Postgres)
    r.publisher.due = [(j, 1, Stage.CALL) for (j,) in env.rows("SELECT id FROM jobs WHERE published_at IS NOT NULL")]
    r.drive(batch)
    # Then it finishes as if nothing had happened
    assert r.client.status(batch).halted is None
    audit(env, r.client, batch, r.config.snapshot("label"), base, rows)


def test_a_wrong_key_halts_and_a_fixed_key_resumes(env, sim, run, monkeypatch):
    # Given a gateway that wants another key than the workers have (401 invalid_api_key)
    base = scenario.sim_config(71)
    server = sim(base.model_copy(update={"api_key": "sk-right"}))
    monkeypatch.setenv(KEY_VAR, "sk-wrong")
    cfg = config(server.url, api_key_env=KEY_VAR)
    r = run(cfg)
    rows = scenario.rows(10, "label")
    batch = r.submit(rows)
    # When the batch runs
    r.drive(batch)
    # Then it halted on the 401, with zero requests beyond tier 1
    state = r.client.status(batch)
    assert state.halted and "401" in state.halted and "sk-wrong" not in state.halted
    assert env.scalar("SELECT count(*) FROM attempts WHERE tier > 1") == 0
    # When the workers get the right key (a new process reads it) and the batch is resumed
    monkeypatch.setenv(KEY_VAR, "sk-right")
    r.ctx.providers = ProviderPool()
    r.providers = r.ctx.providers
    r.client.resume(batch)
    r.drive(batch)
    # Then it finishes as predicted
    audit(env, r.client, batch, cfg.snapshot("label"), base, rows)


def test_on_config_error_escalate_keeps_the_old_behaviour(env, sim, run):
    # Given the unknown tier-1 model and a task type that asks to escalate on configuration faults
    base = scenario.sim_config(73)
    server = sim(SimConfig(seed=base.seed, models={k: v for k, v in base.models.items() if k != "small"}))
    r = run(config(server.url, task={"on_config_error": "escalate"}))
    batch = r.submit(scenario.rows(5, "label"))
    # When it runs, then nothing halts: tier 1 fails as model_error:config and the jobs go on to tier 2
    r.drive(batch)
    assert r.client.status(batch).halted is None
    assert env.scalar("SELECT count(*) FROM validations WHERE tier = 1 AND reasons->0->>'code' = 'model_error:config'") \
        == 5


# --- Retry-After wherever it is ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["seconds", "http_date", "ms", "litellm", "openai_reset"])
def test_retry_after_is_honoured_in_every_form(env, sim, run, style):
    # Given a 429 on the first try of a row, asking for 2 s in one of the forms gateways use
    rows = scenario.rows(40, "summary")
    small = SimModel(p_429=0.5, retry_after_s=2.0, retry_after_style=style)
    sim_cfg = SimConfig(seed=79, models={"small": small, "medium": SimModel(), "large": SimModel()})
    snap = scenario.cascade_config("http://x").snapshot("summary")
    key = next(render(snap.tier(1).prompt, row) for row in rows
               if sim_cfg.fault("small", render(snap.tier(1).prompt, row), 0, 0) == "429"
               and sim_cfg.fault("small", render(snap.tier(1).prompt, row), 0, 1) is None)
    row = next(row for row in rows if render(snap.tier(1).prompt, row) == key)
    server = sim(sim_cfg)
    r = run(config(server.url), max_inline_wait_s=5.0)
    # When that row runs
    batch = r.submit([row], task="summary")
    r.drive(batch)
    # Then the retry reached the sim no sooner than asked (our own backoff would have been 0.5 s)
    first, second = [s for s in server.seen() if s.model == "small"]
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 2.0, (style, second.at - first.at)
    assert r.client.status(batch).counts == {"succeeded": 1}


# --- what a request costs and says --------------------------------------------------------------------------


def test_cached_prompt_tokens_are_priced_as_the_gateway_bills_them(env, sim, run):
    # Given a gateway that serves 80% of each prompt from its cache and reports its own cost
    price = {"input_per_mtok": "0.15", "output_per_mtok": "0.60", "cached_input_per_mtok": "0.075"}
    small = SimModel(cached_prompt_fraction=0.8, gateway_headers=True, served_model="gpt-4o-mini-2024-07-18",
                     gateway_price=SimPrice(**{k: Decimal(v) for k, v in price.items()}))
    server = sim(SimConfig(seed=83, models={"small": small}, unknown_models="default"))
    r = run(config(server.url, price=price))
    # When a batch runs
    batch = r.submit(scenario.rows(12, "summary"), task="summary")
    r.drive(batch)
    # Then each request's cost is the hand-computed one: fresh, cached and output tokens at their prices, equal
    # to the gateway's own figure, and what the gateway said is recorded for reconciliation
    rows = env.rows("SELECT input_tokens, cached_tokens, output_tokens, cost_usd, gateway_cost_usd, request_id, "
                    "served_model FROM attempts WHERE model = 'small'")
    assert rows
    for tin, cached, tout, cost, gateway, request_id, served in rows:
        assert cached == int(tin * 0.8) > 0
        expected = ((tin - cached) * Decimal("0.15") + cached * Decimal("0.075") + tout * Decimal("0.60")) / 10**6
        assert cost == expected and gateway == expected
        assert request_id and served == "gpt-4o-mini-2024-07-18"


def test_refusals_and_filtered_answers_are_failed_samples_never_votes(env, sim, run):
    # Given a model that refuses some samples (content null, a refusal text) and has others filtered
    small = SimModel(p_refusal=0.25, p_content_filter=0.25)
    sim_cfg = SimConfig(seed=89, models={"small": small}, unknown_models="default")
    server = sim(sim_cfg)
    r = run(config(server.url))
    rows = scenario.rows(20, "label")
    # When the label batch runs (3 samples at tier 1)
    batch = r.submit(rows)
    r.drive(batch)
    # Then every blocked sample is recorded with why (the refusal text kept) and counted as a failed sample
    snap = r.config.snapshot("label")
    ids = dict(env.rows("SELECT key, id FROM jobs"))
    refusals = {(job, int(i)): why for job, refusal in env.rows(
        "SELECT job_id, refusals FROM attempts WHERE tier = 1 AND refusals IS NOT NULL") for i, why in refusal.items()}
    expected = {(ids[row["id"]], s): sim_cfg.blocked("small", render(snap.tier(1).prompt, row), s)
                for row in rows for s in range(3)}
    expected = {k: v for k, v in expected.items() if v}
    assert expected and {k: w["code"] for k, w in refusals.items()} == {
        k: "refused" if v == "refusal" else "content_filter" for k, v in expected.items()}
    assert all(w["detail"] for w in refusals.values() if w["code"] == "refused")
    for job, votes, reasons in env.rows("SELECT job_id, votes, reasons FROM validations WHERE tier = 1"):
        blocked = sum(1 for s in range(3) if (job, s) in expected)
        assert votes <= 3 - blocked
        codes = {reason["code"] for reason in reasons}
        if blocked == 3:
            assert codes & {"refused", "content_filter"}
    assert env.scalar("SELECT count(*) FROM validations v WHERE tier = 1 AND reasons @> '[{\"code\": \"refused\"}]'")


def test_reasoning_models_get_no_temperature_and_max_completion_tokens(env, sim, run):
    # Given a task type with temperature: null and models that take max_completion_tokens
    server = sim(SimConfig(seed=97, unknown_models="default"))
    r = run(config(server.url, max_tokens_param="max_completion_tokens", task={"temperature": None}))
    # When a batch runs
    batch = r.submit(scenario.rows(3, "label"))
    r.drive(batch)
    # Then no request carried a temperature or max_tokens, and each carried max_completion_tokens
    seen = server.seen()
    assert seen and all("temperature" not in s.params and "max_tokens" not in s.params for s in seen)
    assert all("max_completion_tokens" in s.params for s in seen)
    assert json.loads(json.dumps(r.client.status(batch).counts)) == {"succeeded": 3}
