"""Migration 0004: escalation_stats, read from the trigger-kept summary, returns what 0002's view returns.

Every comparison runs 0002's query and the view in one statement (one snapshot) and compares Postgres' text
of each row, so a different numeric scale or the last bit of a float8 percentile counts as a difference.
Every job here starts at tier 1, where 0002's columns still mean what they meant (migration 0012 counts from
the start tier, and appends columns: those are tests/integration/test_start_tier_stats.py's).
"""

from __future__ import annotations

import importlib
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from cascade.migrate import downgrade, upgrade
from cascade.sim import SimConfig, SimModel
from cascade.store import make_engine, normalize_url
from tests.conftest import wait_for
from tests.integration import scenario
from tests.integration.audit import client as make_client

pytestmark = pytest.mark.integration

QUERY_0002 = importlib.import_module("migrations.versions.0004_stats_summary").QUERY_0002

#: escalation_stats' columns as 0002 defines them; later migrations append more.
COLUMNS_0002 = ("task_type, jobs, finished, succeeded, failed, escalation_rate, tier2_rate, tier3_rate, avg_cost_usd, "
                "baseline_cost_usd, savings_pct, p50_latency_ms, p95_latency_ms, total_cost_usd")

#: The task types where escalation_stats and 0002's query disagree, with both rows as text.
DIFFERENCES = f"""
SELECT coalesce(o.task_type, n.task_type) AS task_type, o::text AS old, n.row AS new
FROM ({QUERY_0002}) o
FULL JOIN (SELECT task_type, ROW({COLUMNS_0002})::text AS row FROM escalation_stats) n ON n.task_type = o.task_type
WHERE o::text IS DISTINCT FROM n.row
ORDER BY 1
"""

# Three batches (their prices give baselines of different numeric scales) and 3,000 jobs in every state,
# tier and task type, with attempts at each tier reached: token counts over six orders of magnitude, tied
# and missing latencies (finished jobs without attempts).
SEED = [
    """INSERT INTO batches (id, task_type, content_hash, config, config_hash, rows, tiers, top_input_per_mtok,
                            top_output_per_mtok)
       VALUES ('b1', 'alpha', '', '{}', '', 0, 3, 5, 15), ('b2', 'alpha', '', '{}', '', 0, 3, 0.000123, 0.000007),
              ('b3', 'beta', '', '{}', '', 0, 3, 2.5, 10)""",
    """INSERT INTO jobs (batch_id, task_type, key, input, status, tier, stage, created_at, finished_at, cost_usd)
       SELECT (ARRAY['b1', 'b2', 'b3'])[1 + i % 3], CASE WHEN i % 3 = 2 THEN 'beta' ELSE 'alpha' END, i::text,
              '{}', (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'queued', 'running'])[1 + i % 6],
              1 + i % 7 % 3, 'validate', start,
              CASE WHEN i % 6 < 4 THEN start + make_interval(secs => (i * 37 % 1000) / 100.0) END,
              (i * 7919 % 100000) / 1e9
       FROM (SELECT i, timestamptz '2026-01-01' + make_interval(secs => i) AS start
             FROM generate_series(1, 3000) i) s""",
    """INSERT INTO attempts (job_id, tier, model, sample, n, input_tokens, output_tokens, cost_usd, created_at)
       SELECT j.id, g.tier, 'm' || g.tier, 0, 1, (j.id * 104729 % 1000000) / (10 ^ (j.id % 6))::int,
              j.id % 50, 0.000001 * g.tier, j.created_at + make_interval(secs => g.tier)
       FROM jobs j, generate_series(1, j.tier) g(tier)
       WHERE j.id % 10 <> 0""",
]


def _differences(env) -> list[tuple[str, str | None, str | None]]:
    return [tuple(r) for r in env.rows(DIFFERENCES)]


def _execute(env, *statements: str) -> None:
    with env.engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))


def _view(env) -> list[str]:
    return [r for (r,) in env.rows(f"SELECT ROW({COLUMNS_0002})::text FROM escalation_stats ORDER BY task_type")]


