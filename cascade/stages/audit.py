"""The audit stage: re-run an accepted answer's job on the audit model and record whether the two agree.

A task type with ``audit: {rate, model}`` has that share of the answers it accepts below its top tier queued
for audit by the verdict that accepted them (``Writes.verdict``, in the same transaction), and published to
the ``audit`` queue. This stage runs like the call stage, in three steps: claim the audits (reserving their
cost bounds under the batch's and the task type's budgets, and inserting their requests' rows), send the
requests, then record them, vote on the auditor's samples with the audit tier's settings, and compare its
answer with the accepted one on the voted fields (``cascade.validate.answer_key``).

An audit's requests are its job's attempts at tier 0 (``attempts.audit``): they count in budgets and in
``audits.cost_usd``, never in the job's cost. The job itself is never touched. Audits are background work:
they never fail over, never use the request cache, and a request that cannot go out soon (a rate limit, a
provider asking to come back later) puts the audit back in Postgres for later; one that gives up ends the
audit without a verdict (``agreed`` NULL, ``detail`` says why).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import Connection

from cascade import store
from cascade.config import ResolvedTier, TaskSnapshot
from cascade.errors import ConfigError, ProviderError, ProviderRateLimited
from cascade.policy import RequestAction, after_request_error, is_retryable
from cascade.stages.budget import cost_bound, count_estimates, settle_rows, settled
from cascade.stages.context import StageContext, request_threads
from cascade.stages.limits import limit_tokens, reserve_slots, settle_tokens
from cascade.stages.requests import Request, answer_row, failed_row, plan_requests, send
from cascade.stages.validate import judge_tier
from cascade.store import AUDIT_TIER, AuditClaim, AuditEnd, Claim, Stage
from cascade.validate import answer_key

__all__ = ["run_audits"]

log = logging.getLogger(__name__)

#: an audit whose request failed unexpectedly waits this long in Postgres before it is tried again
CRASH_DELAY_S = 30.0


@dataclass
class _Sent:
    """What became of one request of an audit."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # Any: attempts UPDATE parameters
    defer_s: float = 0.0
    failed: str | None = None  # it gave up: why
    again: bool = False  # the audit is claimed again at once (a model that ignored n, an unexpected error)


@dataclass
class _Audit:
    held: AuditClaim
    snap: TaskSnapshot
    tier: ResolvedTier
    #: requests to send: (request, its attempts row, its cost bound)
    pending: list[tuple[Request, int, Decimal]] = field(default_factory=list)
    sent: list[_Sent] = field(default_factory=list)

    @property
    def budgeted(self) -> bool:
        return self.snap.max_cost_usd is not None or self.snap.task_type.budget is not None

    def budget_keys(self, bound: Decimal) -> dict[str, Any]:  # Any: row values
        return {"reserved_usd": bound, "batch_id": self.held.batch_id}


def run_audits(ctx: StageContext, audit_ids: Sequence[int]) -> int:
    """Claim the due audits of ``audit_ids``, send their requests, record them and end each audit; returns how
    many ended (done or skipped)."""
    audits, ended = _claim(ctx, audit_ids)
    if not audits:
        return ended
    try:
        _send_all(ctx, audits)
    except BaseException:
        _give_back(ctx, audits)
        raise
    return ended + _finish(ctx, audits)


def _as_claim(held: AuditClaim) -> Claim:
    """The audit as a claim on its job's tier 0 (what the attempts statements read of a claim)."""
    return Claim(held.job_id, held.batch_id, held.key, held.input, AUDIT_TIER, Stage.AUDIT, held.claim_no)


def _claim(ctx: StageContext, audit_ids: Sequence[int]) -> tuple[list[_Audit], int]:
    """Claim, plan each audit's requests and reserve their bounds; an audit whose budget has no room ends as
    skipped. Returns the audits to send and how many ended."""
    audits: list[_Audit] = []
    ends: list[AuditEnd] = []
    with ctx.engine.begin() as conn:
        held = store.claim_audits(conn, audit_ids, ctx.settings.lease_s, ctx.worker_id)
        if not held:
            return [], 0
        history = store.prepare_attempts(conn, [_as_claim(h) for h in held], AUDIT_TIER)
        for h in held:
            snap = ctx.snapshot(h.batch_id, partial(store.batch_config, conn, h.batch_id))
            tier = snap.audit_tier()
            if tier is None:
                ends.append(AuditEnd(h, "skipped", detail="its batch's task type has no audit"))
                continue
            audit = _Audit(h, snap, tier)
            requests = plan_requests(tier, h.input, set(history[h.job_id].answered),
                                     one_by_one=tier.model.name in ctx.n_ignored)
            audit.pending = [(r, 0, cost_bound(tier, r)) for r in requests]
            audits.append(audit)
        budgeted = [a for a in audits if a.budgeted]
        if budgeted:  # the job rows first: the lock order of every transaction that touches a budget
            store.lock_for_settling(conn, [a.held.job_id for a in budgeted], [])
            count_estimates(conn, [(a.snap, a.held.batch_id, history[a.held.job_id]) for a in budgeted])
        kept = []
        for audit in audits:
            amount = sum((bound for _, _, bound in audit.pending), Decimal(0))
            if audit.budgeted and not _reserve(conn, audit, amount):
                ends.append(AuditEnd(audit.held, "skipped", detail=f"its requests may cost up to ${amount}, more "
                                     "than its budget (the batch's --max-cost or the task type's daily one) has left"))
            else:
                kept.append(audit)
        new = [(a, r, bound) for a in kept for r, _, bound in a.pending]
        ids = store.start_attempts(conn, [store.NewAttempt(a.held.job_id, AUDIT_TIER, a.tier.model.name, r.variant,
                                                           r.sample, r.n, bound or None, audit=True)
                                          for a, r, bound in new])
        by_audit: dict[int, list[tuple[Request, int, Decimal]]] = {}
        for (a, r, bound), attempt_id in zip(new, ids, strict=True):
            by_audit.setdefault(a.held.id, []).append((r, attempt_id, bound))
        for audit in kept:
            audit.pending = by_audit.get(audit.held.id, [])
        store.end_audits(conn, ends)
    return kept, len(ends)


