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

from sqlalchemy import Engine

from cascade import store, validate
from cascade.config import CascadeSettings, ResolvedTier, TaskSnapshot, render
from cascade.errors import ProviderError, ProviderRateLimited
from cascade.policy import Action, RequestAction, after_request_error, after_verdict
from cascade.providers import Completion, Message, ProviderPool
from cascade.publish import Due, Publisher
from cascade.store import Claim, JobStatus, Stage

__all__ = ["Group", "StageContext", "judge", "plan_groups", "run_call", "run_validate"]

log = logging.getLogger(__name__)

#: Longest stored content of one sample; anything longer is cut (and fails a sane max_chars).
MAX_STORED_CHARS = 1_000_000


@dataclass
class StageContext:
    """What stages need from the outside world; built once per worker process."""

    engine: Engine
    publisher: Publisher
    providers: ProviderPool
    settings: CascadeSettings
    sleep: Callable[[float], None] = time.sleep
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


@dataclass(frozen=True)
class Group:
    """One HTTP request of a tier: ``n`` samples starting at ``sample``."""

    sample: int
    n: int
    variant: str | None
    messages: list[Message]


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
                groups.append(Group(start, size, variant, messages))
        first += samples
    return groups


def _response_format(snap: TaskSnapshot) -> dict[str, Any] | None:  # Any: OpenAI's response_format
    task = snap.task_type
    if task.schema_ is not None:
        return {"type": "json_schema", "json_schema": {"name": task.name, "schema": task.schema_}}
    return {"type": "json_object"} if task.output == "json" else None


@dataclass
class _Outcome:
    """What happened to one group after its retries."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # Any: attempts UPDATE parameters
    answered: bool = False
    defer_s: float = 0.0
    error_kind: str | None = None
    error_detail: str = ""


def run_call(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Call stage: send the tier's requests, record them, move the job to validation.

    Returns False when the message was stale (the job had moved on) or the claim was lost.
    """
    with ctx.engine.begin() as conn:
        held = store.claim(conn, job_id, tier, Stage.CALL, ctx.settings.lease_s)
        if held is None:
            log.debug("job %s tier %s call: already moved on", job_id, tier)
            return False
        snap = ctx.snapshot(held.batch_id, lambda: store.batch_config(conn, held.batch_id))
        resolved = snap.tier(tier)
        groups = plan_groups(resolved, held.input, store.prepare_attempts(conn, held))
        ids = [store.start_attempt(conn, job_id, tier, resolved.model.name, g.variant, g.sample, g.n) for g in groups]
    outcomes = _run_groups(ctx, snap, resolved, held, list(zip(groups, ids, strict=True)))
    return _finish_call(ctx, snap, held, outcomes)


def _run_groups(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, held: Claim,
                work: list[tuple[Group, int]]) -> list[_Outcome]:
    def one(item: tuple[Group, int]) -> _Outcome:
        return _run_group(ctx, snap, tier, held, *item)

    if len(work) <= 1:
        return [one(item) for item in work]
    # Samples go out concurrently (gevent patches threads into greenlets in workers).
    with ThreadPoolExecutor(max_workers=len(work)) as pool:
        return list(pool.map(one, work))


def _request(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, group: Group) -> Completion:
    headers = {"X-Cascade-Model": tier.model.name, "X-Cascade-Sample": str(group.sample)}
    if group.variant:
        headers["X-Cascade-Variant"] = group.variant
    provider = ctx.providers.get(tier.model)
    return provider.complete(group.messages, n=group.n, max_tokens=tier.max_tokens,
                             temperature=tier.temperature, response_format=_response_format(snap), headers=headers)


