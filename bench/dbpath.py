"""Postgres work of one job (call stage, then a passing validation), as the stages do it now and as proposed,
run serially in this process on the same jobs: milliseconds and round trips per job (libpq trace).

``current`` calls the store functions the stages call, in the stages' transactions (2 for the call stage,
1 for validation), on an engine with pool_pre_ping as ``store.make_engine`` builds it. The proposals run the
statements below (the SQL proposed for cascade/store.py) without pre-ping:

- ``same transactions``: claim + interrupted + answered + failures in one statement and all attempt rows in
  one INSERT (BEGIN … COMMIT as now); ending the attempts and moving the job in one statement (its own
  transaction, as now); claim + answers in one statement, validation + move in one (BEGIN … COMMIT as now).
  9 round trips, 3 commits — the same transactions and guarantees as today.
- ``autocommit``: the same five statements, each its own transaction (no BEGIN/COMMIT round trips). 5 round
  trips, 5 commits; a crash between a claim and its next statement leaves the job to the lease (sweeper).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, text

from bench.harness import Scratch
from bench.inprocess import read_dir, traced_engine
from bench.workload import ListPublisher, submit
from cascade import stages, store
from cascade.store import JobStatus, Stage

__all__ = ["PathRun", "compare"]

CLAIM_CALL = text("""
WITH claimed AS (
    UPDATE jobs SET status = 'running', claim_no = claim_no + 1,
                    lease_until = now() + make_interval(secs => :lease_s), not_before = NULL
    WHERE id = :id AND status = 'queued' AND tier = :tier AND stage = 'call'
      AND (not_before IS NULL OR not_before <= now())
    RETURNING id, batch_id, key, input, tier, stage, claim_no
), interrupted AS (  -- requests of an earlier claim that never finished
    UPDATE attempts SET error = 'interrupted'
    WHERE job_id = :id AND tier = :tier AND error = 'in_flight' AND EXISTS (SELECT FROM claimed)
)
-- The sub-selects see the rows as they were before "interrupted": in_flight rows count in neither list.
SELECT c.*,
       (SELECT coalesce(json_agg(json_build_array(sample, n)), '[]') FROM attempts
        WHERE job_id = :id AND tier = :tier AND error IS NULL) AS answered,
       (SELECT coalesce(json_agg(json_build_array(sample, n, limited, count)), '[]') FROM (
            SELECT sample, n, error = 'rate_limited' AS limited, count(*) AS count FROM attempts
            WHERE job_id = :id AND tier = :tier AND error IS NOT NULL AND error NOT IN ('in_flight', 'interrupted')
            GROUP BY 1, 2, 3) f) AS failures
FROM claimed c
""")

START_ATTEMPTS = text("""
INSERT INTO attempts (job_id, tier, model, variant, sample, n, error)
SELECT :id, :tier, :model, g.variant, g.sample, g.n, 'in_flight'
FROM unnest(CAST(:variants AS text[]), CAST(:samples AS int[]), CAST(:ns AS int[])) WITH ORDINALITY
     AS g(variant, sample, n, i)
ORDER BY g.i
RETURNING id
""")

FINISH_CALL = text("""
WITH ended AS (
    UPDATE attempts a SET latency_ms = r.latency_ms, input_tokens = r.input_tokens, output_tokens = r.output_tokens,
                          cost_usd = r.cost_usd, error = r.error, detail = r.detail, response = r.response
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(id bigint, latency_ms int, input_tokens int, output_tokens int,
                                                      cost_usd numeric, error text, detail text, response jsonb)
    WHERE a.id = r.id
    RETURNING a.id, a.cost_usd
)
UPDATE jobs SET status = :status, tier = :tier, stage = :stage, lease_until = NULL,
                not_before = CASE WHEN :delay_s > 0 THEN now() + make_interval(secs => :delay_s) END,
                published_at = CASE WHEN :delay_s > 0 THEN NULL ELSE now() END,
                output = CAST(:output AS jsonb), error = :error,
                -- the statement's snapshot does not see "ended": the other rows, plus the ended rows' new cost
                cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts
                            WHERE job_id = :id AND id NOT IN (SELECT id FROM ended))
                           + (SELECT coalesce(sum(cost_usd), 0) FROM ended),
                finished_at = CASE WHEN :status IN ('succeeded', 'failed') THEN now() END
WHERE id = :id AND status = 'running' AND claim_no = :claim_no
""")

CLAIM_VALIDATE = text("""
WITH claimed AS (
    UPDATE jobs SET status = 'running', claim_no = claim_no + 1,
                    lease_until = now() + make_interval(secs => :lease_s), not_before = NULL
    WHERE id = :id AND status = 'queued' AND tier = :tier AND stage = 'validate'
      AND (not_before IS NULL OR not_before <= now())
    RETURNING id, batch_id, key, input, tier, stage, claim_no
)
SELECT c.*, (SELECT coalesce(json_agg(json_build_array(sample, response)), '[]') FROM attempts
             WHERE job_id = :id AND tier = :tier AND error IS NULL) AS answers
