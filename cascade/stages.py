"""Runs one stage of the jobs of one message: claim, call or validate, record, decide, publish.

What a Celery task calls, and what tests can call without Celery. Postgres is the truth: a stage
claims its jobs with one conditional UPDATE, records their work and moves them in one transaction,
and publishes only after that commit, so a lost or duplicated message never changes a result. A message
carries up to ``jobs_per_message`` job ids: their requests go out concurrently and their rows are written
with one statement per kind, so Celery's and Postgres's per-message costs are shared by those jobs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine

from cascade import store, validate
from cascade.config import CascadeSettings, Length, ResolvedTier, TaskSnapshot, render
from cascade.errors import ConfigError, ProviderError, ProviderRateLimited
from cascade.policy import Action, RequestAction, after_request_error, after_verdict, is_retryable
from cascade.providers import Completion, Message, ProviderPool
from cascade.publish import Due, Publisher
from cascade.ratelimit import UNLIMITED, RateLimiter, RedisRateLimiter, Reservation
from cascade.store import Claim, JobStatus, Stage

__all__ = ["Group", "StageContext", "judge", "plan_groups", "run_call", "run_calls", "run_validate",
           "run_validates"]

log = logging.getLogger(__name__)

#: Longest stored content of one sample. A longer answer is cut to ``min(this, max_chars + 1)`` chars
#: and always fails as ``too_long`` (``judge`` never allows more than this minus one).
MAX_STORED_CHARS = 1_000_000

@dataclass
class StageContext:
    """What stages need from the outside world; built once per worker process.

    ``rate_limiter`` None means one on the broker's Redis (``settings.broker_url``), built on first use
    by a model with ``rate_limit_rpm``; without a broker URL no rate limit is applied.
    """

    engine: Engine
    publisher: Publisher
    providers: ProviderPool
    settings: CascadeSettings
    sleep: Callable[[float], None] = time.sleep
    rate_limiter: RateLimiter | None = None
    #: the heartbeating worker process that claims (``cascade.liveness``); None: claims rely on their lease
    worker_id: str | None = None
    _snapshots: OrderedDict[str, TaskSnapshot] = field(default_factory=OrderedDict)

    def snapshot(self, batch_id: str, load: Callable[[], dict[str, Any]]) -> TaskSnapshot:
        """The batch's task snapshot; immutable once submitted, so it is cached per process."""
        snap = self._snapshots.get(batch_id)
        if snap is None:
            snap = TaskSnapshot.model_validate(load())
            self._snapshots[batch_id] = snap
            if len(self._snapshots) > 256:
                self._snapshots.popitem(last=False)
        return snap

    def limiter(self) -> RateLimiter | None:
        """The process's rate limiter (see the class docstring); None when there is no broker to share."""
        if self.rate_limiter is None and self.settings.broker_url:
            self.rate_limiter = RedisRateLimiter.from_broker(self.settings.broker_url,
                                                             key_prefix=self.settings.key_prefix)
        return self.rate_limiter

    @property
    def limit_wait_s(self) -> float:
        """Longest inline wait for a rate-limit slot; a job also comes back this long before its held slot."""
        return max(0.5, self.settings.max_inline_wait_s)


@dataclass(frozen=True)
class Group:
    """One HTTP request of a tier: ``n`` samples starting at ``sample``."""

    sample: int
    n: int
    variant: str | None
    messages: list[Message]
    #: index of the first sample within its variant (a ``model#variant`` recording is indexed by it)
    variant_sample: int = 0


def plan_groups(tier: ResolvedTier, row: dict[str, Any], answered: set[int]) -> list[Group]:  # Any: a row
    """The requests a tier needs: one ``n=k`` request per prompt (variant) when the model supports
    ``n``, else one request per sample; samples already answered (before a crash) are skipped."""
    prompts: list[tuple[str | None, str, str, int]] = [
        (v.name, v.system or tier.system, v.prompt, v.samples) for v in tier.variants or []]
    if not prompts:
        prompts = [(None, tier.system, tier.prompt, tier.samples)]
    groups: list[Group] = []
    first = 0
    for variant, system, prompt, samples in prompts:
        messages: list[Message] = []
        if system:
            messages.append({"role": "system", "content": render(system, row)})
        messages.append({"role": "user", "content": render(prompt, row)})
        size = samples if tier.model.supports_n else 1
        for start in range(first, first + samples, size):
            if not answered.issuperset(range(start, start + size)):
                groups.append(Group(start, size, variant, messages, start - first))
        first += samples
    return groups


