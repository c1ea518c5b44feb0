"""Runs one stage of one job: claim, call or validate, record, decide, publish.

What a Celery task calls, and what tests can call without Celery. Postgres is the truth: a stage
claims the job with a conditional UPDATE, records its work and moves the job in one transaction,
and publishes only after that commit, so a lost or duplicated message never changes a result.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, text

from cascade import store, validate
from cascade.config import CascadeSettings, Length, ResolvedTier, TaskSnapshot, render
from cascade.errors import ConfigError, ProviderError, ProviderRateLimited
from cascade.policy import Action, RequestAction, after_request_error, after_verdict, is_retryable
from cascade.providers import Completion, Message, ProviderPool
from cascade.publish import Due, Publisher
from cascade.ratelimit import UNLIMITED, RateLimiter, RedisRateLimiter, Reservation
from cascade.store import Claim, JobStatus, Stage

__all__ = ["Group", "StageContext", "judge", "plan_groups", "run_call", "run_validate"]

log = logging.getLogger(__name__)

#: Longest stored content of one sample. A longer answer is cut to ``min(this, max_chars + 1)`` chars
#: and always fails as ``too_long`` (``judge`` never allows more than this minus one).
MAX_STORED_CHARS = 1_000_000

#: Failed requests of earlier claims of a tier (a deferred retry), per request group: retries and
#: backoff continue where they stopped instead of starting over after every deferral.
_FAILURES = text("""
SELECT sample, n, error = 'rate_limited' AS limited, count(*) FROM attempts
WHERE job_id = :id AND tier = :tier AND error IS NOT NULL AND error NOT IN ('in_flight', 'interrupted')
GROUP BY 1, 2, 3
""")


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


def _claim(ctx: StageContext, conn: Connection, job_id: int, tier: int,
           stage: Stage) -> tuple[Claim, TaskSnapshot] | None:
    """Claim the job for (tier, stage) with its batch's snapshot; None when a duplicate or late message."""
    held = store.claim(conn, job_id, tier, stage, ctx.settings.lease_s)
    if held is None:
        # Losing the race is normal (a redelivered or re-published message): not an error.
        log.debug("job %s tier %s %s: already moved on", job_id, tier, stage.value)
        return None
    return held, ctx.snapshot(held.batch_id, lambda: store.batch_config(conn, held.batch_id))


