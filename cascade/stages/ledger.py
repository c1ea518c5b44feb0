"""What a stage writes: its claims, and what ends them (moves and verdicts) in one transaction.

``claim_due`` takes the jobs of a message that are still due; ``Writes`` collects how each claim ends
(decided by ``cascade.policy``) and ``Writes.write`` puts it all in the caller's transaction: the moves
first, guarded by each claim's number, then the verdicts of the jobs that moved. Nothing here talks to a
provider or the broker: the caller publishes the returned next steps after its commit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import Connection

from cascade import store
from cascade.config import TaskSnapshot
from cascade.policy import Action, after_verdict
from cascade.publish import Due
from cascade.routing import audited
from cascade.stages.context import StageContext
from cascade.store import Claim, JobStatus, Stage
from cascade.validate import Verdict, answer_key

__all__ = ["Writes", "claim_due", "holding"]

log = logging.getLogger(__name__)


def claim_due(ctx: StageContext, conn: Connection, job_ids: Sequence[int], tier: int,
              stage: Stage, *, lock_only: bool = False) -> list[tuple[Claim, TaskSnapshot]]:
    """Claim the jobs due at (tier, stage), each with its batch's snapshot; the others already moved on. With
    ``lock_only`` they are locked for ``conn``'s transaction instead (``store.lock_due``): for a stage that moves
    them before it commits, one write per job instead of two."""
    claims = (store.lock_due(conn, job_ids, tier, stage) if lock_only
              else store.claim(conn, job_ids, tier, stage, ctx.settings.lease_s, ctx.worker_id))
    if len(claims) < len(job_ids):
        # Losing the race is normal (a redelivered or re-published message): not an error.
        log.debug("tier %s %s: %d of %d jobs already moved on", tier, stage.value, len(job_ids) - len(claims),
                  len(job_ids))
    return [(claim, ctx.snapshot(claim.batch_id, partial(store.batch_config, conn, claim.batch_id),
                                 claim.max_cost_usd))
            for claim in claims]


@contextmanager
def holding(ctx: StageContext, claims: Sequence[Claim]) -> Iterator[None]:
    """Keep ``claims`` in the process's held set while the stage works on them (the heartbeat renews their
    leases); on an error they are handed back to the queue at once instead of waiting for the lease."""
    ctx.held.add(claims)
    try:
        yield
    except BaseException:
        _release(ctx, claims)
        raise
    finally:
        ctx.held.discard(claims)


def _release(ctx: StageContext, claims: Sequence[Claim]) -> None:
    try:
        with ctx.engine.begin() as conn:
            due = store.release(conn, claims)
        ctx.publisher.publish(due)
    # Any error here: the stage's own error is the one to raise; the lease or the sweeper covers the rest.
    except Exception as exc:  # noqa: BLE001
        log.warning("could not hand back %d claimed jobs: %s", len(claims), str(exc).splitlines()[0])


@dataclass
class Writes:
    """How the claims of one message end: moves, their next messages, and verdicts."""

    validations: list[dict[str, Any]] = field(default_factory=list)  # Any: validations INSERT parameters
    moves: list[store.Move] = field(default_factory=list)
    next_steps: dict[int, Due] = field(default_factory=dict)
    #: accepted answers picked for a quality audit (``cascade.stages.audit``)
    audits: list[store.NewAudit] = field(default_factory=list)

    def move(self, claim: Claim, status: JobStatus, tier: int, stage: Stage, *, output_json: str | None = None,
             error: str | None = None, delay_s: float = 0.0, then: Due | None = None) -> None:
        self.moves.append(store.Move(claim, status, tier, stage, output_json, error, delay_s))
        if then is not None:
            self.next_steps[claim.job_id] = then

    def verdict(self, snap: TaskSnapshot, claim: Claim, verdict: Verdict, model: str | None = None) -> None:
        """Record a tier's verdict and move the job as the policy decides; ``model``: the model that answered
        (a fallback of the tier's), by default the tier's."""
        task = snap.task_type
        step = after_verdict(verdict.passed, claim.tier, snap.tier_count, on_exhausted=task.on_exhausted,
                             has_answer=verdict.votes > 0)
        accepted = step.action is Action.ACCEPT
        self.validations.append({
            "job_id": claim.job_id, "tier": claim.tier, "model": model or snap.tier(claim.tier).model.name,
            # an answer the policy accepted as the last tier's counts as passed, as it always has
            "passed": accepted, "agreement": verdict.agreement, "votes": verdict.votes, "samples": verdict.samples,
            "reasons": json.dumps(store.pg_json([] if accepted else [r.to_json() for r in verdict.reasons])),
            "answer_key": answer_key(verdict.result, task.self_consistency.fields) if verdict.votes else None,
        })
        if accepted and claim.tier < snap.tier_count and task.audit is not None \
                and audited(claim.job_id, task.audit.rate):
            auditor = snap.audit_tier()
            assert auditor is not None
            self.audits.append(store.NewAudit(claim.job_id, task.name, claim.tier,
                                              model or snap.tier(claim.tier).model.name, auditor.model.name))
        if accepted:
            self.move(claim, JobStatus.SUCCEEDED, claim.tier, Stage.VALIDATE,
                      output_json=json.dumps(store.pg_json(verdict.result)))
        elif step.action is Action.ESCALATE:
            self.move(claim, JobStatus.QUEUED, step.tier, Stage.CALL, then=(claim.job_id, step.tier, Stage.CALL))
        else:
            error = "; ".join(f"{r.code}: {r.detail}" if r.detail else r.code for r in verdict.reasons)[:1000]
            self.move(claim, JobStatus.FAILED, claim.tier, Stage.VALIDATE, error=store.pg_text(error))

    def budget_exhausted(self, snap: TaskSnapshot, claim: Claim, detail: str, earlier: Any = None) -> None:
        """End a job whose next request does not fit in its batch's budget: recorded as this tier's failed
        validation (``budget_exhausted``); the job fails, or with ``on_exhausted: accept_last`` keeps
        ``earlier``, the valid answer of a tier before (None: it has none)."""
        self.validations.append({
            "job_id": claim.job_id, "tier": claim.tier, "model": snap.tier(claim.tier).model.name, "passed": False,
            "agreement": None, "votes": 0, "samples": snap.tier(claim.tier).samples,
            "reasons": json.dumps([{"code": "budget_exhausted", "detail": store.pg_text(detail[:500])}]),
            "answer_key": None,
        })
        if earlier is not None and snap.task_type.on_exhausted == "accept_last":
            self.move(claim, JobStatus.SUCCEEDED, claim.tier, Stage.VALIDATE,
                      output_json=json.dumps(store.pg_json(earlier)))
        else:
            self.move(claim, JobStatus.FAILED, claim.tier, Stage.VALIDATE, error="budget_exhausted")

    def write(self, conn: Connection) -> tuple[int, list[Due]]:
        """Write everything in ``conn``'s transaction; returns how many jobs moved and the messages due for
        them and for their audits. A verdict is recorded only for a job that moved: a claim that was taken over
        leaves no trace."""
        moved = store.move_many(conn, self.moves)
        store.record_validations(conn, [v for v in self.validations if v["job_id"] in moved])
        # a job of a cancelled batch stopped instead of going on: no message for it
        due = [due for job_id, due in self.next_steps.items() if moved.get(job_id) is JobStatus.QUEUED]
        audit_ids = store.insert_audits(conn, [a for a in self.audits if a.job_id in moved])
        return len(moved), due + [(audit_id, 0, Stage.AUDIT) for audit_id in audit_ids]
