"""escalation_stats from a summary kept exact by triggers, instead of aggregating every job at each query.

Migration 0002's view joins every job to its attempts and sorts all latencies: 6.6 s over 1,000,000 jobs.
This one returns the same columns, types and values (bit for bit: the same numeric scales and the same
float8 percentile arithmetic) from about 64 rows per task type and two short index scans:

- ``job_outcomes``: one row per finished job with its share of the counters (task type, status, tier,
  cost) and what 0002 derives from its attempts (baseline cost: tier-1 tokens at the top tier's prices;
  latency: first request to ``finished_at``), computed by 0002's own expressions. An index on
  (task_type, latency_ms) answers percentiles by rank from whichever end is nearer; an index on
  (task_type, scale(baseline_usd)) gives the numeric scale avg() would have.
- ``escalation_summary``: per task type, counters and sums split over 64 shard rows. A transaction adds
  to the shard of its backend (``pg_backend_pid() % 64``) after taking a transaction lock on that
  shard, so concurrent workers rarely wait on each other and never deadlock over summary rows, however
  many jobs and task types one statement touches.
- Triggers keep both exact. On jobs: INSERT and DELETE per statement (one upsert per COPY or cascaded
  batch delete), UPDATE per row only when a job's cost or task type changes or it is or was finished
  (never on a claim). On attempts (0002 reads them at query time): INSERT and DELETE per statement, UPDATE
  per row when tier-1 tokens, the first request time or the job change. They lock the job's row, so a
  late write of a lost claim and the job's finishing UPDATE are ordered and whichever comes second sees
  the other, and recompute the job only if it is finished. On batches: a change of top-tier prices.
  TRUNCATE of jobs or attempts rebuilds.
- ``escalation_summary_rebuild()`` recomputes everything from the tables (the backfill below; also the
  way back after changing jobs with the triggers disabled).

Functions pin ``search_path`` to the migration's (``SET search_path FROM CURRENT``), so they resolve this
schema's tables whatever the caller's path; EXECUTE is revoked from PUBLIC. cascade_reader keeps SELECT
on the view (which reads the new tables with its owner's rights) and gains nothing else.

The SQL is built from a ``Summary`` (``SUMMARY``: what 0002 counts): a later migration that changes what the
view counts builds its functions, attempts trigger and view from its own (as migration 0012 does).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

# No ``from __future__ import annotations``: Alembic loads this file without registering it in sys.modules,
# where dataclass cannot resolve annotations given as strings.
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

__all__ = ["DOWNGRADE", "FINISHED", "QUERY_0002", "SUMMARY", "UPGRADE", "Summary", "attempts_update_trigger",
           "downgrade", "functions", "upgrade", "view"]


def _query_0002() -> str:
    views: str = importlib.import_module("migrations.versions.0002_views").VIEWS
    head = "CREATE VIEW escalation_stats AS"
    start = views.index(head) + len(head)
    end = views.index(";", views.index("GROUP BY task_type", start))
    return views[start:end].strip()


#: The SELECT behind 0002's escalation_stats, read from that migration: what the summary must equal and
#: what DOWNGRADE restores.
QUERY_0002 = _query_0002()

#: The statuses of a finished job, as an SQL list.
FINISHED = "('succeeded', 'failed')"

# The transaction lock on this backend's shard, taken before any of its summary rows: two transactions that
# share a shard queue up instead of deadlocking over rows of several task types.
_LOCK_SHARD = "PERFORM pg_advisory_xact_lock('escalation_summary'::regclass::oid::int, pg_backend_pid() % 64);"

# job_outcomes' columns after job_id (a job's share is read from them), and the jobs columns its outcome reads.
_OUTCOME = ("task_type", "status", "tier", "cost_usd", "baseline_usd", "latency_ms")
_READS = ("id", "task_type", "batch_id", "status", "tier", "cost_usd", "finished_at")

_ATTEMPTS_WHEN = """(OLD.job_id IS DISTINCT FROM NEW.job_id OR OLD.created_at IS DISTINCT FROM NEW.created_at
          OR ((OLD.tier = 1 OR NEW.tier = 1) AND (OLD.tier, OLD.input_tokens, OLD.output_tokens)
              IS DISTINCT FROM (NEW.tier, NEW.input_tokens, NEW.output_tokens)))"""


def _share(r: str) -> dict[str, str]:
    """One job's share of each counter, in escalation_summary's column order, from ``r``: its job_outcomes row
    once it is finished, its own columns with NULL baseline_usd and latency_ms before."""
    done = f"{r}.status IN {FINISHED}"
    return {"jobs": "1", "finished": f"({done})::int", "succeeded": f"({r}.status = 'succeeded')::int",
            "failed": f"({r}.status = 'failed')::int", "escalated": f"({done} AND {r}.tier > 1)::int",
            "tier3": f"({done} AND {r}.tier >= 3)::int", "latencies": f"({done} AND {r}.latency_ms IS NOT NULL)::int",
            "finished_cost": f"CASE WHEN {done} THEN {r}.cost_usd ELSE 0 END",
            "finished_baseline": f"CASE WHEN {done} THEN {r}.baseline_usd ELSE 0 END", "total_cost": f"{r}.cost_usd"}


@dataclass(frozen=True)
class Summary:
    """What the summary counts, as SQL; ``functions``, ``attempts_update_trigger`` and ``view`` build it.

    SUMMARY is this migration's. A later migration that changes what escalation_stats counts adds its columns
    to job_outcomes and escalation_summary, replaces the functions, the trigger and the view with those of its
    own Summary, and goes back with SUMMARY's.
    """

    #: One job's share of each counter of escalation_summary from row ``r`` (as ``_share``).
    share: Callable[[str], dict[str, str]] = _share
    #: Columns of jobs that job_outcomes keeps after latency_ms, for ``share`` to read.
    kept: tuple[str, ...] = ()
    #: The tier whose requests' tokens, at the top tier's prices, are the baseline cost (an expression over jobs j).
    baseline_tier: str = "1"
    #: Which attempts count for the baseline and the first request (a condition on attempts; empty: all).
    counted: str = ""
    #: When an UPDATE of an attempt may change its job's outcome (WHEN of attempts_summary_update).
    attempts_when: str = _ATTEMPTS_WHEN
    #: escalation_stats' columns escalation_rate, tier2_rate, tier3_rate: (column, counter) shares of finished.
    rates: tuple[tuple[str, str], ...] = (("escalation_rate", "escalated"), ("tier2_rate", "escalated"),
                                          ("tier3_rate", "tier3"))
    #: More such rates, appended after total_cost_usd.
    appended: tuple[tuple[str, str], ...] = ()

    @property
    def counters(self) -> tuple[str, ...]:
        """escalation_summary's counters."""
        return tuple(self.share("r"))

    @property
    def columns(self) -> tuple[str, ...]:
        """job_outcomes' columns after job_id."""
        return _OUTCOME + self.kept


