"""The job state machine: statuses, the allowed moves, and the conditional UPDATEs that claim, end and release.

Every state change is one conditional UPDATE (``... WHERE id = :id AND status = :from AND tier = :t
AND stage = :s``); zero rows means another worker already moved the job, so a duplicate or late
message is a no-op. A claim bumps ``claim_no``; the stage's closing UPDATE repeats that number, so a
worker whose lease expired (and whose job the sweeper handed to another worker) cannot move it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

from cascade.errors import IllegalTransition

__all__ = ["HAND_BACK", "TRANSITIONS", "Claim", "JobStatus", "Move", "Stage", "claim", "lock_due", "move_many", "release",
           "renew_leases"]


class JobStatus(enum.StrEnum):
    #: waiting for its stage's message (or for ``not_before``)
    QUEUED = "queued"
    #: a worker holds it (``worker_id``, its heartbeat renewing ``lease_until``)
    RUNNING = "running"
    #: a tier's answer passed validation (or was accepted as the last tier's)
    SUCCEEDED = "succeeded"
    #: every tier failed, or the policy gave up
    FAILED = "failed"
    #: its batch was cancelled (``cascade cancel``) before it finished
    CANCELLED = "cancelled"


class Stage(enum.StrEnum):
    CALL = "call"
    VALIDATE = "validate"
    #: a message stage only (never in ``jobs.stage``): its ids are ``audits`` ids (``cascade.stages.audit``)
    AUDIT = "audit"


#: The allowed moves of ``jobs.status``; every UPDATE in this module follows one of them.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # cancelled: the batch was cancelled (``cancel_batch``); a move of a running job of a cancelled batch to
    # anything but succeeded becomes cancelled (``move_many``)
    # a queued job locked in one transaction (``lock_due``: the validate stage) moves from queued directly: it is
    # never seen running, as no other transaction sees the lock
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.QUEUED, JobStatus.SUCCEEDED,
                                 JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED}),
    JobStatus.SUCCEEDED: frozenset(),
    # a failed or cancelled job runs again from tier 1 with ``cascade retry --failed`` (``retry_jobs``)
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.CANCELLED: frozenset({JobStatus.QUEUED}),
}


@dataclass(frozen=True)
class Claim:
    """A job a worker now holds for one stage."""

    job_id: int
    batch_id: str
    key: str
    input: dict[str, Any]  # Any: the user's row
    tier: int
    stage: Stage
    claim_no: int
    #: the batch's cap on spend as it stands (``batches.max_cost_usd``; a retry may raise it); None: none
    max_cost_usd: Decimal | None = None
    #: the job's status while held: ``running`` for a claim, ``queued`` for a job locked for one transaction
    #: (``lock_due``), which its move is checked against
    held_as: JobStatus = JobStatus.RUNNING


# --- state transitions -------------------------------------------------------------------------

# SKIP LOCKED: a job locked by another transaction (a sweep re-publishing it, a claim of a duplicate message,
# a frozen worker's open transaction) is left to its holder instead of stalling this worker's slot; if it
# is still due afterwards, its own message or the sweeper brings it back. A halted batch's jobs are not
# claimed: they wait in Postgres until the batch is resumed.
_CLAIM = text("""
UPDATE jobs SET status = 'running', claim_no = claim_no + 1, worker_id = :worker_id,
                lease_until = now() + make_interval(secs => :lease_s), not_before = NULL
WHERE id IN (SELECT id FROM jobs
             WHERE id = ANY(:ids) AND status = 'queued' AND tier = :tier AND stage = :stage
               AND (not_before IS NULL OR not_before <= now())
               AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = jobs.batch_id AND b.halted_at IS NOT NULL)
             FOR UPDATE SKIP LOCKED)
RETURNING id, batch_id, key, input, tier, stage, claim_no,
          (SELECT b.max_cost_usd FROM batches b WHERE b.id = jobs.batch_id) AS max_cost_usd