def test_comparison_detects_a_broken_summary(env):
    # Given seeded jobs, where the view equals 0002's query
    _execute(env, *SEED)
    assert len(_view(env)) == 2
    assert _differences(env) == []
    # When a counter of one shard is changed by hand, then the comparison names that task type
    _execute(env, "UPDATE escalation_summary SET failed = failed + 1 WHERE task_type = 'beta' AND jobs > 0")
    assert [task for task, _, _ in _differences(env)] == ["beta"]
    _execute(env, "UPDATE escalation_summary SET failed = failed - 1 WHERE task_type = 'beta' AND jobs > 0")
    assert _differences(env) == []
    # And so do latencies off by a microsecond, or a baseline off by 1e-18 dollars
    _execute(env, "UPDATE job_outcomes SET latency_ms = latency_ms + 0.001 WHERE task_type = 'alpha'")
    assert [task for task, _, _ in _differences(env)] == ["alpha"]
    _execute(env, "TRUNCATE job_outcomes, escalation_summary", "SELECT escalation_summary_rebuild()")
    assert _differences(env) == []
    _execute(env, "UPDATE escalation_summary SET finished_baseline = finished_baseline + 1e-18 "
                  "WHERE task_type = 'alpha' AND finished > 0")
    assert [task for task, _, _ in _differences(env)] == ["alpha"]


@pytest.mark.slow
def test_view_equals_0002_after_direct_changes(env):
    # Given seeded jobs
    _execute(env, *SEED)
    steps = {
        "costs change": "UPDATE jobs SET cost_usd = cost_usd + 0.000000000123 WHERE id % 5 = 0",
        "jobs finish": "UPDATE jobs SET status = 'succeeded', tier = 2, finished_at = created_at + interval '2 s' "
                       "WHERE status IN ('queued', 'running') AND id % 2 = 0",
        "failed jobs reopen": "UPDATE jobs SET status = 'queued', finished_at = NULL WHERE status = 'failed' "
                              "AND id % 3 = 0",
        "finished jobs move tier": "UPDATE jobs SET tier = 3 WHERE status = 'succeeded' AND id % 7 = 1",
        "a task type is renamed": "UPDATE jobs SET task_type = 'gamma' WHERE id % 11 = 0",
        "late tier-1 tokens": "UPDATE attempts SET input_tokens = input_tokens + 17, output_tokens = 3 "
                              "WHERE tier = 1 AND job_id % 4 = 0",
        "an earlier first request": "INSERT INTO attempts (job_id, tier, model, sample, n, error, created_at) "
                                    "SELECT id, 2, 'm2', 9, 1, 'late', created_at - interval '1 s' FROM jobs "
                                    "WHERE id % 13 = 0",
        "attempts move to another job": "UPDATE attempts SET job_id = job_id + 1, error = 'moved' "
                                        "WHERE job_id % 10 = 3 AND job_id < 3000",
        "attempts are deleted": "DELETE FROM attempts WHERE tier = 1 AND job_id % 6 = 1",
        "a batch's prices change": "UPDATE batches SET top_input_per_mtok = 7.123456789 WHERE id = 'b1'",
        "jobs are inserted finished": "INSERT INTO jobs (batch_id, task_type, key, input, status, tier, finished_at, "
                                      "cost_usd) SELECT 'b3', 'beta', 'done' || i, '{}', 'failed', 3, now(), 0.5 "
                                      "FROM generate_series(1, 20) i",
        "jobs are deleted": "DELETE FROM jobs WHERE id % 9 = 0",
        # b2's tiny prices give the baselines with the most decimals: what remains has fewer
        "the batch with the longest baselines is deleted": "DELETE FROM batches WHERE id = 'b2'",
        "attempts are truncated": "TRUNCATE attempts",
    }
    for step, sql in steps.items():
        # When each change is made, then the view still equals 0002's query
        _execute(env, sql)
        assert _differences(env) == [], step
    assert [r.split(",")[0] for r in _view(env)] == ["(alpha", "(beta", "(gamma"]
    # And after a TRUNCATE of everything, and jobs inserted again
    _execute(env, "TRUNCATE batches CASCADE")
    assert _view(env) == []
    _execute(env, *SEED)
    assert _differences(env) == []
    assert len(_view(env)) == 2


def _failing_sim() -> SimConfig:
    """Every tier fails a good share of its answers, and the small model answers 500 now and then: jobs
    escalate, retry, and some fail at the last tier."""
    return SimConfig(seed=7, models={
        "small": SimModel(p_correct=0.6, p_too_short=0.4, p_500=0.1),
        "medium": SimModel(p_correct=0.7, p_too_short=0.35),
        "large": SimModel(p_correct=0.9, p_too_short=0.3),
    })