#: This migration's summary: what 0002's view counts.
SUMMARY = Summary()

_COUNTERS = SUMMARY.counters


def _outcomes(d: Summary) -> str:
    """Outcome rows of the finished jobs among {jobs} (jobs ``j`` with _READS and ``d.kept``), with per_job's
    expressions from migration 0002 (those of ``d``'s baseline tier and counted attempts)."""
    kept = "".join(f", {c}" for c in d.kept)
    counted = f" AND {d.counted}" if d.counted else ""
    return f"""
INSERT INTO job_outcomes AS o (job_id, {", ".join(_OUTCOME)}{kept})
SELECT j.id, j.task_type, j.status, j.tier, j.cost_usd,
       (coalesce(a.in1, 0) * b.top_input_per_mtok + coalesce(a.out1, 0) * b.top_output_per_mtok) / 1000000,
       extract(epoch FROM j.finished_at - a.first_at) * 1000{"".join(f", j.{c}" for c in d.kept)}
FROM {{jobs}}
JOIN batches b ON b.id = j.batch_id
LEFT JOIN LATERAL (
    SELECT sum(input_tokens) FILTER (WHERE tier = {d.baseline_tier}) AS in1,
           sum(output_tokens) FILTER (WHERE tier = {d.baseline_tier}) AS out1,
           min(created_at) AS first_at
    FROM attempts WHERE job_id = j.id{counted}
) a ON true
WHERE j.status IN ('succeeded', 'failed')"""


