"""Unit tests for cascade.policy: what happens after a verdict and after a failed request (pure tables)."""

from __future__ import annotations

import itertools

import pytest

from cascade.policy import (
    RATE_LIMIT_PATIENCE,
    Action,
    NextStep,
    RequestAction,
    RequestStep,
    after_request_error,
    after_verdict,
    backoff,
    is_retryable,
)

RETRY, DEFER, GIVE_UP = RequestAction.RETRY, RequestAction.DEFER, RequestAction.GIVE_UP


# --- after_verdict -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("passed", "tier", "tier_count", "expected"),
    [
        (True, 1, 3, NextStep(Action.ACCEPT, 1)),
        (True, 2, 3, NextStep(Action.ACCEPT, 2)),
        (True, 3, 3, NextStep(Action.ACCEPT, 3)),
        (True, 1, 1, NextStep(Action.ACCEPT, 1)),
        (False, 1, 3, NextStep(Action.ESCALATE, 2)),
        (False, 2, 3, NextStep(Action.ESCALATE, 3)),
        (False, 3, 3, NextStep(Action.FAIL, 3)),
        (False, 1, 1, NextStep(Action.FAIL, 1)),
    ],
)
def test_after_verdict(passed: bool, tier: int, tier_count: int, expected: NextStep) -> None:
    # Given a tier's verdict and the number of tiers
    # When the policy decides
    step = after_verdict(passed, tier, tier_count)

    # Then a pass is accepted where it is, a failure escalates one tier, or fails at the last
    assert step == expected


@pytest.mark.parametrize(
    ("on_exhausted", "tier", "has_answer", "expected"),
    [
        ("accept_last", 3, True, NextStep(Action.ACCEPT, 3)),  # the last tier's majority, whatever its share
        ("accept_last", 3, False, NextStep(Action.FAIL, 3)),  # no valid sample: nothing to accept
        ("accept_last", 2, True, NextStep(Action.ESCALATE, 3)),  # not the last tier: escalate as usual
        ("fail", 3, True, NextStep(Action.FAIL, 3)),
    ],
)
def test_on_exhausted_is_decided_by_the_policy(on_exhausted: str, tier: int, has_answer: bool,
                                               expected: NextStep) -> None:
    # Given a failed verdict of a three-tier task type
    # When the policy decides with the task's on_exhausted
    step = after_verdict(False, tier, 3, on_exhausted=on_exhausted, has_answer=has_answer)

    # Then only accept_last at the last tier, with a valid sample, accepts the failed vote
    assert step == expected


# --- after_request_error -----------------------------------------------------------------------------


def decide(
    kind: str,
    attempt: int,
    *,
    retryable: bool = True,
    max_retries: int = 3,
    retry_after_s: float | None = None,
    max_inline_wait_s: float = 5.0,
) -> RequestStep:
    return after_request_error(kind, retryable=retryable, attempt=attempt, max_retries=max_retries,
                               retry_after_s=retry_after_s, max_inline_wait_s=max_inline_wait_s)


@pytest.mark.parametrize(
    ("retry_after_s", "max_inline_wait_s", "expected"),
    [
        (0.0, 5.0, RequestStep(RETRY, 0.0)),
        (2.0, 5.0, RequestStep(RETRY, 2.0)),
        (5.0, 5.0, RequestStep(RETRY, 5.0)),  # equal to the inline limit: still sleeps in the worker
        (5.5, 5.0, RequestStep(DEFER, 5.5)),
        (120.0, 5.0, RequestStep(DEFER, 120.0)),
        (1.0, 0.0, RequestStep(DEFER, 1.0)),
    ],
)
def test_rate_limited_follows_retry_after(
    retry_after_s: float, max_inline_wait_s: float, expected: RequestStep
) -> None:
    # Given a 429 with a Retry-After
    # When the policy decides
    step = decide("rate_limited", 1, retry_after_s=retry_after_s, max_inline_wait_s=max_inline_wait_s)

    # Then a short wait is slept inline, a long one deferred to Postgres, with the server's delay
    assert step == expected


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5])
def test_rate_limited_without_retry_after_backs_off(attempt: int) -> None:
    # Given a 429 without a usable Retry-After
    # When the policy decides
    step = decide("rate_limited", attempt, max_inline_wait_s=100.0)

    # Then it retries after our own backoff
    assert step == RequestStep(RETRY, backoff(attempt))


