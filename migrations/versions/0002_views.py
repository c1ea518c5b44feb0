"""Views analysts query: escalation_stats, escalation_reasons, tier_stats; role cascade_reader.

Denominators are finished jobs (succeeded or failed). Latency per job runs from its first
request to finished_at; tier_stats latency is per request.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = """
CREATE VIEW escalation_stats AS
WITH per_job AS (
    SELECT j.task_type, j.tier, j.status, j.cost_usd,
           j.status IN ('succeeded', 'failed') AS finished,
           (coalesce(a.in1, 0) * b.top_input_per_mtok + coalesce(a.out1, 0) * b.top_output_per_mtok)
               / 1000000 AS baseline_usd,
           extract(epoch FROM j.finished_at - a.first_at) * 1000 AS latency_ms
    FROM jobs j
    JOIN batches b ON b.id = j.batch_id
    LEFT JOIN LATERAL (
        SELECT sum(input_tokens) FILTER (WHERE tier = 1) AS in1,
               sum(output_tokens) FILTER (WHERE tier = 1) AS out1,
               min(created_at) AS first_at
        FROM attempts WHERE job_id = j.id
    ) a ON true
)
SELECT task_type,
       count(*) AS jobs,
       count(*) FILTER (WHERE finished) AS finished,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE finished AND tier > 1)::numeric
           / nullif(count(*) FILTER (WHERE finished), 0) AS escalation_rate,
       count(*) FILTER (WHERE finished AND tier >= 2)::numeric
           / nullif(count(*) FILTER (WHERE finished), 0) AS tier2_rate,
       count(*) FILTER (WHERE finished AND tier >= 3)::numeric
           / nullif(count(*) FILTER (WHERE finished), 0) AS tier3_rate,
       avg(cost_usd) FILTER (WHERE finished) AS avg_cost_usd,
       avg(baseline_usd) FILTER (WHERE finished) AS baseline_cost_usd,
       100 * (1 - sum(cost_usd) FILTER (WHERE finished)
                  / nullif(sum(baseline_usd) FILTER (WHERE finished), 0)) AS savings_pct,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE finished) AS p50_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) FILTER (WHERE finished) AS p95_latency_ms,
       sum(cost_usd) AS total_cost_usd
FROM per_job
GROUP BY task_type;

CREATE VIEW escalation_reasons AS
SELECT j.task_type, v.tier, r.reason ->> 'code' AS reason, count(*) AS count
FROM validations v
JOIN jobs j ON j.id = v.job_id
CROSS JOIN LATERAL jsonb_array_elements(v.reasons) AS r(reason)
WHERE NOT v.passed
GROUP BY j.task_type, v.tier, r.reason ->> 'code';

CREATE VIEW tier_stats AS
WITH req AS (
    SELECT j.task_type, a.tier, a.model,
           count(*) AS attempts,
           sum(a.cost_usd) AS cost_usd,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY a.latency_ms) AS p50_latency_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY a.latency_ms) AS p95_latency_ms
    FROM attempts a JOIN jobs j ON j.id = a.job_id
    GROUP BY j.task_type, a.tier, a.model
), val AS (
    SELECT j.task_type, v.tier, v.model, avg(v.passed::int::numeric) AS pass_rate
    FROM validations v JOIN jobs j ON j.id = v.job_id
    GROUP BY j.task_type, v.tier, v.model
)
SELECT req.task_type, req.tier, req.model, req.attempts, val.pass_rate, req.cost_usd,
       req.p50_latency_ms, req.p95_latency_ms
FROM req LEFT JOIN val USING (task_type, tier, model);
"""

READER = """
DO $$
BEGIN
    CREATE ROLE cascade_reader NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO cascade_reader', current_schema());
END $$;
GRANT SELECT ON escalation_stats, escalation_reasons, tier_stats TO cascade_reader;
"""


def upgrade() -> None:
    op.execute(VIEWS)
    op.execute(READER)


def downgrade() -> None:
    op.execute("DROP VIEW tier_stats, escalation_reasons, escalation_stats")