""")


_LOCK_DUE = text("""
SELECT id, batch_id, key, input, tier, stage, claim_no,
       (SELECT b.max_cost_usd FROM batches b WHERE b.id = jobs.batch_id) AS max_cost_usd
FROM jobs
WHERE id = ANY(:ids) AND status = 'queued' AND tier = :tier AND stage = :stage
  AND (not_before IS NULL OR not_before <= now())
  AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = jobs.batch_id AND b.halted_at IS NOT NULL)
ORDER BY id
FOR NO KEY UPDATE SKIP LOCKED
""")


def lock_due(conn: Connection, job_ids: Sequence[int], tier: int, stage: Stage) -> list[Claim]:
    """Lock the jobs of ``job_ids`` that are due at (tier, stage) until the transaction ends, writing nothing: a
    stage that decides and moves them in the same transaction needs no claim (no other transaction sees them
    held, and their one UPDATE is the move). Skips jobs another transaction holds, as ``claim`` does."""
    rows = conn.execute(_LOCK_DUE, {"ids": list(job_ids), "tier": tier, "stage": stage.value})
    return [Claim(r.id, r.batch_id, r.key, r.input, r.tier, Stage(r.stage), r.claim_no, r.max_cost_usd,
                  JobStatus.QUEUED) for r in rows]


def claim(conn: Connection, job_ids: Sequence[int], tier: int, stage: Stage, lease_s: float,
          worker_id: str | None = None) -> list[Claim]:
    """Take the jobs of ``job_ids`` that are due at (tier, stage), in one statement; the others already moved
    on (a duplicate or late message) and are left alone. ``worker_id`` names the heartbeating process that
    holds them (``cascade.liveness``); without one, only ``lease_s`` protects the claim."""
    rows = conn.execute(_CLAIM, {"ids": list(job_ids), "tier": tier, "stage": stage.value, "lease_s": lease_s,
                                 "worker_id": worker_id})
    return sorted((Claim(r.id, r.batch_id, r.key, r.input, r.tier, Stage(r.stage), r.claim_no, r.max_cost_usd)
                   for r in rows),
                  key=lambda c: c.job_id)


@dataclass(frozen=True)
class Move:
    """How a claim ends: the job goes to (status, tier, stage); ``delay_s`` > 0 holds it in Postgres that long."""

    held: Claim
    status: JobStatus
    tier: int
    stage: Stage
    output_json: str | None = None
    error: str | None = None
    delay_s: float = 0.0


#: SET clause handing a running job back to its queue (``j``, its batch ``b``): cancelled if its batch was
HAND_BACK = """status = CASE WHEN b.cancelled_at IS NULL THEN 'queued' ELSE 'cancelled' END,
    error = CASE WHEN b.cancelled_at IS NULL THEN j.error ELSE 'cancelled' END,
    finished_at = CASE WHEN b.cancelled_at IS NULL THEN NULL ELSE now() END"""

# A job of a cancelled batch that does not succeed now stops there: cancelled (b is its batch).
_STOPS = "(b.cancelled_at IS NOT NULL AND m.status <> 'succeeded')"
_MOVE = text(f"""
UPDATE jobs j SET status = CASE WHEN {_STOPS} THEN 'cancelled' ELSE m.status END, tier = m.tier, stage = m.stage,
                  lease_until = NULL,
                  not_before = CASE WHEN m.delay_s > 0 AND NOT {_STOPS} THEN now() + make_interval(secs => m.delay_s) END,
                  published_at = CASE WHEN m.delay_s > 0 THEN NULL ELSE now() END,
                  output = CAST(m.output AS jsonb),
                  error = CASE WHEN {_STOPS} THEN 'cancelled' ELSE m.error END,
                  cost_usd = (SELECT coalesce(sum(cost_usd), 0) FROM attempts WHERE job_id = m.id AND NOT audit),
                  finished_at = CASE WHEN m.status IN ('succeeded', 'failed') OR {_STOPS} THEN now() END
