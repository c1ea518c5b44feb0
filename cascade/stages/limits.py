"""Rate-limit slots of a tier's requests (``cascade.ratelimit``), as the call stage and audits book them."""

from __future__ import annotations

from collections.abc import Sequence

from cascade.config import ResolvedTier
from cascade.ratelimit import UNLIMITED, Reservation, upper_bound_tokens
from cascade.stages.context import StageContext
from cascade.stages.requests import Request

__all__ = ["limit_tokens", "reserve_slots"]


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
