"""One message, several jobs: run_calls/run_validates on real Postgres and the sim over HTTP, in-process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import pytest
from sqlalchemy import text

from cascade.client import Client
from cascade.config import CascadeConfig, render
from cascade.providers import ProviderPool
from cascade.sim import SimConfig, SimModel
from cascade.stages import StageContext, run_calls, run_validates
from cascade.store import Stage, make_engine
from tests.integration import scenario
from tests.integration.audit import Recorder

pytestmark = pytest.mark.integration


@dataclass
class InProcess:
    """Jobs of one batch, and stages to run on them in this process (a Recorder instead of a broker)."""

    ctx: StageContext
    publisher: Recorder
    config: CascadeConfig
    rows: list[dict[str, Any]]
    ids: list[int]


@pytest.fixture
def in_process(env, sim):
    """Factory: submit ``n`` rows of ``task`` against a sim configured by ``sim_cfg``; providers closed after."""
    providers = ProviderPool()

    def make(sim_cfg: SimConfig, task: str, n: int) -> InProcess:
        server = sim(sim_cfg)
        publisher = Recorder()
        config = scenario.cascade_config(server.url)
        client = Client(env.settings(), engine=env.engine, config=config, publisher=publisher)
        rows = scenario.rows(n, task)
        batch = client.submit(task, rows, key_field="id").batch_id
        ids = [j for (j,) in env.rows("SELECT id FROM jobs WHERE batch_id = :b ORDER BY id", b=batch)]
        ctx = StageContext(env.engine, publisher, providers, env.settings(), sleep=lambda s: None)
        return InProcess(ctx, publisher, config, rows, ids)

    yield make
    providers.close()


def test_a_message_runs_only_its_due_jobs_and_reports_each_next_step(env, in_process):
    # Given six label jobs due at tier 1 (three samples in one request each; the sim's seed escalates
    # three of them), of which one already went on to validation
    sim_cfg = scenario.sim_config()
    run = in_process(sim_cfg, "label", 6)
    ctx, publisher, ids = run.ctx, run.publisher, run.ids
    assert run_calls(ctx, ids[:1], 1) == 1
    publisher.due.clear()

    # When one call message carries all six ids (one twice) and an id that does not exist
    moved = run_calls(ctx, [*ids, ids[2], 10**12], 1)

    # Then the five due jobs ran (one request each, all at once), the stale one was left alone
    assert moved == 5
    attempts = dict(env.rows("SELECT job_id, count(*) FROM attempts GROUP BY job_id"))
    assert attempts == dict.fromkeys(ids, 1)
    # And each moved job is due for validation, once
    assert sorted(publisher.due) == [(j, 1, Stage.VALIDATE) for j in ids[1:]]

    # When one validate message carries all six
    publisher.due.clear()
    assert run_validates(ctx, ids, 1) == 6
    assert run_validates(ctx, ids, 1) == 0  # the same message again changes nothing

    # Then each job is where the sim's seed says: done at tier 1, or due at tier 2 (and only those are published)
    snap = run.config.snapshot("label")
    expected = {j: scenario.predict(snap, sim_cfg, row) for j, row in zip(ids, run.rows, strict=True)}
    assert sorted(tier for _, tier, _ in expected.values()) == [1, 1, 1, 2, 2, 3]
    got = dict(env.rows("SELECT id, CASE WHEN status = 'queued' THEN 'tier' || tier ELSE status END FROM jobs"))
    assert got == {j: "succeeded" if tier == 1 and status == "succeeded" else ("tier2" if tier > 1 else status)
                   for j, (status, tier, _) in expected.items()}
    assert sorted(publisher.due) == sorted((j, 2, Stage.CALL) for j, (_, tier, _) in expected.items() if tier > 1)
    assert env.scalar("SELECT count(*) FROM validations") == 6


def test_a_text_answer_cut_at_max_tokens_fails_as_too_long_and_escalates(env, in_process):
    # Given a text task whose tier-1 model always stops at max_tokens (finish_reason "length", half an answer
    # that still passes the length limits) and a tier-2 model that answers in full
    base = scenario.sim_config()
    sim_cfg = base.model_copy(update={"models": {**base.models, "small": SimModel(p_truncated=1.0)}})
    run = in_process(sim_cfg, "summary", 3)
    ctx, ids = run.ctx, run.ids

    # When tier 1 runs and is validated, then tier 2
    assert run_calls(ctx, ids, 1) == 3 and run_validates(ctx, ids, 1) == 3
    assert run_calls(ctx, ids, 2) == 3 and run_validates(ctx, ids, 2) == 3

    # Then every tier-1 answer is recorded as cut, long enough to have passed on its own, and failed as too_long
    tier1 = env.rows("SELECT truncated, response->>0 AS text FROM attempts WHERE tier = 1 ORDER BY job_id")
    assert [r.truncated for r in tier1] == [[0]] * 3
    assert all(len(r.text) >= 3 for r in tier1)  # the task's min_chars
    reasons = env.rows("SELECT reasons FROM validations WHERE tier = 1 ORDER BY job_id")
    assert [[r["code"] for r in row.reasons] for row in reasons] == [["too_long"]] * 3
    # And tier 2's full answers (finish_reason "stop", truncated NULL) succeeded
    assert env.scalar("SELECT count(*) FROM attempts WHERE tier = 2 AND truncated IS NULL") == 3
    assert [s for (s,) in env.rows("SELECT status FROM jobs ORDER BY id")] == ["succeeded"] * 3


def test_a_database_error_in_one_request_keeps_every_other_answer(env, in_process):
    # Given twelve label jobs whose tier-1 model answers 500 to about half of the first requests, and a worker
    # whose Postgres connections are all cut the moment the first retry backs off (a real database error in
    # the middle of one request's retries, while the other requests' answers are already back)
    base = scenario.sim_config()
    sim_cfg = base.model_copy(update={"models": {**base.models, "small": SimModel(p_500=0.5)}})
    run = in_process(sim_cfg, "label", 12)
    engine = make_engine(env.services.database_url, schema=env.schema, pre_ping=False)
    admin = make_engine(env.services.database_url)
    cut: list[int] = []
    first = threading.Lock()

    def sleep_and_cut(_: float) -> None:
        if not first.acquire(blocking=False):
            return  # the other retries back off as usual
        for _try in range(40):  # the worker's idle connections, once they show in pg_stat_activity
            with admin.begin() as conn:
                cut.append(len(conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE (application_name = :app OR application_name LIKE :app || ':worker:%') "
                    "AND pid <> pg_backend_pid()"), {"app": f"cascade:{env.schema}"}).all()))
            if cut[-1]:
                return
            time.sleep(0.05)

    ctx = replace(run.ctx, engine=engine, sleep=sleep_and_cut)
    snap = run.config.snapshot("label")
    first_try = {j for j, row in zip(run.ids, run.rows, strict=True)
                 if sim_cfg.fault("small", render(snap.tier(1).prompt, row), 0, 0) is None}
    assert 0 < len(first_try) < len(run.ids)

    # When one call message carries all twelve
    run.publisher.due.clear()
    try:
        run_calls(ctx, run.ids, 1)
    finally:
        engine.dispose()
        admin.dispose()

    # Then the cut happened, and every answer that came back on the first try is recorded as the answer
    assert cut and cut[-1] > 0
    answered = {j for (j,) in env.rows("SELECT job_id FROM attempts WHERE error IS NULL")}
    assert first_try <= answered
    # And no job is left running: each went on to validation, or back to its call stage: at once when its
    # request hit the cut (sent again), later when its retries ran past the inline wait (deferred)
    states = dict(env.rows("SELECT id, status || ':' || stage || CASE WHEN not_before IS NULL THEN '' "
                           "ELSE ' deferred' END FROM jobs"))
    assert set(states.values()) <= {"queued:validate", "queued:call", "queued:call deferred"}
    assert {j for j, s in states.items() if s != "queued:validate"}.isdisjoint(first_try)
    assert "queued:call" in states.values(), "the request whose retry hit the cut is sent again"
    assert sorted(run.publisher.due) == sorted((j, 1, Stage.CALL if s == "queued:call" else Stage.VALIDATE)
                                               for j, s in states.items() if not s.endswith("deferred"))