def _response_format(snap: TaskSnapshot) -> dict[str, Any] | None:  # Any: OpenAI's response_format
    task = snap.task_type
    if task.schema_ is not None:
        return {"type": "json_schema", "json_schema": {"name": task.name, "schema": task.schema_}}
    return {"type": "json_object"} if task.output == "json" else None


@dataclass
class _Work:
    """One group to run: its first attempt row (None: inserted after waiting for its rate-limit slot)."""

    group: Group
    attempt_id: int | None
    wait_s: float = 0.0
    limited: int = 0  # 429s of earlier claims
    failed: int = 0  # other failures of earlier claims


@dataclass
class _Outcome:
    """What happened to one group after its retries."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # Any: attempts UPDATE parameters
    answered: bool = False
    defer_s: float = 0.0
    error_kind: str | None = None
    error_detail: str = ""


@dataclass
class _Closing:
    """What ends the claims of one message, written in one transaction: verdicts, then moves."""

    validations: list[dict[str, Any]] = field(default_factory=list)  # Any: validations INSERT parameters
    moves: list[store.Move] = field(default_factory=list)
    next_steps: dict[int, Due] = field(default_factory=dict)

    def move(self, held: Claim, status: JobStatus, tier: int, stage: Stage, *, output_json: str | None = None,
             error: str | None = None, delay_s: float = 0.0, then: Due | None = None) -> None:
        self.moves.append(store.Move(held, status, tier, stage, output_json, error, delay_s))
        if then is not None:
            self.next_steps[held.job_id] = then

    def commit(self, conn: Connection) -> tuple[int, list[Due]]:
        """Write everything; the jobs that moved and the messages due for them (only those that moved). A
        verdict is recorded only for a job that moved: a claim that was taken over leaves no trace."""
        moved = store.move_many(conn, self.moves)
        store.record_validations(conn, [v for v in self.validations if v["job_id"] in moved])
        return len(moved), [due for job_id, due in self.next_steps.items() if job_id in moved]


def _claim(ctx: StageContext, conn: Connection, job_ids: Sequence[int], tier: int,
           stage: Stage) -> list[tuple[Claim, TaskSnapshot]]:
    """Claim the jobs due at (tier, stage), each with its batch's snapshot; the others already moved on."""
    claims = store.claim(conn, job_ids, tier, stage, ctx.settings.lease_s, ctx.worker_id)
    if len(claims) < len(job_ids):
        # Losing the race is normal (a redelivered or re-published message): not an error.
        log.debug("tier %s %s: %d of %d jobs already moved on", tier, stage.value, len(job_ids) - len(claims),
                  len(job_ids))
    return [(held, ctx.snapshot(held.batch_id, partial(store.batch_config, conn, held.batch_id))) for held in claims]


@dataclass
class _Job:
    """One claimed job of a call message and the requests it sends."""

    held: Claim
    snap: TaskSnapshot
    tier: ResolvedTier
    work: list[_Work] = field(default_factory=list)
    outcomes: list[_Outcome] = field(default_factory=list)


def run_call(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Call stage of one job (see ``run_calls``): False when the message was stale or the claim was lost."""
    return run_calls(ctx, [job_id], tier) == 1


def run_calls(ctx: StageContext, job_ids: Sequence[int], tier: int) -> int:
    """Call stage: send each job's requests for the tier (all jobs' at once), record them, move the jobs to
    validation. Returns how many jobs moved (stale ids and lost claims do not)."""
    closing = _Closing()
    jobs: list[_Job] = []
    with ctx.engine.begin() as conn:
        claimed = _claim(ctx, conn, job_ids, tier, Stage.CALL)
        if not claimed:
            return 0
        history = store.prepare_attempts(conn, [held for held, _ in claimed], tier)
        for held, snap in claimed:
            resolved = snap.tier(tier)
            unusable = _unusable_model(ctx, resolved)
            if unusable is not None:
                _apply_verdict(closing, snap, held, unusable)
                continue
            past = history[held.job_id]
            groups = plan_groups(resolved, held.input, set(past.answered))
            slots = _reserve(ctx, resolved, len(groups), hold=f"{held.job_id}:{tier}")
            if not slots.granted:
                _defer_for_slot(ctx, closing, held, resolved, slots)
                continue
            job = _Job(held, snap, resolved)
            job.work = [_Work(g, None, slots.wait_s(i), past.failures.get((g.sample, g.n, True), 0),
                              past.failures.get((g.sample, g.n, False), 0)) for i, g in enumerate(groups)]
            jobs.append(job)
        # A request whose slot is now gets its attempts row in the claim's transaction; the others after waiting.
        now = [(job, w) for job in jobs for w in job.work if w.wait_s <= 0]
        ids = store.start_attempts(conn, [store.NewAttempt(job.held.job_id, tier, job.tier.model.name,
                                                           w.group.variant, w.group.sample, w.group.n)
                                          for job, w in now])
        for (_, w), attempt_id in zip(now, ids, strict=True):
            w.attempt_id = attempt_id
        moved_early, due = closing.commit(conn)
    ctx.publisher.publish(due)
    _run_jobs(ctx, jobs)
    return moved_early + _finish_calls(ctx, jobs)


def _unusable_model(ctx: StageContext, tier: ResolvedTier) -> validate.Verdict | None:
    """A model this worker cannot call (its API key variable is unset) is a model error the policy decides,
    not a job left running until its lease expires."""
    try:
        ctx.providers.get(tier.model)
    except ConfigError as exc:
        return validate.model_error("config", str(exc), samples=tier.samples)
    return None


def _reserve(ctx: StageContext, tier: ResolvedTier, count: int, *, hold: str | None) -> Reservation:
    """Slots for ``count`` requests under the model's ``rate_limit_rpm`` (shared by every worker)."""
    rpm = tier.model.rate_limit_rpm
    limiter = ctx.limiter() if rpm and count else None
    if limiter is None or rpm is None:
        return UNLIMITED
    return limiter.reserve(tier.model.name, rpm, count=count, max_wait_s=ctx.limit_wait_s, hold=hold)


