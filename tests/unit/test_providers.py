"""Unit tests for cascade.providers: the chat completions protocol over httpx.MockTransport."""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from cascade.config import ModelConfig
from cascade.errors import (
    ConfigError,
    ProviderBadResponse,
    ProviderConfigError,
    ProviderError,
    ProviderNUnsupported,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from cascade.providers import (
    ChatProvider,
    Completion,
    ErrorDetails,
    Message,
    ProviderPool,
    RateLimits,
    classify_error,
    error_details,
    parse_duration,
    parse_rate_limits,
    parse_retry_after,
    retry_wait,
)

KEY_ENV = "CASCADE_TEST_PROVIDER_KEY"
SENTINEL = "sk-SENTINEL-5f3a9c-never-print-me"
URL = "https://llm.example.com/v1/chat/completions"
MESSAGES: list[Message] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

Handler = Callable[[httpx.Request], httpx.Response]


def completion_body(*contents: str | None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": c}, "finish_reason": "stop"}
               for i, c in enumerate(contents)]
    body: dict[str, Any] = {"id": "x", "object": "chat.completion", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def model(**over: Any) -> ModelConfig:
    fields: dict[str, Any] = {"name": "small", "base_url": "https://llm.example.com/v1/", "model": "tiny-1",
                              "api_key_env": KEY_ENV, "timeout_s": 7.0}
    return ModelConfig(**{**fields, **over})


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    return SENTINEL


@pytest.fixture
def make_provider(api_key: str) -> Iterator[Callable[[Handler], ChatProvider]]:
    made: list[ChatProvider] = []

    def make(handler: Handler, **over: Any) -> ChatProvider:
        provider = ChatProvider(model(**over), transport=httpx.MockTransport(handler))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def call(provider: ChatProvider, *, n: int = 1, response_format: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> Completion:
    return provider.complete(MESSAGES, n=n, max_tokens=64, temperature=0.3, response_format=response_format,
                             headers=headers or {})


def answering(body: dict[str, Any], seen: list[httpx.Request] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(200, json=body)

    return handler


# --- the request -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "response_format", "expected_extra"),
    [
        (1, None, {}),
        (3, None, {"n": 3}),
        (1, {"type": "json_object"}, {"response_format": {"type": "json_object"}}),
        (2, {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}},
         {"n": 2, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}}}}),
    ],
)
def test_request_body(make_provider: Callable[[Handler], ChatProvider], n: int,
                      response_format: dict[str, Any] | None, expected_extra: dict[str, Any]) -> None:
    # Given a provider whose server records the request
    seen: list[httpx.Request] = []
    provider = make_provider(answering(completion_body(*["ok"] * n), seen))

    # When it asks for n choices with a response format
    call(provider, n=n, response_format=response_format)

    # Then one POST goes to base_url + /chat/completions with the model id, the sampling settings,
    # and n / response_format only when they are needed
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == URL
    expected = {"model": "tiny-1", "messages": MESSAGES, "max_tokens": 64, "temperature": 0.3, **expected_extra}
    assert json.loads(request.content) == expected


def test_request_headers(make_provider: Callable[[Handler], ChatProvider]) -> None:
    # Given a provider with an API key in its environment variable
    seen: list[httpx.Request] = []
    provider = make_provider(answering(completion_body("ok"), seen))

    # When it sends a request with cascade's tracing headers
    call(provider, headers={"X-Cascade-Model": "small", "X-Cascade-Sample": "2", "X-Cascade-Variant": "terse"})

    # Then the headers, the bearer key and the JSON content type are all sent
    (request,) = seen
    assert request.headers["X-Cascade-Model"] == "small"
    assert request.headers["X-Cascade-Sample"] == "2"
    assert request.headers["X-Cascade-Variant"] == "terse"
    assert request.headers["Authorization"] == f"Bearer {SENTINEL}"
    assert request.headers["Content-Type"] == "application/json"