@pytest.mark.slow
def test_view_equals_0002_through_a_real_workload(env, sim, workers):
    # Given two task types over three tiers on models that fail often, and a worker for every queue
    client = make_client(env, sim(_failing_sim()).url)
    workers(concurrency=32)
    seen: list[list[tuple[str, str | None, str | None]]] = []

    def compare(_state) -> None:
        seen.append(_differences(env))

    # When a batch of each task type runs, compared with 0002's query at every poll while jobs move
    batches = [client.submit(task, scenario.rows(40, task), key_field="id").batch_id for task in ("label", "summary")]
    for batch in batches:
        assert client.wait(batch, timeout=120, poll_s=0.1, on_progress=compare).is_done
    # Then the two never differed, and the run escalated, retried and failed jobs
    assert len(seen) > 2
    assert [d for d in seen if d] == []
    assert env.scalar("SELECT count(*) FROM jobs WHERE status = 'failed'") > 0
    assert env.scalar("SELECT count(*) FROM jobs WHERE tier = 3") > 0
    assert env.scalar("SELECT count(*) FROM attempts WHERE error IS NOT NULL") > 0
    assert len(_view(env)) == 2
    # And after a batch is deleted (its jobs and attempts cascade), one task type is left
    _execute(env, f"DELETE FROM batches WHERE id = '{batches[0]}'")
    assert _differences(env) == []
    assert [r.split(",")[0] for r in _view(env)] == ["(summary"]
    # And after a TRUNCATE, a new batch is counted from zero
    _execute(env, "TRUNCATE jobs, attempts, validations, eval_results CASCADE")
    assert _view(env) == []
    again = client.submit("summary", scenario.rows(10, "summary"), key_field="id").batch_id
    assert client.wait(again, timeout=60, poll_s=0.1, on_progress=compare).is_done
    assert [d for d in seen if d] == []
    assert env.scalar("SELECT jobs FROM escalation_stats") == 10


# --- a late write of a lost claim and the job's finishing UPDATE ------------------------------------

LATE_ATTEMPT = "UPDATE attempts SET input_tokens = 900000 WHERE job_id = :job AND tier = 1"
FINISH = "UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = :job"


def _waits_for_a_lock(env, pid: int) -> bool:
    return env.scalar("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p", p=pid) is True


@pytest.mark.parametrize("first, second", [(LATE_ATTEMPT, FINISH), (FINISH, LATE_ATTEMPT)],
                         ids=["attempt-first", "finish-first"])
def test_late_attempt_and_finish_in_two_transactions(env, first, second):
    # Given a running job with a tier-1 request
    _execute(env, SEED[0], "INSERT INTO jobs (batch_id, task_type, key, input, status) "
                           "VALUES ('b1', 'alpha', 'k', '{}', 'running')")
    job = env.scalar("SELECT id FROM jobs")
    _execute(env, f"INSERT INTO attempts (job_id, tier, model, sample, n, input_tokens) "
                  f"VALUES ({job}, 1, 'm', 0, 1, 10)")
    # When one transaction has written and not committed, the other one waits for it ...
    with env.engine.connect() as holder, env.engine.connect() as waiter:
        holder.execute(text(first), {"job": job})
        pid = waiter.execute(text("SELECT pg_backend_pid()")).scalar_one()
        done = threading.Event()

        def run_second() -> None:
            waiter.execute(text(second), {"job": job})
            waiter.commit()
            done.set()

        thread = threading.Thread(target=run_second)
        thread.start()
        try:
            wait_for(lambda: _waits_for_a_lock(env, pid), 10, "the second transaction to wait for the first")
        finally:
            holder.commit()
            thread.join(10)
        assert done.is_set()
    # ... and then sees what it wrote: the baseline counts the late tokens
    assert _differences(env) == []
    assert env.scalar("SELECT baseline_cost_usd FROM escalation_stats") == pytest.approx(4.5)


def _pid(conn: Connection) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _same_shard(env) -> tuple[Engine, Connection, Connection]:
    """Two new connections whose backends share a summary shard (pid % 64)."""
    engine = create_engine(normalize_url(env.services.database_url), poolclass=NullPool,
                           connect_args={"options": f"-csearch_path={env.schema}"})
    first = engine.connect()
    for _ in range(500):
        second = engine.connect()
        if _pid(second) % 64 == _pid(first) % 64:
            return engine, first, second
        second.close()
    raise AssertionError("no second backend on the first one's shard in 500 connections")


