"""Reports: the ``escalation_stats`` view and the evaluation tables (``eval_runs``, ``eval_results``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, text

__all__ = ["escalation_stats", "record_eval_run"]


def escalation_stats(conn: Connection, task_type: str | None = None) -> list[dict[str, Any]]:  # Any: view rows
    """Rows of the ``escalation_stats`` view (one per task type), by task type; only ``task_type``'s if given."""
    sql = "SELECT * FROM escalation_stats" + (" WHERE task_type = :t" if task_type else "") + " ORDER BY task_type"
    return [dict(r._mapping) for r in conn.execute(text(sql), {"t": task_type})]


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
