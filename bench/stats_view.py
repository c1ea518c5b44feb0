"""Benchmark 5, stats: ``SELECT * FROM escalation_stats`` over 1,000,000 jobs, the view as migrated on main
(migration 0004's summary) against migration 0002's view (the baseline), in one scratch schema.

Data: three task types, 97 % succeeded / 2 % failed / 1 % queued, 70 % finishing at tier 1, 22 % at tier 2,
8 % at tier 3, one attempt per tier reached, written with generate_series into a schema at revision 0003.
Then the schema is migrated to head as a deployment would be (backfill under a lock), VACUUM ANALYZE'd as
autovacuum would, and the view must return exactly what 0002's query returns (created beside it as
``escalation_stats_0002``). A live workload (jobs inserted, called, escalated, finished by single-row
statements as the stages write them, a batch deleted) checks that the triggers keep it exact. Last, the
triggers' cost: one job's writes, and the DELETE of a batch, with the triggers on and off.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from sqlalchemy import Connection, text

from bench.harness import Row, Scratch, Services, scratch
from bench.stats_sql import old_view
from cascade.migrate import upgrade

__all__ = ["run"]

TARGET_MS = 200.0

GENERATE = """
INSERT INTO batches (id, task_type, content_hash, config, config_hash, rows, tiers, top_input_per_mtok,
                     top_output_per_mtok)
SELECT 'b' || t || '_' || k, 'task_' || t, '', '{}', '', 0, 3, 5, 15
FROM generate_series(1, 3) t, generate_series(0, 9) k;

INSERT INTO jobs (batch_id, task_type, key, input, status, tier, stage, created_at, finished_at)
SELECT 'b' || t || '_' || (i % 10), 'task_' || t, i::text, '{}'::jsonb,
       CASE WHEN r < 0.97 THEN 'succeeded' WHEN r < 0.99 THEN 'failed' ELSE 'queued' END,
       CASE WHEN r2 < 0.70 THEN 1 WHEN r2 < 0.92 THEN 2 ELSE 3 END, 'validate',
       start, CASE WHEN r < 0.99 THEN start + make_interval(secs => 0.2 + 3 * r3 * r3) END
FROM (SELECT i, i % 3 + 1 AS t, random() AS r, random() AS r2, random() AS r3,
             timestamptz '2026-01-01' + make_interval(secs => i * 0.01) AS start
      FROM generate_series(1, :n) i) s;

INSERT INTO attempts (job_id, tier, model, sample, n, latency_ms, input_tokens, output_tokens, cost_usd, created_at)
SELECT j.id, g.tier, 'm' || g.tier, 0, 1, 200, 300 + j.id % 200, 20 + j.id % 50,
       (300 + j.id % 200) * 0.00000015 * g.tier + (20 + j.id % 50) * 0.0000006 * g.tier,
       j.created_at + make_interval(secs => 0.01 + g.tier * 0.05)
FROM jobs j, generate_series(1, j.tier) g(tier);