def _limit_note(tier: ResolvedTier, slots: Reservation) -> str:
    return (f"waiting for model {tier.model.name!r} (rate_limit_rpm {tier.model.rate_limit_rpm}): "
            f"next slot in {slots.first_s:.1f} s")


def _slot_delay(ctx: StageContext, slots: Reservation) -> float:
    """How long a job waits in Postgres for a slot: until the slot is 0.8 × the inline bound away, so the
    sweeper's cadence and the clocks of Postgres and Redis may be a little late without missing it."""
    return max(0.05, slots.first_s - 0.8 * ctx.limit_wait_s)


def _defer_for_slot(ctx: StageContext, closing: _Closing, held: Claim, tier: ResolvedTier,
                    slots: Reservation) -> None:
    """No slot soon: hand the job back to Postgres (not_before) so it frees the worker; it comes back a
    little before its held slot (the sweeper re-publishes it) and waits the rest inline."""
    closing.move(held, JobStatus.QUEUED, held.tier, Stage.CALL, delay_s=_slot_delay(ctx, slots),
                 error=_limit_note(tier, slots))


_REQUESTS: ThreadPoolExecutor | None = None


def _requests() -> ThreadPoolExecutor:
    """The process's request threads (greenlets under gevent), reused from message to message: starting a
    thread per request cost more than the request's own bookkeeping. Built on first use, after a gevent
    worker patched threading; idle threads cost nothing but their stack."""
    global _REQUESTS
    if _REQUESTS is None:
        _REQUESTS = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="cascade-request")
    return _REQUESTS


def _run_jobs(ctx: StageContext, jobs: list[_Job]) -> None:
    """Send every request of every job at once (gevent patches threads into greenlets in workers)."""
    work = [(job, w) for job in jobs for w in job.work]

    def one(item: tuple[_Job, _Work]) -> _Outcome:
        job, w = item
        return _run_group(ctx, job.snap, job.tier, job.held, w)

    outcomes = [one(item) for item in work] if len(work) <= 1 else list(_requests().map(one, work))
    for (job, _), outcome in zip(work, outcomes, strict=True):
        job.outcomes.append(outcome)


def _request(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, group: Group) -> Completion:
    headers = {"X-Cascade-Model": tier.model.name, "X-Cascade-Sample": str(group.sample)}
    if group.variant:
        headers["X-Cascade-Variant"] = group.variant
        headers["X-Cascade-Variant-Sample"] = str(group.variant_sample)
    provider = ctx.providers.get(tier.model)
    return provider.complete(group.messages, n=group.n, max_tokens=tier.max_tokens,
                             temperature=tier.temperature, response_format=_response_format(snap), headers=headers)


def _start_attempt(ctx: StageContext, held: Claim, tier: ResolvedTier, group: Group) -> int | None:
    """The row of a request about to go out; None when the claim was taken over meanwhile (no request)."""
    with ctx.engine.begin() as conn:
        return store.start_held_attempt(conn, held, tier.model.name, group.variant, group.sample, group.n)