def test_no_api_key_env_sends_no_authorization(make_provider: Callable[..., ChatProvider]) -> None:
    # Given a model without api_key_env (a local server)
    seen: list[httpx.Request] = []
    provider = make_provider(answering(completion_body("ok"), seen), api_key_env=None)

    # When it sends a request
    call(provider)

    # Then no Authorization header goes out
    assert "Authorization" not in seen[0].headers


@pytest.mark.parametrize("value", [None, ""])
def test_unset_api_key_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    # Given api_key_env naming a variable that is unset or empty
    if value is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, value)

    # When the provider is built
    with pytest.raises(ConfigError) as info:
        ChatProvider(model(), transport=httpx.MockTransport(answering(completion_body("ok"))))

    # Then the error names the variable (and the model), not a value
    assert KEY_ENV in str(info.value)
    assert "small" in str(info.value)


def test_timeout_is_explicit(make_provider: Callable[[Handler], ChatProvider]) -> None:
    # Given a model with timeout_s 7
    provider = make_provider(answering(completion_body("ok")))

    # When a request has gone out
    provider.complete([{"role": "user", "content": "hi"}], n=1, max_tokens=8, temperature=0,
                      response_format=None, headers={})
    timeouts = {(c.timeout.read, c.timeout.connect) for c in provider._clients}

    # Then every one reads 7 s and connects at most 7 s
    assert timeouts == {(7.0, 7.0)}


def test_concurrent_requests_use_their_own_client_and_sequential_ones_reuse_it(
        make_provider: Callable[[Handler], ChatProvider]) -> None:
    # Given a server that holds every request until three are in flight
    import threading

    arrived = threading.Barrier(3, timeout=10)
    sequential = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if not sequential.is_set():
            arrived.wait()
        return answering(completion_body("ok"))(request)

    provider = make_provider(handler)

    def send() -> None:
        provider.complete([{"role": "user", "content": "hi"}], n=1, max_tokens=8, temperature=0,
                          response_format=None, headers={})

    # When three requests go out at once, then three one after another
    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sequential.set()
    for _ in range(3):
        send()

    # Then each concurrent request had a client of its own (one connection each), and later ones reused them
    assert len(provider._clients) == 3
    assert sorted(map(id, provider._idle)) == sorted(map(id, provider._clients))


# --- the response ------------------------------------------------------------------------------------


def test_completion_is_parsed(make_provider: Callable[[Handler], ChatProvider]) -> None:
    # Given a server answering three choices out of order, one without content, with usage
    body = completion_body(usage={"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33})
    body["choices"] = [
        {"index": 2, "message": {"role": "assistant", "content": "c"}, "finish_reason": "length"},
        {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant"}, "finish_reason": "content_filter"},
    ]
    provider = make_provider(answering(body))

    # When a completion is requested
    done = call(provider, n=3)

    # Then choices come back in index order, a missing content is None, and usage is read
    assert done.contents == ["a", None, "c"]
    assert done.finish_reasons == ["stop", "content_filter", "length"]
    assert (done.input_tokens, done.output_tokens) == (11, 22)
    assert done.latency_ms >= 0


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"index": 0, "message": {"content": "x"}}, "x"),
        ({"index": 0, "message": {"content": None}}, None),
        ({"index": 0, "message": {}}, None),
        ({"index": 0}, None),
        ({"index": 0, "message": None}, None),
        ({"index": 0, "message": {"content": [{"type": "text", "text": "x"}]}}, None),
        ({"message": {"content": "no index"}}, "no index"),
    ],
)
def test_content_is_none_when_missing(make_provider: Callable[[Handler], ChatProvider],
                                      choice: dict[str, Any], expected: str | None) -> None:
    # Given a choice whose message content is missing, null or not a string
    provider = make_provider(answering({"choices": [choice]}))

    # When a completion is requested
    done = call(provider)

    # Then its content is None (an invalid sample, not a crash); usage defaults to 0
    assert done.contents == [expected]
    assert (done.input_tokens, done.output_tokens) == (0, 0)