def test_two_transactions_on_one_shard_queue_up_instead_of_deadlocking(env):
    # Given a job of each task type for each of two transactions whose backends share a shard
    _execute(env, SEED[0], "INSERT INTO jobs (batch_id, task_type, key, input) VALUES ('b1', 'alpha', 'a1', '{}'), "
                           "('b3', 'beta', 'b1', '{}'), ('b1', 'alpha', 'a2', '{}'), ('b3', 'beta', 'b2', '{}')")
    ids = dict(env.rows("SELECT key, id FROM jobs"))
    cost = text("UPDATE jobs SET cost_usd = cost_usd + 1 WHERE id = :id")
    engine, first, second = _same_shard(env)
    # When they change the costs of their jobs in opposite task type orders
    with first, second:
        first.execute(cost, {"id": ids["a1"]})
        errors: list[DBAPIError] = []
        second_pid = _pid(second)

        def run_second() -> None:
            try:
                second.execute(cost, {"id": ids["b2"]})
                second.execute(cost, {"id": ids["a2"]})
                second.commit()
            except DBAPIError as exc:  # a deadlock: reported by the assertion below, not lost in the thread
                errors.append(exc)

        thread = threading.Thread(target=run_second)
        thread.start()
        try:
            # Then the second waits for the first's shard lock before touching any summary row ...
            wait_for(lambda: _waits_for_a_lock(env, second_pid), 10, "the second transaction to wait")
            first.execute(cost, {"id": ids["b1"]})
            first.commit()
        finally:
            thread.join(10)
    engine.dispose()
    # ... so both commit (no deadlock), and the view counts every change
    assert errors == []
    assert _differences(env) == []
    assert env.scalar("SELECT sum(total_cost_usd) FROM escalation_stats") == 4


# --- the migration itself ------------------------------------------------------------------------------


def test_upgrade_backfills_the_jobs_already_there(env):
    # Given a database at 0003 holding jobs in every state, and what 0002's view returns for them
    downgrade(env.engine, "0003")
    _execute(env, *SEED)
    before = _view(env)
    assert len(before) == 2
    # When it is migrated to 0004
    upgrade(env.engine)
    # Then the view returns the same rows, and keeps up with the next changes
    assert _view(env) == before
    _execute(env, "UPDATE jobs SET status = 'failed', finished_at = now() WHERE status = 'running'")
    assert _differences(env) == []
    assert _view(env) != before


@pytest.fixture
def schemas(env) -> Iterator[Callable[[str], tuple[str, Engine]]]:
    """Factory: another schema migrated to ``revision``, dropped at teardown."""
    engines: list[tuple[str, Engine]] = []
    admin = make_engine(env.services.database_url, pool_size=1)

    def create(revision: str = "head") -> tuple[str, Engine]:
        name = f"{env.schema}_{uuid.uuid4().hex[:6]}"
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        engine = make_engine(env.services.database_url, schema=name, pool_size=2)
        engines.append((name, engine))
        upgrade(engine, revision)
        return name, engine

    yield create
    for name, engine in engines:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{name}" CASCADE'))
    admin.dispose()


CATALOG = """
SELECT 'schema ' || coalesce(nspacl::text, '') FROM pg_namespace WHERE oid = CAST(:s AS regnamespace)
UNION ALL
SELECT 'relation ' || relname || ' ' || relkind::text || ' ' || coalesce(relacl::text, '') FROM pg_class
WHERE relnamespace = CAST(:s AS regnamespace)
UNION ALL
SELECT 'view ' || relname || ' ' || pg_get_viewdef(oid) FROM pg_class
WHERE relnamespace = CAST(:s AS regnamespace) AND relkind = 'v'
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = CAST(:s AS name)
UNION ALL
SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
WHERE connamespace = CAST(:s AS regnamespace)
UNION ALL
SELECT 'function ' || oid::regprocedure::text || ' ' || coalesce(proconfig::text, '') || ' '
       || coalesce(proacl::text, '') FROM pg_proc WHERE pronamespace = CAST(:s AS regnamespace)
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = CAST(:s AS regnamespace) AND NOT t.tgisinternal
ORDER BY 1
"""


def _catalog(engine: Engine, schema: str) -> list[str]:
    """What a schema holds (relations and their grants, view and index definitions, constraints,
    functions, triggers), with the schema's name replaced so that two schemas compare."""
    with engine.connect() as conn:
        return [r.replace(schema, "<schema>") for (r,) in conn.execute(text(CATALOG), {"s": schema})]


def test_downgrade_restores_0003_and_upgrade_round_trips(env, schemas):
    # Given the test's schema at head holding jobs, and another schema migrated only to 0003
    _execute(env, *SEED)
    at_head, rows = _catalog(env.engine, env.schema), _view(env)
    name, at_0003 = schemas("0003")
    assert any(r.startswith("function escalation_summary_rebuild()") for r in at_head)
    # When the test's schema is downgraded to 0003
    downgrade(env.engine, "0003")
    # Then it holds what a schema migrated to 0003 holds (0002's view and its grant, and nothing of 0004's),
    # and the view returns the same rows
    assert _catalog(env.engine, env.schema) == _catalog(at_0003, name)
    assert _view(env) == rows
    # When it is upgraded again, then it is as it was, with the same rows
    upgrade(env.engine)
    assert _catalog(env.engine, env.schema) == at_head
    assert _view(env) == rows
    assert _differences(env) == []


