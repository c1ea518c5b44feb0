"""What ``cascade report`` reads about one batch, aggregated in Postgres: a few rows per tier and model, never a
row per job, so a batch of a million jobs reads like one of ten.

Savings and job latency come from the query ``escalation_stats`` equals (migration 0012's ``QUERY``, over the
batch's jobs only), so the report and ``cascade stats --batch`` agree to the last digit; the latency histogram is
binned by that same query.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

__all__ = ["AuditGroup", "BatchInfo", "Histogram", "JobGroup", "ReportData", "RequestGroup", "TierVerdicts",
           "read_report"]


@dataclass(frozen=True)
class BatchInfo:
    """The batch row."""

    batch_id: str
    task_type: str
    rows: int
    created_at: datetime
    config_hash: str
    source: str | None
    tiers: int
    halted: str | None  # why the batch is halted, or None
    spent_usd: Decimal  # what a capped batch's requests cost (0 without a cap)
    reserved_usd: Decimal
    top_input_per_mtok: Decimal
    top_output_per_mtok: Decimal
    config: dict[str, Any]  # Any: the task snapshot's JSON


@dataclass(frozen=True)
class JobGroup:
    """The batch's jobs that started at ``start_tier`` (chosen by ``route``) and are ``status`` at ``tier``."""

    start_tier: int
    route: str  # "default" when no rule chose the start tier
    tier: int
    status: str
    jobs: int
    cost_usd: Decimal
    last_finished_at: datetime | None


@dataclass(frozen=True)
class RequestGroup:
    """The batch's requests at one tier to one model (tier 0: audit work). Latencies are those of the requests
    sent (cache hits left out); None when there are none."""

    tier: int
    model: str
    requests: int
    errors: int
    cached: int  # answered from the request cache
    answered: int  # answered by the model (sent, no error)
    cost_usd: Decimal
    saved_usd: Decimal  # the original cost of the cache hits
    input_tokens: int
    output_tokens: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None


@dataclass(frozen=True)
class TierVerdicts:
    """The verdicts at one tier: how many, how many rejected, and the rejected ones' reason codes with counts,
    most frequent first (code None: the codes past the top ones, together)."""

    tier: int
    verdicts: int
    rejected: int
    reasons: list[tuple[str | None, int]]


@dataclass(frozen=True)
class AuditGroup:
    """The audits of the answers one tier and model accepted."""

    tier: int
    model: str
    auditor_model: str
    audits: int
    waiting: int  # queued or running
    agreed: int
    disagreed: int
    cost_usd: Decimal


@dataclass(frozen=True)
class Histogram:
    """Finished jobs' latency (first request to finished_at, ms) in ``len(counts)`` equal bins from ``lo`` to
    ``hi`` (the last bin includes ``hi``); no bins when no finished job has a latency."""

    lo: float
    hi: float
    counts: list[int]

    def edges(self) -> list[float]:
        n = len(self.counts)
        return [self.lo + (self.hi - self.lo) * i / n for i in range(n + 1)] if n else []


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows. ``stats``: the ``escalation_stats`` columns over the batch's jobs (empty when
    it has none), plus ``finished_cost_usd`` and ``finished_baseline_usd``, the sums behind ``savings_pct``."""

    batch: BatchInfo
    jobs: list[JobGroup]
    requests: list[RequestGroup]
    verdicts: list[TierVerdicts]
    audits: list[AuditGroup]
    stats: dict[str, Any]  # Any: view columns
    latency: Histogram


_BATCH = text("""
SELECT id, task_type, rows, created_at, config_hash, source, tiers, halted_at, halt_reason, spent_usd, reserved_usd,
       top_input_per_mtok, top_output_per_mtok, config
FROM batches WHERE id = :b
""")

_JOBS = text("""
SELECT start_tier, coalesce(route, 'default') AS route, tier, status, count(*) AS jobs,
       coalesce(sum(cost_usd), 0) AS cost_usd, max(finished_at) AS last_finished_at