# --- errors ------------------------------------------------------------------------------------------


def responding(status: int, content: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content, headers=headers)

    return handler


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return handler


@pytest.mark.parametrize(
    ("handler", "error", "kind", "status"),
    [
        pytest.param(responding(429, b"slow down"), ProviderRateLimited, "rate_limited", 429, id="429"),
        pytest.param(responding(500, b"oops"), ProviderUnavailable, "unavailable", 500, id="500"),
        pytest.param(responding(502), ProviderUnavailable, "unavailable", 502, id="502"),
        pytest.param(responding(503, b"busy"), ProviderUnavailable, "unavailable", 503, id="503"),
        pytest.param(raising(httpx.ConnectError), ProviderUnavailable, "connection", None, id="connect-error"),
        pytest.param(raising(httpx.RemoteProtocolError), ProviderUnavailable, "connection", None, id="protocol"),
        pytest.param(raising(httpx.ReadTimeout), ProviderTimeout, "timeout", None, id="read-timeout"),
        pytest.param(raising(httpx.ConnectTimeout), ProviderTimeout, "timeout", None, id="connect-timeout"),
        pytest.param(responding(400, b'{"error": "bad request"}'), ProviderBadResponse, "bad_response", 400,
                     id="400"),
        pytest.param(responding(401, b"no"), ProviderConfigError, "config", 401, id="401"),
        pytest.param(responding(403, b"no"), ProviderConfigError, "config", 403, id="403"),
        pytest.param(responding(404, b"no"), ProviderConfigError, "config", 404, id="404"),
        pytest.param(responding(400, b'{"error": {"message": "This model\'s maximum context length is 8192 tokens"}}'),
                     ProviderBadResponse, "bad_response", 400, id="400-context-length"),
        pytest.param(responding(400, b'{"error": {"message": "litellm.UnsupportedParamsError: anthropic does not '
                                     b'support parameters: [\'n\'], for model=claude"}}'),
                     ProviderNUnsupported, "n_unsupported", 400, id="400-n"),
        pytest.param(responding(400, b'{"error": {"message": "Unsupported parameter: \'max_tokens\' is not '
                                     b'supported with this model.", "code": "unsupported_parameter"}}'),
                     ProviderConfigError, "config", 400, id="400-param"),
        pytest.param(responding(503, b"busy", {"Retry-After": "2"}), ProviderRateLimited, "rate_limited", 503,
                     id="503-retry-after"),
        pytest.param(responding(200, b""), ProviderBadResponse, "bad_response", 200, id="200-empty"),
        pytest.param(responding(200, b"  \n"), ProviderBadResponse, "bad_response", 200, id="200-blank"),
        pytest.param(responding(200, b"<html>hello</html>"), ProviderBadResponse, "bad_response", 200,
                     id="200-not-json"),
        pytest.param(responding(200, b'{"id": "x"}'), ProviderBadResponse, "bad_response", 200,
                     id="200-no-choices"),
        pytest.param(responding(200, b'{"choices": null}'), ProviderBadResponse, "bad_response", 200,
                     id="200-null-choices"),
        pytest.param(responding(200, b'["choices"]'), ProviderBadResponse, "bad_response", 200,
                     id="200-a-list"),
        pytest.param(responding(200, b'{"choices": ["x"]}'), ProviderBadResponse, "bad_response", 200,
                     id="200-choice-not-object"),
        pytest.param(responding(200, b'{"choices": [], "usage": {"prompt_tokens": "many"}}'), ProviderBadResponse,
                     "bad_response", 200, id="200-bad-usage"),
    ],
)
def test_errors_are_mapped_once(
    make_provider: Callable[[Handler], ChatProvider],
    handler: Handler,
    error: type[ProviderError],
    kind: str,
    status: int | None,
) -> None:
    # Given a server that fails in one particular way
    provider = make_provider(handler)

    # When a completion is requested
    with pytest.raises(ProviderError) as info:
        call(provider)

    # Then it is the one matching cascade error, with its kind, status, model and URL, and the key is not in it
    exc = info.value
    assert type(exc) is error
    assert exc.kind == kind
    assert exc.status == status
    assert (exc.model, exc.url) == ("small", URL)
    assert str(exc).startswith(f"model 'small' at {URL}: ")
    assert SENTINEL not in str(exc)
    assert SENTINEL not in repr(exc)
    assert exc.__cause__ is None or SENTINEL not in str(exc.__cause__)


