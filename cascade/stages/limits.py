"""Rate-limit slots of a tier's requests (``cascade.ratelimit``), as the call stage and audits book them."""

from __future__ import annotations

from collections.abc import Sequence

from cascade.config import ResolvedTier
from cascade.providers import Completion
from cascade.ratelimit import UNLIMITED, Reservation, pause_s, upper_bound_tokens
from cascade.stages.context import StageContext
from cascade.stages.requests import Request

__all__ = ["limit_tokens", "reserve_slots", "settle_tokens"]


def reserve_slots(ctx: StageContext, tier: ResolvedTier, requests: Sequence[Request], *,
                  hold: str | None) -> Reservation:
    """Slots for ``requests`` under the model's ``rate_limit_rpm`` and their upper-bound tokens under its
    ``rate_limit_tpm`` (shared by every worker)."""
    model = tier.model
    limiter = ctx.limiter() if (model.rate_limit_rpm or model.rate_limit_tpm) and requests else None
    if limiter is None:
        return UNLIMITED
    tokens = sum(limit_tokens(tier, r) for r in requests) if model.rate_limit_tpm else 0
    return limiter.reserve(model.name, model.rate_limit_rpm, count=len(requests), max_wait_s=ctx.limit_wait_s,
                           hold=hold, tpm=model.rate_limit_tpm, tokens=tokens)


def limit_tokens(tier: ResolvedTier, request: Request) -> int:
    """What ``request`` reserves under ``rate_limit_tpm``: the most it can use."""
    if not tier.model.rate_limit_tpm:
        return 0
    return upper_bound_tokens(request.messages, n=request.n, max_tokens=tier.max_tokens)


def settle_tokens(ctx: StageContext, tier: ResolvedTier, reserved: int, done: Completion) -> None:
    """After an answer: count its real tokens instead of the ``reserved`` ones, and when its ``x-ratelimit-*``
    headers say a provider limit is nearly spent, hold every worker's next requests back until its reset."""
    model, pause = tier.model, pause_s(done.rate_limits)
    if not (model.rate_limit_tpm or (pause and model.rate_limit_rpm)):
        return  # nothing to count: RPM alone costs no round trip per answer
    limiter = ctx.limiter()
    if limiter is not None:
        limiter.settle(model.name, rpm=model.rate_limit_rpm, tpm=model.rate_limit_tpm, reserved=reserved,
                       used=done.input_tokens + done.output_tokens, pause_s=pause)