def _add_shares(d: Summary, rows: str) -> str:
    """An upsert adding job shares to this backend's shard, one row per task type. ``rows`` yields
    (``d.columns``, sign): a job's share as ``d.share`` reads it, and +1 to add it or -1 to take it out."""
    return f"""INSERT INTO escalation_summary AS s (task_type, shard, {", ".join(d.counters)})
    SELECT r.task_type, pg_backend_pid() % 64, {", ".join(f"sum(r.sign * {e})" for e in d.share("r").values())}
    FROM ({rows}) r({", ".join(d.columns)}, sign)
    GROUP BY r.task_type
    ON CONFLICT (task_type, shard) DO UPDATE SET
        {", ".join(f"{c} = s.{c} + EXCLUDED.{c}" for c in d.counters)}"""


def _shares(d: Summary, jobs: str, outcomes: str, sign: int) -> str:
    """Rows for _add_shares: the unfinished jobs among ``jobs``, and ``outcomes``, the finished jobs' rows."""
    own = ", ".join({"baseline_usd": "NULL::numeric", "latency_ms": "NULL::float8"}.get(c, c) for c in d.columns)
    return (f"SELECT {own}, {sign} FROM {jobs} "
            f"WHERE status NOT IN {FINISHED} UNION ALL "
            f"SELECT {', '.join(d.columns)}, {sign} FROM {outcomes}")