def run_call(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Call stage: send the tier's requests, record them, move the job to validation.

    Returns False when the message was stale (the job had moved on) or the claim was lost.
    """
    with ctx.engine.begin() as conn:
        claimed = _claim(ctx, conn, job_id, tier, Stage.CALL)
        if claimed is None:
            return False
        held, snap = claimed
        resolved = snap.tier(tier)
        unusable = _unusable_model(ctx, resolved)
        if unusable is not None:
            moved, due = _apply_verdict(conn, snap, held, unusable)
        else:
            groups = plan_groups(resolved, held.input, store.prepare_attempts(conn, held))
            slots = _reserve(ctx, resolved, len(groups), hold=f"{job_id}:{tier}")
            if not slots.granted:
                return _defer_for_slot(ctx, conn, held, resolved, slots)
            work = _plan_work(conn, held, resolved, groups, slots)
    if unusable is not None:
        if moved:
            ctx.publisher.publish(due)
        return moved
    outcomes = _run_groups(ctx, snap, resolved, held, work)
    return _finish_call(ctx, snap, held, outcomes)


def _unusable_model(ctx: StageContext, tier: ResolvedTier) -> validate.Verdict | None:
    """A model this worker cannot call (its API key variable is unset) is a model error the policy decides,
    not a job left running until its lease expires."""
    try:
        ctx.providers.get(tier.model)
    except ConfigError as exc:
        return validate.model_error("config", str(exc), samples=tier.samples)
    return None


def _plan_work(conn: Connection, held: Claim, tier: ResolvedTier, groups: list[Group],
               slots: Reservation) -> list[_Work]:
    """A group whose slot is now gets its attempt row in the claim's transaction; the others after waiting."""
    failures: dict[tuple[int, int, bool], int] = {
        (sample, n, limited): count for sample, n, limited, count in conn.execute(
            _FAILURES, {"id": held.job_id, "tier": held.tier})}
    work: list[_Work] = []
    for i, g in enumerate(groups):
        wait = slots.wait_s(i)
        attempt_id = None if wait > 0 else store.start_attempt(conn, held.job_id, held.tier, tier.model.name,
                                                                g.variant, g.sample, g.n)
        work.append(_Work(g, attempt_id, wait, failures.get((g.sample, g.n, True), 0),
                          failures.get((g.sample, g.n, False), 0)))
    return work


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


def _defer_for_slot(ctx: StageContext, conn: Connection, held: Claim, tier: ResolvedTier,
                    slots: Reservation) -> bool:
    """No slot soon: hand the job back to Postgres (not_before) so it frees the worker; it comes back a
    little before its held slot (the sweeper re-publishes it) and waits the rest inline."""
    delay = _slot_delay(ctx, slots)
    return store.move(conn, held, status=JobStatus.QUEUED, tier=held.tier, stage=Stage.CALL, delay_s=delay,
                      error=_limit_note(tier, slots))


def _run_groups(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, held: Claim,
                work: list[_Work]) -> list[_Outcome]:
    def one(item: _Work) -> _Outcome:
        return _run_group(ctx, snap, tier, held, item)

    if len(work) <= 1:
        return [one(item) for item in work]
    # Samples go out concurrently (gevent patches threads into greenlets in workers).
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        return list(pool.map(one, work))


def _request(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, group: Group) -> Completion:
    headers = {"X-Cascade-Model": tier.model.name, "X-Cascade-Sample": str(group.sample)}
    if group.variant:
        headers["X-Cascade-Variant"] = group.variant
        headers["X-Cascade-Variant-Sample"] = str(group.variant_sample)
    provider = ctx.providers.get(tier.model)
    return provider.complete(group.messages, n=group.n, max_tokens=tier.max_tokens,
                             temperature=tier.temperature, response_format=_response_format(snap), headers=headers)


def _start_attempt(ctx: StageContext, held: Claim, tier: ResolvedTier, group: Group) -> int:
    with ctx.engine.begin() as conn:
        return store.start_attempt(conn, held.job_id, held.tier, tier.model.name, group.variant, group.sample,
                                   group.n)


def _run_group(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, held: Claim, work: _Work) -> _Outcome:
    """Send one group's request, retrying as the policy says; every request has its attempts row first."""
    out = _Outcome()
    attempt_id = work.attempt_id
    if attempt_id is None:
        ctx.sleep(work.wait_s)
        attempt_id = _start_attempt(ctx, held, tier, work.group)
    while True:
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
    """The answered request's row. Contents longer than the cap are cut (they fail as too_long)."""
    cap = _stored_cap(snap)
    contents = [store.pg_text(c[:cap]) if c is not None else None for c in done.contents[: group.n]]
    cut = [f"sample {group.sample + i}: {len(c)} chars, stored {cap}"
           for i, c in enumerate(done.contents[: group.n]) if c is not None and len(c) > cap]
    return {
        "id": attempt_id, "latency_ms": done.latency_ms, "input_tokens": done.input_tokens,
        "output_tokens": done.output_tokens, "cost_usd": tier.model.price.cost(done.input_tokens, done.output_tokens),
        "error": None, "detail": "; ".join(cut)[:500] or None, "response": json.dumps(contents),
    }


def _finish_call(ctx: StageContext, snap: TaskSnapshot, held: Claim, outcomes: list[_Outcome]) -> bool:
    rows = [row for o in outcomes for row in o.rows]
    deferred = max((o.defer_s for o in outcomes), default=0.0)
    gave_up = [o for o in outcomes if o.error_kind and not o.defer_s]
    due: list[Due] = []
    with ctx.engine.begin() as conn:
        store.end_attempts(conn, rows)
        if deferred:
            moved = store.move(conn, held, status=JobStatus.QUEUED, tier=held.tier, stage=Stage.CALL,
                               delay_s=deferred, error=next(o.error_detail for o in outcomes if o.defer_s)[:1000])
        elif gave_up and not store.answers(conn, held.job_id, held.tier):
            verdict = validate.model_error(gave_up[0].error_kind or "error", gave_up[0].error_detail[:500],
                                           samples=snap.tier(held.tier).samples)
            moved, due = _apply_verdict(conn, snap, held, verdict)
        else:
            moved = store.move(conn, held, status=JobStatus.QUEUED, tier=held.tier, stage=Stage.VALIDATE)
            due = [(held.job_id, held.tier, Stage.VALIDATE)]
    if moved:
        ctx.publisher.publish(due)
    return moved


def run_validate(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Validate stage: vote on the tier's samples, then accept, escalate or fail — in one transaction."""
    with ctx.engine.begin() as conn:
        claimed = _claim(ctx, conn, job_id, tier, Stage.VALIDATE)
        if claimed is None:
            return False
        held, snap = claimed
        verdict = judge(snap, tier, store.answers(conn, job_id, tier))
        moved, due = _apply_verdict(conn, snap, held, verdict)
    if moved:
        ctx.publisher.publish(due)
    return moved


def judge(snap: TaskSnapshot, tier: int, answers: dict[int, str | None]) -> validate.Verdict:
    """The verdict on a tier's answers (sample index → content)."""
    task, resolved = snap.task_type, snap.tier(tier)
    texts = [answers.get(i) for i in range(resolved.samples)]
    return validate.vote(
        texts, samples=resolved.samples, min_agreement=resolved.min_agreement, output=task.output,
        schema=task.schema_, length=_length(snap), fields=task.self_consistency.fields,
        accept_any=task.on_exhausted == "accept_last" and tier == snap.tier_count,
    )


def _length(snap: TaskSnapshot) -> Length:
    """The task's length limits, max_chars at most what is stored: a cut answer is never accepted."""
    length = snap.task_type.length
    cap = _stored_cap(snap)
    return length if length.max_chars < cap else length.model_copy(update={"max_chars": cap - 1})


def _apply_verdict(conn: Any, snap: TaskSnapshot, held: Claim, verdict: validate.Verdict) -> tuple[bool, list[Due]]:
    """Record the verdict and move the job as the policy says (same transaction)."""
    store.record_validation(conn, {
        "job_id": held.job_id, "tier": held.tier, "model": snap.tier(held.tier).model.name,
        "passed": verdict.passed, "reasons": json.dumps(store.pg_json([r.to_json() for r in verdict.reasons])),
        "agreement": verdict.agreement, "votes": verdict.votes, "samples": verdict.samples,
    })
    step = after_verdict(verdict.passed, held.tier, snap.tier_count)
    if step.action is Action.ACCEPT:
        output = json.dumps(store.pg_json(verdict.result))
        moved = store.move(conn, held, status=JobStatus.SUCCEEDED, tier=held.tier, stage=Stage.VALIDATE,
                           output_json=output)
        return moved, []
    if step.action is Action.ESCALATE:
        moved = store.move(conn, held, status=JobStatus.QUEUED, tier=step.tier, stage=Stage.CALL)
        return moved, [(held.job_id, step.tier, Stage.CALL)]
    error = store.pg_text("; ".join(f"{r.code}: {r.detail}" if r.detail else r.code for r in verdict.reasons)[:1000])
    return store.move(conn, held, status=JobStatus.FAILED, tier=held.tier, stage=Stage.VALIDATE, error=error), []

