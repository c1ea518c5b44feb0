"""Migration 0012: escalation_stats counts from each job's start tier, and never counts tier-0 (audit) requests.

The summary is compared with REFERENCE, the view's meaning written directly over jobs and attempts, in one
statement and as Postgres' text of each row (numeric scales and float8 bits included), as
test_stats_summary.py compares it with migration 0002's query; so is the migration's QUERY (0002's query
rewritten, for the same columns over some jobs only).
"""

from __future__ import annotations

import importlib
from decimal import Decimal

import pytest
from sqlalchemy import text

from cascade.migrate import downgrade, upgrade
from tests.integration import test_stats_summary as summary_tests

pytestmark = pytest.mark.integration

QUERY = importlib.import_module("migrations.versions.0012_start_tiers").QUERY

#: Another schema at a given revision (a fixture factory).
schemas = summary_tests.schemas
#: Statements run in one transaction.
_execute = summary_tests._execute

_DONE = "count(*) FILTER (WHERE done)"


def _share(condition: str) -> str:
    return f"count(*) FILTER (WHERE done AND {condition})::numeric / nullif({_DONE}, 0)"


#: escalation_stats as migration 0012 defines it. Counted requests are those at tier 1 and up; the baseline
#: prices the start tier's tokens at the top tier's prices; latency runs from the first counted request.
REFERENCE = f"""
WITH counted AS (
    SELECT job_id, tier, input_tokens, output_tokens, created_at FROM attempts WHERE tier >= 1
), job AS (
    SELECT j.id, j.task_type, j.status, j.tier, j.start_tier, j.cost_usd, j.finished_at,
           j.status IN ('succeeded', 'failed') AS done, b.top_input_per_mtok, b.top_output_per_mtok,
           (SELECT sum(c.input_tokens) FROM counted c WHERE c.job_id = j.id AND c.tier = j.start_tier) AS start_in,
           (SELECT sum(c.output_tokens) FROM counted c WHERE c.job_id = j.id AND c.tier = j.start_tier) AS start_out,
           (SELECT min(c.created_at) FROM counted c WHERE c.job_id = j.id) AS first_at
    FROM jobs j JOIN batches b ON b.id = j.batch_id
), priced AS (
    SELECT job.*,
           (coalesce(start_in, 0) * top_input_per_mtok + coalesce(start_out, 0) * top_output_per_mtok) / 1000000
               AS baseline_usd,
           extract(epoch FROM finished_at - first_at) * 1000 AS latency_ms
    FROM job
)
SELECT task_type, count(*) AS jobs, {_DONE} AS finished,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded, count(*) FILTER (WHERE status = 'failed') AS failed,
       {_share("tier > start_tier")} AS escalation_rate,
       {_share("tier >= 2")} AS tier2_rate,
       {_share("tier >= 3")} AS tier3_rate,
       avg(cost_usd) FILTER (WHERE done) AS avg_cost_usd,
       avg(baseline_usd) FILTER (WHERE done) AS baseline_cost_usd,
       100 * (1 - sum(cost_usd) FILTER (WHERE done) / nullif(sum(baseline_usd) FILTER (WHERE done), 0)) AS savings_pct,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE done) AS p50_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE done) AS p95_latency_ms,
       sum(cost_usd) AS total_cost_usd,
       {_share("start_tier > 1")} AS skipped_rate
FROM priced
GROUP BY task_type
"""

#: The task types where escalation_stats or the migration's QUERY disagree with REFERENCE, with the rows as text.
DIFFERENCES = f"""
SELECT coalesce(r.task_type, v.task_type, q.task_type), r::text, v::text, q::text
FROM ({REFERENCE}) r
FULL JOIN escalation_stats v ON v.task_type = r.task_type
FULL JOIN ({QUERY}) q ON q.task_type = coalesce(r.task_type, v.task_type)
WHERE r::text IS DISTINCT FROM v::text OR r::text IS DISTINCT FROM q::text
ORDER BY 1
"""

