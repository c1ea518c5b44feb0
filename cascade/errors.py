"""The one exception hierarchy of cascade.

    CascadeError
     ├─ ConfigError        a cascade.yaml or setting is wrong: file, field path
     ├─ InputError         a submitted row is wrong: source file, line, field
     │   └─ DuplicateKey           two rows of a batch have one key: key, row (store.copy_jobs)
     ├─ ProviderError      a model request failed: model, url, status
     │   ├─ ProviderTimeout        the request timed out (connect or read)
     │   ├─ ProviderUnavailable    connection refused/reset, 5xx
     │   ├─ ProviderRateLimited    429 (or 503 naming a wait), with the longest retry_after the headers ask for
     │   ├─ ProviderBadResponse    HTTP 2xx/4xx whose body is not a usable completion
     │   ├─ ProviderConfigError    401/403/404, or a 400 naming an unknown model, parameter or bad key:
     │   │                         no retry or bigger tier helps; provider_message, reason
     │   └─ ProviderNUnsupported   a 400 refusing n > 1: ask again with one request per sample
     ├─ IllegalTransition  a job move that store.TRANSITIONS does not allow (a bug in the caller)
     ├─ IdempotencyConflict the same idempotency key came with other content
     ├─ IdempotencyKeyTaken a concurrent submit took the idempotency key first (store.insert_batch)
     └─ ServiceUnreachable Postgres or the broker did not answer: service, host (never a password), batch_id
                           of a batch that was committed but not published (the sweeper publishes it)

Database errors that mean something (a taken key, a duplicate row) become these in ``cascade.store``, once.

A failed validation is not an exception: it is a ``Verdict``.
"""

from __future__ import annotations

__all__ = [
    "CascadeError",
    "ConfigError",
    "DuplicateKey",
    "IdempotencyConflict",
    "IdempotencyKeyTaken",
    "IllegalTransition",
    "InputError",
    "ProviderBadResponse",
    "ProviderConfigError",
    "ProviderError",
    "ProviderNUnsupported",
    "ProviderRateLimited",
    "ProviderTimeout",
    "ProviderUnavailable",
    "ServiceUnreachable",
]


class CascadeError(Exception):
    """Root of every error cascade raises on purpose."""


class ConfigError(CascadeError):
    """A config file or setting is invalid; the message names the file and the field path."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None) -> None:
        self.file = file
        self.path = path
        where = ": ".join(p for p in (file, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


class InputError(CascadeError):
    """A submitted row is invalid; the message names the source, the line and the field."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, field: str | None = None) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.reason = message
        where = source + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}" if where else message)


class DuplicateKey(InputError):
    """Two rows of one batch have the same key (Postgres refused the second in the COPY).

    ``row`` is the second row's 1-based position among the rows copied (None when Postgres did not say);
    the producer turns it into the source line.
    """

    def __init__(self, key: str, row: int | None) -> None:
        self.key = key
        self.row = row
        super().__init__(f'duplicate key "{key}"')


class ProviderError(CascadeError):
    """A request to a model failed. ``kind`` is the short name used in ``model_error:<kind>``."""

    kind = "error"

    def __init__(self, message: str, *, model: str = "", url: str = "", status: int | None = None) -> None:
        self.model = model
        self.url = url
        self.status = status
        super().__init__(f"model {model!r} at {url}: {message}" if model else message)


class ProviderTimeout(ProviderError):
    """The request did not complete within the model's timeout."""

    kind = "timeout"


class ProviderUnavailable(ProviderError):
    """The connection failed or the server answered 5xx."""

    kind = "unavailable"


class ProviderRateLimited(ProviderError):
    """The server answered 429, or 503 with a wait; ``retry_after`` is the longest wait its headers ask for
    (Retry-After, retry-after-ms, LiteLLM's llm_provider- copies, spent x-ratelimit resets), in seconds, or None."""

    kind = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ProviderBadResponse(ProviderError):
    """The server answered, but not with a usable chat completion (4xx, empty or non-JSON body)."""

    kind = "bad_response"


class ProviderConfigError(ProviderError):
    """A request that can never succeed as configured: a bad key (401/403), an unknown model or route (404), or a
    400/422 naming an unknown model, an unsupported parameter or value, or an invalid key.

    ``provider_message`` is the provider's own error message (the API key redacted); ``reason`` says which
    fault: ``auth``, ``model``, ``parameter`` or ``not_found``.
    """

    kind = "config"

    def __init__(self, message: str, *, provider_message: str = "", reason: str = "", **kw: object) -> None:
        self.provider_message = provider_message
        self.reason = reason
        super().__init__(message, **kw)  # type: ignore[arg-type]


class ProviderNUnsupported(ProviderError):
    """The server refused ``n`` > 1 (LiteLLM's ``UnsupportedParamsError ... ['n']``, Groq): the samples must be
    asked for as separate requests."""

    kind = "n_unsupported"


class IllegalTransition(CascadeError):
    """A job was asked to move between two statuses that ``store.TRANSITIONS`` does not connect.

    Raised before any SQL runs; it means the calling code is wrong, not that another worker won a race.
    """

    def __init__(self, job_id: int, from_status: str, to_status: str) -> None:
        self.job_id = job_id
        self.from_status = from_status
        self.to_status = to_status
        super().__init__(f"job {job_id}: {from_status} -> {to_status} is not an allowed move (store.TRANSITIONS)")


class IdempotencyConflict(CascadeError):
    """An idempotency key was reused with different content; ``batch_id`` is the first batch."""

    def __init__(self, key: str, batch_id: str) -> None:
        self.key = key
        self.batch_id = batch_id
        super().__init__(
            f"idempotency key {key!r} was already used by batch {batch_id} with different content"
        )


class IdempotencyKeyTaken(CascadeError):
    """Another batch already holds this idempotency key: a concurrent submit with the same key committed first.

    Raised by ``store.insert_batch``; the producer then compares contents as for a key it found up front.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"idempotency key {key!r} is already held by another batch")


class ServiceUnreachable(CascadeError):
    """Postgres or the broker could not be reached. ``host`` is where it was looked for (``host:port`` or a
    socket path, never a password); ``batch_id`` names a batch that was committed before the broker failed:
    its jobs wait in Postgres and the sweeper publishes them once the broker answers again."""

    def __init__(self, service: str, *, host: str = "", detail: str = "", batch_id: str | None = None) -> None:
        self.service = service
        self.host = host
        self.detail = detail
        self.batch_id = batch_id
        where = f" at {host}" if host else ""
        why = f" ({detail})" if detail else ""
        message = f"cannot reach the {service}{where}{why}"
        if batch_id:
            message += (f"; batch {batch_id} is committed and `cascade sweep` will publish its jobs once the "
                        f"{service} is back: do not submit it again")
        super().__init__(message)