def _fields(r: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{r}.{c}" for c in columns)


def _unfinished(d: Summary, job: str) -> str:
    """The job_outcomes row of an unfinished ``job`` for its share: its own columns, NULL baseline and latency."""
    kept = "".join(f", {job}.{c}" for c in d.kept)
    return f"ROW({job}.id, {job}.task_type, {job}.status, {job}.tier, {job}.cost_usd, NULL, NULL{kept})"


def _replace(d: Summary, old: str, new: str) -> str:
    """PL/pgSQL replacing one job's share: ``old`` is the job as it was, ``new`` as it is (variables gone
    and born hold their shares)."""
    reads = _READS + d.kept
    values = ", ".join(f"{new}.{c}" for c in reads)
    this = f"(VALUES ({values})) j({', '.join(reads)})"
    pair = ", ".join(f"({_fields(r, d.columns)}, {sign})" for r, sign in (("gone", -1), ("born", 1)))
    return f"""
    IF {old}.status IN {FINISHED} THEN
        DELETE FROM job_outcomes WHERE job_id = {old}.id RETURNING * INTO gone;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'job_outcomes has no row for finished job %', {old}.id
                USING HINT = 'jobs changed while these triggers were disabled: SELECT escalation_summary_rebuild()';
        END IF;
    ELSE
        gone := {_unfinished(d, old)};
    END IF;
    IF {new}.status IN {FINISHED} THEN
        {_outcomes(d).format(jobs=this)}
        RETURNING o.* INTO STRICT born;
    ELSE
        born := {_unfinished(d, new)};
    END IF;
    {_LOCK_SHARD}
    {_add_shares(d, f"VALUES {pair}")};"""


def _lock_jobs(ids: str) -> str:
    """PL/pgSQL locking the jobs ``id IN (ids)`` in id order, setting ``any_finished`` if any of them is."""
    return f"""SELECT coalesce(bool_or(status IN {FINISHED}), false) INTO any_finished
    FROM (SELECT status FROM jobs WHERE id IN ({ids}) ORDER BY id FOR NO KEY UPDATE) j;"""


def functions(d: Summary, *, replace: bool = False) -> str:
    """The summary's functions for ``d``: CREATE FUNCTION, or CREATE OR REPLACE (keeping grants) if ``replace``."""
    create = "CREATE OR REPLACE FUNCTION" if replace else "CREATE FUNCTION"
    changed = f"changed_attempts WHERE {d.counted}" if d.counted else "changed_attempts"
    return f"""
{create} escalation_summary_rebuild() RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    TRUNCATE job_outcomes, escalation_summary;
    {_outcomes(d).format(jobs="jobs j")};
    {_LOCK_SHARD}
    {_add_shares(d, _shares(d, "jobs", "job_outcomes", 1))};
END $$;

{create} escalation_summary_on_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    {_LOCK_SHARD}
    WITH born AS ({_outcomes(d).format(jobs="new_jobs j")} RETURNING o.*)
    {_add_shares(d, _shares(d, "new_jobs", "born", 1))};
    RETURN NULL;
END $$;

{create} escalation_summary_on_update() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    gone job_outcomes;
    born job_outcomes;
BEGIN{_replace(d, "OLD", "NEW")}
    RETURN NULL;
END $$;

{create} escalation_summary_on_delete() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    {_LOCK_SHARD}
    WITH gone AS (
        DELETE FROM job_outcomes WHERE job_id = ANY (ARRAY(SELECT id FROM old_jobs WHERE status IN {FINISHED}))
        RETURNING *
    )
    {_add_shares(d, _shares(d, "old_jobs", "gone", -1))};
    RETURN NULL;
END $$;

{create} escalation_summary_on_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM escalation_summary_rebuild();
    RETURN NULL;
END $$;

-- Recomputes the finished jobs among p_ids. Each job's row is locked first, in id order: a job's own
-- UPDATE holds that lock while its trigger reads the job's attempts and batch, so of a change to those
-- and the job's UPDATE, the second to get the lock sees what the first wrote.
{create} escalation_summary_refresh(p_ids bigint[]) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    job jobs;
    gone job_outcomes;
    born job_outcomes;
BEGIN
    FOR job IN SELECT * FROM jobs WHERE id = ANY (p_ids) ORDER BY id FOR NO KEY UPDATE LOOP
        IF job.status IN {FINISHED} THEN{_replace(d, "job", "job")}
        END IF;
    END LOOP;
END $$;

-- Attempts inserted or deleted (transition table changed_attempts): lock their jobs as refresh does, and
-- refresh only if one of them is finished (a running job's attempts are read when it finishes).
{create} escalation_summary_on_attempts() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    any_finished boolean;
BEGIN
    {_lock_jobs(f"SELECT job_id FROM {changed}")}
    IF any_finished THEN
        PERFORM escalation_summary_refresh(ARRAY(SELECT DISTINCT job_id FROM {changed}));
    END IF;
    RETURN NULL;
END $$;

{create} escalation_summary_on_attempt_update() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    any_finished boolean;
BEGIN
    {_lock_jobs("OLD.job_id, NEW.job_id")}
    IF any_finished THEN
        PERFORM escalation_summary_refresh(ARRAY[OLD.job_id, NEW.job_id]);
    END IF;
    RETURN NULL;
END $$;

{create} escalation_summary_on_prices() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM escalation_summary_refresh(ARRAY(SELECT id FROM jobs WHERE batch_id = NEW.id));
    RETURN NULL;
END $$;
"""


def attempts_update_trigger(d: Summary, *, replace: bool = False) -> str:
    """The attempts UPDATE trigger for ``d``: CREATE TRIGGER, or CREATE OR REPLACE if ``replace``."""
    create = "CREATE OR REPLACE TRIGGER" if replace else "CREATE TRIGGER"
    return f"""{create} attempts_summary_update AFTER UPDATE ON attempts FOR EACH ROW
    WHEN {d.attempts_when}
    EXECUTE FUNCTION escalation_summary_on_attempt_update();"""


def _rate(column: str, counter: str) -> str:
    return f"r.{counter}::numeric / nullif(r.finished, 0) AS {column}"


def view(d: Summary) -> str:
    """escalation_stats over the summary of ``d``: CREATE OR REPLACE VIEW (it may add columns at the end)."""
    more = ", ".join(f"sum({c}) AS {c}" for c in d.counters if c not in _COUNTERS)
    sums = f",\n           {more}" if more else ""
    rates = "".join(f"\n       {_rate(column, counter)}," for column, counter in d.rates)
    appended = "".join(f",\n       {_rate(column, counter)}" for column, counter in d.appended)
    return f"""
CREATE OR REPLACE VIEW escalation_stats AS
WITH s AS (
    SELECT task_type, sum(jobs)::bigint AS jobs, sum(finished)::bigint AS finished,
           sum(succeeded)::bigint AS succeeded, sum(failed)::bigint AS failed, sum(escalated) AS escalated,
           sum(tier3) AS tier3, sum(latencies)::bigint AS latencies, sum(finished_cost) AS finished_cost,
           sum(finished_baseline) AS finished_baseline, sum(total_cost) AS total_cost{sums}
    FROM escalation_summary
    GROUP BY task_type
    HAVING sum(jobs) > 0
), r AS (
    -- avg() and sum() over the jobs would give the largest scale of the baselines still there; the shard
    -- sums keep the scale of every baseline ever added, so round to that (exact: no digit is dropped).
    -- percentile_cont(f) interpolates the values at ranks k = floor(f * (n - 1)) and k + 1 (0-based), in
    -- float8 exactly as percentile_cont computes it.
    SELECT s.*, round(s.finished_baseline, (SELECT max(scale(o.baseline_usd)) FROM job_outcomes o
                                            WHERE o.task_type = s.task_type)) AS baseline,
           floor(0.5::float8 * (latencies - 1))::bigint AS k50, 0.5::float8 * (latencies - 1) AS x50,
           floor(0.95::float8 * (latencies - 1))::bigint AS k95, 0.95::float8 * (latencies - 1) AS x95
    FROM s
)
SELECT r.task_type, r.jobs, r.finished, r.succeeded, r.failed,{rates}
       r.finished_cost / nullif(r.finished, 0) AS avg_cost_usd,
       r.baseline / nullif(r.finished, 0) AS baseline_cost_usd,
       100 * (1 - r.finished_cost / nullif(r.baseline, 0)) AS savings_pct,
       p50.lo + (r.x50 - r.k50) * (p50.hi - p50.lo) AS p50_latency_ms,
       p95.lo + (r.x95 - r.k95) * (p95.hi - p95.lo) AS p95_latency_ms,
       r.total_cost AS total_cost_usd{appended}
FROM r
LEFT JOIN LATERAL (  -- ranks k50, k50 + 1 from the low end
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


_FUNCTIONS = functions(SUMMARY)

_FUNCTION_SIGNATURES = (
    "escalation_summary_rebuild()", "escalation_summary_refresh(bigint[])", "escalation_summary_on_insert()",
    "escalation_summary_on_update()", "escalation_summary_on_delete()", "escalation_summary_on_truncate()",
    "escalation_summary_on_attempts()", "escalation_summary_on_attempt_update()", "escalation_summary_on_prices()",
)

_TRIGGERS = f"""
CREATE TRIGGER jobs_summary_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_insert();
-- A claim, and an escalation or a deferral that leaves the cost as it was, do not fire it (WHEN is
-- evaluated before any PL/pgSQL runs).
CREATE TRIGGER jobs_summary_update AFTER UPDATE ON jobs FOR EACH ROW
    WHEN (OLD.cost_usd IS DISTINCT FROM NEW.cost_usd OR OLD.task_type IS DISTINCT FROM NEW.task_type
          OR OLD.status IN ('succeeded', 'failed') OR NEW.status IN ('succeeded', 'failed'))
    EXECUTE FUNCTION escalation_summary_on_update();
CREATE TRIGGER jobs_summary_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_delete();
CREATE TRIGGER jobs_summary_truncate AFTER TRUNCATE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_truncate();

CREATE TRIGGER attempts_summary_insert AFTER INSERT ON attempts REFERENCING NEW TABLE AS changed_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_attempts();
-- Only what 0002 reads: tier-1 tokens, the first request's time, the job. Ending a request above tier 1
-- or marking requests interrupted does not fire it.
{attempts_update_trigger(SUMMARY)}
-- Rows cascaded from a deleted job find no job to lock: the jobs DELETE trigger takes its share out.
CREATE TRIGGER attempts_summary_delete AFTER DELETE ON attempts REFERENCING OLD TABLE AS changed_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_attempts();
CREATE TRIGGER attempts_summary_truncate AFTER TRUNCATE ON attempts
    FOR EACH STATEMENT EXECUTE FUNCTION escalation_summary_on_truncate();

CREATE TRIGGER batches_summary_prices AFTER UPDATE ON batches FOR EACH ROW
    WHEN (OLD.top_input_per_mtok IS DISTINCT FROM NEW.top_input_per_mtok
          OR OLD.top_output_per_mtok IS DISTINCT FROM NEW.top_output_per_mtok)
    EXECUTE FUNCTION escalation_summary_on_prices();
"""

_VIEW = view(SUMMARY)

UPGRADE = f"""
-- Writers wait until the summary is built and the triggers are in place, so no change slips between.
LOCK TABLE batches, jobs, attempts IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE job_outcomes (
    job_id bigint PRIMARY KEY,          -- no FK: the jobs DELETE trigger removes rows (it needs their share)
    task_type text NOT NULL,
    status text NOT NULL,
    tier integer NOT NULL,
    cost_usd numeric NOT NULL,
    baseline_usd numeric NOT NULL,      -- tier-1 tokens at the top tier's prices
    latency_ms double precision         -- first request to finished_at; NULL when the job made none
);
CREATE INDEX job_outcomes_latency ON job_outcomes (task_type, latency_ms) WHERE latency_ms IS NOT NULL;
CREATE INDEX job_outcomes_baseline_scale ON job_outcomes (task_type, scale(baseline_usd));

CREATE TABLE escalation_summary (
    task_type text NOT NULL,
    shard integer NOT NULL,             -- pg_backend_pid() % 64 of the writers: a shard's sums mean nothing alone
    jobs bigint NOT NULL,
    finished bigint NOT NULL,
    succeeded bigint NOT NULL,
    failed bigint NOT NULL,
    escalated bigint NOT NULL,          -- finished with tier > 1 (for integer tiers also tier >= 2)
    tier3 bigint NOT NULL,              -- finished with tier >= 3
    latencies bigint NOT NULL,          -- finished jobs with a latency (rows of job_outcomes_latency)
    finished_cost numeric NOT NULL,
    finished_baseline numeric NOT NULL,
    total_cost numeric NOT NULL,
    PRIMARY KEY (task_type, shard)
);
{_FUNCTIONS}
REVOKE EXECUTE ON FUNCTION {", ".join(_FUNCTION_SIGNATURES)} FROM PUBLIC;
{_TRIGGERS}
SELECT escalation_summary_rebuild();
{_VIEW}"""

DOWNGRADE = f"""
CREATE OR REPLACE VIEW escalation_stats AS
{QUERY_0002};

DROP TRIGGER jobs_summary_insert ON jobs;
DROP TRIGGER jobs_summary_update ON jobs;
DROP TRIGGER jobs_summary_delete ON jobs;
DROP TRIGGER jobs_summary_truncate ON jobs;
DROP TRIGGER attempts_summary_insert ON attempts;
DROP TRIGGER attempts_summary_update ON attempts;
DROP TRIGGER attempts_summary_delete ON attempts;
DROP TRIGGER attempts_summary_truncate ON attempts;
DROP TRIGGER batches_summary_prices ON batches;
DROP FUNCTION {", ".join(_FUNCTION_SIGNATURES)};
DROP TABLE job_outcomes, escalation_summary;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
