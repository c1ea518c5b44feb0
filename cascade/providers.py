"""Model clients over httpx: OpenAI-compatible ``/chat/completions``.

One ``complete`` call is one HTTP request. Retries, backoff and their bookkeeping live in
``stages`` (every request is an ``attempts`` row); this module only speaks the protocol and
translates httpx's errors into cascade's, once, at the edge.

What gateways and backends put in their answers (PROVIDERS.md) is read here into plain values: per-choice
refusals and filters, cached and reasoning token counts, request ids and the gateway's own cost, rate-limit
headers, and which 4xx answers are configuration faults. The header and error parsers are pure functions.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TypedDict

import httpx

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

__all__ = [
    "ChatProvider",
    "Choice",
    "Completion",
    "ErrorDetails",
    "Message",
    "ProviderPool",
    "RateLimits",
    "classify_error",
    "error_details",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
    "retry_wait",
]

#: Bodies larger than this are cut off: a model answering megabytes must not exhaust a worker.
MAX_BODY_BYTES = 32 * 1024 * 1024

MaxTokensParam = Literal["max_tokens", "max_completion_tokens"]


class Message(TypedDict):
    role: str
    content: str


@dataclass(frozen=True)
class Choice:
    """One returned choice. ``refusal`` is the model's refusal text (``message.refusal``), None when it has none."""

    index: int
    content: str | None
    finish_reason: str | None
    refusal: str | None = None

    @property
    def blocked(self) -> Literal["refused", "content_filter"] | None:
        """Why this choice is no answer at all: ``refused`` (a refusal text), ``content_filter`` (filtered)."""
        if self.refusal:
            return "refused"
        return "content_filter" if self.finish_reason == "content_filter" else None


@dataclass(frozen=True)
class RateLimits:
    """The ``x-ratelimit-*`` headers of an answer (None where absent); resets in seconds."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True)
class Completion:
    """The answer to one request: one content per returned choice (None where a choice had none), in index order.

    ``choices_returned`` may be less than ``n_requested`` (a backend that ignores ``n``): ``missing`` samples
    never came, which is not the same as a returned choice with empty content. ``cached_tokens`` is part of
    ``input_tokens``, ``reasoning_tokens`` part of ``output_tokens`` (0 when the provider does not say).
    ``request_id``, ``served_model`` and ``gateway_cost_usd`` are what a gateway says about the request, for
    reconciling with its bill.
    """

    contents: list[str | None]
    finish_reasons: list[str | None]
    input_tokens: int
    output_tokens: int
    latency_ms: int
    choices: tuple[Choice, ...] = ()
    n_requested: int = 1
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    request_id: str | None = None
    response_id: str | None = None
    served_model: str | None = None
    gateway_cost_usd: Decimal | None = None
    rate_limits: RateLimits = field(default_factory=RateLimits)

    @property
    def choices_returned(self) -> int:
        """How many choices came back."""
        return len(self.contents)

    @property
    def missing(self) -> int:
        """How many of the requested choices did not come back."""
        return max(0, self.n_requested - self.choices_returned)

    @property
    def refusals(self) -> list[str | None]:
        """Each returned choice's refusal text, in index order."""
        return [c.refusal for c in self.choices]