def _reserve(conn: Connection, audit: _Audit, amount: Decimal) -> bool:
    """Reserve ``amount`` under the audit's batch budget, then its task type's daily one; False (nothing
    reserved) when either has no room."""
    if not amount:
        return True
    cap, budget = audit.snap.max_cost_usd, audit.snap.task_type.budget
    if cap is not None and store.reserve_budget(conn, audit.held.batch_id, cap, [amount])[0] == 0:
        return False
    if budget is not None and store.reserve_daily(conn, audit.snap.task_type.name, budget.per_day_usd,
                                                  [amount])[0] == 0:
        if cap is not None:
            store.settle_budget(conn, audit.held.batch_id, spent=Decimal(0), released=amount)
        return False
    return True


def _send_all(ctx: StageContext, audits: list[_Audit]) -> None:
    def one(item: tuple[_Audit, Request, int, Decimal]) -> _Sent:
        audit, request, attempt_id, bound = item
        sent = _Sent()
        try:
            _send(ctx, audit, request, attempt_id, bound, sent)
        except Exception:
            log.exception("audit %s: request from sample %s failed unexpectedly; the audit is tried again in %s s",
                          audit.held.id, request.sample, CRASH_DELAY_S)
            sent.defer_s = CRASH_DELAY_S
        return sent

    work = [(a, r, attempt_id, bound) for a in audits for r, attempt_id, bound in a.pending]
    results = [one(item) for item in work] if len(work) <= 1 else list(request_threads().map(one, work))
    for (audit, *_), sent in zip(work, results, strict=True):
        audit.sent.append(sent)


def _send(ctx: StageContext, audit: _Audit, request: Request, attempt_id: int, bound: Decimal, sent: _Sent) -> None:
    """Send one request, retrying inline as the policy says (each try has its own attempts row)."""
    tier, limited, failed = audit.tier, 0, 0
    if (missing := ctx.missing_shared_state(tier.model)) is not None:
        sent.rows.append(_not_sent(attempt_id, "config", missing) | audit.budget_keys(bound))
        sent.failed = missing
        return
    while True:
        slots = reserve_slots(ctx, tier, [request], hold=None)
        if not slots.granted:
            sent.rows.append(_not_sent(attempt_id, "rate_limited", "no rate-limit slot soon: the audit waits")
                             | audit.budget_keys(bound))
            sent.defer_s = max(0.05, slots.first_s)
            return
        ctx.sleep(slots.wait_s(0))
        started = time.monotonic()
        try:
            done = send(ctx, audit.snap, tier, request)
        except ConfigError as exc:  # the auditor cannot be called from this worker (its API key is unset)
            sent.rows.append(_not_sent(attempt_id, "config", str(exc)[:500]) | audit.budget_keys(bound))
            sent.failed = str(exc)[:300]
            return
        except ProviderError as exc:
            sent.rows.append(failed_row(attempt_id, exc, int((time.monotonic() - started) * 1000))
                             | audit.budget_keys(bound))
            limited, failed = (limited + 1, failed) if exc.kind == "rate_limited" else (limited, failed + 1)
            step = after_request_error(
                exc.kind, retryable=is_retryable(exc.kind, exc.status),
                attempt=limited if exc.kind == "rate_limited" else failed, max_retries=tier.model.max_retries,
                retry_after_s=exc.retry_after if isinstance(exc, ProviderRateLimited) else None,
                max_inline_wait_s=ctx.settings.max_inline_wait_s, on_config_error="escalate")
            if step.action is RequestAction.SPLIT:
                ctx.ignores_n(tier.model.name, "refused n")
                sent.again = True
            elif step.action is RequestAction.DEFER:
                sent.defer_s = step.delay_s
            elif step.action is RequestAction.RETRY:
                ctx.sleep(step.delay_s)
                next_id = _retry_attempt(ctx, audit, request, bound)
                if next_id is not None:
                    attempt_id = next_id
                    continue
                sent.failed = "its budget had no room for a retry"
            else:
                sent.failed = f"{exc.kind}: {str(exc)[:300]}"
            return
        settle_tokens(ctx, tier, limit_tokens(tier, request), done)
        sent.rows.append(answer_row(attempt_id, audit.snap, tier, request, done) | audit.budget_keys(bound))
        if done.missing:  # the next claim asks for the missing samples one by one
            ctx.ignores_n(tier.model.name, f"answered {done.choices_returned} of {request.n} choices")
            sent.again = True
        return