def test_connection_kind_does_not_leak_to_the_class(make_provider: Callable[[Handler], ChatProvider]) -> None:
    # Given a connection error raised earlier
    with pytest.raises(ProviderUnavailable):
        call(make_provider(raising(httpx.ConnectError)))

    # When a 503 is raised afterwards
    with pytest.raises(ProviderUnavailable) as info:
        call(make_provider(responding(503)))

    # Then it is still kind "unavailable" (the "connection" kind was set on the instance only)
    assert info.value.kind == "unavailable"
    assert ProviderUnavailable.kind == "unavailable"


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        ("7", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None),
        ("inf", None),
        (None, None),
    ],
)
def test_rate_limit_retry_after(make_provider: Callable[[Handler], ChatProvider], retry_after: str | None,
                                expected: float | None) -> None:
    # Given a 429 with (or without) a Retry-After header
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    provider = make_provider(responding(429, b"rate limited", headers))

    # When a completion is requested
    with pytest.raises(ProviderRateLimited) as info:
        call(provider)

    # Then delay-seconds become retry_after (a past date: 0); anything unusable leaves it None (our own backoff)
    assert info.value.retry_after == expected
    assert info.value.status == 429


def test_error_detail_is_cut_to_200_bytes(make_provider: Callable[[Handler], ChatProvider]) -> None:
    # Given a 500 with a huge body
    provider = make_provider(responding(500, b"x" * 100_000))

    # When a completion is requested
    with pytest.raises(ProviderUnavailable) as info:
        call(provider)

    # Then the message carries only the start of the body
    assert str(info.value).endswith("HTTP 500: " + "x" * 200)


# --- pool --------------------------------------------------------------------------------------------


def test_pool_reuses_a_client_per_model(api_key: str) -> None:
    # Given a pool with a mock transport
    pool = ProviderPool(transport=httpx.MockTransport(answering(completion_body("ok"))))
    try:
        # When the same model is asked for twice, and a changed model once
        first, again = pool.get(model()), pool.get(model())
        changed = pool.get(model(timeout_s=9.0))

        # Then the same config shares one client and a changed config gets its own
        assert first is again
        assert changed is not first
        assert call(first).contents == ["ok"]
    finally:
        pool.close()


# --- request options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected", "absent"),
    [
        ({"temperature": None}, {"max_tokens": 64}, "temperature"),
        ({"temperature": 0.0}, {"temperature": 0.0, "max_tokens": 64}, None),
        ({"max_tokens_param": "max_completion_tokens"}, {"max_completion_tokens": 64, "temperature": 0.3},
         "max_tokens"),
        ({"temperature": None, "max_tokens_param": "max_completion_tokens"}, {"max_completion_tokens": 64},
         "temperature"),
    ],
)
def test_temperature_none_and_max_tokens_param(make_provider: Callable[[Handler], ChatProvider],
                                               options: dict[str, Any], expected: dict[str, Any],
                                               absent: str | None) -> None:
    # Given a provider whose server records the request
    seen: list[httpx.Request] = []
    provider = make_provider(answering(completion_body("ok"), seen))
    # When it is called with temperature None and/or max_completion_tokens
    provider.complete(MESSAGES, n=1, max_tokens=64, response_format=None, headers={},
                      **{"temperature": 0.3, **options})
    # Then no temperature key is sent for None, and the token limit goes under the chosen name
    body = json.loads(seen[0].content)
    assert {k: v for k, v in body.items() if k not in ("model", "messages")} == expected
    assert absent is None or absent not in body