# Three batches (prices of different numeric scales) and 600 jobs in every state, starting at tiers 1 to 3 and
# ending at or above their start, with a request at each tier from the start tier to the one reached. A
# quarter of the jobs have an audit request (tier 0) before any other, with more tokens than any; a tenth
# have no request, another tenth only the audit request.
SEED = [
    summary_tests.SEED[0],
    """INSERT INTO jobs (batch_id, task_type, key, input, status, start_tier, tier, stage, created_at, finished_at,
                         cost_usd)
       SELECT (ARRAY['b1', 'b2', 'b3'])[1 + i % 3], CASE WHEN i % 3 = 2 THEN 'beta' ELSE 'alpha' END, i::text,
              '{}', (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'queued', 'running'])[1 + i % 6],
              s, s + i / 11 % (4 - s), 'validate', start,
              CASE WHEN i % 6 < 4 THEN start + make_interval(secs => (i * 37 % 1000) / 100.0) END,
              (i * 7919 % 100000) / 1e9
       FROM (SELECT i, 1 + i / 7 % 3 AS s, timestamptz '2026-01-01' + make_interval(secs => i) AS start
             FROM generate_series(1, 600) i) q""",
    """INSERT INTO attempts (job_id, tier, model, sample, n, input_tokens, output_tokens, cost_usd, created_at)
       SELECT j.id, g.tier, 'm' || g.tier, 0, 1, (j.id * 104729 % 1000000) / (10 ^ (j.id % 6))::int, j.id % 50,
              0.000001 * g.tier, j.created_at + make_interval(secs => g.tier)
       FROM jobs j, generate_series(j.start_tier, j.tier) g(tier)
       WHERE j.id % 10 NOT IN (0, 5)""",
    """INSERT INTO attempts (job_id, tier, model, sample, n, input_tokens, output_tokens, cost_usd, created_at)
       SELECT id, 0, 'auditor', 0, 1, 7777777, 4444, 0.01, created_at - interval '5 s' FROM jobs
       WHERE id % 4 = 0 OR id % 10 = 5""",
]

# Finished jobs per (start tier, tier): every pair a job can end with.
COVERAGE = """
SELECT start_tier, tier, count(*) FROM jobs WHERE status IN ('succeeded', 'failed') GROUP BY 1, 2 ORDER BY 1, 2
"""


def _differences(env) -> list[tuple[str, str | None, str | None, str | None]]:
    return [tuple(r) for r in env.rows(DIFFERENCES)]


@pytest.mark.slow
def test_view_equals_the_reference_through_changes(env):
    # Given jobs of every start tier, escalated and not, with and without audit requests
    _execute(env, *SEED)
    assert [(s, t) for s, t, n in env.rows(COVERAGE) if n > 0] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    # (where counting from the start tier is not counting from tier 1)
    rows = env.rows("SELECT escalation_rate, tier2_rate, skipped_rate FROM escalation_stats")
    assert all(r.escalation_rate < r.tier2_rate and r.skipped_rate > 0 for r in rows) and len(rows) == 2
    assert _differences(env) == []
    steps = {
        "jobs finish above their start tier": "UPDATE jobs SET status = 'succeeded', tier = least(start_tier + 1, 3), "
                                              "finished_at = created_at + interval '3 s' "
                                              "WHERE status IN ('queued', 'running') AND id % 2 = 0",
        "late tokens at the start tier": "UPDATE attempts a SET input_tokens = a.input_tokens + 1234, output_tokens = 5 "
                                         "FROM jobs j WHERE j.id = a.job_id AND a.tier = j.start_tier "
                                         "AND j.start_tier > 1 AND j.id % 3 <> 0",
        "late tokens above the start tier": "UPDATE attempts a SET input_tokens = a.input_tokens + 99 FROM jobs j "
                                            "WHERE j.id = a.job_id AND a.tier > j.start_tier",
        "audit requests on finished jobs": "INSERT INTO attempts (job_id, tier, model, sample, n, input_tokens, "
                                           "created_at) SELECT id, 0, 'auditor', 1, 1, 555, created_at - interval "
                                           "'1 h' FROM jobs WHERE status = 'succeeded' AND id % 3 = 0",
        "audit requests end": "UPDATE attempts SET input_tokens = 999999, output_tokens = 8, "
                              "created_at = created_at - interval '1 day' WHERE tier = 0",
        "requests move to tier 0": "UPDATE attempts SET tier = 0, sample = 10 + tier WHERE tier >= 1 AND job_id % 8 = 1",
        "finished jobs reopen": "UPDATE jobs SET status = 'queued', finished_at = NULL "
                                "WHERE status = 'failed' AND id % 3 = 0",
        "requests move back from tier 0": "UPDATE attempts SET tier = sample - 10, sample = 0 "
                                          "WHERE sample >= 10 AND job_id % 16 = 1",
        # never done by cascade (a job keeps its start tier), but a job's share must follow its row
        "start tiers change": "UPDATE jobs SET start_tier = 1 + start_tier % 3 WHERE id % 5 = 0",
        "jobs are inserted finished above tier 1": "INSERT INTO jobs (batch_id, task_type, key, input, status, "
                                                   "start_tier, tier, finished_at, cost_usd) SELECT 'b3', 'beta', "
                                                   "'done' || i, '{}', 'succeeded', 2, 2 + i % 2, now(), 0.25 "
                                                   "FROM generate_series(1, 20) i",
        "requests are deleted": "DELETE FROM attempts WHERE job_id % 6 = 1 OR (tier = 0 AND job_id % 3 = 0)",
        "a batch's prices change": "UPDATE batches SET top_output_per_mtok = 21.5 WHERE id = 'b3'",
        "jobs are deleted": "DELETE FROM jobs WHERE id % 9 = 0",
        "attempts are truncated": "TRUNCATE attempts",
        "the summary is rebuilt": "SELECT escalation_summary_rebuild()",
    }
    for name, change in steps.items():
        # When each change is made, then the view still equals the reference
        _execute(env, change)
        assert _differences(env) == [], name
    # And after a TRUNCATE of everything, and jobs inserted again
    _execute(env, "TRUNCATE batches CASCADE")
    assert env.rows("SELECT * FROM escalation_stats") == []
    _execute(env, *SEED)
    assert _differences(env) == []


