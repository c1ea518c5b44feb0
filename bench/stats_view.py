"""Benchmark 5, stats: ``SELECT * FROM escalation_stats`` over 1,000,000 jobs, the view of migration 0002
(baseline) against the proposed summary (bench.stats_sql.UPGRADE), in one scratch schema.

Data: three task types, 97 % succeeded / 2 % failed / 1 % queued, 70 % finishing at tier 1, 22 % at tier 2,
8 % at tier 3, one attempt per tier reached, written with generate_series. The proposal is applied as its
migration would be (backfill under a lock), VACUUM ANALYZE'd as autovacuum would, and must return exactly
the old view's rows. Then a live workload (jobs inserted, called, escalated, finished by single-row UPDATEs as
the stages do) checks that the triggers keep it exact, and times a finishing UPDATE with and without them.
"""

from __future__ import annotations

import math
import statistics
import time
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

from bench.harness import Row, Scratch, Services, scratch
from bench.stats_sql import OLD_VIEW, UPGRADE

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


def _same(a: Any, b: Any) -> bool:  # Any: column values
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return abs(a - b) <= Decimal("1e-15") * max(Decimal(1), abs(a))
    return bool(a == b)


def differences(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:  # Any: view rows
    """Where two result sets of escalation_stats differ (column by column), as readable lines."""
    if [r["task_type"] for r in old] != [r["task_type"] for r in new]:
        return [f"task types {[r['task_type'] for r in old]} != {[r['task_type'] for r in new]}"]
    out = []
    for o, n in zip(old, new, strict=True):
        if list(o) != list(n):
            out.append(f"columns {list(o)} != {list(n)}")
        out += [f"{o['task_type']}.{k}: {o[k]!r} != {n.get(k)!r}" for k in o if not _same(o[k], n.get(k))]
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
        conn.execute(text("DELETE FROM batches WHERE id = 'b2_9'"))  # cascades to its jobs
        conn.commit()


def _finish_cost_us(box: Scratch, n: int, *, triggers: bool) -> float:
    """Mean microseconds of a single-row finishing UPDATE (its own transaction), with or without triggers."""
    tag = "on" if triggers else "off"
    with box.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(text(
            "INSERT INTO jobs (batch_id, task_type, key, input) SELECT 'b1_1', 'task_1', :tag || i, '{}'::jsonb "
            "FROM generate_series(1, :n) i RETURNING id"), {"n": n, "tag": f"finish-{tag}-"})]
        conn.execute(text(f"ALTER TABLE jobs {'ENABLE' if triggers else 'DISABLE'} TRIGGER USER"))
    finish = text("UPDATE jobs SET status = 'succeeded', finished_at = now(), cost_usd = cost_usd + 0.000001 "
                  "WHERE id = :id")
    with box.engine.connect() as conn:
        started = time.perf_counter()
        for job in ids:
            conn.execute(finish, {"id": job})
            conn.commit()
        elapsed = time.perf_counter() - started
    with box.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs ENABLE TRIGGER USER"))
    return elapsed / max(1, len(ids)) * 1e6


def _plan(box: Scratch) -> str:
    with box.engine.connect() as conn:
        rows = conn.execute(text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT * FROM escalation_stats"))
        return "\n".join(r[0] for r in rows)


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    n = 5_000 if tiny else 1_000_000
    with scratch(svc, "stats") as box:
        started = time.perf_counter()
        with box.engine.begin() as conn:
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            for sql in GENERATE.split(";\n\n"):
                conn.execute(text(sql), {"n": n})
        with box.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        generated = time.perf_counter() - started
        old_ms, old_rows = _time_view(box, "escalation_stats", 1 if not tiny else 3)
        started = time.perf_counter()
        with box.engine.begin() as conn:
            conn.execute(text(UPGRADE))
        migrated = time.perf_counter() - started
        with box.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE job_outcomes, escalation_summary"))
        new_ms, new_rows = _time_view(box, "escalation_stats", 9)
        diff = differences(old_rows, new_rows)
        plan = _plan(box)
        _live(box, 300 if tiny else 3000)
        with box.engine.begin() as conn:
            conn.execute(text(OLD_VIEW.replace("VIEW escalation_stats", "VIEW escalation_stats_live")))
            live_diff = differences(_rows(conn, "escalation_stats_live"), _rows(conn, "escalation_stats"))
        with_us = _finish_cost_us(box, 300 if tiny else 2000, triggers=True)
        without_us = _finish_cost_us(box, 300 if tiny else 2000, triggers=False)
    if profile or diff or live_diff:
        print(plan)
        print("\n".join(diff + live_diff) or "results identical")
    same = not diff and not live_diff
    return [
        Row(f"5 stats: escalation_stats over {n:,} jobs", new_ms, old_ms, "ms", f"≤ {TARGET_MS:.0f} ms",
            new_ms <= TARGET_MS and same,
            f"summary + triggers (bench/stats_sql.py); results {'identical' if same else 'DIFFER'} to 0002's view "
            f"(also after a live workload); data {generated:.0f} s, migration+backfill {migrated:.1f} s"),
        Row("5 stats: finishing UPDATE with summary triggers", with_us, without_us, "µs", "report", None,
            "single-row UPDATE to succeeded in its own transaction, triggers on vs off"),
    ]