# --- the answer: choices, usage, gateway metadata ----------------------------------------------------


def test_choices_refusals_usage_and_gateway_metadata(make_provider: Callable[..., ChatProvider]) -> None:
    # Given a gateway answering 3 choices of 4 (one refused, one filtered), usage details and its headers
    body = {
        "id": "chatcmpl-1", "model": "claude-alias",
        "choices": [
            {"index": 0, "message": {"content": "a", "refusal": None}, "finish_reason": "stop"},
            {"index": 1, "message": {"content": None, "refusal": "I can't help with that."}, "finish_reason": "stop"},
            {"index": 2, "message": {"content": ""}, "finish_reason": "content_filter"},
        ],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
                  "prompt_tokens_details": {"cached_tokens": 800},
                  "completion_tokens_details": {"reasoning_tokens": 120}},
    }
    headers = {"x-litellm-call-id": "call-1", "x-request-id": "req-1", "x-litellm-model-name": "claude-3-5-sonnet",
               "x-litellm-response-cost": "0.00123", "x-ratelimit-limit-requests": "600",
               "x-ratelimit-remaining-requests": "599", "x-ratelimit-limit-tokens": "150000",
               "x-ratelimit-remaining-tokens": "148700", "x-ratelimit-reset-requests": "100ms",
               "x-ratelimit-reset-tokens": "1m30.5s"}
    provider = make_provider(lambda request: httpx.Response(200, json=body, headers=headers))

    # When 4 choices are asked for
    done = call(provider, n=4)

    # Then each choice keeps its content, finish reason and refusal, and one missing choice is told apart
    assert done.contents == ["a", None, ""]
    assert done.finish_reasons == ["stop", "stop", "content_filter"]
    assert done.refusals == [None, "I can't help with that.", None]
    assert [c.blocked for c in done.choices] == [None, "refused", "content_filter"]
    assert (done.choices_returned, done.n_requested, done.missing) == (3, 4, 1)
    # And usage, ids, the served model, the gateway's cost and its rate-limit headers are read
    assert (done.input_tokens, done.output_tokens, done.cached_tokens, done.reasoning_tokens) == (1000, 300, 800, 120)
    assert (done.request_id, done.response_id, done.served_model) == ("call-1", "chatcmpl-1", "claude-3-5-sonnet")
    assert done.gateway_cost_usd == Decimal("0.00123")
    assert done.rate_limits == RateLimits(limit_requests=600, limit_tokens=150000, remaining_requests=599,
                                          remaining_tokens=148700, reset_requests_s=0.1, reset_tokens_s=90.5)


@pytest.mark.parametrize(
    ("usage", "headers", "expected"),
    [
        # nothing but the basics: details default to 0, no ids, no cost
        ({"prompt_tokens": 10, "completion_tokens": 5}, {}, (10, 5, 0, 0, None, None)),
        # details present but null or malformed count 0; cached never exceeds the prompt
        ({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": None,
          "completion_tokens_details": {"reasoning_tokens": "lots"}}, {}, (10, 5, 0, 0, None, None)),
        ({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 50}}, {},
         (10, 5, 10, 0, None, None)),
        # Groq/OpenRouter put them at the top of usage; OpenRouter's usage.cost is its cost
        ({"prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 4, "reasoning_tokens": 2, "cost": 0.5}, {},
         (10, 5, 4, 2, None, Decimal("0.5"))),
        # thoughts counted in the total only (Gemini): booked as output
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 40}, {}, (10, 30, 0, 0, None, None)),
        # request id fallbacks; LiteLLM's "None" cost and the pre-discount cost
        ({}, {"x-request-id": "req-9", "x-litellm-response-cost": "None"}, (0, 0, 0, 0, "req-9", None)),
        ({}, {"request-id": "ant-1", "x-litellm-response-cost-original": "2e-05"},
         (0, 0, 0, 0, "ant-1", Decimal("0.00002"))),
        ({}, {"x-generation-id": "gen-1", "x-litellm-response-cost": "-1"}, (0, 0, 0, 0, "gen-1", None)),
    ],
)
def test_usage_details_ids_and_cost(make_provider: Callable[..., ChatProvider], usage: dict[str, Any],
                                    headers: dict[str, str], expected: tuple[Any, ...]) -> None:
    body = completion_body("ok", usage=usage)
    provider = make_provider(lambda request: httpx.Response(200, json=body, headers=headers))
    done = call(provider)
    got = (done.input_tokens, done.output_tokens, done.cached_tokens, done.reasoning_tokens, done.request_id,
           done.gateway_cost_usd)
    assert got == expected
    assert done.served_model is None and done.rate_limits == RateLimits()


