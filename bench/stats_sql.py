"""The proposed migration for escalation_stats (benchmark 5): an incrementally maintained summary.

``UPGRADE`` is the exact SQL for a new Alembic revision (``op.execute(UPGRADE)``), ``DOWNGRADE`` its
reverse. bench.stats_view applies it to a scratch schema holding 1,000,000 jobs, checks that the view
returns what the old definition returns, and times both.

Design:

- ``job_outcomes``: one row per finished job (written when ``jobs.status`` becomes succeeded/failed): its
  task type, its baseline cost (tier-1 tokens at the top tier's prices) and its latency (first request to
  ``finished_at``). An index on (task_type, latency_ms) answers percentiles by position: percentile_cont
  interpolates between the values at ranks floor(f·(n−1)) and the next, and the index reaches a rank with
  an index-only scan from whichever end is nearer (p95 walks 5 % of the rows, not 95 %).
- ``escalation_summary``: per task type, 64 shard rows of counters and sums (a job's shard is
  ``id % 64``), so concurrent workers finishing jobs rarely wait on the same row lock.
- Triggers keep both exact: a statement-level trigger on INSERT (one upsert per COPY, not one per row), a
  row-level trigger on UPDATE that fires only when a job's cost, its finished state, tier or task type
  changes (the claim UPDATE and an escalation do not fire it), a statement-level trigger on DELETE
  (including deletes cascaded from batches) and one on TRUNCATE.
- The view keeps the old columns, types and semantics; it reads ~64 rows per task type plus two short
  index scans.
"""

from __future__ import annotations

import importlib

__all__ = ["DOWNGRADE", "OLD_VIEW", "UPGRADE"]


def _escalation_stats_0002() -> str:
    views = importlib.import_module("migrations.versions.0002_views").VIEWS
    start = views.index("CREATE VIEW escalation_stats")
    end = views.index(";", views.index("GROUP BY task_type", start)) + 1
    return "\n" + views[start:end].replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1) + "\n"

#: The view as migration 0002 defines it (the baseline; also what DOWNGRADE restores), read from that migration.
OLD_VIEW = _escalation_stats_0002()


