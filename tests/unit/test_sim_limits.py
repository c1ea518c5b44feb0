"""cascade.sim enforcing a model's rpm_limit and tpm_limit the way OpenAI answers: 429s with Retry-After and
``x-ratelimit-*`` headers, and those headers on every answer, read back through cascade.providers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from cascade.config import ModelConfig
from cascade.errors import ProviderRateLimited
from cascade.providers import ChatProvider, parse_rate_limits
from cascade.sim import SimConfig, SimModel, SimServer, _Window

Factory = Callable[..., SimServer]  # the `sim` fixture of tests/conftest.py


def _post(server: SimServer, text: str = "q", **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/chat/completions", headers={"X-Cascade-Model": "m"},
                      json={"model": "m", "messages": [{"role": "user", "content": text}], **body})


def test_no_limit_sends_no_rate_limit_headers(sim: Factory) -> None:
    resp = _post(sim(SimConfig(models={"m": SimModel()})))
    assert resp.status_code == 200
    assert not [h for h in resp.headers if h.startswith("x-ratelimit")]


def test_requests_over_rpm_get_openais_429(sim: Factory) -> None:
    # Given a model limited to 3 requests a minute
    server = sim(SimConfig(models={"m": SimModel(rpm_limit=3)}))
    # When 4 requests come
    answers = [_post(server, f"q{i}") for i in range(4)]
    # Then 3 are answered, each saying what remains and when the window resets
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["2", "1", "0", "0"]
    limits = parse_rate_limits(answers[0].headers)
    assert limits.limit_requests == 3 and 59 < (limits.reset_requests_s or 0) <= 60
    assert "x-ratelimit-limit-tokens" not in answers[0].headers  # no token limit set
    # And the 4th is OpenAI's rate_limit_exceeded, with a Retry-After until the window resets
    error = answers[3].json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "requests per min (RPM): Limit 3, Used 3" in error["message"]
    assert 59 <= int(answers[3].headers["Retry-After"]) <= 60
    assert [s.status for s in server.seen()] == [200, 200, 200, 429]


def test_tokens_are_counted_as_answered(sim: Factory) -> None:
    # Given a model limited to 100 tokens a minute
    server = sim(SimConfig(models={"m": SimModel(tpm_limit=100)}))
    # When a request with a 40-character prompt is answered
    first = _post(server, "x" * 40)
    usage = first.json()["usage"]["total_tokens"]
    # Then the remaining tokens are the limit less its real usage (prompt and completion)
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 1 + 40 // 4
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100 - usage
    assert first.headers["x-ratelimit-limit-tokens"] == "100" and "x-ratelimit-limit-requests" not in first.headers
    # And a request whose prompt does not fit in what remains is refused, one that fits is answered
    big = _post(server, "y" * 4 * (100 - usage))
    assert big.status_code == 429 and "tokens per min (TPM)" in big.json()["error"]["message"]
    assert _post(server, "z").status_code == 200


def test_a_limit_429_reaches_the_cascade_as_rate_limited(sim: Factory) -> None:
    # Given a model at 1 request a minute whose one request is spent
    server = sim(SimConfig(models={"m": SimModel(rpm_limit=1)}))
    provider = ChatProvider(ModelConfig(name="m", base_url=server.url, model="m", timeout_s=5))
    try:
        done = provider.complete([{"role": "user", "content": "q"}], n=1, max_tokens=8, temperature=None,
                                 response_format=None, headers={"X-Cascade-Model": "m"})
        assert done.rate_limits.remaining_requests == 0 and done.rate_limits.limit_requests == 1
        # When another request goes, then it fails as rate limited, asking to wait for the window's reset
        with pytest.raises(ProviderRateLimited) as caught:
            provider.complete([{"role": "user", "content": "q"}], n=1, max_tokens=8, temperature=None,
                              response_format=None, headers={"X-Cascade-Model": "m"})
        assert 59 <= (caught.value.retry_after or 0) <= 60
    finally:
        provider.close()


def test_a_limit_429_counts_no_attempt(sim: Factory) -> None:
    # Given a model with random server errors, and the same model limited to one request a minute
    faulty = {"p_500": 0.5, "p_429": 0.2}
    free = sim(SimConfig(seed=5, models={"m": SimModel(**faulty)}))
    limited = sim(SimConfig(seed=5, models={"m": SimModel(**faulty, rpm_limit=1)}))
    # When the same request is sent 6 times to each (the limited sim's limit lifted after its 429)
    expected = [_post(free).status_code for _ in range(6)]
    got = [_post(limited).status_code, _post(limited).status_code]
    limited.reconfigure(SimConfig(seed=5, models={"m": SimModel(**faulty)}))
    got += [_post(limited).status_code for _ in range(5)]
    # Then the limited sim's answers are the free one's, with the limit's 429 inserted: it drew nothing
    assert got[1] == 429 and got[:1] + got[2:] == expected


@pytest.mark.parametrize(("at", "start", "requests"), [(59.9, 0.0, 5), (60.0, 60.0, 0), (185.0, 180.0, 0)])
def test_the_window_is_fixed_and_rolls_every_60_s(at: float, start: float, requests: int) -> None:
    window = _Window(0.0, requests=5, tokens=50)
    window.roll(at, 60.0)
    assert (window.start, window.requests) == (start, requests)
    headers = dict(window.headers(SimModel(rpm_limit=10, tpm_limit=100), at))
    assert headers["x-ratelimit-remaining-requests"] == str(10 - requests)


def test_a_shorter_window_allows_its_share_of_the_limit(sim: Factory) -> None:
    # Given 60 requests a minute enforced per 5 s window (OpenAI's quantized limits): 5 per window
    server = sim(SimConfig(models={"m": SimModel(rpm_limit=60, limit_window_s=5)}))
    answers = [_post(server, f"q{i}") for i in range(6)]
    # Then the 6th is refused until the window resets, and the headers say so
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "60"
    assert answers[4].headers["x-ratelimit-remaining-requests"] == "0"
    assert 4 < (parse_rate_limits(answers[4].headers).reset_requests_s or 0) <= 5
    assert answers[5].headers["Retry-After"] == "5"
