"""escalation_stats_pretty: escalation_stats rounded for people (a dashboard, a psql session, a report).

escalation_stats keeps its exact numeric columns for machines (``0.05000000000000000000``,
``0.000015170000``); this view shows the same rows as percentages with one decimal, money in USD with six
decimals (a row's cost is often a fraction of a cent) and latencies in whole milliseconds. cascade_reader
may select it, like the other views.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE VIEW escalation_stats_pretty AS
SELECT task_type, jobs, finished, succeeded, failed,
       round(100 * escalation_rate, 1) AS escalation_pct,
       round(100 * tier2_rate, 1) AS tier2_pct,
       round(100 * tier3_rate, 1) AS tier3_pct,
       round(avg_cost_usd, 6) AS avg_cost_usd,
       round(baseline_cost_usd, 6) AS baseline_cost_usd,
       round(savings_pct, 1) AS savings_pct,
       round(p50_latency_ms::numeric) AS p50_latency_ms,
       round(p95_latency_ms::numeric) AS p95_latency_ms
FROM escalation_stats;
GRANT SELECT ON escalation_stats_pretty TO cascade_reader;
""")


def downgrade() -> None:
    op.execute("DROP VIEW escalation_stats_pretty")