def test_rates_and_baseline_count_from_the_start_tier(env):
    # Given five finished jobs (prices $10 / $20 per Mtok): start 1 end 1, start 1 end 2, start 2 end 2 with an
    # audit request before its first one, start 3 end 3, and start 2 end 3 (failed); the first request of each
    # 1 s after it was created, finished 10 s after
    jobs = [("a", 1, 1, "succeeded"), ("b", 1, 2, "succeeded"), ("c", 2, 2, "succeeded"), ("d", 3, 3, "succeeded"),
            ("e", 2, 3, "failed")]
    requests = [("a", 1, 1000, 100), ("b", 1, 2000, 0), ("b", 2, 5000, 0), ("c", 2, 3000, 200), ("c", 0, 10**6, 10**6),
                ("d", 3, 1000, 100), ("e", 2, 500, 50), ("e", 3, 9000, 900)]
    _execute(env, "INSERT INTO batches (id, task_type, content_hash, config, config_hash, rows, tiers, "
                  "top_input_per_mtok, top_output_per_mtok) VALUES ('p', 'gamma', '', '{}', '', 0, 3, 10, 20)")
    with env.engine.begin() as conn:
        for key, start, tier, status in jobs:
            conn.execute(text("INSERT INTO jobs (batch_id, task_type, key, input, status, start_tier, tier, created_at, "
                              "finished_at, cost_usd) VALUES ('p', 'gamma', :k, '{}', :st, :s, :t, "
                              "timestamptz '2026-01-01', timestamptz '2026-01-01' + interval '10 s', 0.001)"),
                         {"k": key, "st": status, "s": start, "t": tier})
        for key, tier, tokens_in, tokens_out in requests:
            conn.execute(text("INSERT INTO attempts (job_id, tier, model, sample, n, input_tokens, output_tokens, "
                              "created_at) SELECT id, :t, 'm', 0, 1, :i, :o, created_at + CASE WHEN :t = 0 "
                              "THEN interval '-100 s' ELSE make_interval(secs => :t - start_tier + 1) END "
                              "FROM jobs WHERE key = :k"), {"k": key, "t": tier, "i": tokens_in, "o": tokens_out})
    # When escalation_stats is read
    (row,) = env.rows("SELECT * FROM escalation_stats")
    # Then b and e escalated (2 of 5), b to e reached tier 2, d and e tier 3, c to e skipped tier 1
    assert (row.finished, row.succeeded, row.failed) == (5, 4, 1)
    assert [float(r) for r in (row.escalation_rate, row.tier2_rate, row.tier3_rate, row.skipped_rate)] == [
        0.4, 0.8, 0.4, 0.6]
    # And the baseline is the start tier's tokens at top prices ($0.012, 0.02, 0.034, 0.012, 0.006), not the audit's
    assert row.baseline_cost_usd == Decimal("0.0168")
    assert float(row.savings_pct) == pytest.approx(100 * (1 - 0.001 / 0.0168))
    # And the latency runs from the first request at tier 1 or above: 9 s for every job
    assert (row.p50_latency_ms, row.p95_latency_ms) == (9000, 9000)
    pretty = env.rows("SELECT escalation_pct, tier2_pct, skipped_pct FROM escalation_stats_pretty")
    assert pretty == [(Decimal("40.0"), Decimal("80.0"), Decimal("60.0"))]
    assert _differences(env) == []


