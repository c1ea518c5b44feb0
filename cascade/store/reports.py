"""Reports: the ``escalation_stats`` view (or its query over some batches) and the evaluation tables
(``eval_runs``, ``eval_results``)."""

from __future__ import annotations

import importlib
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

__all__ = ["batch_votes", "count_eval_batches", "escalation_stats", "escalation_stats_of", "record_eval_run",
           "routing_accuracy"]

# A batch `cascade eval` submitted (its source says so from the start; eval_runs names it once it is done).
_IS_EVAL = ("(b.source LIKE 'cascade eval %' OR EXISTS (SELECT 1 FROM eval_runs e WHERE e.batch_id = b.id))")


def escalation_stats(conn: Connection, task_type: str | None = None) -> list[dict[str, Any]]:  # Any: view rows
    """Rows of the ``escalation_stats`` view (one per task type), by task type; only ``task_type``'s if given."""
    sql = "SELECT * FROM escalation_stats" + (" WHERE task_type = :t" if task_type else "") + " ORDER BY task_type"
    return [dict(r._mapping) for r in conn.execute(text(sql), {"t": task_type})]


_VOTES = text("SELECT v.job_id, v.votes, v.samples FROM validations v JOIN jobs j ON j.id = v.job_id "
              "WHERE j.batch_id = :b AND v.tier = :tier")


def batch_votes(conn: Connection, batch_id: str, tier: int) -> dict[int, tuple[int, int]]:
    """Per job of a batch: the votes of its majority answer at ``tier`` and the samples voted (k)."""
    return {int(job): (int(votes), int(k)) for job, votes, k in conn.execute(_VOTES, {"b": batch_id, "tier": tier})}


def routing_accuracy(conn: Connection, task_type: str | None = None) -> list[dict[str, Any]]:  # Any: view rows
    """Rows of the ``routing_accuracy`` view (per task type, tier and model), only ``task_type``'s if given."""
    sql = ("SELECT * FROM routing_accuracy" + (" WHERE task_type = :t" if task_type else "")
           + " ORDER BY task_type, tier, model")
    return [dict(r._mapping) for r in conn.execute(text(sql), {"t": task_type})]


def escalation_stats_of(
    conn: Connection,
    *,
    task_type: str | None = None,
    batch_ids: list[str] | None = None,
    since: datetime | None = None,
    include_eval: bool = True,
) -> list[dict[str, Any]]:  # Any: view rows
    """The ``escalation_stats`` columns over some jobs only: those of ``batch_ids``, of batches submitted at or
    after ``since``, and without the batches of ``cascade eval`` unless ``include_eval``. Without a filter this is
    the view itself (kept by triggers); with one, the view's original query runs over the jobs that pass."""
    where = {"j.task_type = :t": task_type is not None, "j.batch_id = ANY(:ids)": batch_ids is not None,
             "b.created_at >= :since": since is not None, f"NOT {_IS_EVAL}": not include_eval}
    chosen = [cond for cond, wanted in where.items() if wanted]
    if not chosen:
        return escalation_stats(conn, task_type)
    # Migration 0012 keeps the SELECT the view must equal (0002's, counted from each job's start tier): the same
    # numbers, filtered.
    query: str = importlib.import_module("migrations.versions.0012_start_tiers").QUERY
    end = ") a ON true\n)"
    if query.count(end) != 1:
        raise RuntimeError("the per_job CTE of migration 0002's escalation_stats is not where it was")
    query = query.replace(end, ") a ON true\n    WHERE " + " AND ".join(chosen) + "\n)") + " ORDER BY task_type"
    params = {"t": task_type, "ids": batch_ids, "since": since}
    return [dict(r._mapping) for r in conn.execute(text(query), params)]


def count_eval_batches(conn: Connection) -> int:
    """How many batches ``cascade eval`` submitted."""
    return int(conn.execute(text(f"SELECT count(*) FROM batches b WHERE {_IS_EVAL}")).scalar_one())


_RUN = text("""
INSERT INTO eval_runs (id, eval_id, task_type, dataset, dataset_hash, label, kind, threshold, tier, batch_id,
                       config_hash, rows, correct, accuracy, escalation_rate, tier3_rate, cost_usd, relative_cost)
VALUES (:id, :eval_id, :task_type, :dataset, :dataset_hash, :label, :kind, :threshold, :tier, :batch_id,
        :config_hash, :rows, :correct, :accuracy, :escalation_rate, :tier3_rate, :cost_usd, :relative_cost)
""")
_RESULT = text("""
INSERT INTO eval_results (run_id, row_id, job_id, status, tier, correct, cost_usd, calibration, gold, output)
VALUES (:run_id, :row_id, :job_id, :status, :tier, :correct, :cost_usd, :calibration, CAST(:gold AS jsonb),
        CAST(:output AS jsonb))
""")


def record_eval_run(conn: Connection, run: dict[str, Any], results: list[dict[str, Any]]) -> None:  # Any: params
    """Insert one evaluation run (keys: the columns of ``eval_runs``) and its per-row results (the columns of
    ``eval_results``, with gold and output as JSON text)."""
    conn.execute(_RUN, run)
    conn.execute(_RESULT, results)