def test_an_event_stream_answer_is_named(make_provider: Callable[..., ChatProvider]) -> None:
    # Given a server that streams although the request did not ask it to
    stream = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
    provider = make_provider(responding(200, stream, {"Content-Type": "text/event-stream"}))
    # Then the bad response says so
    with pytest.raises(ProviderBadResponse, match="text/event-stream"):
        call(provider)


# --- Retry-After, in every form ----------------------------------------------------------------------

NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)


def _http_date(delta_s: float) -> str:
    return email.utils.format_datetime(NOW + timedelta(seconds=delta_s), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("6m0s", 360.0), ("1s", 1.0), ("20ms", 0.02), ("1m30.5s", 90.5), ("0.5s", 0.5), ("2m59.56s", 179.56),
        ("7.66s", 7.66), ("1h2m3s", 3723.0), ("100us", 0.0001), ("1\u00b5s", 1e-6), ("0s", 0.0), (" 12ms ", 0.012),
        ("1.5", 1.5), ("0", 0.0),
        ("-1s", None), ("-1", None), ("soon", None), ("", None), ("1x", None), ("1m30", None), ("inf", None),
        ("nan", None), ("1733312400000", None),
    ],
)
def test_parse_duration(value: str, expected: float | None) -> None:
    assert parse_duration(value) == pytest.approx(expected) if expected is not None else parse_duration(value) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0), ("0", 0.0), ("1.5", 1.5), ("-3", 0.0), (" 30 ", 30.0),
        (_http_date(30), 30.0), (_http_date(-30), 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("soon", None), ("inf", None), ("nan", None), ("", None),
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": _http_date(7)}, 7.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "1", "retry-after-ms": "2500"}, 2.5),  # the longest wait wins
        ({"llm_provider-retry-after": "7"}, 7.0),  # LiteLLM forwards the upstream's header
        ({"llm_provider-retry-after-ms": "300"}, 0.3),
        ({"retry-after": "2", "llm_provider-retry-after": "9"}, 9.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),  # remaining not sent: the reset applies
        # only the spent limit's reset applies
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
          "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6m0s"}, 1.0),
        ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s",
          "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
          "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30.5s"}, 90.5),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}, None),
        ({"retry-after": "2", "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30.5s"}, 90.5),
        ({"retry-after": "soon", "retry-after-ms": "x", "x-ratelimit-reset-tokens": "later"}, None),
    ],
)
def test_retry_wait(headers: dict[str, str], expected: float | None) -> None:
    assert retry_wait(headers, NOW) == expected


def test_retry_wait_reads_httpx_headers_in_any_case() -> None:
    assert retry_wait(httpx.Headers({"Retry-After": "3", "Retry-After-Ms": "3500"}), NOW) == 3.5