def _run_group(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, held: Claim,
               group: Group, attempt_id: int) -> _Outcome:
    out = _Outcome()
    attempt = 1
    while True:
        started = time.monotonic()
        try:
            done = _request(ctx, snap, tier, group)
        except ProviderError as exc:
            latency = int((time.monotonic() - started) * 1000)
            step = after_request_error(
                exc.kind, retryable=exc.kind != "bad_response" or exc.status == 200, attempt=attempt,
                max_retries=tier.model.max_retries,
                retry_after_s=exc.retry_after if isinstance(exc, ProviderRateLimited) else None,
                max_inline_wait_s=ctx.settings.max_inline_wait_s)
            out.rows.append(_failed_row(attempt_id, exc, latency))
            if step.action is not RequestAction.RETRY:
                out.defer_s = step.delay_s if step.action is RequestAction.DEFER else 0.0
                out.error_kind, out.error_detail = exc.kind, str(exc)
                return out
            _commit_rows(ctx, out)
            ctx.sleep(step.delay_s)
            attempt += 1
            with ctx.engine.begin() as conn:
                attempt_id = store.start_attempt(conn, held.job_id, held.tier, tier.model.name, group.variant,
                                                 group.sample, group.n)
            continue
        out.rows.append(_answer_row(attempt_id, tier, group, done))
        out.answered = True
        return out


def _commit_rows(ctx: StageContext, out: _Outcome) -> None:
    """A failed request is recorded before its retry goes out."""
    with ctx.engine.begin() as conn:
        store.end_attempts(conn, out.rows)
    out.rows.clear()


def _failed_row(attempt_id: int, exc: ProviderError, latency_ms: int) -> dict[str, Any]:  # Any: parameters
    return {"id": attempt_id, "latency_ms": latency_ms, "input_tokens": 0, "output_tokens": 0,
            "cost_usd": Decimal(0), "error": exc.kind, "detail": str(exc)[:500], "response": None}


def _answer_row(attempt_id: int, tier: ResolvedTier, group: Group, done: Completion) -> dict[str, Any]:  # Any
    contents = [c[:MAX_STORED_CHARS] if c is not None else None for c in done.contents[: group.n]]
    return {
        "id": attempt_id, "latency_ms": done.latency_ms, "input_tokens": done.input_tokens,
        "output_tokens": done.output_tokens, "cost_usd": tier.model.price.cost(done.input_tokens, done.output_tokens),
        "error": None, "detail": None, "response": json.dumps(contents),
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
                               delay_s=deferred, error=next(o.error_detail for o in outcomes if o.defer_s))
        elif gave_up and not store.answers(conn, held.job_id, held.tier):
            verdict = validate.model_error(gave_up[0].error_kind or "error", gave_up[0].error_detail[:500])
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
        held = store.claim(conn, job_id, tier, Stage.VALIDATE, ctx.settings.lease_s)
        if held is None:
            log.debug("job %s tier %s validate: already moved on", job_id, tier)
            return False
        snap = ctx.snapshot(held.batch_id, lambda: store.batch_config(conn, held.batch_id))
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
        schema=task.schema_, length=task.length, fields=task.self_consistency.fields,
        accept_any=task.on_exhausted == "accept_last" and tier == snap.tier_count,
    )


def _apply_verdict(conn: Any, snap: TaskSnapshot, held: Claim, verdict: validate.Verdict) -> tuple[bool, list[Due]]:
    """Record the verdict and move the job as the policy says (same transaction)."""
    store.record_validation(conn, {
        "job_id": held.job_id, "tier": held.tier, "model": snap.tier(held.tier).model.name,
        "passed": verdict.passed, "reasons": json.dumps([r.to_json() for r in verdict.reasons]),
        "agreement": verdict.agreement, "votes": verdict.votes, "samples": verdict.samples,
    })
    step = after_verdict(verdict.passed, held.tier, snap.tier_count)
    if step.action is Action.ACCEPT:
        output = json.dumps(verdict.result)
        moved = store.move(conn, held, status=JobStatus.SUCCEEDED, tier=held.tier, stage=Stage.VALIDATE,
                           output_json=output)
        return moved, []
    if step.action is Action.ESCALATE:
        moved = store.move(conn, held, status=JobStatus.QUEUED, tier=step.tier, stage=Stage.CALL)
        return moved, [(held.job_id, step.tier, Stage.CALL)]
    error = "; ".join(f"{r.code}: {r.detail}" if r.detail else r.code for r in verdict.reasons)[:1000]
    return store.move(conn, held, status=JobStatus.FAILED, tier=held.tier, stage=Stage.VALIDATE, error=error), []

