"""The HTTP requests a tier sends for one job, and the ``attempts`` rows they leave.

A tier's k samples go out as one ``n=k`` request per prompt (variant) where the model supports ``n``,
else as k one-sample requests: ``plan_requests``. ``send`` makes one request; ``answer_row`` and
``failed_row`` are what ``store.end_attempts`` writes for it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cascade import store
from cascade.config import ResolvedTier, TaskSnapshot, render
from cascade.errors import ProviderError
from cascade.providers import Completion, Message
from cascade.stages.context import StageContext

__all__ = ["MAX_STORED_CHARS", "Request", "answer_row", "failed_row", "plan_requests", "request_params", "send",
           "split", "stored_cap"]

#: Longest stored content of one sample. A longer answer is cut to ``min(this, max_chars + 1)`` chars
#: and always fails as ``too_long`` (the validator never allows more than this minus one).
MAX_STORED_CHARS = 1_000_000


@dataclass(frozen=True)
class Request:
    """One HTTP request of a tier: ``n`` samples from index ``sample`` on, for one prompt."""

    sample: int
    n: int
    variant: str | None
    messages: list[Message]
    #: index of the first sample within its variant (a ``model#variant`` recording is indexed by it)
    variant_sample: int = 0


def plan_requests(tier: ResolvedTier, row: dict[str, Any], answered: set[int], *,  # Any: a row
                  one_by_one: bool = False) -> list[Request]:
    """The requests a tier needs: one ``n=k`` request per prompt (variant) when the model supports
    ``n``, else (or with ``one_by_one``: the model was seen ignoring ``n``) one request per sample; samples
    already answered (before a crash) are skipped."""
    prompts: list[tuple[str | None, str, str, int]] = [
        (v.name, v.system or tier.system, v.prompt, v.samples) for v in tier.variants or []]
    if not prompts:
        prompts = [(None, tier.system, tier.prompt, tier.samples)]
    requests: list[Request] = []
    first = 0
    for variant, system, prompt, samples in prompts:
        messages: list[Message] = []
        if system:
            messages.append({"role": "system", "content": render(system, row)})
        messages.append({"role": "user", "content": render(prompt, row)})
        size = samples if tier.model.supports_n and not one_by_one else 1
        for start in range(first, first + samples, size):
            if not answered.issuperset(range(start, start + size)):
                requests.append(Request(start, size, variant, messages, start - first))
        first += samples
    return requests


def response_format(snap: TaskSnapshot) -> dict[str, Any] | None:  # Any: OpenAI's response_format
    task = snap.task_type
    if task.schema_ is not None:
        return {"type": "json_schema", "json_schema": {"name": task.name, "schema": task.schema_}}
    return {"type": "json_object"} if task.output == "json" else None


def request_params(snap: TaskSnapshot, tier: ResolvedTier, request: Request) -> dict[str, Any]:  # Any: params
    """Everything ``send`` asks the provider besides its endpoint and model id: the request cache's key is
    built from exactly these (``cascade.cache.request_key``), so no parameter that is sent escapes it."""
    return {"messages": request.messages, "n": request.n, "max_tokens": tier.max_tokens,
            "temperature": tier.temperature, "response_format": response_format(snap),
            "max_tokens_param": tier.model.max_tokens_param}


def send(ctx: StageContext, snap: TaskSnapshot, tier: ResolvedTier, request: Request) -> Completion:
    """Make one request (raises ``ProviderError``). The X-Cascade-* headers let the sim and recordings
    answer per model and sample; real providers ignore them."""
    headers = {"X-Cascade-Model": tier.model.name, "X-Cascade-Sample": str(request.sample)}
    if request.variant:
        headers["X-Cascade-Variant"] = request.variant
        headers["X-Cascade-Variant-Sample"] = str(request.variant_sample)
    provider = ctx.providers.get(tier.model)
    return provider.complete(**request_params(snap, tier, request), headers=headers)


def split(request: Request, samples: Sequence[int]) -> list[Request]:
    """One-sample requests for ``samples`` of ``request`` (a backend that ignores or refuses ``n``)."""
    return [Request(s, 1, request.variant, request.messages, request.variant_sample + s - request.sample)
            for s in samples]


def stored_cap(snap: TaskSnapshot) -> int:
    """How many characters of one sample are stored (one more than the task allows, so a cut one fails)."""
    return min(MAX_STORED_CHARS, snap.task_type.length.max_chars + 1)


def failed_row(attempt_id: int, exc: ProviderError, latency_ms: int) -> dict[str, Any]:  # Any: parameters
    """The row of a request that failed."""
    return {"id": attempt_id, "latency_ms": latency_ms, "input_tokens": 0, "output_tokens": 0,
            "cost_usd": Decimal(0), "error": exc.kind, "detail": store.pg_text(str(exc)[:500]), "response": None}


def answer_row(attempt_id: int, snap: TaskSnapshot, tier: ResolvedTier, request: Request,
               done: Completion) -> dict[str, Any]:  # Any: parameters
    """The answered request's row. Contents longer than the cap are cut (they fail as too_long); samples the
    model stopped at max_tokens are listed in ``truncated`` (they fail as too_long too); samples it refused or
    its provider filtered are listed in ``refusals`` with why (they never vote). Priced as the provider bills:
    cached prompt tokens at the model's cached price."""
    cap = stored_cap(snap)
    returned = done.contents[: request.n]
    blocked = {request.sample + c.index: c for c in done.choices[: request.n] if c.blocked}
    contents = [None if request.sample + i in blocked or c is None else store.pg_text(c[:cap])
                for i, c in enumerate(returned)]
    cut = [f"sample {request.sample + i}: {len(c)} chars, stored {cap}"
           for i, c in enumerate(returned) if c is not None and len(c) > cap]
    truncated = [request.sample + i for i, r in enumerate(done.finish_reasons[: request.n]) if r == "length"]
    refusals = {str(i): {"code": c.blocked, "detail": store.pg_text((c.refusal or "")[:500])}
                for i, c in blocked.items()}
    return {
        "id": attempt_id, "latency_ms": done.latency_ms, "input_tokens": done.input_tokens,
        "output_tokens": done.output_tokens,
        "cost_usd": tier.model.price.cost(done.input_tokens, done.output_tokens, done.cached_tokens),
        "error": None, "detail": "; ".join(cut)[:500] or None, "response": json.dumps(contents),
        "truncated": json.dumps(truncated) if truncated else None,
        "refusals": json.dumps(refusals) if refusals else None, "choices": done.choices_returned,
        "cached_tokens": done.cached_tokens, "reasoning_tokens": done.reasoning_tokens,
        "request_id": done.request_id, "served_model": done.served_model, "gateway_cost_usd": done.gateway_cost_usd,
    }