def test_parse_rate_limits_skips_unreadable_values() -> None:
    limits = parse_rate_limits({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "n/a",
                                "llm_provider-x-ratelimit-remaining-tokens": "10.0", "x-ratelimit-reset-tokens": "x"})
    assert limits == RateLimits(limit_requests=60, remaining_tokens=10)


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {"retry-after-ms": "250"}, 0.25),
        (429, {"llm_provider-retry-after": "7"}, 7.0),
        (429, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}, 360.0),
        (503, {"Retry-After": "4"}, 4.0),
    ],
)
def test_rate_limited_answers_carry_the_wait(make_provider: Callable[..., ChatProvider], status: int,
                                             headers: dict[str, str], expected: float) -> None:
    provider = make_provider(responding(status, b"slow down", headers))
    with pytest.raises(ProviderRateLimited) as info:
        call(provider)
    assert (info.value.retry_after, info.value.status, info.value.kind) == (expected, status, "rate_limited")


# --- configuration faults and n ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"error": {"message": "m", "type": "invalid_request_error", "param": "n", "code": "bad"}}',
         ErrorDetails("m", "bad", "n")),
        (b'{"error": {"message": "m", "type": "None", "param": "None", "code": "400"}}', ErrorDetails("m", "400")),
        (b'{"error": {"message": "m", "type": "invalid_request_error", "code": null}}',
         ErrorDetails("m", "invalid_request_error")),
        (b'{"error": "Invalid model name passed in model=x"}', ErrorDetails("Invalid model name passed in model=x")),
        (b'[{"error": {"code": 400, "message": "m", "status": "INVALID_ARGUMENT"}}]', ErrorDetails("m", "400")),
        (b'{"object": "error", "message": {"detail": [{"type": "extra_forbidden"}]}}',
         ErrorDetails('{"detail": [{"type": "extra_forbidden"}]}')),
        (b'{"object": "error", "message": "The model `x` does not exist.", "code": 404}',
         ErrorDetails("The model `x` does not exist.", "404")),
        (b"<html>Bad Gateway</html>", ErrorDetails("<html>Bad Gateway</html>")),
        (b'"just a string"', ErrorDetails('"just a string"')),
    ],
)
def test_error_details(raw: bytes, expected: ErrorDetails) -> None:
    assert error_details(raw) == expected


LITELLM_N = ("litellm.UnsupportedParamsError: anthropic does not support parameters: ['n'], for model=claude-3-5. "
             "To drop these, set `litellm.drop_params=True` or for proxy:\n\n`litellm_settings:\n drop_params: true`")


