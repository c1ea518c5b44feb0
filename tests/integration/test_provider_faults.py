"""Provider faults end to end: the sim fails on purpose, a real worker retries, defers or escalates.

Every fault kind gets its own tier-1 model and task type, so one worker process and one sim run them
all at once; a sweeper thread re-publishes the jobs that waited in Postgres (``not_before``). The
expected result of every row, every request it made (its attempts rows, in order) and every
escalation reason is derived from the sim's seeded draws and the retry policy, then audited.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from cascade.client import Client
from cascade.config import CascadeConfig, Length, ResolvedTier, TaskSnapshot, parse_config, render
from cascade.policy import RequestAction, after_request_error
from cascade.providers import ProviderPool
from cascade.publish import CeleryPublisher
from cascade.sim import SimConfig, SimModel
from cascade.stages import StageContext, judge, run_call, run_validate
from cascade.sweeper import sweep
from tests.integration import scenario
from tests.integration.audit import Recorder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: What a request fault looks like in attempts.error; the other faults answer (with bad content).
ERROR_KINDS = {"429": "rate_limited", "500": "unavailable", "timeout": "timeout", "drop": "connection",
               "empty_body": "bad_response", "non_json_body": "bad_response"}
HUGE_CHARS = 5 * 1024 * 1024
MAX_INLINE_WAIT_S = 1.0  # CASCADE_MAX_INLINE_WAIT_S in the tests' environment
#: id → (tier-1 sim model's faults, rows, model settings). Each is a task type whose tier 1 is model "f-<id>",
#: retried twice. Only models that time out on purpose get a short timeout_s: a normal answer slowed down
#: by a busy test machine must not time out.
FAULTS: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = {
    "http-5xx": ({"p_500": 1.0}, 8, {}),
    "http-5xx-half": ({"p_500": 0.5}, 12, {}),
    "read-timeout": ({"p_timeout": 1.0, "hang_s": 3}, 6, {"timeout_s": 1}),
    "connection-drop": ({"p_drop": 1.0}, 8, {}),
    "empty-body": ({"p_empty_body": 1.0}, 8, {}),
    "non-json-body": ({"p_non_json_body": 1.0}, 8, {}),
    "garbage": ({"p_garbage": 1.0}, 8, {}),
    "truncated": ({"p_truncated": 1.0}, 8, {}),
    "huge": ({"p_huge": 1.0}, 4, {}),
    "429-no-retry-after": ({"p_429": 0.5, "retry_after_s": None}, 12, {}),
    "429-retry-after": ({"p_429": 0.4, "retry_after_s": 2}, 12, {}),
    "mixed": ({"p_429": 0.08, "retry_after_s": 0.5, "p_500": 0.08, "p_timeout": 0.04, "hang_s": 8, "p_drop": 0.08,
               "p_empty_body": 0.08, "p_non_json_body": 0.08, "p_garbage": 0.08, "p_truncated": 0.08,
               "p_huge": 0.02}, 16, {"timeout_s": 4}),
}
#: A task type with one tier that is always down: its jobs fail, and jobs.error says why.
DOWN = "all-down"


def fault_config(sim_url: str) -> CascadeConfig:
    def model(name: str, price: str, **extra: Any) -> dict[str, Any]:
        i, o = scenario.PRICES[price]
        return {"name": name, "base_url": sim_url, "model": f"sim-{name}", "timeout_s": 10, "max_retries": 2,
                "price": {"input_per_mtok": str(i), "output_per_mtok": str(o)}, **extra}

    models = [model(name, name) for name in scenario.PRICES]
    models += [model(f"f-{fid}", "small", **extra) for fid, (_, _, extra) in FAULTS.items()]
    models.append(model(f"f-{DOWN}", "small"))
    label = {"system": "You label support tickets. Answer with JSON only.", "prompt": "Ticket {id}: {text}",
             "output": "json", "schema": scenario.LABEL_SCHEMA,
             "self_consistency": {"samples": 3, "min_agreement": 0.6, "fields": ["label"]}}
    tasks = [{"name": fid, **label, "tiers": [f"f-{fid}", "medium", {"model": "large", "samples": 1}]}
             for fid in FAULTS]
    tasks.append({"name": DOWN, **label, "tiers": [f"f-{DOWN}"]})
    return parse_config({"models": models, "task_types": tasks}, "faults.yaml")


def fault_sim(seed: int = 4) -> SimConfig:
    base = scenario.sim_config(seed)
    quality = base.model("small").model_dump()
    models = {f"f-{fid}": SimModel(**{**quality, **faults}) for fid, (faults, _, _) in FAULTS.items()}
    models[f"f-{DOWN}"] = SimModel(**{**quality, "p_500": 1.0})
    return base.model_copy(update={"models": {**base.models, **models}})


# --- what the sim's seed predicts --------------------------------------------------------------------


@dataclass
class Expected:
    status: str = "failed"
    tier: int = 0
    output: Any = None
    errors: dict[int, list[str | None]] = field(default_factory=dict)  # tier → attempts.error, in order
    reasons: dict[int, list[str]] = field(default_factory=dict)  # tier → failed validation's reason codes
    deferrals: int = 0  # waits handed to Postgres (the sweeper re-publishes each once)


def _contents(sim: SimConfig, name: str, key: str, n: int, fmt: dict[str, Any] | None, fault: str | None) -> list[str]:
    """What an answered request carries, as the sim builds it."""
    if fault == "huge":
        return ["x" * HUGE_CHARS] * n
    if fault == "garbage":
        return ["0f3a ~#%9b1c ~#%"] * n  # hex and symbols: never JSON
    contents = [sim.content(name, key, i, fmt) for i in range(n)]
    return [c[: len(c) // 2] for c in contents] if fault == "truncated" else contents


def _request_errors(sim: SimConfig, tier: ResolvedTier, key: str, exp: Expected) -> tuple[list[str | None], str | None]:
    """The sim's fault on each identical request (its attempt counter) until one answers or the policy gives up.

    Returns the attempts' error column and the fault of the answer (None: a normal answer), or the
    kind given up on in place of the fault when no request answered."""
    errors: list[str | None] = []
    failures: Counter[bool] = Counter()
    model = sim.model(tier.model.name)
    for attempt in range(100):
        fault = sim.fault(tier.model.name, key, 0, attempt)
        kind = ERROR_KINDS.get(fault or "")
        if kind is None:
            return [*errors, None], fault
        errors.append(kind)
        failures[kind == "rate_limited"] += 1
        step = after_request_error(
            kind, retryable=True, attempt=failures[kind == "rate_limited"], max_retries=tier.model.max_retries,
            retry_after_s=model.retry_after_s if kind == "rate_limited" else None, max_inline_wait_s=MAX_INLINE_WAIT_S)
        if step.action is RequestAction.GIVE_UP:
            return errors, "model_error:" + kind
        exp.deferrals += step.action is RequestAction.DEFER
    raise AssertionError("the sim never answers")


def predict(snap: TaskSnapshot, sim: SimConfig, row: dict[str, Any]) -> Expected:
    task = snap.task_type
    fmt = {"type": "json_schema", "json_schema": {"name": task.name, "schema": task.schema_}}
    exp = Expected()
    for index in range(1, snap.tier_count + 1):
        tier = snap.tier(index)
        key = render(tier.prompt, row)
        exp.tier = index
        exp.errors[index], fault = _request_errors(sim, tier, key, exp)
        if fault and fault.startswith("model_error:"):
            exp.reasons[index] = [fault]
            continue
        verdict = judge(snap, index, dict(enumerate(_contents(sim, tier.model.name, key, tier.samples, fmt, fault))))
        if verdict.passed:
            exp.status, exp.output = "succeeded", verdict.result
            return exp
        exp.reasons[index] = [r.code for r in verdict.reasons]
    return exp


# --- running it ---------------------------------------------------------------------------------------


@contextmanager
def sweeping(env: Any, every_s: float = 0.25) -> Iterator[Counter[str]]:
    """Run ``cascade.sweeper.sweep`` in a loop thread (as `cascade sweep --every` would); yields its totals."""
    settings = env.settings()
    publisher = CeleryPublisher.connect(settings, settings.broker_url)
    totals: Counter[str] = Counter()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            report = sweep(env.engine, publisher, stalled_after_s=60)
            totals.update(expired=report.expired, due=report.due, stalled=report.stalled)

    thread = threading.Thread(target=loop, name="sweeper", daemon=True)
    thread.start()
    try:
        yield totals
    finally:
        stop.set()
        thread.join(10)
        publisher.close()


def _rows(task: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{task}-{i}", "text": f"row {i} of {task}: printer on floor {i % 7} is jammed"} for i in range(n)]


def _attempts(env: Any, batch_id: str) -> dict[tuple[str, int], list[Any]]:
    rows = env.rows("""SELECT j.key, a.tier, a.error, a.latency_ms, a.input_tokens, a.output_tokens, a.cost_usd,
                              a.detail, a.model
                       FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE j.batch_id = :b ORDER BY a.id""",
                    b=batch_id)
    out: dict[tuple[str, int], list[Any]] = {}
    for row in rows:
        out.setdefault((row.key, row.tier), []).append(row)
    return out


def _reasons(env: Any, batch_id: str) -> dict[tuple[str, int], list[str]]:
    rows = env.rows("""SELECT j.key, v.tier, v.reasons FROM validations v JOIN jobs j ON j.id = v.job_id
                       WHERE j.batch_id = :b AND NOT v.passed""", b=batch_id)
    return {(r.key, r.tier): [x["code"] for x in r.reasons] for r in rows}


def audit(env: Any, client: Client, batch_id: str, snap: TaskSnapshot, expected: dict[str, Expected]) -> None:
    """Each row: one terminal job equal to the prediction; its requests and reasons as predicted; costs add up."""
    jobs = {r["key"]: r for r in client.results(batch_id)}
    attempts, reasons = _attempts(env, batch_id), _reasons(env, batch_id)
    assert sorted(jobs) == sorted(expected)
    for key, exp in expected.items():
        job = jobs[key]
        assert (job["status"], job["tier"], job["output"]) == (exp.status, exp.tier, exp.output), key
        mine = {t: rows for (k, t), rows in attempts.items() if k == key}
        assert {t: [a.error for a in rows] for t, rows in mine.items()} == exp.errors, (key, mine)
        assert {t: codes for (k, t), codes in reasons.items() if k == key} == exp.reasons, key
        if exp.status == "failed":
            assert job["error"].startswith(exp.reasons[exp.tier][0]), key
    for rows in attempts.values():
        for a in rows:
            assert a.latency_ms is not None and a.latency_ms >= 0
            if a.error is not None:  # no usage came back: no tokens, no cost
                assert (a.input_tokens, a.output_tokens, a.cost_usd) == (0, 0, 0)
            else:
                i, o = scenario.PRICES["small" if a.model.startswith("f-") else a.model]
                assert a.cost_usd == (a.input_tokens * i + a.output_tokens * o) / Decimal(1_000_000) > 0
    assert env.scalar("""SELECT count(*) FROM jobs j WHERE batch_id = :b AND
        (SELECT count(*) FROM validations v WHERE v.job_id = j.id) <> j.tier""", b=batch_id) == 0
    assert env.scalar("""SELECT count(*) FROM (SELECT 1 FROM attempts a JOIN jobs j ON j.id = a.job_id
        WHERE j.batch_id = :b AND a.error IS NULL GROUP BY a.job_id, a.tier, a.sample HAVING count(*) > 1) d""",
                      b=batch_id) == 0
    assert env.scalar("""SELECT count(*) FROM jobs j WHERE batch_id = :b AND cost_usd <>
        (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = j.id)""", b=batch_id) == 0
    # And escalation_reasons counts exactly the predicted reasons of this task type
    view = {(r.tier, r.reason): r.count for r in
            env.rows("SELECT tier, reason, count FROM escalation_reasons WHERE task_type = :t", t=snap.task_type.name)}
    assert view == Counter((t, code) for exp in expected.values() for t, codes in exp.reasons.items()
                           for code in codes)


def test_provider_faults_end_as_the_policy_says(env, sim, workers, subtests):
    # Given a sim whose tier-1 models each fail one way, and a worker and a sweeper on the real services (the
    # circuit breaker left out: this is each request's retry policy; test_failover.py covers the breaker)
    sim_cfg = fault_sim()
    server = sim(sim_cfg)
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=fault_config(server.url),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    worker = workers(concurrency=64, CASCADE_BREAKER_FAILURES="1000000")
    batches = {fid: _rows(fid, n) for fid, (_, n, _) in FAULTS.items()} | {DOWN: _rows(DOWN, 6)}
    expected = {fid: {r["id"]: predict(client.config.snapshot(fid), sim_cfg, r) for r in rows}
                for fid, rows in batches.items()}
    # When a batch per fault is submitted and run
    with sweeping(env) as swept:
        ids = {fid: client.submit(fid, rows, key_field="id").batch_id for fid, rows in batches.items()}
        for fid, batch_id in ids.items():
            assert client.wait(batch_id, timeout=60, poll_s=0.2).is_done, fid
    # Then each batch ends as predicted, request by request
    for fid, batch_id in ids.items():
        with subtests.test(fault=fid):
            audit(env, client, batch_id, client.config.snapshot(fid), expected[fid])
    # And every long wait went through Postgres: the sweeper re-published each deferred job once
    assert swept["due"] == sum(e.deferrals for exp in expected.values() for e in exp.values())
    assert swept["due"] > 0
    assert swept["expired"] == 0
    # And stored answers are capped: a 5 MB answer is kept as max_chars + 1 characters and fails as too_long
    longest = env.scalar("SELECT max(length(c)) FROM attempts, jsonb_array_elements_text(response) c")
    assert longest == Length().max_chars + 1
    assert env.scalar("SELECT count(*) FROM attempts WHERE detail LIKE :d", d=f"%{HUGE_CHARS} chars, stored%") > 0
    # And the worker is alive, with no unhandled task failure in its log
    assert worker.proc.poll() is None
    log = worker.log.read_text(errors="replace")
    assert "Traceback" not in log and "CRITICAL" not in log, log[-3000:]
    client.close()


def test_hostile_bytes_are_stored_not_fatal(env):
    # Given a model that first fails with NUL and invalid UTF-8 in its error body, then answers with a
    # NUL character and a lone surrogate (raw, and as JSON escapes inside the answer), which Postgres refuses
    answer = '{"label": "a\\u0000\\ud800b", "confidence": 1}'
    bodies = iter([httpx.Response(500, content=b"oops \x00 \xff"), httpx.Response(200, content=json.dumps({
        "choices": [{"index": i, "message": {"content": c}} for i, c in enumerate([answer, answer, "raw\x00\ud800"])],
        "usage": {"prompt_tokens": 10, "completion_tokens": 30}}).encode())])
    providers = ProviderPool(transport=httpx.MockTransport(lambda request: next(bodies)))
    config = fault_config("http://mock.test/v1")
    publisher = Recorder()
    client = Client(env.settings(), engine=env.engine, config=config, publisher=publisher)
    batch = client.submit(DOWN, [{"id": "x", "text": "hostile"}], key_field="id").batch_id
    ctx = StageContext(env.engine, publisher, providers, env.settings(), sleep=lambda s: None)
    job_id = env.scalar("SELECT id FROM jobs WHERE batch_id = :b", b=batch)
    # When its call and validate stages run
    assert run_call(ctx, job_id, 1)
    assert run_validate(ctx, job_id, 1)
    # Then the failed request and the answer are recorded, and the majority answer is stored, made safe
    job = next(client.results(batch))
    assert (job["status"], job["output"]) == ("succeeded", {"label": "a\ufffd?b", "confidence": 1})
    rows = env.rows("SELECT error, detail, response FROM attempts WHERE job_id = :j ORDER BY id", j=job_id)
    assert [r.error for r in rows] == ["unavailable", None]
    assert "oops \ufffd \ufffd" in rows[0].detail
    assert rows[1].response[2] == "raw\ufffd?"
    providers.close()
