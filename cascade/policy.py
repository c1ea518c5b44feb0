"""What happens next: after a verdict, and after a failed model request. Pure: no clock, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Action",
    "NextStep",
    "RequestAction",
    "RequestStep",
    "after_request_error",
    "after_verdict",
    "backoff",
    "fails_over",
    "is_fault",
    "is_retryable",
]


class Action(enum.StrEnum):
    #: the tier's answer is the job's result
    ACCEPT = "accept"
    #: re-enqueue the job on the next tier's call stage
    ESCALATE = "escalate"
    #: no tier is left (or the policy gave up): the job failed
    FAIL = "fail"


@dataclass(frozen=True)
class NextStep:
    """The job's next move after a tier's verdict."""

    action: Action
    tier: int  # the tier the job is at after the move


def after_verdict(passed: bool, tier: int, tier_count: int, *, on_exhausted: str = "fail",
                  has_answer: bool = False) -> NextStep:
    """A passing tier is accepted; a failing one escalates, or ends the job at the last tier.

    At the last tier, ``on_exhausted: accept_last`` accepts the tier's majority answer whatever its share,
    if some sample was valid (``has_answer``); otherwise, and with ``on_exhausted: fail``, the job fails.
    """
    if passed:
        return NextStep(Action.ACCEPT, tier)
    if tier < tier_count:
        return NextStep(Action.ESCALATE, tier + 1)
    if on_exhausted == "accept_last" and has_answer:
        return NextStep(Action.ACCEPT, tier)
    return NextStep(Action.FAIL, tier)


class RequestAction(enum.StrEnum):
    #: send the request again after ``delay_s`` (short: the worker sleeps)
    RETRY = "retry"
    #: hand the job back to Postgres with ``not_before = now + delay_s``; the sweeper re-publishes it
    DEFER = "defer"
    #: stop trying: the request's samples count as missing (``model_error:<kind>``)
    GIVE_UP = "give_up"
    #: the request can never succeed as configured (bad key, unknown model): stop the whole batch, escalate
    #: nothing, until it is fixed and resumed
    HALT = "halt"
    #: the model answered fewer choices than ``n`` (or refused ``n``): ask for the missing samples one by one
    SPLIT = "split"


@dataclass(frozen=True)
class RequestStep:
    action: RequestAction
    delay_s: float = 0.0


#: 429s are retried up to this many times ``max_retries`` (at least 1) before the request gives up: a 429 means
#: "later", so it gets far more patience than other errors, but a provider that answers only 429s must not hold
#: a job forever.
RATE_LIMIT_PATIENCE = 10

RETRYABLE = frozenset({"timeout", "unavailable", "connection", "rate_limited", "bad_response"})


def is_retryable(kind: str, status: int | None) -> bool:
    """Whether a failed request is worth sending again: not a 4xx (our request is wrong; 429 aside),
    but a broken 200 body (empty, not JSON, cut off) may be a passing fault."""
    if kind == "bad_response":
        return status == 200
    return kind in RETRYABLE


#: Provider faults: the model or its provider is broken right now (not our request, not a rate limit).
FAULTS = frozenset({"timeout", "unavailable", "connection", "bad_response"})


def is_fault(kind: str, status: int | None) -> bool:
    """Whether a failed request counts against its model's health (``cascade.health``): a 5xx, a timeout, a
    lost connection or a broken 200 body; never a 429 (it means "later") nor a 4xx (our request is wrong)."""
    return kind in FAULTS and is_retryable(kind, status)


def fails_over(kind: str, status: int | None, step: RequestStep) -> bool:
    """Whether a failed request goes to its tier's next model: a provider fault at once; a 429 once its
    patience is spent or its wait would hand the job back to Postgres."""
    if kind == "rate_limited":
        return step.action in (RequestAction.DEFER, RequestAction.GIVE_UP)
    return is_fault(kind, status)


def backoff(attempt: int, *, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Exponential backoff for the ``attempt``-th retry (1-based): base × 2^(attempt-1), capped."""
    return float(min(cap_s, base_s * 2.0 ** min(64, max(0, attempt - 1))))


def after_request_error(
    kind: str,
    *,
    retryable: bool,
    attempt: int,
    max_retries: int,
    retry_after_s: float | None,
    max_inline_wait_s: float,
    on_config_error: str = "halt",
) -> RequestStep:
    """Decide after a failed request of one sample group.

    A configuration fault (kind ``config``: 401/403, 404, a 400 naming an unknown model or parameter) halts
    the batch, or with ``on_config_error: escalate`` gives up like any exhausted request. A refused ``n``
    (kind ``n_unsupported``) splits the request into one request per sample, at once.

    ``attempt`` (1-based) counts the group's failures of the same sort so far — 429s, or every
    other error — across deferrals too, so retries and backoff go on where they stopped.
    A 429 means "later", not "broken": rate limits have their own, larger budget of
    ``RATE_LIMIT_PATIENCE × max(1, max_retries)`` retries (30 with the default ``max_retries: 3``), after
    which the group gives up as ``model_error:rate_limited``, so a 429 storm ends instead of running forever.
    A long wait is deferred to Postgres so the worker slot is freed (CELERY-NOTES §1: no long countdowns).
    """
    if kind == "config":
        return RequestStep(RequestAction.HALT if on_config_error == "halt" else RequestAction.GIVE_UP)
    if kind == "n_unsupported":
        return RequestStep(RequestAction.SPLIT)
    if kind == "rate_limited" and attempt <= RATE_LIMIT_PATIENCE * max(1, max_retries):
        delay = retry_after_s if retry_after_s is not None else backoff(attempt)
        return RequestStep(RequestAction.RETRY if delay <= max_inline_wait_s else RequestAction.DEFER, delay)
    if not retryable or attempt > max_retries:
        return RequestStep(RequestAction.GIVE_UP)
    # A server that says when to come back (a 503 with Retry-After) is asked then, not sooner.
    delay = max(backoff(attempt), retry_after_s or 0.0)
    return RequestStep(RequestAction.RETRY if delay <= max_inline_wait_s else RequestAction.DEFER, delay)