class ChatProvider:
    """An OpenAI-compatible chat completions client for one configured model.

    Raises ``ConfigError`` when ``api_key_env`` names a variable that is not set (the message
    names the variable, never a value).
    """

    def __init__(self, config: ModelConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self._secret: str | None = None
        headers = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ConfigError(f"environment variable {config.api_key_env} is not set",
                                  path=f"models[{config.name}].api_key_env")
            headers["Authorization"] = f"Bearer {key}"
            self._secret = key
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._endpoint = httpx.URL(self._url)  # parsed once: httpx re-parses a str URL on every request
        self._client_args: dict[str, Any] = {  # Any: httpx.Client keyword arguments
            "transport": transport,
            "headers": headers,
            "timeout": httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            "limits": httpx.Limits(max_connections=1, max_keepalive_connections=1),
            # One certificate store for every client: loading it costs ~20 ms per client.
            "verify": httpx.create_ssl_context(),
        }
        # A free list of one-connection clients: a request takes one, uses it alone and puts it back, so the
        # list grows to the process's peak of concurrent requests. httpcore walks every connection of a pool
        # (polling each idle socket) on every request and response; with hundreds of connections in one pool
        # that walk was a gevent worker's top cost (0.96 → 0.62 ms of client CPU per call at 256 in flight,
        # docs/benchmarks.md). LIFO keeps warm connections in use.
        self._idle: list[httpx.Client] = []
        self._clients: list[httpx.Client] = []

    def _checkout(self) -> httpx.Client:
        try:
            return self._idle.pop()
        except IndexError:
            client = httpx.Client(**self._client_args)
            self._clients.append(client)
            return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        self._idle.clear()

    def complete(
        self,
        messages: list[Message],
        *,
        n: int,
        max_tokens: int,
        temperature: float | None,
        response_format: dict[str, Any] | None,  # Any: OpenAI's response_format object
        headers: dict[str, str],
        max_tokens_param: MaxTokensParam = "max_tokens",
    ) -> Completion:
        """Send one request for ``n`` choices and read the answer.

        ``temperature=None`` sends no temperature (models that accept only their default); ``max_tokens_param``
        names the token limit field (reasoning models take ``max_completion_tokens``).

        Raises:
            ProviderConfigError: 401/403/404, or a 400/422 naming an unknown model, an unsupported parameter or
                a bad key: the request can never succeed as configured.
            ProviderNUnsupported: a 400/422 refusing ``n``; ask again with separate requests.
            ProviderRateLimited: 429, or 503 with a wait; ``retry_after`` is the longest wait the headers ask for.
            ProviderError: any other failure (its subclasses ``ProviderTimeout``, ``ProviderUnavailable``,
                ``ProviderBadResponse``).
        """
        body: dict[str, Any] = {  # Any: a JSON request body
            "model": self.config.model,
            "messages": messages,
            max_tokens_param: max_tokens,
        }
        if temperature is not None:
            body["temperature"] = temperature
        if n != 1:
            body["n"] = n
        if response_format is not None:
            body["response_format"] = response_format
        started = time.monotonic()
        status, raw, answer_headers = self._post(body, headers)
        latency_ms = int((time.monotonic() - started) * 1000)
        self._raise_for_status(status, raw, answer_headers)
        return self._parse(raw, answer_headers, latency_ms, n)

    def _error(self, cls: type[ProviderError], message: str, status: int | None = None) -> ProviderError:
        return cls(message, model=self.config.name, url=self._url, status=status)

    def _post(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes, httpx.Headers]:
        client = self._checkout()
        try:
            with client.stream("POST", self._endpoint, json=body, headers=headers) as response:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise self._error(ProviderBadResponse, f"body larger than {MAX_BODY_BYTES} bytes",
                                          response.status_code)
                return response.status_code, b"".join(chunks), response.headers
        except httpx.TimeoutException as exc:
            raise self._error(ProviderTimeout, f"timed out after {self.config.timeout_s} s ({type(exc).__name__})") \
                from exc
        except httpx.TransportError as exc:
            err = self._error(ProviderUnavailable, f"connection failed: {type(exc).__name__}")
            err.kind = "connection"
            raise err from exc
        except httpx.HTTPError as exc:  # DecodingError (a bad Content-Encoding), StreamError, ...
            raise self._error(ProviderBadResponse, f"unreadable response: {type(exc).__name__}") from exc
        finally:
            self._idle.append(client)

    def _redact(self, text: str) -> str:
        # A gateway may quote the key back (401 bodies do): it must never reach attempts or jobs.error. Redacted
        # before any cut, so a key straddling the cut cannot leak its first half.
        return text.replace(self._secret, "***") if self._secret else text

    def _raise_for_status(self, status: int, raw: bytes, headers: httpx.Headers) -> None:
        if status < 400:
            return
        detail = self._redact(raw[:64 * 1024].decode("utf-8", "replace"))[:200]
        wait = retry_wait(headers, datetime.now(UTC)) if status in (429, 503) else None
        if status == 429 or (status == 503 and wait is not None):
            raise ProviderRateLimited(f"HTTP {status}: {detail}", retry_after=wait,
                                      model=self.config.name, url=self._url, status=status)
        if status >= 500:
            raise self._error(ProviderUnavailable, f"HTTP {status}: {detail}", status)
        details = error_details(raw)
        verdict = classify_error(status, details)
        message = self._redact(details.message)[:500]
        if verdict == "n_unsupported":
            raise self._error(ProviderNUnsupported, f"HTTP {status}: n > 1 refused: {message[:300]}", status)
        if verdict != "bad_response":
            raise ProviderConfigError(f"HTTP {status}: {message[:300]}", provider_message=message, reason=verdict,
                                      model=self.config.name, url=self._url, status=status)
        raise self._error(ProviderBadResponse, f"HTTP {status}: {detail}", status)

    def _parse(self, raw: bytes, headers: httpx.Headers, latency_ms: int, n: int) -> Completion:
        try:
            data = json.loads(raw)
            choices = [_choice(c) for c in sorted(data["choices"], key=lambda c: c.get("index", 0))]
            prompt, completion, cached, reasoning = _usage(data.get("usage") or {})
            model = data.get("model")
            response_id = data.get("id")
            return Completion(
                contents=[c.content for c in choices],
                finish_reasons=[c.finish_reason for c in choices],
                input_tokens=prompt,
                output_tokens=completion,
                latency_ms=latency_ms,
                choices=tuple(choices),
                n_requested=n,
                cached_tokens=cached,
                reasoning_tokens=reasoning,
                request_id=_first_header(headers, _REQUEST_ID_HEADERS),
                response_id=response_id if isinstance(response_id, str) else None,
                served_model=headers.get("x-litellm-model-name") or (model if isinstance(model, str) else None),
                gateway_cost_usd=_gateway_cost(headers, data.get("usage") or {}),
                rate_limits=parse_rate_limits(headers),
            )
        # RecursionError: JSON nested too deep; OverflowError: int() of a huge float token count.
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
            what = "empty body" if not raw.strip() else f"not a chat completion ({type(exc).__name__})"
            if "text/event-stream" in headers.get("content-type", ""):
                what = "a text/event-stream answer: the server streamed though the request did not ask it to"
            raise self._error(ProviderBadResponse, what, 200) from exc


# --- answers -----------------------------------------------------------------------------------------

#: Where gateways put the request id, the gateway's own first (it is the one its spend logs show).
_REQUEST_ID_HEADERS = ("x-litellm-call-id", "x-request-id", "request-id", "x-generation-id")


def _choice(choice: dict[str, Any]) -> Choice:  # Any: a JSON choice object
    message = choice.get("message") or {}
    content, refusal, finish = message.get("content"), message.get("refusal"), choice.get("finish_reason")
    index = choice.get("index", 0)
    return Choice(index=index if isinstance(index, int) else 0,
                  content=content if isinstance(content, str) else None,
                  finish_reason=finish if isinstance(finish, str) else None,
                  refusal=refusal if isinstance(refusal, str) and refusal else None)


def _count(value: Any, *, strict: bool) -> int:  # Any: a JSON value
    """A token count; a malformed one raises when ``strict`` (the main counts), else counts 0 (the details)."""
    try:
        return max(0, int(value or 0))
    except (ValueError, TypeError, OverflowError):
        if strict:
            raise
        return 0


def _usage(usage: dict[str, Any]) -> tuple[int, int, int, int]:  # Any: the JSON usage object
    """(prompt, completion, cached, reasoning). Cached tokens are part of the prompt and reasoning tokens part of
    the completion; a total above prompt + completion (thoughts counted apart) is booked as completion."""
    prompt = _count(usage.get("prompt_tokens"), strict=True)
    completion = _count(usage.get("completion_tokens"), strict=True)
    completion = max(completion, _count(usage.get("total_tokens"), strict=False) - prompt)
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else None
    reasoning = completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else None
    # Groq and OpenRouter may also put them at the top of usage.
    cached = _count(usage.get("cached_tokens") if cached is None else cached, strict=False)
    reasoning = _count(usage.get("reasoning_tokens") if reasoning is None else reasoning, strict=False)
    return prompt, completion, min(cached, prompt), min(reasoning, completion)


def _decimal(value: Any) -> Decimal | None:  # Any: a header string or a JSON number
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = Decimal(str(value).strip())
    except (InvalidOperation, ValueError):
        return None  # LiteLLM writes "None" for an unknown cost
    return amount if amount.is_finite() and amount >= 0 else None


def _gateway_cost(headers: Mapping[str, str], usage: dict[str, Any]) -> Decimal | None:  # Any: JSON usage
    """The cost the gateway charged: LiteLLM's header, OpenRouter's ``usage.cost``, else LiteLLM's pre-discount."""
    for value in (headers.get("x-litellm-response-cost"), usage.get("cost"),
                  headers.get("x-litellm-response-cost-original")):
        cost = _decimal(value)
        if cost is not None:
            return cost
    return None


def _first_header(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((headers[name] for name in names if headers.get(name)), None)


# --- rate limits -------------------------------------------------------------------------------------

_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|\u00b5s|\u03bcs|ns|h|m|s)")
_GO_DURATION = re.compile(rf"(?:{_GO_PART.pattern})+")


def parse_duration(value: str) -> float | None:
    """Seconds in a reset header: a Go duration as OpenAI writes it (``6m0s``, ``1s``, ``20ms``, ``1m30.5s``)
    or a bare number of seconds. None when unreadable, negative, or an epoch time rather than a duration."""
    text = value.strip()
    if _GO_DURATION.fullmatch(text):
        return sum(float(number) * _GO_UNITS[unit] for number, unit in _GO_PART.findall(text))
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and 0 <= seconds < 1e9 else None


def parse_retry_after(value: str, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds, or an HTTP date (a past one is 0).

    A negative delay counts as 0; None when the value is neither.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retry_after_ms(value: str) -> float | None:
    try:
        ms = float(value.strip())
    except ValueError:
        return None
    return max(0.0, ms / 1000) if math.isfinite(ms) else None


def _number(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


def _rate_header(headers: Mapping[str, str], name: str) -> str | None:
    # LiteLLM re-sends every upstream header as llm_provider-<name>; its own (the key's) come unprefixed.
    return headers.get(name) or headers.get("llm_provider-" + name)


def parse_rate_limits(headers: Mapping[str, str]) -> RateLimits:
    """The ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers (keys in lower case, or
    ``httpx.Headers``); absent or unreadable values are None."""
    def reset(dim: str) -> float | None:
        value = _rate_header(headers, f"x-ratelimit-reset-{dim}")
        return None if value is None else parse_duration(value)

    return RateLimits(
        limit_requests=_number(_rate_header(headers, "x-ratelimit-limit-requests")),
        limit_tokens=_number(_rate_header(headers, "x-ratelimit-limit-tokens")),
        remaining_requests=_number(_rate_header(headers, "x-ratelimit-remaining-requests")),
        remaining_tokens=_number(_rate_header(headers, "x-ratelimit-remaining-tokens")),
        reset_requests_s=reset("requests"),
        reset_tokens_s=reset("tokens"),
    )


def retry_wait(headers: Mapping[str, str], now: datetime) -> float | None:
    """The longest wait a 429/503 asks for, in seconds, or None when it names none.

    Read: ``Retry-After`` (seconds or HTTP date), ``retry-after-ms``, their ``llm_provider-`` copies (LiteLLM),
    and ``x-ratelimit-reset-requests``/``-tokens`` for each limit that is spent (its ``remaining`` is 0, or not
    sent): a reset of a limit with room left does not apply. ``headers``: keys in lower case, or ``httpx.Headers``.
    """
    waits: list[float | None] = []
    for prefix in ("", "llm_provider-"):
        if (value := headers.get(prefix + "retry-after")) is not None:
            waits.append(parse_retry_after(value, now))
        if (value := headers.get(prefix + "retry-after-ms")) is not None:
            waits.append(_retry_after_ms(value))
    limits = parse_rate_limits(headers)
    for remaining, reset in ((limits.remaining_requests, limits.reset_requests_s),
                             (limits.remaining_tokens, limits.reset_tokens_s)):
        if remaining is None or remaining <= 0:
            waits.append(reset)
    found = [w for w in waits if w is not None]
    return max(found) if found else None


# --- errors ------------------------------------------------------------------------------------------

ErrorClass = Literal["auth", "model", "parameter", "not_found", "n_unsupported", "bad_response"]


@dataclass(frozen=True)
class ErrorDetails:
    """What an error body says: its message (the raw text when not JSON), and OpenAI's ``code`` and ``param``."""

    message: str
    code: str | None = None
    param: str | None = None


def _field(value: Any) -> str | None:  # Any: a JSON value
    # LiteLLM writes "None" for null, and codes may be ints (vLLM, Gemini, OpenRouter).
    return None if value is None or str(value) in ("None", "") else str(value)


def error_details(raw: bytes) -> ErrorDetails:
    """Read an error body defensively: ``{"error": {...}}``, ``{"error": "text"}``, Gemini's list of such,
    a top-level ``{"object": "error", "message": ...}`` (Mistral, old vLLM), or plain text."""
    text = raw[:64 * 1024].decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return ErrorDetails(text.strip())
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return ErrorDetails(text.strip())
    inner = data.get("error", data)
    if not isinstance(inner, dict):
        return ErrorDetails(str(inner))
    message = inner.get("message", inner.get("detail", text))
    return ErrorDetails(message if isinstance(message, str) else json.dumps(message),
                        _field(inner.get("code") or inner.get("type")), _field(inner.get("param")))


_N_TEXT = re.compile(r"""parameters?\W*\[[^\]]*['"`]n['"`]       # LiteLLM: does not support parameters: ['n']
                     | param(?:eter)?s?\W{0,3}['"`]n['"`]                        # Unsupported parameter: 'n'
                     | ['"`]n['"`]\s*(?:parameter|must|is|should|can|only|:|=|>)    # 'n' must be 1
                     | \bn\s*(?:must|should|>|=\s*\d|is\s+not|not\s+supported)      # n must be 1, n > 1
                     | multiple\s+candidates                                    # Gemini
                     | number\s+of\s+(?:choices|completions|candidates)""", re.IGNORECASE | re.VERBOSE)
_MODEL_TEXT = re.compile(r"""(?:unknown|invalid|unsupported|no\s+such)\s+model
                         | model\b[^\n]{0,120}?\b(?:does\s+not\s+exist|not\s+found|not\s+exist|is\s+not\s+available)
                         | model_not_found""", re.IGNORECASE | re.VERBOSE)
_PARAM_TEXT = re.compile(r"""unsupported\s*(?:_|\s)?(?:parameter|param|value)|does\s+not\s+support\s+param
                         | not\s+supported\s+with\s+this\s+model|extra\s+(?:inputs|fields)\s+(?:are\s+)?not\s+permitted
                         | unrecognized\s+request\s+argument|unknown\s+(?:parameter|field)""", re.IGNORECASE | re.VERBOSE)
_KEY_TEXT = re.compile(r"""(?:invalid|incorrect|bad|wrong|missing|expired|revoked)\s+(?:x-)?api[\s_-]?key
                       | api[\s_-]?key\s+(?:not\s+valid|is\s+(?:not\s+valid|invalid|expired)|invalid|not\s+found)
                       | invalid_api_key|authentication|unauthori[sz]ed""", re.IGNORECASE | re.VERBOSE)
_PARAM_CODES = frozenset({"unsupported_parameter", "unsupported_value", "extra_forbidden"})


def classify_error(status: int, details: ErrorDetails) -> ErrorClass:
    """What a 4xx answer (not 429) means, from its status and body (PROVIDERS.md, sections 1 and 5).

    ``n_unsupported``: a 400/422 refusing ``n`` (ask again with separate requests). A configuration fault, which
    no retry or bigger tier fixes: ``auth`` (401, 403, a bad key), ``model`` (an unknown model), ``parameter``
    (an unsupported parameter or value), ``not_found`` (another 404: a wrong base_url). Anything else
    (context too long, a filtered prompt, ...) is ``bad_response``.
    """
    text = details.message
    if status in (400, 422) and (details.param == "n" or _N_TEXT.search(text)):
        return "n_unsupported"
    if status in (401, 403):
        return "auth"
    if status not in (400, 404, 422):
        return "bad_response"
    if details.code == "model_not_found" or _MODEL_TEXT.search(text):
        return "model"
    if status == 404:
        return "not_found"
    if details.code in _PARAM_CODES or _PARAM_TEXT.search(text):
        return "parameter"
    if details.code == "invalid_api_key" or _KEY_TEXT.search(text):
        return "auth"
    return "bad_response"


class ProviderPool:
    """One client per model name, created on first use and shared by every task in a process."""

    def __init__(self, *, transport: httpx.BaseTransport | None = None) -> None:
        self._transport = transport
        self._providers: dict[tuple[str, ModelConfig], ChatProvider] = {}

    def get(self, config: ModelConfig) -> ChatProvider:
        key = (config.name, config)  # ModelConfig is frozen: hashable, equal when every field is
        provider = self._providers.get(key)
        if provider is None:
            provider = self._providers[key] = ChatProvider(config, transport=self._transport)
        return provider

    def close(self) -> None:
        for provider in self._providers.values():
            provider.close()
        self._providers.clear()
