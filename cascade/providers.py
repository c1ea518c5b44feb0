"""Model clients over httpx: OpenAI-compatible ``/chat/completions``.

One ``complete`` call is one HTTP request. Retries, backoff and their bookkeeping live in
``stages`` (every request is an ``attempts`` row); this module only speaks the protocol and
translates httpx's errors into cascade's, once, at the edge.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, TypedDict

import httpx

from cascade.config import ModelConfig
from cascade.errors import (
    ConfigError,
    ProviderBadResponse,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)

__all__ = ["ChatProvider", "Completion", "Message", "ProviderPool"]

#: Bodies larger than this are cut off: a model answering megabytes must not exhaust a worker.
MAX_BODY_BYTES = 32 * 1024 * 1024


class Message(TypedDict):
    role: str
    content: str


@dataclass(frozen=True)
class Completion:
    """The answer to one request: one content per returned choice (None where a choice had none)."""

    contents: list[str | None]
    finish_reasons: list[str | None]
    input_tokens: int
    output_tokens: int
    latency_ms: int


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
        temperature: float,
        response_format: dict[str, Any] | None,  # Any: OpenAI's response_format object
        headers: dict[str, str],
    ) -> Completion:
        """Send one request for ``n`` choices. Raises a ``ProviderError`` subclass on failure."""
        body: dict[str, Any] = {  # Any: a JSON request body
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if n != 1:
            body["n"] = n
        if response_format is not None:
            body["response_format"] = response_format
        started = time.monotonic()
        status, raw, retry_after = self._post(body, headers)
        latency_ms = int((time.monotonic() - started) * 1000)
        self._raise_for_status(status, raw, retry_after)
        return self._parse(raw, latency_ms)

    def _error(self, cls: type[ProviderError], message: str, status: int | None = None) -> ProviderError:
        return cls(message, model=self.config.name, url=self._url, status=status)

    def _post(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes, str | None]:
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
                return response.status_code, b"".join(chunks), response.headers.get("retry-after")
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

    def _raise_for_status(self, status: int, raw: bytes, retry_after: str | None) -> None:
        if status < 400:
            return
        detail = raw[:200].decode("utf-8", "replace")
        if self._secret:
            # A gateway may quote the key back (401 bodies do): it must never reach attempts or jobs.error.
            detail = detail.replace(self._secret, "***")
        if status == 429:
            raise ProviderRateLimited(f"HTTP 429: {detail}", retry_after=_seconds(retry_after),
                                      model=self.config.name, url=self._url, status=status)
        if status >= 500:
            raise self._error(ProviderUnavailable, f"HTTP {status}: {detail}", status)
        raise self._error(ProviderBadResponse, f"HTTP {status}: {detail}", status)

    def _parse(self, raw: bytes, latency_ms: int) -> Completion:
        try:
            data = json.loads(raw)
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            usage = data.get("usage") or {}
            return Completion(
                contents=[_content(c) for c in choices],
                finish_reasons=[c.get("finish_reason") for c in choices],
                input_tokens=max(0, int(usage.get("prompt_tokens") or 0)),
                output_tokens=max(0, int(usage.get("completion_tokens") or 0)),
                latency_ms=latency_ms,
            )
        # RecursionError: JSON nested too deep; OverflowError: int() of a huge float token count.
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
            what = "empty body" if not raw.strip() else f"not a chat completion ({type(exc).__name__})"
            raise self._error(ProviderBadResponse, what, 200) from exc


def _content(choice: dict[str, Any]) -> str | None:  # Any: a JSON choice object
    message = choice.get("message") or {}
    content = message.get("content")
    return content if isinstance(content, str) else None


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date Retry-After: fall back to our own backoff
    return max(0.0, seconds) if math.isfinite(seconds) else None


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