FROM jobs WHERE batch_id = :b
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
""")

_REQUESTS = text("""
SELECT a.tier, a.model, count(*) AS requests, count(*) FILTER (WHERE a.error IS NOT NULL) AS errors,
       count(*) FILTER (WHERE a.cached) AS cached,
       count(*) FILTER (WHERE NOT a.cached AND a.error IS NULL) AS answered,
       coalesce(sum(a.cost_usd), 0) AS cost_usd, coalesce(sum(a.saved_usd) FILTER (WHERE a.cached), 0) AS saved_usd,
       coalesce(sum(a.input_tokens), 0) AS input_tokens, coalesce(sum(a.output_tokens), 0) AS output_tokens,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY a.latency_ms) FILTER (WHERE NOT a.cached) AS p50_latency_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.latency_ms) FILTER (WHERE NOT a.cached) AS p95_latency_ms
FROM attempts a JOIN jobs j ON j.id = a.job_id
WHERE j.batch_id = :b
GROUP BY a.tier, a.model ORDER BY a.tier, a.model
""")

_VERDICTS = text("""
SELECT v.tier, count(*) AS verdicts, count(*) FILTER (WHERE NOT v.passed) AS rejected
FROM validations v JOIN jobs j ON j.id = v.job_id
WHERE j.batch_id = :b
GROUP BY v.tier ORDER BY v.tier
""")

# The codes as escalation_reasons counts them (one per reason of a rejected verdict), the top :top per tier and
# the rest together (code NULL).
_REASONS = text("""
WITH codes AS (
    SELECT v.tier, r.reason ->> 'code' AS code, count(*) AS n
    FROM validations v
    JOIN jobs j ON j.id = v.job_id
    CROSS JOIN LATERAL jsonb_array_elements(v.reasons) AS r(reason)
    WHERE j.batch_id = :b AND NOT v.passed
    GROUP BY 1, 2
), ranked AS (
    SELECT tier, n, CASE WHEN row_number() OVER (PARTITION BY tier ORDER BY n DESC, code) <= :top THEN code END AS code
    FROM codes
)
SELECT tier, code, sum(n) AS n FROM ranked GROUP BY tier, code ORDER BY tier, code IS NULL, n DESC, code
""")

_AUDITS = text("""
SELECT a.tier, a.model, a.auditor_model, count(*) AS audits,
       count(*) FILTER (WHERE a.status IN ('queued', 'running')) AS waiting,
       count(*) FILTER (WHERE a.agreed) AS agreed, count(*) FILTER (WHERE NOT a.agreed) AS disagreed,
       coalesce(sum(a.cost_usd), 0) AS cost_usd
FROM audits a JOIN jobs j ON j.id = a.job_id
WHERE j.batch_id = :b
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
""")


def _stats_query() -> str:
    """escalation_stats' query over the batch's jobs, with the sums behind savings_pct and the latency histogram:
    ``bins`` equal bins (about the square root of the jobs timed, at most :max_bins) between the least and the
    greatest latency, counted in one pass."""
    query: str = importlib.import_module("migrations.versions.0012_start_tiers").QUERY
    end = ") a ON true\n)"
    if query.count(end) != 1:
        raise RuntimeError("the per_job CTE of migration 0012's escalation_stats query is not where it was")
    per_job, _, summary = query.partition(end)
    return f"""{per_job}) a ON true
    WHERE j.batch_id = :b
), summary AS (
{summary.strip()}
), totals AS (
    SELECT sum(cost_usd) FILTER (WHERE finished) AS finished_cost_usd,
           sum(baseline_usd) FILTER (WHERE finished) AS finished_baseline_usd,
           count(latency_ms) FILTER (WHERE finished) AS timed,
           min(latency_ms) FILTER (WHERE finished) AS lo, max(latency_ms) FILTER (WHERE finished) AS hi
    FROM per_job
), shape AS (
    SELECT *, least(:max_bins, ceil(sqrt(timed)))::int AS bins FROM totals
), binned AS (
    SELECT CASE WHEN s.hi > s.lo THEN least(s.bins - 1, floor((p.latency_ms - s.lo) * s.bins / (s.hi - s.lo)))
                ELSE 0 END::int AS bin,
           count(*) AS n
    FROM per_job p CROSS JOIN shape s
    WHERE p.finished AND p.latency_ms IS NOT NULL
    GROUP BY 1
)
SELECT summary.*, shape.finished_cost_usd, shape.finished_baseline_usd, shape.lo, shape.hi, shape.bins,
       (SELECT coalesce(json_agg(json_build_array(bin, n) ORDER BY bin), '[]') FROM binned) AS histogram