OUTCOMES = "SELECT job_id, xmin::text FROM job_outcomes ORDER BY job_id"


def test_audit_requests_leave_the_summary_alone(env):
    # Given seeded jobs and their outcome rows
    _execute(env, *SEED)
    before = env.rows(OUTCOMES)
    # When audit requests of finished jobs are inserted, end (tokens), and are deleted
    _execute(env, "INSERT INTO attempts (job_id, tier, model, sample, n, created_at) SELECT job_id, 0, 'auditor', 2, "
                  "1, now() - interval '1 day' FROM job_outcomes",
             "UPDATE attempts SET input_tokens = 123456 WHERE tier = 0",
             "DELETE FROM attempts WHERE tier = 0 AND sample = 2")
    # Then no outcome row was written again
    assert env.rows(OUTCOMES) == before
    # But tokens recorded late at a finished job's start tier are
    _execute(env, "UPDATE attempts a SET output_tokens = a.output_tokens + 1 FROM job_outcomes o "
                  "WHERE o.job_id = a.job_id AND a.tier = o.start_tier AND o.start_tier = 3")
    changed = {job for (job, xmin), (_, old) in zip(env.rows(OUTCOMES), before, strict=True) if xmin != old}
    assert changed == {job for (job,) in env.rows("SELECT DISTINCT a.job_id FROM attempts a JOIN job_outcomes o "
                                                  "ON o.job_id = a.job_id AND a.tier = o.start_tier AND o.start_tier = 3")}
    assert changed and _differences(env) == []


def test_downgrade_restores_0011_and_upgrade_round_trips(env, schemas):
    # Given the test's schema at head holding jobs of every start tier, and another schema migrated to 0011
    _execute(env, *SEED)
    at_head = summary_tests._catalog(env.engine, env.schema)
    name, at_0011 = schemas("0011")
    # When the test's schema is downgraded to 0011
    downgrade(env.engine, "0011")
    # Then it holds what a schema migrated to 0011 holds (0004's functions, trigger and view, 0008's pretty view,
    # their grants), and the view counts from tier 1 again: it equals 0002's query over the same jobs
    assert summary_tests._catalog(env.engine, env.schema) == summary_tests._catalog(at_0011, name)
    assert env.rows(summary_tests.DIFFERENCES) == []
    assert "skipped_rate" not in env.rows("SELECT * FROM escalation_stats")[0]._fields
    # And 0004's triggers keep it so (over tables that had columns dropped)
    _execute(env, "UPDATE jobs SET status = 'failed', finished_at = now() WHERE status = 'running'",
             "UPDATE jobs SET cost_usd = cost_usd + 1, tier = 3 WHERE id % 7 = 0",
             "UPDATE attempts SET input_tokens = input_tokens + 5 WHERE tier = 1", "DELETE FROM jobs WHERE id % 5 = 0")
    assert env.rows(summary_tests.DIFFERENCES) == []
    # When it is upgraded again, then it is as it was, and every job (now) starts at tier 1
    upgrade(env.engine)
    assert summary_tests._catalog(env.engine, env.schema) == at_head
    assert _differences(env) == []
    assert [r.skipped_rate for r in env.rows("SELECT skipped_rate FROM escalation_stats")] == [0, 0]