@pytest.mark.parametrize(
    ("status", "details", "expected"),
    [
        # n refused: LiteLLM, OpenAI's param, Groq-like and Gemini texts
        (400, ErrorDetails(LITELLM_N, "400"), "n_unsupported"),
        (400, ErrorDetails("Invalid 'n': integer above maximum value", "integer_above_max_value", "n"),
         "n_unsupported"),
        (400, ErrorDetails("'n' : number must be at most 1"), "n_unsupported"),
        (400, ErrorDetails("n must be 1"), "n_unsupported"),
        (400, ErrorDetails("Multiple candidates is not enabled for models/gemini-3"), "n_unsupported"),
        (422, ErrorDetails("unsupported parameter `n`"), "n_unsupported"),
        (400, ErrorDetails("Unsupported parameter: 'n' is not supported with this model.", "unsupported_parameter"),
         "n_unsupported"),
        (400, ErrorDetails("Unsupported parameter: 'name' in messages"), "parameter"),
        # auth
        (401, ErrorDetails("Incorrect API key provided: sk-abc***xyz", "invalid_api_key"), "auth"),
        (403, ErrorDetails("forbidden"), "auth"),
        (400, ErrorDetails("API key not valid. Please pass a valid API key.", "400"), "auth"),
        (400, ErrorDetails("Authentication Error, Invalid proxy server token passed"), "auth"),
        # unknown model
        (404, ErrorDetails("The model `gpt-5o` does not exist or you do not have access to it.", "model_not_found"),
         "model"),
        (404, ErrorDetails("model 'llama9' not found"), "model"),
        (400, ErrorDetails("400: {'error': 'Invalid model name passed in model=Lite-GPT-12'}", "400"), "model"),
        (400, ErrorDetails("litellm.BadRequestError: PerplexityException - Invalid model 'perplexity/sonar'."),
         "model"),
        (404, ErrorDetails("Not Found"), "not_found"),
        # unsupported parameters and values
        (400, ErrorDetails("Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                           "'max_completion_tokens' instead.", "unsupported_parameter", "max_tokens"), "parameter"),
        (400, ErrorDetails("Unsupported value: 'temperature' does not support 0.7 with this model. Only the default "
                           "(1) value is supported.", "unsupported_value", "temperature"), "parameter"),
        (400, ErrorDetails("litellm.UnsupportedParamsError: anthropic does not support parameters: ['logit_bias']"),
         "parameter"),
        (422, ErrorDetails('{"detail": [{"type": "extra_forbidden", "msg": "Extra inputs are not permitted"}]}'),
         "parameter"),
        (400, ErrorDetails("stream: true is not supported", "unsupported_value", "stream"), "parameter"),
        # a request problem of this row, not of the configuration
        (400, ErrorDetails("This model's maximum context length is 8192 tokens.", "context_length_exceeded"),
         "bad_response"),
        (400, ErrorDetails("'messages' must contain the word 'json' in some form"), "bad_response"),
        (400, ErrorDetails("The response was filtered due to the prompt triggering content management policy",
                           "content_filter"), "bad_response"),
        (402, ErrorDetails("Insufficient credits"), "bad_response"),
        (413, ErrorDetails("Request too large"), "bad_response"),
    ],
)
def test_classify_error(status: int, details: ErrorDetails, expected: str) -> None:
    assert classify_error(status, details) == expected


@pytest.mark.parametrize(
    ("status", "body", "error", "reason"),
    [
        (401, {"error": {"message": f"Incorrect API key provided: {SENTINEL}.", "code": "invalid_api_key"}},
         ProviderConfigError, "auth"),
        (404, {"error": {"message": "The model `tiny-1` does not exist", "code": "model_not_found"}},
         ProviderConfigError, "model"),
        (400, {"error": {"message": "Unsupported parameter: 'max_tokens'", "code": "unsupported_parameter"}},
         ProviderConfigError, "parameter"),
        (400, {"error": {"message": LITELLM_N, "type": "None", "param": "None", "code": "400"}},
         ProviderNUnsupported, None),
    ],
)
def test_config_faults_carry_the_providers_message_without_the_key(
        make_provider: Callable[..., ChatProvider], status: int, body: dict[str, Any],
        error: type[ProviderError], reason: str | None) -> None:
    # Given a provider answering a configuration fault (one quoting the API key back)
    provider = make_provider(lambda request: httpx.Response(status, json=body))
    # When a completion is requested
    with pytest.raises(ProviderError) as info:
        call(provider, n=3)
    # Then it is its own error class, carrying the provider's message with the key redacted
    exc = info.value
    assert type(exc) is error and exc.status == status
    assert SENTINEL not in str(exc) and SENTINEL not in repr(exc.args)
    if isinstance(exc, ProviderConfigError):
        assert exc.kind == "config" and exc.reason == reason
        assert exc.provider_message == body["error"]["message"].replace(SENTINEL, "***")
        assert exc.provider_message in str(exc)
    else:
        assert exc.kind == "n_unsupported" and "['n']" in str(exc)


def test_a_key_across_the_detail_cut_is_redacted_whole(make_provider: Callable[..., ChatProvider]) -> None:
    # Given a 500 whose body quotes the key so that it straddles the 200-character cut
    provider = make_provider(responding(500, b"x" * 190 + SENTINEL.encode() + b"y" * 100))
    with pytest.raises(ProviderUnavailable) as info:
        call(provider)
    # Then no part of the key survives: it is replaced before the cut
    assert SENTINEL[:10] not in str(info.value)
    assert str(info.value).endswith("x" * 190 + "***" + "y" * 7)