UPGRADE = """
-- Writers (stages, producer, sweeper) wait while the summary is built, so no change slips between the
-- backfill and the triggers.
LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE job_outcomes (
    job_id bigint PRIMARY KEY,          -- no FK: the DELETE trigger removes rows (it needs their baseline)
    task_type text NOT NULL,
    baseline_usd numeric NOT NULL,      -- tier-1 tokens at the top tier's prices, when the job finished
    latency_ms double precision         -- first request to finished_at; NULL when the job made none
);
CREATE INDEX job_outcomes_latency ON job_outcomes (task_type, latency_ms) WHERE latency_ms IS NOT NULL;

CREATE TABLE escalation_summary (
    task_type text NOT NULL,
    shard integer NOT NULL,             -- jobs.id % 64: spreads concurrent finishes over 64 row locks
    jobs bigint NOT NULL DEFAULT 0,
    finished bigint NOT NULL DEFAULT 0,
    succeeded bigint NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    escalated bigint NOT NULL DEFAULT 0,    -- finished with tier > 1 (for integer tiers also tier >= 2)
    tier3 bigint NOT NULL DEFAULT 0,        -- finished with tier >= 3
    latencies bigint NOT NULL DEFAULT 0,    -- finished jobs with a latency (rows of job_outcomes_latency)
    finished_cost numeric NOT NULL DEFAULT 0,
    finished_baseline numeric NOT NULL DEFAULT 0,
    total_cost numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (task_type, shard)
);

-- One job's share of the counters, signed (+1 adds it, -1 removes it).
CREATE FUNCTION escalation_summary_add(p_task text, p_shard integer, p_sign integer, p_status text,
                                       p_tier integer, p_cost numeric, p_baseline numeric,
                                       p_has_latency boolean) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO escalation_summary AS s (task_type, shard, jobs, finished, succeeded, failed, escalated, tier3,
                                         latencies, finished_cost, finished_baseline, total_cost)
    SELECT p_task, p_shard, p_sign, p_sign * f::int, p_sign * (p_status = 'succeeded')::int,
           p_sign * (p_status = 'failed')::int, p_sign * (f AND p_tier > 1)::int, p_sign * (f AND p_tier >= 3)::int,
           p_sign * (f AND p_has_latency)::int, CASE WHEN f THEN p_sign * p_cost ELSE 0 END,
           CASE WHEN f THEN p_sign * p_baseline ELSE 0 END, p_sign * p_cost
    FROM (SELECT p_status IN ('succeeded', 'failed') AS f) x
    ON CONFLICT (task_type, shard) DO UPDATE SET
        jobs = s.jobs + EXCLUDED.jobs, finished = s.finished + EXCLUDED.finished,
        succeeded = s.succeeded + EXCLUDED.succeeded, failed = s.failed + EXCLUDED.failed,
        escalated = s.escalated + EXCLUDED.escalated, tier3 = s.tier3 + EXCLUDED.tier3,
        latencies = s.latencies + EXCLUDED.latencies, finished_cost = s.finished_cost + EXCLUDED.finished_cost,
        finished_baseline = s.finished_baseline + EXCLUDED.finished_baseline,
        total_cost = s.total_cost + EXCLUDED.total_cost
$$;

-- The outcome row of a job that is finished now: baseline and latency from its attempts.
CREATE FUNCTION job_outcome_record(p_job jobs) RETURNS job_outcomes
LANGUAGE sql AS $$
    INSERT INTO job_outcomes (job_id, task_type, baseline_usd, latency_ms)
    SELECT p_job.id, p_job.task_type,
           (coalesce(a.in1, 0) * b.top_input_per_mtok + coalesce(a.out1, 0) * b.top_output_per_mtok) / 1000000,
           extract(epoch FROM p_job.finished_at - a.first_at) * 1000
    FROM batches b,
         LATERAL (SELECT sum(input_tokens) FILTER (WHERE tier = 1) AS in1,
                         sum(output_tokens) FILTER (WHERE tier = 1) AS out1,
                         min(created_at) AS first_at
                  FROM attempts WHERE job_id = p_job.id) a
    WHERE b.id = p_job.batch_id
    ON CONFLICT (job_id) DO UPDATE SET task_type = EXCLUDED.task_type, baseline_usd = EXCLUDED.baseline_usd,
                                      latency_ms = EXCLUDED.latency_ms
    RETURNING *
$$;

CREATE FUNCTION escalation_summary_on_update() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone job_outcomes;
    born job_outcomes;
BEGIN
    IF OLD.status IN ('succeeded', 'failed') THEN
        DELETE FROM job_outcomes WHERE job_id = OLD.id RETURNING * INTO gone;
    END IF;
    PERFORM escalation_summary_add(OLD.task_type, (OLD.id % 64)::int, -1, OLD.status, OLD.tier, OLD.cost_usd,
                                   coalesce(gone.baseline_usd, 0), gone.latency_ms IS NOT NULL);
    IF NEW.status IN ('succeeded', 'failed') THEN
        born := job_outcome_record(NEW);
    END IF;
    PERFORM escalation_summary_add(NEW.task_type, (NEW.id % 64)::int, 1, NEW.status, NEW.tier, NEW.cost_usd,
                                   coalesce(born.baseline_usd, 0), born.latency_ms IS NOT NULL);
    RETURN NULL;
END $$;

CREATE FUNCTION escalation_summary_on_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Jobs are inserted queued (producer COPY); a row inserted already finished is recorded with the
    -- attempts that exist at that moment (none, in practice).
    PERFORM job_outcome_record(n) FROM new_jobs n WHERE n.status IN ('succeeded', 'failed');
    PERFORM escalation_summary_add(n.task_type, (n.id % 64)::int, 1, n.status, n.tier, n.cost_usd,
                                   coalesce(o.baseline_usd, 0), o.latency_ms IS NOT NULL)
    FROM new_jobs n LEFT JOIN job_outcomes o ON o.job_id = n.id
    WHERE n.status IN ('succeeded', 'failed');
    INSERT INTO escalation_summary AS s (task_type, shard, jobs, total_cost)
    SELECT task_type, (id % 64)::int, count(*), sum(cost_usd) FROM new_jobs
    WHERE status NOT IN ('succeeded', 'failed') GROUP BY 1, 2
    ON CONFLICT (task_type, shard) DO UPDATE SET jobs = s.jobs + EXCLUDED.jobs,
                                                 total_cost = s.total_cost + EXCLUDED.total_cost;
    RETURN NULL;
END $$;

CREATE FUNCTION escalation_summary_on_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH gone AS (DELETE FROM job_outcomes o USING old_jobs d WHERE o.job_id = d.id RETURNING o.*)
    INSERT INTO escalation_summary AS s (task_type, shard, jobs, finished, succeeded, failed, escalated, tier3,
                                         latencies, finished_cost, finished_baseline, total_cost)
    SELECT d.task_type, (d.id % 64)::int, -count(*),
           -count(*) FILTER (WHERE d.status IN ('succeeded', 'failed')),
           -count(*) FILTER (WHERE d.status = 'succeeded'), -count(*) FILTER (WHERE d.status = 'failed'),
           -count(*) FILTER (WHERE d.status IN ('succeeded', 'failed') AND d.tier > 1),
           -count(*) FILTER (WHERE d.status IN ('succeeded', 'failed') AND d.tier >= 3),
           -count(g.latency_ms), -coalesce(sum(d.cost_usd) FILTER (WHERE d.status IN ('succeeded', 'failed')), 0),
           -coalesce(sum(g.baseline_usd), 0), -sum(d.cost_usd)
    FROM old_jobs d LEFT JOIN gone g ON g.job_id = d.id
    GROUP BY 1, 2
    ON CONFLICT (task_type, shard) DO UPDATE SET
        jobs = s.jobs + EXCLUDED.jobs, finished = s.finished + EXCLUDED.finished,
        succeeded = s.succeeded + EXCLUDED.succeeded, failed = s.failed + EXCLUDED.failed,
        escalated = s.escalated + EXCLUDED.escalated, tier3 = s.tier3 + EXCLUDED.tier3,
        latencies = s.latencies + EXCLUDED.latencies, finished_cost = s.finished_cost + EXCLUDED.finished_cost,
        finished_baseline = s.finished_baseline + EXCLUDED.finished_baseline,
        total_cost = s.total_cost + EXCLUDED.total_cost;
    RETURN NULL;
END $$;

CREATE FUNCTION escalation_summary_on_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE job_outcomes, escalation_summary;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_summary_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_insert();
-- Fires on a cost change (the call stage's move), on finishing and on any change to a finished job; never
-- on a claim or an escalation of an unfinished job (WHEN is evaluated before any PL/pgSQL runs).
CREATE TRIGGER jobs_summary_update AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.cost_usd IS DISTINCT FROM NEW.cost_usd OR OLD.task_type IS DISTINCT FROM NEW.task_type
          OR OLD.status IN ('succeeded', 'failed') OR NEW.status IN ('succeeded', 'failed'))
    EXECUTE FUNCTION escalation_summary_on_update();
CREATE TRIGGER jobs_summary_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_delete();
CREATE TRIGGER jobs_summary_truncate AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_truncate();

-- Backfill from what is there now (under the lock above).
INSERT INTO job_outcomes (job_id, task_type, baseline_usd, latency_ms)
SELECT j.id, j.task_type,
       (coalesce(a.in1, 0) * b.top_input_per_mtok + coalesce(a.out1, 0) * b.top_output_per_mtok) / 1000000,
       extract(epoch FROM j.finished_at - a.first_at) * 1000
FROM jobs j
JOIN batches b ON b.id = j.batch_id
LEFT JOIN (SELECT job_id, sum(input_tokens) FILTER (WHERE tier = 1) AS in1,
                  sum(output_tokens) FILTER (WHERE tier = 1) AS out1, min(created_at) AS first_at
           FROM attempts GROUP BY job_id) a ON a.job_id = j.id
WHERE j.status IN ('succeeded', 'failed');

INSERT INTO escalation_summary (task_type, shard, jobs, finished, succeeded, failed, escalated, tier3, latencies,
                                finished_cost, finished_baseline, total_cost)
SELECT j.task_type, (j.id % 64)::int, count(*),
       count(*) FILTER (WHERE j.status IN ('succeeded', 'failed')),
       count(*) FILTER (WHERE j.status = 'succeeded'), count(*) FILTER (WHERE j.status = 'failed'),
       count(*) FILTER (WHERE j.status IN ('succeeded', 'failed') AND j.tier > 1),
       count(*) FILTER (WHERE j.status IN ('succeeded', 'failed') AND j.tier >= 3),
       count(o.latency_ms), coalesce(sum(j.cost_usd) FILTER (WHERE j.status IN ('succeeded', 'failed')), 0),
       coalesce(sum(o.baseline_usd), 0), sum(j.cost_usd)
FROM jobs j LEFT JOIN job_outcomes o ON o.job_id = j.id
GROUP BY 1, 2;

CREATE OR REPLACE VIEW escalation_stats AS
WITH s AS (
    SELECT task_type, sum(jobs)::bigint AS jobs, sum(finished)::bigint AS finished,
           sum(succeeded)::bigint AS succeeded, sum(failed)::bigint AS failed,
           sum(escalated) AS escalated, sum(tier3) AS tier3, sum(latencies)::bigint AS latencies,
           sum(finished_cost) AS finished_cost, sum(finished_baseline) AS finished_baseline,
           sum(total_cost) AS total_cost
    FROM escalation_summary
    GROUP BY task_type
    HAVING sum(jobs) > 0
), ranks AS (
    -- percentile_cont(f) interpolates the values at ranks k = floor(f * (n - 1)) and k + 1 (0-based).
    -- Computed in float8 exactly as percentile_cont does, so the result is bit-for-bit the same.
    SELECT s.*, floor(0.5::float8 * (latencies - 1))::bigint AS k50, 0.5::float8 * (latencies - 1) AS x50,
           floor(0.95::float8 * (latencies - 1))::bigint AS k95, 0.95::float8 * (latencies - 1) AS x95
    FROM s
)
SELECT r.task_type, r.jobs, r.finished, r.succeeded, r.failed,
       r.escalated::numeric / nullif(r.finished, 0) AS escalation_rate,
       r.escalated::numeric / nullif(r.finished, 0) AS tier2_rate,
       r.tier3::numeric / nullif(r.finished, 0) AS tier3_rate,
       r.finished_cost / nullif(r.finished, 0) AS avg_cost_usd,
       r.finished_baseline / nullif(r.finished, 0) AS baseline_cost_usd,
       100 * (1 - r.finished_cost / nullif(r.finished_baseline, 0)) AS savings_pct,
       p50.lo + (r.x50 - r.k50) * (p50.hi - p50.lo) AS p50_latency_ms,
       p95.lo + (r.x95 - r.k95) * (p95.hi - p95.lo) AS p95_latency_ms,
       r.total_cost AS total_cost_usd
FROM ranks r
LEFT JOIN LATERAL (  -- ranks k50, k50 + 1 from the low end (the median walks half the index)
    SELECT min(latency_ms) AS lo, max(latency_ms) AS hi FROM (
        SELECT latency_ms FROM job_outcomes o
        WHERE o.task_type = r.task_type AND o.latency_ms IS NOT NULL
        ORDER BY o.latency_ms OFFSET greatest(r.k50, 0) LIMIT 2) x
) p50 ON r.latencies > 0
LEFT JOIN LATERAL (  -- ranks k95 + 1, k95 from the high end (5 % of the index)
    SELECT min(latency_ms) AS lo, max(latency_ms) AS hi FROM (
        SELECT latency_ms FROM job_outcomes o
        WHERE o.task_type = r.task_type AND o.latency_ms IS NOT NULL
        ORDER BY o.latency_ms DESC OFFSET greatest(r.latencies - r.k95 - 2, 0) LIMIT 2) x
) p95 ON r.latencies > 0;
"""

DOWNGRADE = OLD_VIEW + """
DROP TRIGGER jobs_summary_insert ON jobs;
DROP TRIGGER jobs_summary_update ON jobs;
DROP TRIGGER jobs_summary_delete ON jobs;
DROP TRIGGER jobs_summary_truncate ON jobs;
DROP FUNCTION escalation_summary_on_insert(), escalation_summary_on_update(), escalation_summary_on_delete(),
              escalation_summary_on_truncate(), job_outcome_record(jobs),
              escalation_summary_add(text, integer, integer, text, integer, numeric, numeric, boolean);
DROP TABLE job_outcomes, escalation_summary;
"""