def test_rate_limited_long_backoff_is_deferred() -> None:
    # Given a 429 without Retry-After, late enough that the backoff exceeds the inline limit
    # When the policy decides
    step = decide("rate_limited", 5, max_inline_wait_s=1.0)

    # Then the wait is deferred rather than slept
    assert step == RequestStep(DEFER, backoff(5))


@pytest.mark.parametrize("max_retries", [0, 1, 3])
def test_rate_limits_outlast_max_retries(max_retries: int) -> None:
    # Given a model with max_retries and repeated 429s
    patience = RATE_LIMIT_PATIENCE * max(1, max_retries)

    # When the policy decides at the last patient attempt and just after it
    last = decide("rate_limited", patience, max_retries=max_retries, retry_after_s=1.0)
    after = decide("rate_limited", patience + 1, max_retries=max_retries, retry_after_s=1.0)

    # Then it keeps retrying well past max_retries, then gives up
    assert last == RequestStep(RETRY, 1.0)
    assert after == RequestStep(GIVE_UP)


@pytest.mark.parametrize(
    ("max_retries", "retried_429s"),
    [
        (0, 10),  # even a model that never retries other errors waits out a short rate limit
        (1, 10),
        (3, 30),  # the default
        (10, 100),  # the most the config allows
    ],
)
@pytest.mark.parametrize("retry_after_s", [None, 1.0, 600.0])
def test_a_429_storm_gives_up_after_a_stated_number_of_retries(
    max_retries: int, retried_429s: int, retry_after_s: float | None
) -> None:
    # Given a provider that answers every request with 429 (with or without a Retry-After)
    # When the policy decides after each consecutive 429, up to far more than any bound
    steps = [decide("rate_limited", attempt, max_retries=max_retries, retry_after_s=retry_after_s)
             for attempt in range(1, 1001)]

    # Then it retries (inline or deferred) exactly RATE_LIMIT_PATIENCE x max(1, max_retries) times, then gives
    # up for good: a 429 storm is bounded, as the docstring and the README say
    actions = [step.action for step in steps]
    assert GIVE_UP not in actions[:retried_429s]
    assert set(actions[retried_429s:]) == {GIVE_UP}
    assert retried_429s == RATE_LIMIT_PATIENCE * max(1, max_retries)


@pytest.mark.parametrize("kind", ["timeout", "unavailable", "connection", "bad_response"])
@pytest.mark.parametrize(
    ("attempt", "max_retries", "expected"),
    [
        (1, 3, RequestStep(RETRY, 0.5)),
        (2, 3, RequestStep(RETRY, 1.0)),
        (3, 3, RequestStep(RETRY, 2.0)),
        (4, 3, RequestStep(GIVE_UP)),
        (9, 3, RequestStep(GIVE_UP)),
        (1, 0, RequestStep(GIVE_UP)),
        (1, 1, RequestStep(RETRY, 0.5)),
        (2, 1, RequestStep(GIVE_UP)),
    ],
)
def test_retryable_errors_retry_until_max_retries(
    kind: str, attempt: int, max_retries: int, expected: RequestStep
) -> None:
    # Given the attempt-th failure of a retryable kind
    # When the policy decides
    step = decide(kind, attempt, max_retries=max_retries)

    # Then it retries with backoff while attempt <= max_retries, then gives up
    assert step == expected


def test_retryable_error_with_a_long_backoff_is_deferred() -> None:
    # Given a timeout whose backoff (2 s at attempt 3) exceeds the inline limit
    # When the policy decides
    step = decide("timeout", 3, max_retries=5, max_inline_wait_s=1.0)

    # Then the retry is deferred
    assert step == RequestStep(DEFER, 2.0)