FROM unnest(CAST(:ids AS bigint[]), CAST(:claim_nos AS int[]), CAST(:held AS text[]), CAST(:statuses AS text[]),
            CAST(:tiers AS int[]), CAST(:stages AS text[]), CAST(:outputs AS text[]), CAST(:errors AS text[]),
            CAST(:delays AS float8[])) AS m(id, claim_no, held, status, tier, stage, output, error, delay_s),
     batches b
WHERE j.id = m.id AND j.status = m.held AND j.claim_no = m.claim_no AND b.id = j.batch_id
RETURNING j.id, j.status
""")



def move_many(conn: Connection, moves: Sequence[Move]) -> dict[int, JobStatus]:
    """End claims in one statement; returns the status each job that moved now has (a claim whose lease expired
    and was taken over by another worker does not move; a job of a cancelled batch that did not succeed is
    ``cancelled``, whatever its move said).

    Raises:
        IllegalTransition: a move leaves ``running`` for a status ``TRANSITIONS`` does not allow; nothing moves.
    """
    if not moves:
        return {}
    for m in moves:
        # A real check, not an assert: `python -O` strips asserts, and a wrong move must never reach the table.
        if m.status not in TRANSITIONS[m.held.held_as]:
            raise IllegalTransition(m.held.job_id, m.held.held_as, m.status)
    params = {
        "ids": [m.held.job_id for m in moves], "claim_nos": [m.held.claim_no for m in moves],
        "held": [m.held.held_as.value for m in moves],
        "statuses": [m.status.value for m in moves], "tiers": [m.tier for m in moves],
        "stages": [m.stage.value for m in moves], "outputs": [m.output_json for m in moves],
        "errors": [m.error for m in moves], "delays": [float(m.delay_s) for m in moves],
    }
    return {job_id: JobStatus(status) for job_id, status in conn.execute(_MOVE, params)}


_RELEASE = text(f"""
UPDATE jobs j SET {HAND_BACK}, lease_until = NULL, published_at = now()
FROM unnest(CAST(:ids AS bigint[]), CAST(:claim_nos AS int[])) AS c(id, claim_no), batches b
WHERE j.id = c.id AND j.claim_no = c.claim_no AND j.status = 'running' AND b.id = j.batch_id
RETURNING j.id, j.tier, j.stage, j.status
""")


def release(conn: Connection, claims: Sequence[Claim]) -> list[tuple[int, int, Stage]]:
    """Hand claims back to their queue unchanged (the stage could not finish them); returns the (job, tier,
    stage)s to publish. A claim that already moved, or was taken over, is left alone."""
    rows = conn.execute(_RELEASE, {"ids": [c.job_id for c in claims], "claim_nos": [c.claim_no for c in claims]})
    return [(job_id, tier, Stage(stage)) for job_id, tier, stage, status in rows if status == "queued"]


# Only leases in their second half are rewritten: a stage shorter than half the lease (nearly all) costs no
# write at all, and a longer one keeps its claim however long its requests take.
_RENEW = text("""
UPDATE jobs j SET lease_until = now() + make_interval(secs => :lease_s)
FROM unnest(CAST(:ids AS bigint[]), CAST(:claim_nos AS int[])) AS h(id, claim_no)
WHERE j.id = h.id AND j.claim_no = h.claim_no AND j.status = 'running'
  AND j.lease_until < now() + make_interval(secs => :lease_s / 2)
""")


def renew_leases(conn: Connection, held: Sequence[tuple[int, int]], lease_s: float) -> None:
    """Push the leases of claims ``(job id, claim_no)`` that are past half of ``lease_s`` further out."""
    if held:
        conn.execute(_RENEW, {"ids": [i for i, _ in held], "claim_nos": [n for _, n in held], "lease_s": lease_s})
