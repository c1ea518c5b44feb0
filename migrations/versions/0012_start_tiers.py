"""Start tiers: a job may start above tier 1 (a routing rule, or the start tier learned from history).

- ``jobs.start_tier``: the tier the job was first published to (1 unless a ``route:`` rule or
  ``routing: {start: learned}`` chose another); ``jobs.route``: what chose it (``route[i]`` or the rule's
  name, ``learned``, ``explore``; NULL: the default, tier 1).
- ``escalation_stats`` counts from the start tier, with every column it had, in the same order:
  ``escalation_rate`` is the share of finished jobs that ended above their start tier (it was: above tier 1);
  ``tier2_rate`` and ``tier3_rate`` keep their meaning (finished at tier 2 or higher, 3 or higher);
  ``baseline_cost_usd`` and ``savings_pct`` price the tokens of the start tier's requests (they were tier 1's)
  at the top tier's prices. New at the end: ``skipped_rate``, the share of finished jobs that started above
  tier 1, and ``skipped_pct`` in ``escalation_stats_pretty``. Requests at tier 0 (audit work) never count:
  not in the baseline, not as a job's first request for its latency.
- The summary of migration 0004 keeps them: ``job_outcomes.start_tier``, and ``escalation_summary.tier2``
  and ``.skipped`` beside ``escalated`` (now: ended above the start tier). Its functions, its attempts
  UPDATE trigger and the view are built by 0004's builders from ``SUMMARY`` below, and the summary is rebuilt.
- The attempts UPDATE trigger cannot see the job's start tier in its WHEN clause, so it fires on a change of
  the tokens at any tier from 1 up (it fired for tier 1 only): the ending of every request, not only the
  tier-1 ones. Each such firing locks the job's row (the request's INSERT already did, so no one waits
  longer) and reads its status, and stops there unless the job has finished (a request ends before its job
  does): about 50 µs of Postgres time per request ended above tier 1. Tier-0 requests fire nothing, and
  their INSERT and DELETE no longer lock the job's row or refresh a finished job.
- The jobs UPDATE trigger needs no change: a job's start tier only counts once it is finished, and every
  UPDATE of a finished job (or one that finishes it) fires it and recomputes the job from its new row.
- ``QUERY``: 0002's SELECT with this meaning (what the view equals), for the same columns over some jobs only.
- DOWNGRADE drops and recreates both views (a view loses columns no other way), as 0004 and 0008 create them,
  with their grants to cascade_reader; other grants on them are lost.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import dataclasses
import importlib

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

__all__ = ["DOWNGRADE", "QUERY", "SUMMARY", "UPGRADE", "downgrade", "upgrade"]

_0004 = importlib.import_module("migrations.versions.0004_stats_summary")

# What changes in 0002's SELECT (each once): the start tier's tokens, counted requests only, escalation from
# the start tier, and the appended column.
_REWRITES = (
    ("SELECT j.task_type, j.tier, j.status,", "SELECT j.task_type, j.tier, j.start_tier, j.status,"),
    ("sum(input_tokens) FILTER (WHERE tier = 1)", "sum(input_tokens) FILTER (WHERE tier = j.start_tier)"),
    ("sum(output_tokens) FILTER (WHERE tier = 1)", "sum(output_tokens) FILTER (WHERE tier = j.start_tier)"),
    ("FROM attempts WHERE job_id = j.id", "FROM attempts WHERE job_id = j.id AND tier >= 1"),
    ("FILTER (WHERE finished AND tier > 1)", "FILTER (WHERE finished AND tier > start_tier)"),
    ("sum(cost_usd) AS total_cost_usd", """sum(cost_usd) AS total_cost_usd,
       count(*) FILTER (WHERE finished AND start_tier > 1)::numeric
           / nullif(count(*) FILTER (WHERE finished), 0) AS skipped_rate"""),
)


def _query() -> str:
    query: str = _0004.QUERY_0002
    for old, new in _REWRITES:
        if query.count(old) != 1:
            raise RuntimeError(f"migration 0002's escalation_stats query has {query.count(old)} times {old!r}")
        query = query.replace(old, new)
    return query


#: escalation_stats' SELECT over jobs and attempts with this migration's meaning: what the view equals, in the
#: shape of 0002's (a ``per_job`` CTE), for the same columns over some jobs only.
QUERY = _query()


def _share(r: str) -> dict[str, str]:
    """0004's shares, with ``escalated`` counted from the start tier, and two counters more."""
    done = f"{r}.status IN {_0004.FINISHED}"
    return {**_0004.SUMMARY.share(r), "escalated": f"({done} AND {r}.tier > {r}.start_tier)::int",
            "tier2": f"({done} AND {r}.tier >= 2)::int", "skipped": f"({done} AND {r}.start_tier > 1)::int"}