FROM shape LEFT JOIN summary ON true
"""


def _batch(conn: Connection, batch_id: str) -> BatchInfo | None:
    r = conn.execute(_BATCH, {"b": batch_id}).first()
    if r is None:
        return None
    halted = None if r.halted_at is None else str(r.halt_reason or "halted")
    config = r.config if isinstance(r.config, dict) else json.loads(r.config)
    return BatchInfo(r.id, r.task_type, r.rows, r.created_at, r.config_hash, r.source, r.tiers, halted,
                     Decimal(r.spent_usd), Decimal(r.reserved_usd), Decimal(r.top_input_per_mtok),
                     Decimal(r.top_output_per_mtok), config)


def _float(value: Any) -> float | None:  # Any: a numeric column
    return None if value is None else float(value)


def _verdicts(conn: Connection, batch_id: str, top: int) -> list[TierVerdicts]:
    reasons: dict[int, list[tuple[str | None, int]]] = {}
    for tier, code, n in conn.execute(_REASONS, {"b": batch_id, "top": top}):
        reasons.setdefault(tier, []).append((code, int(n)))
    return [TierVerdicts(tier, int(n), int(rejected), reasons.get(tier, []))
            for tier, n, rejected in conn.execute(_VERDICTS, {"b": batch_id})]


def _stats(conn: Connection, batch_id: str, max_bins: int) -> tuple[dict[str, Any], Histogram]:  # Any: columns
    row = dict(conn.execute(text(_stats_query()), {"b": batch_id, "max_bins": max_bins}).one()._mapping)
    lo, hi, bins, pairs = row.pop("lo"), row.pop("hi"), row.pop("bins"), row.pop("histogram")
    counts = [0] * int(bins or 0)
    for index, n in pairs if isinstance(pairs, list) else json.loads(pairs):
        counts[index] = n
    histogram = Histogram(float(lo or 0), float(hi or 0), counts)
    return ({} if row.get("task_type") is None else row), histogram


def read_report(conn: Connection, batch_id: str, *, max_bins: int = 30, top_reasons: int = 8) -> ReportData | None:
    """What the report of batch ``batch_id`` (a whole id) shows; None when there is no such batch. Read in one
    transaction on ``conn``: open it REPEATABLE READ for numbers that agree while the batch runs."""
    batch = _batch(conn, batch_id)
    if batch is None:
        return None
    jobs = [JobGroup(r.start_tier, r.route, r.tier, r.status, int(r.jobs), Decimal(r.cost_usd), r.last_finished_at)
            for r in conn.execute(_JOBS, {"b": batch_id})]
    requests = [RequestGroup(r.tier, r.model, int(r.requests), int(r.errors), int(r.cached), int(r.answered),
                             Decimal(r.cost_usd), Decimal(r.saved_usd), int(r.input_tokens), int(r.output_tokens),
                             _float(r.p50_latency_ms), _float(r.p95_latency_ms))
                for r in conn.execute(_REQUESTS, {"b": batch_id})]
    audits = [AuditGroup(r.tier, r.model, r.auditor_model, int(r.audits), int(r.waiting), int(r.agreed),
                         int(r.disagreed), Decimal(r.cost_usd)) for r in conn.execute(_AUDITS, {"b": batch_id})]
    stats, latency = _stats(conn, batch_id, max_bins)
    return ReportData(batch, jobs, requests, _verdicts(conn, batch_id, top_reasons), audits, stats, latency)
