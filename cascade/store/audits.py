"""Quality audits (migration 0013): queued with the verdict that accepted the answer, claimed and finished by
the audit stage (``cascade.stages.audit``), taken back by the sweeper like jobs.

An audit's requests are its job's attempts at tier 0 (``attempts.audit``): ``prepare_attempts``,
``start_attempts``, ``end_attempts`` and ``answers_many`` serve them as they serve a tier's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

__all__ = [
    "AUDIT_TIER",
    "AuditClaim",
    "AuditEnd",
    "NewAudit",
    "claim_audits",
    "end_audits",
    "insert_audits",
    "stamp_audits_due",
    "stamp_stalled_audits",
    "take_back_audits",
    "waiting_audits",
]

#: the tier an audit's requests are recorded at: none of the cascade's
AUDIT_TIER = 0


@dataclass(frozen=True)
class NewAudit:
    job_id: int
    task_type: str
    tier: int  # the tier whose accepted answer is audited
    model: str  # the model that gave it
    auditor_model: str


_INSERT = text("""
INSERT INTO audits (job_id, task_type, tier, model, auditor_model, published_at)
SELECT job_id, task_type, tier, model, auditor, now()
FROM unnest(CAST(:job_ids AS bigint[]), CAST(:task_types AS text[]), CAST(:tiers AS int[]), CAST(:models AS text[]),
            CAST(:auditors AS text[])) AS a(job_id, task_type, tier, model, auditor)
ON CONFLICT (job_id) DO NOTHING
RETURNING id
""")


def insert_audits(conn: Connection, audits: Sequence[NewAudit]) -> list[int]:
    """Queue audits (one per job: a repeated one is ignored); returns the new ids, to publish after the commit."""
    if not audits:
        return []
    params = {"job_ids": [a.job_id for a in audits], "task_types": [a.task_type for a in audits],
              "tiers": [a.tier for a in audits], "models": [a.model for a in audits],
              "auditors": [a.auditor_model for a in audits]}
    return [int(i) for (i,) in conn.execute(_INSERT, params)]


@dataclass(frozen=True)
class AuditClaim:
    """An audit a worker now holds, with the job it audits."""

    id: int
    claim_no: int
    job_id: int
    batch_id: str
    key: str
    input: dict[str, Any]  # Any: the user's row
    output: Any  # Any: the accepted answer (JSON)


_CLAIM = text("""
WITH c AS (
    UPDATE audits SET status = 'running', claim_no = claim_no + 1, worker_id = :worker_id,
                      lease_until = now() + make_interval(secs => :lease_s), not_before = NULL
    WHERE id IN (SELECT id FROM audits
                 WHERE id = ANY(:ids) AND status = 'queued' AND (not_before IS NULL OR not_before <= now())
                 FOR UPDATE SKIP LOCKED)
    RETURNING id, claim_no, job_id
)
SELECT c.id, c.claim_no, c.job_id, j.batch_id, j.key, j.input, j.output FROM c JOIN jobs j ON j.id = c.job_id
ORDER BY c.job_id
""")


def claim_audits(conn: Connection, ids: Sequence[int], lease_s: float, worker_id: str | None) -> list[AuditClaim]:
    """Take the audits of ``ids`` that are due (the others are done, or held by another worker)."""
    rows = conn.execute(_CLAIM, {"ids": list(ids), "lease_s": lease_s, "worker_id": worker_id})
    return [AuditClaim(r.id, r.claim_no, r.job_id, r.batch_id, r.key, r.input, r.output) for r in rows]


@dataclass(frozen=True)
class AuditEnd:
    """How a claimed audit ends: ``done`` (``agreed`` None: the auditor gave no valid answer), ``skipped``, or
    ``queued`` again after ``delay_s``."""

    held: AuditClaim
    status: str
    agreed: bool | None = None
    output_json: str | None = None
    detail: str | None = None
    delay_s: float = 0.0


_END = text("""
UPDATE audits a SET status = e.status, agreed = e.agreed, auditor_output = CAST(e.output AS jsonb),
                    detail = e.detail, lease_until = NULL, worker_id = NULL,
                    cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = a.job_id AND audit),
                    not_before = CASE WHEN e.status = 'queued' AND e.delay_s > 0
                                      THEN now() + make_interval(secs => e.delay_s) END,
                    published_at = CASE WHEN e.status = 'queued' AND e.delay_s > 0 THEN NULL ELSE now() END,
                    finished_at = CASE WHEN e.status IN ('done', 'skipped') THEN now() END
