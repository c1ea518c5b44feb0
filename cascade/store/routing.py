"""What the learned start tier reads (``cascade.routing``): each tier's recent history for a task type."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Connection, text

__all__ = ["tier_history"]

# The last :window finished jobs of the task type that were validated at :tier (newest ids first: the primary key
# read backwards, stopping once the window is full), with what they cost at the tier and above it. Audit work
# (tier 0) is never part of a job's cost.
_HISTORY = text("""
SELECT count(*) AS jobs, count(*) FILTER (WHERE r.passed) AS passed,
       coalesce(avg(c.at_tier), 0) AS cost_usd, coalesce(avg(c.above), 0) AS above_usd
FROM (SELECT j.id, v.passed FROM jobs j JOIN validations v ON v.job_id = j.id AND v.tier = :tier
      WHERE j.task_type = :task AND j.status IN ('succeeded', 'failed')
      ORDER BY j.id DESC LIMIT :window) r
CROSS JOIN LATERAL (
    SELECT coalesce(sum(cost_usd) FILTER (WHERE tier = :tier), 0) AS at_tier,
           coalesce(sum(cost_usd) FILTER (WHERE tier > :tier), 0) AS above
    FROM attempts WHERE job_id = r.id
) c
""")


def tier_history(conn: Connection, task_type: str, tiers: int, window: int) -> list[tuple[int, int, int, Decimal, Decimal]]:
    """Per tier 1..``tiers``: (tier, jobs, passed, average cost at the tier, average cost above it) over the
    last ``window`` finished jobs of ``task_type`` that ran it."""
    out = []
    for tier in range(1, tiers + 1):
        row = conn.execute(_HISTORY, {"task": task_type, "tier": tier, "window": window}).one()
        out.append((tier, int(row.jobs), int(row.passed), Decimal(row.cost_usd), Decimal(row.above_usd)))
    return out