@pytest.mark.parametrize("kind", ["bad_response", "timeout", "unavailable", "error"])
def test_not_retryable_gives_up_at_once(kind: str) -> None:
    # Given a failure the caller marks as not retryable (e.g. HTTP 400)
    # When the policy decides on the first attempt
    step = decide(kind, 1, retryable=False, max_retries=10)

    # Then it gives up without a delay
    assert step == RequestStep(GIVE_UP, 0.0)


# --- backoff -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 0.5), (1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (8, 30.0), (100, 30.0)],
)
def test_backoff_table(attempt: int, expected: float) -> None:
    # Given an attempt number
    # When the backoff is computed with the defaults
    # Then it doubles from 0.5 s and stops at 30 s
    assert backoff(attempt) == expected


@pytest.mark.parametrize(("base_s", "cap_s"), [(0.5, 30.0), (0.1, 1.0), (2.0, 2.0), (1.0, 600.0)])
def test_backoff_is_monotone_and_capped(base_s: float, cap_s: float) -> None:
    # Given any base and cap
    # When backoffs are computed for every attempt a request can reach (at most 10 × 10 + 1)
    delays = [backoff(a, base_s=base_s, cap_s=cap_s) for a in range(1, 200)]

    # Then they never decrease, start at the base and never exceed the cap
    assert delays[0] == min(base_s, cap_s)
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert max(delays) == cap_s
    assert all(isinstance(d, float) for d in delays)


@pytest.mark.parametrize("attempt", [1025, 10_000])
def test_backoff_stays_capped_for_huge_attempts(attempt: int) -> None:
    # Given an attempt number whose 2^(attempt-1) no float can hold
    # When the backoff is computed
    # Then it is the cap, not an OverflowError
    assert backoff(attempt) == 30.0


@pytest.mark.parametrize(
    ("kind", "status", "retryable"),
    [
        ("timeout", None, True),
        ("unavailable", 503, True),
        ("connection", None, True),
        ("rate_limited", 429, True),
        ("bad_response", 200, True),  # an empty or non-JSON 200 body is a glitch worth another try
        ("bad_response", 400, False),  # a 4xx will say the same again
        ("bad_response", 404, False),
    ],
)
def test_is_retryable(kind: str, status: int | None, retryable: bool) -> None:
    from cascade.policy import is_retryable

    assert is_retryable(kind, status) is retryable


@pytest.mark.parametrize(
    ("kind", "on_config_error", "retry_after_s", "expected"),
    [
        ("config", "halt", None, RequestStep(RequestAction.HALT)),  # bad key, unknown model: stop the batch
        ("config", "escalate", None, RequestStep(RequestAction.GIVE_UP)),  # as before: the tier failed
        ("n_unsupported", "halt", None, RequestStep(RequestAction.SPLIT)),  # ask one sample per request
        ("unavailable", "halt", 3.0, RequestStep(RequestAction.RETRY, 3.0)),  # a 503's Retry-After beats backoff
        ("unavailable", "halt", 0.1, RequestStep(RequestAction.RETRY, 0.5)),  # never sooner than our backoff
        ("unavailable", "halt", 60.0, RequestStep(RequestAction.DEFER, 60.0)),  # a long wait frees the worker
    ],
)
def test_configuration_faults_refused_n_and_server_waits(kind: str, on_config_error: str,
                                                         retry_after_s: float | None, expected: RequestStep) -> None:
    # Given the first failure of a request
    # When the policy decides
    step = after_request_error(kind, retryable=is_retryable(kind, 400 if kind != "unavailable" else 503), attempt=1,
                               max_retries=3, retry_after_s=retry_after_s, max_inline_wait_s=5.0,
                               on_config_error=on_config_error)
    # Then it halts, splits, or waits as long as the server asked
    assert step == expected