FROM unnest(CAST(:ids AS bigint[]), CAST(:claim_nos AS int[]), CAST(:statuses AS text[]), CAST(:agreed AS boolean[]),
            CAST(:outputs AS text[]), CAST(:details AS text[]), CAST(:delays AS float8[]))
     AS e(id, claim_no, status, agreed, output, detail, delay_s)
WHERE a.id = e.id AND a.claim_no = e.claim_no AND a.status = 'running'
RETURNING a.id, a.status, a.not_before IS NULL AS now
""")


def end_audits(conn: Connection, ends: Sequence[AuditEnd]) -> list[int]:
    """End claims in one statement (a claim that was taken over is left alone); returns the ids queued again
    without a delay, to publish after the commit."""
    if not ends:
        return []
    params = {"ids": [e.held.id for e in ends], "claim_nos": [e.held.claim_no for e in ends],
              "statuses": [e.status for e in ends], "agreed": [e.agreed for e in ends],
              "outputs": [e.output_json for e in ends], "details": [e.detail for e in ends],
              "delays": [float(e.delay_s) for e in ends]}
    return [int(i) for i, status, now in conn.execute(_END, params) if status == "queued" and now]


# --- the sweeper's statements (as cascade.store.sweep's for jobs) -------------------------------------

_EXPIRED = text("""
UPDATE audits SET status = 'queued', lease_until = NULL, published_at = now()
WHERE id IN (
    SELECT a.id FROM audits a
    WHERE a.status = 'running'
      AND (a.lease_until < now()
           OR a.worker_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = a.worker_id
                                                      AND w.seen_at >= now() - make_interval(secs => :dead_after)))
    FOR UPDATE SKIP LOCKED)
RETURNING id
""")
_DUE = text("""
UPDATE audits SET published_at = now()
WHERE id IN (SELECT id FROM audits
             WHERE status = 'queued' AND published_at IS NULL AND not_before IS NOT NULL AND not_before <= now()
             FOR UPDATE SKIP LOCKED)
RETURNING id
""")
_WAITING = text("""
SELECT count(*) FROM audits WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())
""")
_STALLED = text("""
UPDATE audits SET published_at = now()
WHERE id IN (SELECT id FROM audits
             WHERE status = 'queued' AND (not_before IS NULL OR not_before <= now())
               AND coalesce(published_at, created_at) < now() - make_interval(secs => :stalled_after)
             ORDER BY coalesce(published_at, created_at), id
             LIMIT :missing
             FOR UPDATE SKIP LOCKED)
RETURNING id
""")


def take_back_audits(conn: Connection, dead_after_s: float) -> list[int]:
    """Queue again the running audits of dead workers or with an expired lease; returns their ids."""
    return [int(i) for (i,) in conn.execute(_EXPIRED, {"dead_after": dead_after_s})]


def stamp_audits_due(conn: Connection) -> list[int]:
    """Stamp the deferred audits whose ``not_before`` has come; returns their ids."""
    return [int(i) for (i,) in conn.execute(_DUE)]


def waiting_audits(conn: Connection) -> int:
    """How many queued audits are due."""
    return int(conn.execute(_WAITING).scalar_one())


def stamp_stalled_audits(conn: Connection, stalled_after_s: float, missing: int) -> list[int]:
    """Stamp up to ``missing`` due audits last published over ``stalled_after_s`` ago; returns their ids."""
    rows = conn.execute(_STALLED, {"stalled_after": stalled_after_s, "missing": missing})
    return [int(i) for (i,) in rows]