UPDATE jobs j SET cost_usd = a.cost FROM (SELECT job_id, sum(cost_usd) AS cost FROM attempts GROUP BY job_id) a
WHERE a.job_id = j.id;
"""


def _rows(conn: Connection, view: str) -> list[dict[str, Any]]:  # Any: view rows
    return [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {view} ORDER BY task_type"))]


def _time_view(box: Scratch, view: str, runs: int) -> tuple[float, list[dict[str, Any]]]:  # Any: view rows
    """Median wall milliseconds of ``SELECT * FROM view`` over ``runs`` (after one warm-up run)."""
    times, rows = [], []
    with box.engine.connect() as conn:
        rows = _rows(conn, view)
        for _ in range(runs):
            started = time.perf_counter()
            _rows(conn, view)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), rows


def differences(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:  # Any: view rows
    """Where two result sets of escalation_stats differ (column by column, over ``old``'s columns), as readable
    lines. ``new`` may have more columns after those: the ones later migrations appended (0012's skipped_rate)."""
    if [r["task_type"] for r in old] != [r["task_type"] for r in new]:
        return [f"task types {[r['task_type'] for r in old]} != {[r['task_type'] for r in new]}"]
    out = []
    for o, n in zip(old, new, strict=True):
        if list(o) != list(n)[:len(o)]:
            out.append(f"columns {list(o)} are not the first of {list(n)}")
        # str: Decimal keeps its scale and float its shortest exact repr, so this is an exact comparison.
        out += [f"{o['task_type']}.{k}: {o[k]!r} != {n.get(k)!r}" for k in o if str(o[k]) != str(n.get(k))]
    return out


LIVE_WORKLOAD = [
    # Inserted queued (as COPY does), a call's move (cost), an escalation, a second call, then finishing.
    """INSERT INTO jobs (batch_id, task_type, key, input)
       SELECT 'b1_0', 'task_1', 'live' || i, '{}'::jsonb FROM generate_series(1, :n) i""",
    """INSERT INTO attempts (job_id, tier, model, sample, n, latency_ms, input_tokens, output_tokens, cost_usd)
       SELECT id, 1, 'm1', 0, 1, 5, 100, 10, 0.0001 FROM jobs WHERE key LIKE 'live%'""",
]


def _live(box: Scratch, n: int) -> None:
    """Drive ``n`` new jobs through single-row UPDATEs shaped like the stages' (each its own transaction)."""
    with box.engine.begin() as conn:
        for sql in LIVE_WORKLOAD:
            conn.execute(text(sql), {"n": n})
        ids = [r[0] for r in conn.execute(text("SELECT id FROM jobs WHERE key LIKE 'live%' ORDER BY id"))]
    move = text("UPDATE jobs SET status = :s, tier = :t, cost_usd = (SELECT sum(cost_usd) FROM attempts "
                "WHERE job_id = :id), finished_at = CASE WHEN :s IN ('succeeded', 'failed') THEN now() END "
                "WHERE id = :id")
    with box.engine.connect() as conn:
        for i, job in enumerate(ids):
            status = ("succeeded", "failed", "queued")[i % 3]
            for s, t in (("running", 1), ("queued", 1 + i % 2), (status, 1 + i % 2)):
                conn.execute(move, {"s": s, "t": t, "id": job})
                conn.commit()


def _set_triggers(box: Scratch, on: bool) -> None:
    with box.engine.begin() as conn:
        for table in ("jobs", "attempts"):
            conn.execute(text(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER USER"))


# One job's writes on the hot path that fire a summary trigger, each its own transaction as in the stages:
# its tier-1 request starts and ends (the tokens), the call stage's move (the cost changes) and the
# validation's move to succeeded. Claims, escalations and deferrals fire none and are left out.
HOT_PATH = [
    "INSERT INTO attempts (job_id, tier, model, sample, n, error) VALUES (:id, 1, 'm1', 0, 1, 'in_flight')",
    ("UPDATE attempts SET input_tokens = 300, output_tokens = 20, cost_usd = 0.0001, error = NULL, latency_ms = 5 "
     "WHERE job_id = :id AND tier = 1"),
    ("UPDATE jobs SET status = 'queued', stage = 'validate', cost_usd = (SELECT sum(cost_usd) FROM attempts "
     "WHERE job_id = :id) WHERE id = :id"),
    "UPDATE jobs SET status = 'succeeded', finished_at = now() WHERE id = :id",
]


def _hot_path_us(box: Scratch, n: int, *, triggers: bool) -> list[float]:
    """Postgres time of each of ``n`` jobs' HOT_PATH statements (EXPLAIN ANALYZE's execution time, which
    includes the triggers; not the round trips and commits), with or without the summary triggers, in µs."""
    tag = f"{'on' if triggers else 'off'}-{time.monotonic_ns()}-"
    with box.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(text(
            "INSERT INTO jobs (batch_id, task_type, key, input, status) SELECT 'b1_1', 'task_1', :tag || i, "
            "'{}'::jsonb, 'running' FROM generate_series(1, :n) i RETURNING id"), {"n": n, "tag": tag})]
    _set_triggers(box, triggers)
    statements = [text("EXPLAIN (ANALYZE, FORMAT JSON) " + sql) for sql in HOT_PATH]
    per_job = []
    try:
        with box.engine.connect() as conn:
            for job in ids:
                total_ms = 0.0
                for statement in statements:
                    total_ms += conn.execute(statement, {"id": job}).scalar_one()[0]["Execution Time"]
                    conn.commit()
                per_job.append(total_ms * 1000)
    finally:
        _set_triggers(box, True)
    return per_job


def _hot_path_cost(box: Scratch, n: int) -> tuple[float, float]:
    """Median µs per job of HOT_PATH with and without the triggers, measured in alternating rounds (so that
    autovacuum or another process slows both alike)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for order in ((True, False), (False, True), (True, False), (False, True)):
        for triggers in order:
            times[triggers] += _hot_path_us(box, n // 4, triggers=triggers)
    return statistics.median(times[True]), statistics.median(times[False])


def _delete_batch_s(box: Scratch, batch: str, *, triggers: bool) -> tuple[float, int]:
    """Seconds to DELETE one batch (its jobs and attempts cascade), and how many jobs it had."""
    jobs = int(box.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b", b=batch))
    _set_triggers(box, triggers)
    try:
        started = time.perf_counter()
        with box.engine.begin() as conn:
            conn.execute(text("DELETE FROM batches WHERE id = :b"), {"b": batch})
        return time.perf_counter() - started, jobs
    finally:
        _set_triggers(box, True)


def _plan(box: Scratch) -> str:
    with box.engine.connect() as conn:
        rows = conn.execute(text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT * FROM escalation_stats"))
        return "\n".join(r[0] for r in rows)


def _vacuum(box: Scratch, tables: str = "") -> None:
    with box.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"VACUUM ANALYZE {tables}"))


def _generate(box: Scratch, n: int) -> float:
    """Seconds to write ``n`` jobs into a schema at 0003 (0002's view, no summary yet)."""
    started = time.perf_counter()
    upgrade(box.engine, "0003")
    with box.engine.begin() as conn:
        conn.execute(text("SET LOCAL synchronous_commit = off"))
        for sql in GENERATE.split(";\n\n"):
            conn.execute(text(sql), {"n": n})
    _vacuum(box)
    return time.perf_counter() - started


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    n = 5_000 if tiny else 1_000_000
    with scratch(svc, "stats", migrate=False) as box:
        generated = _generate(box, n)
        started = time.perf_counter()
        upgrade(box.engine)
        migrated = time.perf_counter() - started
        _vacuum(box, "job_outcomes, escalation_summary")
        with box.engine.begin() as conn:
            conn.execute(text(old_view("escalation_stats_0002")))
        old_ms, old_rows = _time_view(box, "escalation_stats_0002", 1 if not tiny else 3)
        new_ms, new_rows = _time_view(box, "escalation_stats", 9)
        diff = differences(old_rows, new_rows)
        plan = _plan(box)
        _live(box, 300 if tiny else 3000)
        delete_on = _delete_batch_s(box, "b2_9", triggers=True)
        with box.engine.connect() as conn:
            live_diff = differences(_rows(conn, "escalation_stats_0002"), _rows(conn, "escalation_stats"))
        delete_off = _delete_batch_s(box, "b2_8", triggers=False)
        with_us, without_us = _hot_path_cost(box, 200 if tiny else 2000)
    if profile or diff or live_diff:
        print(plan)
        print("\n".join(diff + live_diff) or "results identical")
    same = not diff and not live_diff
    return [
        Row(f"5 stats: escalation_stats over {n:,} jobs", new_ms, old_ms, "ms", f"≤ {TARGET_MS:.0f} ms",
            new_ms <= TARGET_MS and same,
            f"migration 0004's summary vs 0002's view; results {'identical' if same else 'DIFFER'} "
            f"(also after a live workload); data {generated:.0f} s, migration 0004 with backfill {migrated:.1f} s"),
        Row("5 stats: one job's writes with the summary triggers", with_us, without_us, "µs", "report", None,
            "median Postgres time (EXPLAIN ANALYZE) of a tier-1 attempt's insert and end, the call move and the "
            "finish, each its own transaction; triggers on vs off"),
        Row(f"5 stats: DELETE of a {delete_on[1]:,}-job batch with the summary triggers", delete_on[0] * 1000,
            delete_off[0] * 1000, "ms", "report", None,
            f"cascading to jobs and attempts; triggers on vs off (a batch of {delete_off[1]:,} jobs)"),
    ]