def _run_group(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, held: Claim, work: _Work) -> _Outcome:
    """Send one group's request, retrying as the policy says; every request has its attempts row first."""
    out = _Outcome()
    attempt_id = work.attempt_id
    if attempt_id is None:
        ctx.sleep(work.wait_s)
        attempt_id = _start_attempt(ctx, held, tier, work.group)
    while attempt_id is not None:
        started = time.monotonic()
        try:
            done = _request(ctx, snap, tier, work.group)
        except ProviderError as exc:
            out.rows.append(_failed_row(attempt_id, exc, int((time.monotonic() - started) * 1000)))
            if not _retry(ctx, tier, work, exc, out):
                return out
            attempt_id = _start_attempt(ctx, held, tier, work.group)
            continue
        out.rows.append(_answer_row(attempt_id, snap, tier, work.group, done))
        out.answered = True
        return out
    out.error_kind, out.error_detail = "taken_over", "the job was handed to another worker"
    return out


def _retry(ctx: StageContext, tier: ResolvedTier, work: _Work, exc: ProviderError, out: _Outcome) -> bool:
    """After a failed request: True when it is to be sent again now (after the backoff and a rate-limit
    slot); False when the group gave up or the job is to be deferred (``out`` says which)."""
    limited = exc.kind == "rate_limited"
    if limited:
        work.limited += 1
    else:
        work.failed += 1
    step = after_request_error(
        exc.kind, retryable=is_retryable(exc.kind, exc.status),
        attempt=work.limited if limited else work.failed, max_retries=tier.model.max_retries,
        retry_after_s=exc.retry_after if isinstance(exc, ProviderRateLimited) else None,
        max_inline_wait_s=ctx.settings.max_inline_wait_s)
    out.error_kind, out.error_detail = exc.kind, store.pg_text(str(exc))
    if step.action is RequestAction.GIVE_UP:
        return False
    if step.action is RequestAction.DEFER:
        out.defer_s = step.delay_s
        return False
    _commit_rows(ctx, out)  # a failed request is recorded before its retry goes out
    ctx.sleep(step.delay_s)
    slot = _reserve(ctx, tier, 1, hold=None)
    if not slot.granted:
        out.defer_s = _slot_delay(ctx, slot)
        out.error_detail = _limit_note(tier, slot)
        return False
    ctx.sleep(slot.wait_s(0))
    out.error_kind, out.error_detail = None, ""
    return True


def _commit_rows(ctx: StageContext, out: _Outcome) -> None:
    with ctx.engine.begin() as conn:
        store.end_attempts(conn, out.rows)
    out.rows.clear()


def _failed_row(attempt_id: int, exc: ProviderError, latency_ms: int) -> dict[str, Any]:  # Any: parameters
    return {"id": attempt_id, "latency_ms": latency_ms, "input_tokens": 0, "output_tokens": 0,
            "cost_usd": Decimal(0), "error": exc.kind, "detail": store.pg_text(str(exc)[:500]), "response": None}


def _stored_cap(snap: TaskSnapshot) -> int:
    return min(MAX_STORED_CHARS, snap.task_type.length.max_chars + 1)


def _answer_row(attempt_id: int, snap: TaskSnapshot, tier: ResolvedTier, group: Group,
                done: Completion) -> dict[str, Any]:  # Any: parameters
    """The answered request's row. Contents longer than the cap are cut (they fail as too_long); samples the
    model stopped at max_tokens are listed in ``truncated`` (they fail as too_long too)."""
    cap = _stored_cap(snap)
    contents = [store.pg_text(c[:cap]) if c is not None else None for c in done.contents[: group.n]]
    cut = [f"sample {group.sample + i}: {len(c)} chars, stored {cap}"
           for i, c in enumerate(done.contents[: group.n]) if c is not None and len(c) > cap]
    truncated = [group.sample + i for i, r in enumerate(done.finish_reasons[: group.n]) if r == "length"]
    return {
        "id": attempt_id, "latency_ms": done.latency_ms, "input_tokens": done.input_tokens,
        "output_tokens": done.output_tokens, "cost_usd": tier.model.price.cost(done.input_tokens, done.output_tokens),
        "error": None, "detail": "; ".join(cut)[:500] or None, "response": json.dumps(contents),
        "truncated": json.dumps(truncated) if truncated else None,
    }


