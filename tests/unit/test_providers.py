"""Unit tests for cascade.providers: the chat completions protocol over httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from cascade.config import ModelConfig
from cascade.errors import (
    ConfigError,
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from cascade.providers import ChatProvider, Completion, Message, ProviderPool

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
        pytest.param(responding(401, b"no"), ProviderBadResponse, "bad_response", 401, id="401"),
        pytest.param(responding(404, b"no"), ProviderBadResponse, "bad_response", 404, id="404"),
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
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
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

    # Then delay-seconds become retry_after; a date or anything unusable leaves it None (our own backoff)
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
