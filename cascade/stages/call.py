"""The call stage: send each claimed job's requests for its tier, record them, move the jobs on.

Three steps, each with its own transaction: claim (and insert the rows of the requests that go out now),
send every request of every job at once (retrying as ``cascade.policy`` decides), then record every
request's outcome and move each job: to validation, back to Postgres (deferred), or to the policy's
verdict when its requests gave up. A request is always recorded before it is sent, and every answer that
came back is recorded, whatever happened to the message's other requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection

from cascade import store
from cascade.config import ResolvedTier, TaskSnapshot
from cascade.errors import ConfigError, ProviderError, ProviderRateLimited
from cascade.policy import RequestAction, RequestStep, after_request_error, fails_over, is_fault, is_retryable
from cascade.ratelimit import UNLIMITED, Reservation
from cascade.stages.budget import (
    BudgetBusy,
    OverBudget,
    cost_bound,
    count_estimates,
    earlier_answer,
    settle_rows,
    settled,
)
from cascade.stages.cached import (
    Cached,
    Role,
    entry_of,
    fills_of,
    keep_answer,
    plan_cache,
    release_all,
    wait_for,
)
from cascade.stages.context import StageContext, request_threads
from cascade.stages.failover import MAX_OUTAGE_WAIT_S, Pick, Picker, outage_note
from cascade.stages.ledger import Writes, claim_due, holding
from cascade.stages.limits import limit_tokens, reserve_slots, settle_tokens
from cascade.stages.requests import Request, answer_row, failed_row, plan_requests, send, split
from cascade.store import Claim, JobStatus, Stage
from cascade.store.cache import Fill, fill_keys
from cascade.validate import Verdict, model_error

__all__ = ["run_call", "run_calls"]

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    """One request of a job to send: its attempts row (None: inserted after waiting for its rate-limit slot),
    and the failures of earlier claims, so retries and backoff go on where they stopped."""

    request: Request
    attempt_id: int | None
    wait_s: float = 0.0
    limited: int = 0  # 429s
    failed: int = 0  # other failures
    tokens: int = 0  # reserved under rate_limit_tpm (settled to the real usage after the answer)
    cache: Cached | None = None  # None: its task type or model does not use the request cache
    #: the tier as this request calls it now: None is the job's pick; a fallback after a provider fault
    tier: ResolvedTier | None = None
    #: the upper bound of its cost (reserved under its batch's budget, the estimate if it never comes back)
    bound: Decimal = Decimal(0)
    #: its batch's budget could not reserve its bound at claim time: it reserves (waiting) before it goes out
    unreserved: bool = False


@dataclass
class _Sent:
    """What became of one request after its retries: the rows to record and how it ended."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # Any: attempts UPDATE parameters
    answered: bool = False
    defer_s: float = 0.0
    error_kind: str | None = None
    error_detail: str = ""
    #: an unexpected error (a database blip while recording a retry): the job is sent again from Postgres
    crashed: bool = False
    #: a configuration fault (bad key, unknown model) halts the batch: the provider's message
    halted: str | None = None
    #: the identical request this one waited for ended without an answer: the job is sent again at once
    again: bool = False
    #: its next request did not fit in the batch's budget
    over_budget: bool = False

    def merge(self, other: _Sent) -> None:
        """Take in what a one-sample request split from this one left."""
        self.rows += other.rows
        self.defer_s = max(self.defer_s, other.defer_s)
        self.crashed = self.crashed or other.crashed
        self.halted = self.halted or other.halted
        self.again = self.again or other.again
        self.over_budget = self.over_budget or other.over_budget
        if other.error_kind and not self.error_kind:
            self.error_kind, self.error_detail = other.error_kind, other.error_detail


@dataclass
class _CallJob:
    """One claimed job of a call message: its requests and what became of them."""

    claim: Claim
    snap: TaskSnapshot
    tier: ResolvedTier  # with the model picked for the job (cascade.stages.failover)
    pick: Pick = field(default_factory=lambda: Pick(None))
    pending: list[_Pending] = field(default_factory=list)
    sent: list[_Sent] = field(default_factory=list)

    def deferred_s(self) -> float:
        return max((s.defer_s for s in self.sent), default=0.0)

    def gave_up(self) -> list[_Sent]:
        return [s for s in self.sent if s.error_kind and not s.defer_s]