def _as_reader(env, sql: str) -> list[tuple[object, ...]]:
    """Run ``sql`` as cascade_reader in a transaction that is rolled back."""
    with env.engine.connect() as conn, conn.begin() as trans:
        try:
            conn.execute(text("SET LOCAL ROLE cascade_reader"))
            return [tuple(r) for r in conn.execute(text(sql)).all()]
        finally:
            trans.rollback()


READER_DENIED = [
    "SELECT * FROM escalation_summary", "SELECT * FROM job_outcomes",
    "UPDATE escalation_summary SET jobs = 0", "DELETE FROM job_outcomes",
    "SELECT escalation_summary_rebuild()", "SELECT escalation_summary_refresh(ARRAY[1]::bigint[])",
]


def test_reader_selects_the_view_and_not_the_summary(env):
    # Given seeded jobs
    _execute(env, *SEED)
    # Then cascade_reader reads the view, which sees the summary ...
    assert [r[:2] for r in _as_reader(env, "SELECT task_type, jobs FROM escalation_stats ORDER BY 1")] == [
        ("alpha", 2000), ("beta", 1000)]
    # ... and neither reads nor writes the summary, nor runs its functions
    for sql in READER_DENIED:
        with pytest.raises(DBAPIError, match="permission denied"):
            _as_reader(env, sql)


def test_triggers_use_their_schema_whatever_the_callers_search_path(env, schemas):
    # Given another schema at head, and a connection whose search_path is that other schema
    _, other = schemas("head")
    s = f'"{env.schema}"'
    # When the test schema's jobs are written through qualified names on that connection
    with other.begin() as conn:
        for sql in (
            (f"INSERT INTO {s}.batches (id, task_type, content_hash, config, config_hash, rows, tiers, "
             f"top_input_per_mtok, top_output_per_mtok) VALUES ('q', 'alpha', '', '{{}}', '', 0, 3, 5, 15)"),
            (f"INSERT INTO {s}.jobs (batch_id, task_type, key, input, status) "
             f"SELECT 'q', 'alpha', i::text, '{{}}', 'running' FROM generate_series(1, 5) i"),
            f"INSERT INTO {s}.attempts (job_id, tier, model, sample, n) SELECT id, 1, 'm', 0, 1 FROM {s}.jobs",
            f"UPDATE {s}.jobs SET status = 'succeeded', finished_at = now(), cost_usd = 0.0001",
            f"UPDATE {s}.attempts SET input_tokens = 200",
            f"DELETE FROM {s}.jobs WHERE key = '1'",
        ):
            conn.execute(text(sql))
    # Then the test schema's view counts them, and the other schema's summary holds nothing
    assert _differences(env) == []
    assert env.rows("SELECT task_type, jobs, finished FROM escalation_stats") == [("alpha", 4, 4)]
    with other.connect() as conn:
        assert conn.execute(text("SELECT (SELECT count(*) FROM escalation_summary) + "
                                 "(SELECT count(*) FROM job_outcomes)")).scalar_one() == 0


def test_the_pretty_view_rounds_the_exact_one_for_people(env):
    # Given seeded jobs, some finished
    _execute(env, *SEED)
    # When both views are read
    exact = {r.task_type: r for r in env.rows("SELECT * FROM escalation_stats")}
    pretty = {r.task_type: r for r in env.rows("SELECT * FROM escalation_stats_pretty")}
    # Then the pretty one has the same rows, rates as percentages with one decimal, money to six decimals
    assert pretty.keys() == exact.keys() and pretty
    for task_type, row in pretty.items():
        e = exact[task_type]
        assert (row.jobs, row.finished, row.succeeded, row.failed) == (e.jobs, e.finished, e.succeeded, e.failed)
        assert row.escalation_pct == round(100 * e.escalation_rate, 1)
        assert row.avg_cost_usd == round(e.avg_cost_usd, 6) and row.avg_cost_usd.as_tuple().exponent == -6
        assert row.p95_latency_ms == round(e.p95_latency_ms)
    # And cascade_reader may read it
    assert len(_as_reader(env, "SELECT * FROM escalation_stats_pretty")) == len(pretty)