def _finish_calls(ctx: StageContext, jobs: list[_Job]) -> int:
    """Record every request's outcome and move each job: to validation, back to Postgres (deferred), or to
    the policy's verdict when its requests gave up and no answer counts."""
    if not jobs:
        return 0
    closing = _Closing()
    with ctx.engine.begin() as conn:
        store.end_attempts(conn, [row for job in jobs for o in job.outcomes for row in o.rows])
        gave_up = [job for job in jobs if _gave_up(job) and not max((o.defer_s for o in job.outcomes), default=0)]
        answered = store.answers_many(conn, [job.held.job_id for job in gave_up], jobs[0].held.tier) \
            if gave_up else {}
        for job in jobs:
            held, deferred = job.held, max((o.defer_s for o in job.outcomes), default=0.0)
            if deferred:
                closing.move(held, JobStatus.QUEUED, held.tier, Stage.CALL, delay_s=deferred,
                             error=next(o.error_detail for o in job.outcomes if o.defer_s)[:1000])
            elif job in gave_up and not answered[held.job_id].contents:
                first = _gave_up(job)[0]
                verdict = validate.model_error(first.error_kind or "error", first.error_detail[:500],
                                               samples=job.tier.samples)
                _apply_verdict(closing, job.snap, held, verdict)
            else:
                closing.move(held, JobStatus.QUEUED, held.tier, Stage.VALIDATE,
                             then=(held.job_id, held.tier, Stage.VALIDATE))
        moved, due = closing.commit(conn)
    ctx.publisher.publish(due)
    return moved


def _gave_up(job: _Job) -> list[_Outcome]:
    return [o for o in job.outcomes if o.error_kind and not o.defer_s]


def run_validate(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Validate stage of one job (see ``run_validates``)."""
    return run_validates(ctx, [job_id], tier) == 1


def run_validates(ctx: StageContext, job_ids: Sequence[int], tier: int) -> int:
    """Validate stage: vote on each job's samples, then accept, escalate or fail — in one transaction.
    Returns how many jobs moved."""
    closing = _Closing()
    with ctx.engine.begin() as conn:
        claimed = _claim(ctx, conn, job_ids, tier, Stage.VALIDATE)
        if not claimed:
            return 0
        answers = store.answers_many(conn, [held.job_id for held, _ in claimed], tier)
        for held, snap in claimed:
            got = answers[held.job_id]
            _apply_verdict(closing, snap, held, judge(snap, tier, got.contents, got.truncated))
        moved, due = closing.commit(conn)
    ctx.publisher.publish(due)
    return moved


def judge(snap: TaskSnapshot, tier: int, answers: dict[int, str | None],
          truncated: Collection[int] = ()) -> validate.Verdict:
    """The verdict on a tier's answers (sample index → content; ``truncated``: samples cut at max_tokens)."""
    task, resolved = snap.task_type, snap.tier(tier)
    texts = [answers.get(i) for i in range(resolved.samples)]
    return validate.vote(
        texts, samples=resolved.samples, min_agreement=resolved.min_agreement, output=task.output,
        schema=task.schema_, length=_length(snap), fields=task.self_consistency.fields,
        accept_any=task.on_exhausted == "accept_last" and tier == snap.tier_count, truncated=truncated,
    )


def _length(snap: TaskSnapshot) -> Length:
    """The task's length limits, max_chars at most what is stored: a cut answer is never accepted."""
    length = snap.task_type.length
    cap = _stored_cap(snap)
    return length if length.max_chars < cap else length.model_copy(update={"max_chars": cap - 1})


def _apply_verdict(closing: _Closing, snap: TaskSnapshot, held: Claim, verdict: validate.Verdict) -> None:
    """Record the verdict and move the job as the policy says (written by ``closing`` in one transaction)."""
    closing.validations.append({
        "job_id": held.job_id, "tier": held.tier, "model": snap.tier(held.tier).model.name,
        "passed": verdict.passed, "reasons": json.dumps(store.pg_json([r.to_json() for r in verdict.reasons])),
        "agreement": verdict.agreement, "votes": verdict.votes, "samples": verdict.samples,
    })
    step = after_verdict(verdict.passed, held.tier, snap.tier_count)
    if step.action is Action.ACCEPT:
        closing.move(held, JobStatus.SUCCEEDED, held.tier, Stage.VALIDATE,
                     output_json=json.dumps(store.pg_json(verdict.result)))
    elif step.action is Action.ESCALATE:
        closing.move(held, JobStatus.QUEUED, step.tier, Stage.CALL, then=(held.job_id, step.tier, Stage.CALL))
    else:
        error = "; ".join(f"{r.code}: {r.detail}" if r.detail else r.code for r in verdict.reasons)[:1000]
        closing.move(held, JobStatus.FAILED, held.tier, Stage.VALIDATE, error=store.pg_text(error))