def run_call(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Call stage of one job (see ``run_calls``): False when the message was stale or the claim was lost."""
    return run_calls(ctx, [job_id], tier) == 1


def run_calls(ctx: StageContext, job_ids: Sequence[int], tier: int) -> int:
    """Call stage: send each job's requests for the tier (all jobs' at once), record them, move the jobs to
    validation. Returns how many jobs moved (stale ids and lost claims do not)."""
    jobs, moved_early, claims = _claim(ctx, job_ids, tier)
    if not claims:
        return moved_early
    with holding(ctx, claims):
        try:
            _send_all(ctx, jobs)
            return moved_early + _finish(ctx, jobs)
        except BaseException:
            _release_flights(ctx, jobs)
            raise


def _release_flights(ctx: StageContext, jobs: list[_CallJob]) -> None:
    """Best effort after an error: end this message's cache flights, so identical requests need not wait for
    their lease (the claims' own release follows)."""
    try:
        with ctx.engine.begin() as conn:
            release_all(conn, [p.cache for job in jobs for p in job.pending if p.cache is not None])
    except Exception as exc:  # noqa: BLE001 - the stage's own error is the one to raise
        log.warning("could not release request cache flights: %s", str(exc).splitlines()[0])


def _claim(ctx: StageContext, job_ids: Sequence[int], tier: int) -> tuple[list[_CallJob], int, list[Claim]]:
    """Claim the due jobs and plan their requests; a job that cannot send now (no usable model, no rate-limit
    slot soon) moves at once. Returns the jobs to send, how many moved, and every claim still held."""
    writes = Writes()
    jobs: list[_CallJob] = []
    with ctx.engine.begin() as conn:
        claimed = claim_due(ctx, conn, job_ids, tier, Stage.CALL)
        if not claimed:
            return [], 0, []
        history = store.prepare_attempts(conn, [claim for claim, _ in claimed], tier)
        picker = Picker(ctx)
        planned = [plan for claim, snap in claimed
                   if (plan := _requests(ctx, writes, picker, claim, snap, history[claim.job_id])) is not None]
        places = iter(plan_cache(ctx, conn, [(job.snap, job.tier, r) for job, requests in planned for r in requests]))
        dropped: list[Cached] = []
        for job, requests in planned:
            cached = [next(places) for _ in requests]
            if _plan(ctx, writes, job, requests, cached, history[job.claim.job_id]):
                jobs.append(job)
            else:
                dropped += [c for c in cached if c is not None]
        jobs = _within_budget(conn, writes, jobs, history, dropped)
        release_all(conn, dropped)
        # A request whose slot is now gets its attempts row in the claim's transaction; the others after waiting
        # (for their slot, or for the identical request whose answer they take).
        now = [(job, p) for job in jobs for p in job.pending
               if p.wait_s <= 0 and _sends_or_hits(p) and not p.unreserved]
        ids = store.start_attempts(conn, [store.NewAttempt(job.claim.job_id, tier, job.tier.model.name,
                                                           p.request.variant, p.request.sample, p.request.n,
                                                           p.bound or None)
                                          for job, p in now])
        for (_, p), attempt_id in zip(now, ids, strict=True):
            p.attempt_id = attempt_id
        moved, due = writes.write(conn)
    ctx.publisher.publish(due)
    return jobs, moved, [job.claim for job in jobs]


def _sends_or_hits(pending: _Pending) -> bool:
    return pending.cache is None or pending.cache.role in (Role.SEND, Role.HIT)


def _requests(ctx: StageContext, writes: Writes, picker: Picker, claim: Claim, snap: TaskSnapshot,
              past: store.History) -> tuple[_CallJob, list[Request]] | None:
    """The job, with the model of its tier it calls, and the requests it needs; None when it moved at once
    (``writes`` says where): every model of the tier is down, or the picked one is unusable."""
    base = snap.tier(claim.tier)
    pick = picker.pick(base)
    if pick.tier is None:
        task = snap.task_type
        if task.on_outage == "escalate" or pick.down_for_s >= task.outage_wait_s:
            writes.verdict(snap, claim, model_error("unavailable", outage_note(base, pick), samples=base.samples))
        else:  # wait in Postgres, no worker slot held, until a cooldown ends
            writes.move(claim, JobStatus.QUEUED, claim.tier, Stage.CALL, delay_s=pick.wait_s,
                        error=outage_note(base, pick))
        return None
    tier = pick.tier
    unusable = _unusable_model(ctx, tier)
    if unusable is not None:
        writes.verdict(snap, claim, unusable)
        return None
    requests = plan_requests(tier, claim.input, set(past.answered), one_by_one=tier.model.name in ctx.n_ignored)
    return _CallJob(claim, snap, tier, pick), requests


def _plan(ctx: StageContext, writes: Writes, job: _CallJob, requests: list[Request], cached: list[Cached | None],
          past: store.History) -> bool:
    """Book rate-limit slots for the requests that go out (not those the cache answers) and set the job's
    pending requests; False when no slot comes soon and the job moved (``writes`` says where)."""
    claim, tier = job.claim, job.tier
    sending = [i for i, c in enumerate(cached) if c is None or c.role is Role.SEND]
    slots = reserve_slots(ctx, tier, [requests[i] for i in sending], hold=f"{claim.job_id}:{claim.tier}")
    if not slots.granted:
        # No slot soon: hand the job back to Postgres (not_before) so it frees the worker; it comes back a
        # little before its held slot (the sweeper re-publishes it) and waits the rest inline.
        writes.move(claim, JobStatus.QUEUED, claim.tier, Stage.CALL, delay_s=_slot_delay(ctx, slots),
                    error=_limit_note(tier, slots))
        return False
    booked = slots is not UNLIMITED  # UNLIMITED: nothing was booked, nothing to settle
    waits = {i: slots.wait_s(k) for k, i in enumerate(sending)}
    job.pending = [_Pending(r, None, waits.get(i, 0.0), past.failures.get((r.sample, r.n, True), 0),
                            past.failures.get((r.sample, r.n, False), 0),
                            limit_tokens(tier, r) if booked and i in waits else 0, cached[i],
                            bound=cost_bound(tier, r) if i in waits else Decimal(0))
                   for i, r in enumerate(requests)]
    return True


def _within_budget(conn: Connection, writes: Writes, jobs: list[_CallJob], history: dict[int, store.History],
                   dropped: list[Cached]) -> list[_CallJob]:
    """The jobs whose requests fit in their budgets (the batch's ``--max-cost``, the task type's
    ``budget.per_day_usd``), reserved in claim order: one conditional UPDATE per capped batch, then one locked
    read and upsert per task type with a daily budget. A job that would fit once requests in flight settle
    reserves before each request goes out; the others end as ``budget_exhausted`` (their cache flights join
    ``dropped``). Requests of earlier claims that never came back are counted as spent at their bound first."""
    limited = [job for job in jobs if _budgeted(job.snap)]
    kept = [job for job in jobs if not _budgeted(job.snap)]
    if not limited:
        return kept
    count_estimates(conn, [(job.snap, job.claim.batch_id, history[job.claim.job_id]) for job in limited])
    for job in limited:
        for p in job.pending:  # a request that waits for its rate-limit slot reserves when it goes out
            p.unreserved = p.wait_s > 0 and p.bound > 0
    amount = {id(job): sum((p.bound for p in job.pending if not p.unreserved), Decimal(0)) for job in limited}
    fits, spent = _reserve_jobs(conn, limited, amount)
    for job in limited:
        if fits[id(job)]:
            kept.append(job)
        elif _fits_later(job, amount[id(job)], spent):
            for p in job.pending:
                p.unreserved = p.bound > 0
            kept.append(job)
        else:
            writes.budget_exhausted(job.snap, job.claim, f"its requests may cost up to ${amount[id(job)]}, more "
                                    "than its budget has left", earlier_answer(conn, job.snap, job.claim))
            dropped += [p.cache for p in job.pending if p.cache is not None]
    return kept


def _reserve_jobs(conn: Connection, jobs: list[_CallJob],
                  amount: dict[int, Decimal]) -> tuple[dict[int, bool], dict[str, Decimal]]:
    """Reserve each job's amount (by ``id(job)``) in its batch's budget, then its task type's daily one, in
    order; returns which fit, and what each budget had spent (by batch id, ``day:<task type>``)."""
    fits = {id(job): True for job in jobs}
    spent: dict[str, Decimal] = {}
    for key, group in _groups(jobs, lambda j: j.claim.batch_id if j.snap.max_cost_usd is not None else None):
        cap = group[0].snap.max_cost_usd
        assert cap is not None
        n, spent[key] = store.reserve_budget(conn, key, cap, [amount[id(j)] for j in group])
        for job in group[n:]:
            fits[id(job)] = False
    for key, group in _groups([j for j in jobs if fits[id(j)]],
                              lambda j: j.snap.task_type.name if j.snap.task_type.budget is not None else None):
        budget = group[0].snap.task_type.budget
        assert budget is not None
        n, spent["day:" + key] = store.reserve_daily(conn, key, budget.per_day_usd, [amount[id(j)] for j in group])
        for job in group[n:]:
            fits[id(job)] = False
            if job.snap.max_cost_usd is not None:  # give back what its batch reserved for it
                store.settle_budget(conn, job.claim.batch_id, spent=Decimal(0), released=amount[id(job)])
    return fits, spent


def _budgeted(snap: TaskSnapshot) -> bool:
    return snap.max_cost_usd is not None or snap.task_type.budget is not None


def _groups(jobs: Sequence[_CallJob], key: Callable[[_CallJob], str | None]) -> list[tuple[str, list[_CallJob]]]:
    """``jobs`` grouped by ``key`` (None: left out), in order."""
    out: dict[str, list[_CallJob]] = {}
    for job in jobs:
        if (k := key(job)) is not None:
            out.setdefault(k, []).append(job)
    return list(out.items())


def _fits_later(job: _CallJob, amount: Decimal, spent: dict[str, Decimal]) -> bool:
    """Whether ``amount`` fits in the job's budgets on top of ``spent`` (what each budget had spent, by batch
    id or ``day:<task type>``; one not read yet does not say no): once the requests in flight settle, or now
    when ``spent`` includes what they reserved."""
    cap, budget = job.snap.max_cost_usd, job.snap.task_type.budget
    if cap is not None and spent.get(job.claim.batch_id, Decimal(0)) + amount > cap:
        return False
    return budget is None or spent.get("day:" + job.snap.task_type.name, Decimal(0)) + amount <= budget.per_day_usd


def _unusable_model(ctx: StageContext, tier: ResolvedTier) -> Verdict | None:
    """A model this worker cannot call (its API key variable is unset) is a model error the policy decides,
    not a job left running until its lease expires."""
    try:
        ctx.providers.get(tier.model)
    except ConfigError as exc:
        return model_error("config", str(exc), samples=tier.samples)
    missing = ctx.missing_shared_state(tier.model)
    return None if missing is None else model_error("config", missing, samples=tier.samples)


def _await_pause(ctx: StageContext, tier: ResolvedTier) -> None:
    """Hold a request back while an answer asked this process to pause (at most the inline wait; past that the
    provider's own 429 and Retry-After take over)."""
    if tier.model.rate_limit_rpm or tier.model.rate_limit_tpm:
        limiter = ctx.limiter()
        if limiter is not None and (wait := limiter.paused_s(tier.model.name)) > 0:
            ctx.sleep(min(wait, ctx.limit_wait_s))


def _limit_note(tier: ResolvedTier, slots: Reservation) -> str:
    limits = [f"{name} {value}" for name, value in (("rate_limit_rpm", tier.model.rate_limit_rpm),
                                                     ("rate_limit_tpm", tier.model.rate_limit_tpm)) if value]
    return f"waiting for model {tier.model.name!r} ({', '.join(limits)}): next slot in {slots.first_s:.1f} s"


def _slot_delay(ctx: StageContext, slots: Reservation) -> float:
    """How long a job waits in Postgres for a slot: until the slot is 0.8 × the inline bound away, so the
    sweeper's cadence and the clocks of Postgres and Redis may be a little late without missing it."""
    return max(0.05, slots.first_s - 0.8 * ctx.limit_wait_s)


def _send_all(ctx: StageContext, jobs: list[_CallJob]) -> None:
    """Send every request of every job at once (gevent patches threads into greenlets in workers). An
    unexpected error in one request ends that request only: the others' answers are already paid for."""
    def one(item: tuple[_CallJob, _Pending]) -> _Sent:
        job, pending = item
        sent = _Sent()
        try:
            _send_with_retries(ctx, job, pending, sent)
        except Exception:
            log.exception("job %s tier %s: request from sample %s failed unexpectedly; the job is sent again",
                          job.claim.job_id, job.claim.tier, pending.request.sample)
            sent.crashed = True
        return sent

    # Requests that follow an identical one of this message go second: they take its answer.
    for follows in (False, True):
        work = [(job, p) for job in jobs for p in job.pending
                if (p.cache is not None and p.cache.role is Role.FOLLOW) is follows]
        results = [one(item) for item in work] if len(work) <= 1 else list(request_threads().map(one, work))
        for (job, _), sent in zip(work, results, strict=True):
            job.sent.append(sent)


def _send_with_retries(ctx: StageContext, job: _CallJob, pending: _Pending, sent: _Sent) -> None:
    """Send one request, retrying as the policy says; every request has its attempts row first. Stops when
    the claim was taken over (``taken_over``: nothing more goes out for a job this worker no longer holds)."""
    try:
        if pending.cache is not None and pending.cache.role is not Role.SEND:
            _answer_from_cache(ctx, job, pending, pending.cache, sent)
        else:
            _send_and_retry(ctx, job, pending, sent)
    except OverBudget:
        sent.over_budget = True
    except BudgetBusy:  # its next claim tries again (the requests in flight will have settled by then)
        sent.again = True


def _send_and_retry(ctx: StageContext, job: _CallJob, pending: _Pending, sent: _Sent) -> None:
    """``_send_with_retries`` for a request that goes to a model (raises ``OverBudget``)."""
    tier = pending.tier or job.tier
    attempt_id = pending.attempt_id
    if attempt_id is None:
        ctx.sleep(pending.wait_s)
        pending.bound = pending.bound or cost_bound(tier, pending.request)
        attempt_id = _start_attempt(ctx, job, pending.request, tier, pending.bound)
    while attempt_id is not None:
        _await_pause(ctx, tier)
        started = time.monotonic()
        try:
            done = send(ctx, job.snap, tier, pending.request)
        except ProviderError as exc:
            sent.rows.append(failed_row(attempt_id, exc, int((time.monotonic() - started) * 1000))
                             | _budget_keys(job, pending))
            sent.error_kind, sent.error_detail = exc.kind, store.pg_text(str(exc))
            fault = is_fault(exc.kind, exc.status)
            down = fault and ctx.health().report(tier.model.name, ok=False, probe=_probing(job, tier))
            step = _after_failure(ctx, job, tier, pending, exc)
            backup = job.pick.next_after(tier.model) if fails_over(exc.kind, exc.status, step) else None
            if backup is None and fault and (down or step.action is RequestAction.GIVE_UP) and _outage(ctx, job):
                sent.defer_s = min(MAX_OUTAGE_WAIT_S, ctx.settings.breaker_cooldown_s)
                sent.error_detail = f"every model of tier {job.claim.tier} is down: waiting for one to come back"
                return
            if backup is not None:  # failover: the tier's next model, at once (no backoff, no escalation)
                pending.tier, pending.limited, pending.failed = tier.using(backup), 0, 0
                if _wait_to_retry(ctx, job, pending.tier, pending, RequestStep(RequestAction.RETRY), sent):
                    tier = pending.tier
                    pending.bound = cost_bound(tier, pending.request)
                    attempt_id = _start_attempt(ctx, job, pending.request, tier, pending.bound)
                    continue
                return  # no rate-limit slot of the backup soon: the job waits in Postgres
            if step.action is RequestAction.RETRY and _wait_to_retry(ctx, job, tier, pending, step, sent):
                attempt_id = _start_attempt(ctx, job, pending.request, tier, pending.bound)
                continue
            _stop(ctx, job, tier, pending, sent, step, exc)
            return
        settle_tokens(ctx, tier, pending.tokens, done)
        pending.tokens = 0
        ctx.health().report(tier.model.name, ok=True, probe=_probing(job, tier))
        sent.rows.append(answer_row(attempt_id, job.snap, tier, pending.request, done) | _budget_keys(job, pending))
        sent.answered = True
        if pending.cache is not None and tier.model is job.tier.model:  # its key names the model it was sent to
            keep_answer(pending.cache, job.snap, done)
        if done.missing:
            ctx.ignores_n(tier.model.name, f"answered {done.choices_returned} of {pending.request.n} choices")
            first = pending.request.sample + done.choices_returned
            _send_split(ctx, job, tier, pending.request, range(first, pending.request.sample + pending.request.n),
                        sent)
        return
    sent.error_kind, sent.error_detail = "taken_over", "the job was handed to another worker"


def _answer_from_cache(ctx: StageContext, job: _CallJob, pending: _Pending, cached: Cached, sent: _Sent) -> None:
    """Record the cached answer of a request as its attempt (cost 0, the original tokens, ``saved_usd`` its
    original cost): the stored one (HIT), the one another claim's identical request got (WAIT), or the one
    this message's identical request got (FOLLOW). Without one the job is sent again at once: its next claim
    finds the answer or sends the request itself."""
    started = time.monotonic()
    if cached.role is Role.WAIT:
        cached.entry = wait_for(ctx, cached)
    entry = entry_of(cached, job.snap, job.tier) if cached.role is Role.FOLLOW else cached.entry
    if entry is None:
        sent.again = True
        return
    attempt_id = pending.attempt_id if pending.attempt_id is not None else _start_attempt(ctx, job, pending.request)
    if attempt_id is None:
        sent.error_kind, sent.error_detail = "taken_over", "the job was handed to another worker"
        return
    row = answer_row(attempt_id, job.snap, job.tier, pending.request,
                     entry.completion(int((time.monotonic() - started) * 1000)))
    row.update(cost_usd=Decimal(0), cached=True, saved_usd=entry.cost_usd)
    sent.rows.append(row)
    sent.answered = True


def _outage(ctx: StageContext, job: _CallJob) -> bool:
    """Whether a request that failed on the tier's last usable model should wait for the tier instead of
    giving up: ``on_outage: wait`` and every model of the tier is down now."""
    base = job.snap.tier(job.claim.tier)
    return job.snap.task_type.on_outage == "wait" and ctx.health().all_down([m.name for m in base.chain])


def _probing(job: _CallJob, tier: ResolvedTier) -> bool:
    """Whether a request of ``job`` to ``tier``'s model is that model's probe after its cooldown."""
    return job.pick.probe and tier.model is job.tier.model


def _stop(ctx: StageContext, job: _CallJob, tier: ResolvedTier, pending: _Pending, sent: _Sent, step: RequestStep,
          exc: ProviderError) -> None:
    """Carry out a step that ends the request here: split it, halt the batch, defer or give up."""
    if step.action is RequestAction.SPLIT:
        ctx.ignores_n(tier.model.name, "refused n")
        sent.error_kind, sent.error_detail = None, ""
        request = pending.request
        _send_split(ctx, job, tier, request, range(request.sample, request.sample + request.n), sent)
    elif step.action is RequestAction.HALT:
        sent.halted = store.pg_text(f"tier {job.claim.tier}: {exc}")
    elif step.action is RequestAction.DEFER or (step.action is RequestAction.RETRY and sent.defer_s):
        sent.defer_s = sent.defer_s or step.delay_s


def _send_split(ctx: StageContext, job: _CallJob, tier: ResolvedTier, request: Request, samples: range,
                sent: _Sent) -> None:
    """Ask for ``samples`` one request each, all at once (the model ignored or refused ``n``)."""
    def one(part: Request) -> _Sent:
        out = _Sent()
        try:
            _send_with_retries(ctx, job, _Pending(part, None, tier=tier), out)
        except Exception:  # as in _send_all: the other samples' answers are kept, the job is sent again
            log.exception("job %s tier %s: request for sample %s failed unexpectedly; the job is sent again",
                          job.claim.job_id, job.claim.tier, part.sample)
            out.crashed = True
        return out

    parts = split(request, samples)
    for out in (map(one, parts) if len(parts) <= 1 else request_threads().map(one, parts)):
        sent.merge(out)


def _after_failure(ctx: StageContext, job: _CallJob, tier: ResolvedTier, pending: _Pending,
                   exc: ProviderError) -> RequestStep:
    """Count the failure and ask the policy what comes next (no I/O)."""
    limited = exc.kind == "rate_limited"
    if limited:
        pending.limited += 1
    else:
        pending.failed += 1
    return after_request_error(
        exc.kind, retryable=is_retryable(exc.kind, exc.status),
        attempt=pending.limited if limited else pending.failed, max_retries=tier.model.max_retries,
        retry_after_s=exc.retry_after if isinstance(exc, ProviderRateLimited) else None,
        max_inline_wait_s=ctx.settings.max_inline_wait_s, on_config_error=job.snap.task_type.on_config_error)


def _wait_to_retry(ctx: StageContext, job: _CallJob, tier: ResolvedTier, pending: _Pending, step: RequestStep,
                   sent: _Sent) -> bool:
    """Carry out a RETRY step: record the failed request, back off, take a rate-limit slot (the failed
    request's tokens stay counted: the provider may have counted them too). False when no slot comes soon
    (``sent.defer_s`` then says how long the job waits in Postgres)."""
    with ctx.engine.begin() as conn:  # a failed request is recorded before its retry goes out
        _end_rows(conn, [job], sent.rows)
    sent.rows.clear()
    ctx.sleep(step.delay_s)
    slot = reserve_slots(ctx, tier, [pending.request], hold=None)
    if not slot.granted:
        sent.defer_s, sent.error_detail = _slot_delay(ctx, slot), _limit_note(tier, slot)
        return False
    pending.tokens = limit_tokens(tier, pending.request) if slot is not UNLIMITED else 0
    ctx.sleep(slot.wait_s(0))
    sent.error_kind, sent.error_detail = None, ""
    return True


def _start_attempt(ctx: StageContext, job: _CallJob, request: Request, tier: ResolvedTier | None = None,
                   bound: Decimal = Decimal(0)) -> int | None:
    """The row of a request about to go out to ``tier``'s model (the job's pick by default), its cost
    ``bound`` reserved under its budgets first (the batch's, the task type's daily one): ``OverBudget`` when it
    can never fit, ``BudgetBusy`` when requests in flight hold the rest longer than the inline wait; None when
    the claim was taken over meanwhile (no request)."""
    model = (tier or job.tier).model.name
    cap, budget = job.snap.max_cost_usd, job.snap.task_type.budget
    deadline, pause = time.monotonic() + ctx.limit_wait_s, 0.01
    while True:
        # The job row, then the batch row, then the task type's buckets, then the attempts row (whose trigger
        # updates the summary rows): the order of every transaction that touches a budget (``_end_rows``).
        spent: dict[str, Decimal] = {}
        try:
            with ctx.engine.begin() as conn:
                if not bound or (cap is None and budget is None):
                    return store.start_held_attempt(conn, job.claim, model, request.variant, request.sample,
                                                    request.n, bound or None)
                if not store.lock_held_job(conn, job.claim):
                    return None
                _reserve_one(conn, job, bound, spent)
                return store.start_held_attempt(conn, job.claim, model, request.variant, request.sample, request.n,
                                                bound)
        except _NotNow:
            pass
        # Requests in flight hold the rest: wait for some to settle, reading without locks, and try again once
        # the bound fits.
        while True:
            if not _fits_later(job, bound, spent):
                raise OverBudget
            if time.monotonic() + pause > deadline:
                raise BudgetBusy
            ctx.sleep(pause)
            pause = min(2 * pause, 0.25)
            with ctx.engine.connect() as conn:
                batch_used, day_used = store.budget_used(conn, job.claim.batch_id if cap is not None else None,
                                                         job.snap.task_type.name if budget is not None else None)
            if _fits_later(job, bound, {job.claim.batch_id: batch_used, "day:" + job.snap.task_type.name: day_used}):
                break


class _NotNow(Exception):
    """A budget cannot reserve a request's bound now."""


def _reserve_one(conn: Connection, job: _CallJob, bound: Decimal, spent: dict[str, Decimal]) -> None:
    """Reserve one request's ``bound`` in the job's batch budget, then its daily one (``_NotNow`` when either
    has no room: the caller's transaction rolls both back); ``spent`` gets what each had spent."""
    cap, budget = job.snap.max_cost_usd, job.snap.task_type.budget
    if cap is not None:
        granted, spent[job.claim.batch_id] = store.reserve_budget(conn, job.claim.batch_id, cap, [bound])
        if not granted:
            raise _NotNow
    if budget is not None:
        granted, spent["day:" + job.snap.task_type.name] = store.reserve_daily(
            conn, job.snap.task_type.name, budget.per_day_usd, [bound])
        if not granted:
            raise _NotNow


def _budget_keys(job: _CallJob, pending: _Pending) -> dict[str, Any]:  # Any: row values
    """What ``_end_rows`` needs of a row to settle its budgets (``store.end_attempts`` ignores them)."""
    return {"reserved_usd": pending.bound, "batch_id": job.claim.batch_id,
            "daily": job.snap.task_type.name if job.snap.task_type.budget is not None else None}


def _end_rows(conn: Connection, jobs: Sequence[_CallJob], rows: list[dict[str, Any]],  # Any: attempts rows
              fills: Sequence[Fill] = ()) -> None:
    """Record ended requests (``store.end_attempts``, storing ``fills`` in the request cache) and settle their
    budgets.

    Locks are taken in one order everywhere a transaction touches a budget: job rows, request cache rows, the
    batch row, the task type's daily buckets, then the summary rows the attempts triggers update (migration
    0004). So with a budget the jobs are locked first (no claim can mark their requests interrupted meanwhile,
    so ``late`` is exact), the cache is filled on its own, and the budgets are settled before the attempts
    are ended."""
    capped = {job.claim.batch_id for job in jobs if job.snap.max_cost_usd is not None}
    by_batch: dict[str, list[dict[str, Any]]] = {}  # Any: attempts rows
    by_day: dict[str, list[dict[str, Any]]] = {}  # Any: attempts rows
    for row in rows:
        if row.get("batch_id") in capped:
            by_batch.setdefault(row["batch_id"], []).append(row)
        if row.get("daily"):
            by_day.setdefault(row["daily"], []).append(row)
    if not by_batch and not by_day:
        store.end_attempts(conn, rows, fills)
        return
    late = store.lock_for_settling(conn, [job.claim.job_id for job in jobs], [r["id"] for r in rows])
    fill_keys(conn, fills)
    for batch, batch_rows in by_batch.items():
        settle_rows(conn, batch, batch_rows, late)
    for task_type, day_rows in by_day.items():
        store.settle_daily(conn, task_type, [settled(r, late) for r in day_rows])
    store.end_attempts(conn, rows)


def _finish(ctx: StageContext, jobs: list[_CallJob]) -> int:
    """Record every request's outcome and move each job (``_end``); returns how many moved."""
    writes = Writes()
    with ctx.engine.begin() as conn:
        cached = [(p.cache, job.snap, job.tier) for job in jobs for p in job.pending if p.cache is not None]
        release_all(conn, [c for c, _, _ in cached if c.answer is None])  # cache rows before the batch row
        _end_rows(conn, jobs, [row for job in jobs for s in job.sent for row in s.rows], fills_of(cached))
        for job in jobs:
            if (reason := _halted(job)) is not None:
                store.halt_batch(conn, job.claim.batch_id, reason)
        gave_up = [job for job in jobs
                   if job.gave_up() and not job.deferred_s() and not _crashed(job) and _halted(job) is None]
        answered = store.answers_many(conn, [job.claim.job_id for job in gave_up], jobs[0].claim.tier) \
            if gave_up else {}
        for job in jobs:
            if _halted(job) is None and any(s.over_budget for s in job.sent):
                writes.budget_exhausted(job.snap, job.claim, "its next request did not fit in what its budget "
                                        "(the batch's --max-cost or the task type's daily one) had left",
                                        earlier_answer(conn, job.snap, job.claim))
            else:
                _end(writes, job, answered.get(job.claim.job_id))
        moved, due = writes.write(conn)
    ctx.publisher.publish(due)
    return moved


def _crashed(job: _CallJob) -> bool:
    return any(s.crashed for s in job.sent)


def _halted(job: _CallJob) -> str | None:
    return next((s.halted for s in job.sent if s.halted), None)


def _end(writes: Writes, job: _CallJob, answered: store.Answers | None) -> None:
    """Where one job goes after its requests: back to Postgres (its batch halted on a configuration fault),
    sent again (a request crashed), deferred, the policy's verdict (every request gave up and no answer
    counts), or validation."""
    claim = job.claim
    if _halted(job) is not None:  # it waits in Postgres, unpublished, until the batch is resumed
        writes.move(claim, JobStatus.QUEUED, claim.tier, Stage.CALL, error=_halted(job))
    elif _crashed(job) or (any(s.again for s in job.sent) and not job.deferred_s()):
        writes.move(claim, JobStatus.QUEUED, claim.tier, Stage.CALL, then=(claim.job_id, claim.tier, Stage.CALL))
    elif job.deferred_s():
        writes.move(claim, JobStatus.QUEUED, claim.tier, Stage.CALL, delay_s=job.deferred_s(),
                    error=next(s.error_detail for s in job.sent if s.defer_s)[:1000])
    elif answered is not None and not answered.contents:
        first = job.gave_up()[0]
        writes.verdict(job.snap, claim, model_error(first.error_kind or "error", first.error_detail[:500],
                                                    samples=job.tier.samples))
    else:
        writes.move(claim, JobStatus.QUEUED, claim.tier, Stage.VALIDATE, then=(claim.job_id, claim.tier, Stage.VALIDATE))