FROM claimed c
""")

RECORD_AND_MOVE = text("""
WITH recorded AS (
    INSERT INTO validations (job_id, tier, model, passed, reasons, agreement, votes, samples)
    VALUES (:id, :tier, :model, :passed, CAST(:reasons AS jsonb), :agreement, :votes, :samples)
    ON CONFLICT (job_id, tier) DO NOTHING
)
UPDATE jobs SET status = :status, tier = :next_tier, stage = :stage, lease_until = NULL, not_before = NULL,
                published_at = now(), output = CAST(:output AS jsonb), error = :error,
                cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = :id),
                finished_at = CASE WHEN :status IN ('succeeded', 'failed') THEN now() END
WHERE id = :id AND status = 'running' AND claim_no = :claim_no
""")

ANSWER = '{"label": "a"}'
LEASE_S = 300


def _row(attempt_id: int) -> dict[str, Any]:  # Any: attempts UPDATE parameters
    return {"id": attempt_id, "latency_ms": 3, "input_tokens": 40, "output_tokens": 5,
            "cost_usd": Decimal("0.000009"), "error": None, "detail": None, "response": json.dumps([ANSWER])}


def current(engine: Engine, job_id: int) -> None:
    """The store calls run_call and run_validate make for a one-sample job that passes."""
    with engine.begin() as conn:
        held = store.claim(conn, job_id, 1, Stage.CALL, LEASE_S)
        assert held is not None
        store.prepare_attempts(conn, held)
        list(conn.execute(stages._FAILURES, {"id": job_id, "tier": 1}))
        attempt = store.start_attempt(conn, job_id, 1, "fast", None, 0, 1)
    with engine.begin() as conn:
        store.end_attempts(conn, [_row(attempt)])
        store.move(conn, held, status=JobStatus.QUEUED, tier=1, stage=Stage.VALIDATE)
    with engine.begin() as conn:
        held = store.claim(conn, job_id, 1, Stage.VALIDATE, LEASE_S)
        assert held is not None
        store.answers(conn, job_id, 1)
        store.record_validation(conn, {"job_id": job_id, "tier": 1, "model": "fast", "passed": True, "reasons": "[]",
                                       "agreement": None, "votes": 1, "samples": 1})
        store.move(conn, held, status=JobStatus.SUCCEEDED, tier=1, stage=Stage.VALIDATE, output_json=ANSWER)


def _proposed_statements(begin: Callable[[], Any], single: Callable[[], Any], job_id: int) -> None:
    with begin() as conn:
        claimed = conn.execute(CLAIM_CALL, {"id": job_id, "tier": 1, "lease_s": LEASE_S}).mappings().one()
        ids = [r[0] for r in conn.execute(START_ATTEMPTS, {"id": job_id, "tier": 1, "model": "fast",
                                                             "variants": [None], "samples": [0], "ns": [1]})]
    with single() as conn:
        rows = [{**_row(i), "cost_usd": str(_row(i)["cost_usd"]), "response": [ANSWER]} for i in ids]
        conn.execute(FINISH_CALL, {"rows": json.dumps(rows), "status": "queued", "tier": 1, "stage": "validate",
                                   "delay_s": 0, "output": None, "error": None, "id": job_id,
                                   "claim_no": claimed["claim_no"]})
    with begin() as conn:
        held = conn.execute(CLAIM_VALIDATE, {"id": job_id, "tier": 1, "lease_s": LEASE_S}).mappings().one()
        conn.execute(RECORD_AND_MOVE, {"id": job_id, "tier": 1, "model": "fast", "passed": True, "reasons": "[]",
                                       "agreement": None, "votes": 1, "samples": 1, "status": "succeeded",
                                       "next_tier": 1, "stage": "validate", "output": ANSWER, "error": None,
                                       "claim_no": held["claim_no"]})


def same_transactions(engine: Engine, job_id: int) -> None:
    _proposed_statements(engine.begin, lambda: engine.connect().execution_options(isolation_level="AUTOCOMMIT"),
                         job_id)


def autocommit(engine: Engine, job_id: int) -> None:
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    _proposed_statements(auto.connect, auto.connect, job_id)


@dataclass(frozen=True)
class PathRun:
    name: str
    ms_per_job: float
    trips_per_job: float


def _run(box: Scratch, name: str, path: Callable[[Engine, int], None], n: int, *, ping: bool) -> PathRun:
    publisher = ListPublisher()
    submit(box, "single", n, publisher)
    ids = [job for job, _, _ in publisher.sent]
    directory = box.workdir / f"dbpath-{name}"
    with traced_engine(box, directory) as engine:
        engine.pool._pre_ping = ping
        path(engine, ids[0])  # warm-up: a connection, prepared statements
        started = time.perf_counter()
        for job in ids[1:]:
            path(engine, job)
        seconds = time.perf_counter() - started
    trips = read_dir(directory)
    return PathRun(name, seconds / (n - 1) * 1000, trips.total / n)


def compare(box: Scratch, n: int) -> list[PathRun]:
    """Each path on its own ``n`` fresh jobs, interleaved twice to even out a noisy machine; the better run."""
    paths = [("current", current, True), ("same transactions", same_transactions, False),
             ("autocommit", autocommit, False)]
    best: dict[str, PathRun] = {}
    for _ in range(2):
        for name, path, ping in paths:
            got = _run(box, name, path, n, ping=ping)
            if name not in best or got.ms_per_job < best[name].ms_per_job:
                best[name] = got
    return [best[name] for name, _, _ in paths]
