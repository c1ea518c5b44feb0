"""The validate stage: vote on each job's samples, then accept, escalate or fail, in one transaction."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from cascade import store
from cascade.config import Length, ResolvedTier, TaskSnapshot
from cascade.stages.context import StageContext
from cascade.stages.ledger import Writes, claim_due
from cascade.stages.requests import stored_cap
from cascade.store import Stage
from cascade.validate import Verdict, vote

__all__ = ["judge", "judge_tier", "run_validate", "run_validates"]


def run_validate(ctx: StageContext, job_id: int, tier: int) -> bool:
    """Validate stage of one job (see ``run_validates``)."""
    return run_validates(ctx, [job_id], tier) == 1


def run_validates(ctx: StageContext, job_ids: Sequence[int], tier: int) -> int:
    """Validate stage: vote on each job's samples and move it as the policy decides, all in one
    transaction (a crash leaves every job where it was): the jobs are locked, not claimed, so each is written
    once. Returns how many jobs moved."""
    writes = Writes()
    with ctx.engine.begin() as conn:
        claimed = claim_due(ctx, conn, job_ids, tier, Stage.VALIDATE, lock_only=True)
        if not claimed:
            return 0
        answers = store.answers_many(conn, [claim.job_id for claim, _ in claimed], tier)
        for claim, snap in claimed:
            got = answers[claim.job_id]
            writes.verdict(snap, claim, judge(snap, tier, got.contents, got.truncated, got.refused), got.model)
        moved, due = writes.write(conn)
    ctx.publisher.publish(due)
    return moved


def judge(snap: TaskSnapshot, tier: int, answers: dict[int, str | None], truncated: Collection[int] = (),
          refused: Mapping[int, tuple[str, str]] | None = None) -> Verdict:
    """The validator's verdict on a tier's answers (sample index → content; ``truncated``: samples cut at
    max_tokens; ``refused``: samples refused or filtered, with why). What follows from it, ``on_exhausted``
    included, is the policy's (``Writes.verdict``)."""
    return judge_tier(snap, snap.tier(tier), answers, truncated, refused)


def judge_tier(snap: TaskSnapshot, resolved: ResolvedTier, answers: dict[int, str | None],
               truncated: Collection[int] = (), refused: Mapping[int, tuple[str, str]] | None = None) -> Verdict:
    """``judge`` with the settings of ``resolved`` (an audit's tier is none of the task type's)."""
    task = snap.task_type
    texts = [answers.get(i) for i in range(resolved.samples)]
    return vote(texts, samples=resolved.samples, min_agreement=resolved.min_agreement, output=task.output,
                schema=task.schema_, length=_length(snap), fields=task.self_consistency.fields, truncated=truncated,
                refused=refused)


def _length(snap: TaskSnapshot) -> Length:
    """The task's length limits, max_chars at most what is stored: a cut answer is never accepted."""
    length = snap.task_type.length
    cap = stored_cap(snap)
    return length if length.max_chars < cap else length.model_copy(update={"max_chars": cap - 1})