#: What escalation_stats counts from this migration on.
SUMMARY = dataclasses.replace(
    _0004.SUMMARY,
    share=_share,
    kept=("start_tier",),
    baseline_tier="j.start_tier",
    counted="tier >= 1",
    # Every change of what a counted request gives its job: its job, time, tier or tokens.
    attempts_when="""((OLD.tier >= 1 OR NEW.tier >= 1)
          AND (OLD.job_id, OLD.created_at, OLD.tier, OLD.input_tokens, OLD.output_tokens)
              IS DISTINCT FROM (NEW.job_id, NEW.created_at, NEW.tier, NEW.input_tokens, NEW.output_tokens))""",
    rates=(("escalation_rate", "escalated"), ("tier2_rate", "tier2"), ("tier3_rate", "tier3")),
    appended=(("skipped_rate", "skipped"),),
)

# Writers wait until the summary is rebuilt and the triggers are in place, so no change slips between.
_LOCK = "LOCK TABLE batches, jobs, attempts IN SHARE ROW EXCLUSIVE MODE;"

UPGRADE = f"""
{_LOCK}

ALTER TABLE jobs ADD COLUMN start_tier integer NOT NULL DEFAULT 1 CHECK (start_tier >= 1),
                 ADD COLUMN route text;

-- Emptied first (the rebuild fills them), so that the new columns need no default.
TRUNCATE job_outcomes, escalation_summary;
ALTER TABLE job_outcomes ADD COLUMN start_tier integer NOT NULL;
ALTER TABLE escalation_summary ADD COLUMN tier2 bigint NOT NULL,     -- finished with tier >= 2
                               ADD COLUMN skipped bigint NOT NULL;   -- finished with start_tier > 1
{_0004.functions(SUMMARY, replace=True)}
{_0004.attempts_update_trigger(SUMMARY, replace=True)}
SELECT escalation_summary_rebuild();
{_0004.view(SUMMARY)}
CREATE OR REPLACE VIEW escalation_stats_pretty AS
SELECT task_type, jobs, finished, succeeded, failed, round(100 * escalation_rate, 1) AS escalation_pct,
       round(100 * tier2_rate, 1) AS tier2_pct, round(100 * tier3_rate, 1) AS tier3_pct,
       round(avg_cost_usd, 6) AS avg_cost_usd, round(baseline_cost_usd, 6) AS baseline_cost_usd,
       round(savings_pct, 1) AS savings_pct, round(p50_latency_ms::numeric) AS p50_latency_ms,
       round(p95_latency_ms::numeric) AS p95_latency_ms, round(100 * skipped_rate, 1) AS skipped_pct
FROM escalation_stats;
"""

DOWNGRADE = f"""
{_LOCK}

DROP VIEW escalation_stats_pretty, escalation_stats;
{_0004.functions(_0004.SUMMARY, replace=True)}
{_0004.attempts_update_trigger(_0004.SUMMARY, replace=True)}
ALTER TABLE job_outcomes DROP COLUMN start_tier;
ALTER TABLE escalation_summary DROP COLUMN tier2, DROP COLUMN skipped;
SELECT escalation_summary_rebuild();
{_0004.view(_0004.SUMMARY)}
GRANT SELECT ON escalation_stats TO cascade_reader;

ALTER TABLE jobs DROP COLUMN start_tier, DROP COLUMN route;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
    # escalation_stats_pretty as 0008 creates it (with its grant): 0008's own statement.
    importlib.import_module("migrations.versions.0008_stats_pretty").upgrade()