def _not_sent(attempt_id: int, error: str, detail: str) -> dict[str, Any]:  # Any: attempts UPDATE parameters
    return {"id": attempt_id, "latency_ms": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": Decimal(0),
            "error": error, "detail": detail, "response": None}


def _retry_attempt(ctx: StageContext, audit: _Audit, request: Request, bound: Decimal) -> int | None:
    """The attempts row of a retry, its bound reserved first; None when a budget has no room for it."""
    with ctx.engine.begin() as conn:
        if audit.budgeted:
            store.lock_for_settling(conn, [audit.held.job_id], [])
            if not _reserve(conn, audit, bound):
                return None
        return store.start_attempts(conn, [store.NewAttempt(audit.held.job_id, AUDIT_TIER, audit.tier.model.name,
                                                            request.variant, request.sample, request.n,
                                                            bound or None, audit=True)])[0]


def _end_rows(conn: Connection, audits: list[_Audit], rows: list[dict[str, Any]]) -> None:  # Any: rows
    """Record the requests and settle their budgets (job rows, batch rows, daily buckets, in that order)."""
    budgeted = [a for a in audits if a.budgeted]
    if not budgeted:
        store.end_attempts(conn, rows)
        return
    late = store.lock_for_settling(conn, [a.held.job_id for a in budgeted], [r["id"] for r in rows])
    for audit in budgeted:
        mine = [r for s in audit.sent for r in s.rows]
        if audit.snap.max_cost_usd is not None:
            settle_rows(conn, audit.held.batch_id, mine, late)
    for audit in budgeted:
        if audit.snap.task_type.budget is not None:
            store.settle_daily(conn, audit.snap.task_type.name, [settled(r, late) for s in audit.sent for r in s.rows])
    store.end_attempts(conn, rows)


def _finish(ctx: StageContext, audits: list[_Audit]) -> int:
    """Record every request, then end each audit: its verdict, or back to the queue. Returns how many ended."""
    with ctx.engine.begin() as conn:
        _end_rows(conn, audits, [row for a in audits for s in a.sent for row in s.rows])
        answers = store.answers_many(conn, [a.held.job_id for a in audits], AUDIT_TIER)
        ends = [_end(a, answers[a.held.job_id]) for a in audits]
        again = store.end_audits(conn, ends)
    ctx.publisher.publish([(audit_id, AUDIT_TIER, Stage.AUDIT) for audit_id in again])
    return sum(e.status != "queued" for e in ends)


def _end(audit: _Audit, got: store.Answers) -> AuditEnd:
    """How one audit ends after its requests."""
    held = audit.held
    if any(s.again for s in audit.sent):
        return AuditEnd(held, "queued")
    defer = max((s.defer_s for s in audit.sent), default=0.0)
    if defer:
        return AuditEnd(held, "queued", delay_s=defer, detail="waiting for the auditor model")
    failed = next((s.failed for s in audit.sent if s.failed), None)
    if failed is not None:
        return AuditEnd(held, "done", detail=store.pg_text(f"the auditor gave no answer: {failed}"))
    verdict = judge_tier(audit.snap, audit.tier, got.contents, got.truncated, got.refused)
    if not verdict.votes:
        why = "; ".join(r.code for r in verdict.reasons)
        return AuditEnd(held, "done", detail=store.pg_text(f"the auditor gave no valid answer: {why}"[:1000]))
    fields = audit.snap.task_type.self_consistency.fields
    agreed = answer_key(verdict.result, fields) == answer_key(held.output, fields)
    note = None if verdict.passed else (f"the auditor's own samples agreed {verdict.votes} of {verdict.samples}, "
                                        f"below its min_agreement {audit.tier.min_agreement}")
    return AuditEnd(held, "done", agreed=agreed, output_json=json.dumps(store.pg_json(verdict.result)), detail=note)


def _give_back(ctx: StageContext, audits: list[_Audit]) -> None:
    """Best effort after an error: the audits go back to the queue at once (the lease covers the rest)."""
    try:
        with ctx.engine.begin() as conn:
            again = store.end_audits(conn, [AuditEnd(a.held, "queued") for a in audits])
        ctx.publisher.publish([(audit_id, AUDIT_TIER, Stage.AUDIT) for audit_id in again])
    except Exception as exc:  # noqa: BLE001 - the stage's own error is the one to raise
        log.warning("could not hand back %d audits: %s", len(audits), str(exc).splitlines()[0])
