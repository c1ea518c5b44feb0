"""The request cache: pay once for a request, however many batches send it.

A request's key is the sha256 of everything that changes a model's answer: the endpoint (``base_url``),
the provider's model id, and the parameters ``cascade.stages.requests.request_params`` sends (rendered
messages, ``n``, max_tokens and which parameter carries it, temperature, response_format with its schema),
plus the first sample index of the request: a model without ``n`` gets k one-sample requests for k samples,
and they stay k different answers. Not the API key, the model's config name, the batch or the job.

Only answers are stored (``cacheable``): never errors, refusals, filtered or cut-off choices, nor an answer
with fewer choices than asked. Rows live in Postgres (``cascade.store.cache``); a hit is recorded as an
attempt with ``cached = true``, the original tokens and ``cost_usd = 0``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cascade.providers import Choice, Completion
from cascade.store.cache import CacheRow

__all__ = ["KEY_VERSION", "Entry", "cacheable", "decode", "encode", "request_key"]

log = logging.getLogger(__name__)

#: Part of every key: a change to what the key means (or to what a stored answer holds) starts afresh.
KEY_VERSION = 1


def request_key(endpoint: str, model: str, params: Mapping[str, Any], sample: int) -> bytes:  # Any: params
    """The key of a request to ``model`` at ``endpoint`` with ``params`` (as sent), from sample ``sample`` on."""
    parts = {"v": KEY_VERSION, "endpoint": endpoint.rstrip("/"), "model": model, "sample": sample, **params}
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Entry:
    """A stored answer: its choices and what the original request used and cost."""

    contents: list[str]
    finish_reasons: list[str | None]
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    served_model: str | None
    cost_usd: Decimal

    def completion(self, latency_ms: int) -> Completion:
        """The answer as if it had just come back (no request id: no request was made)."""
        return Completion(list[str | None](self.contents), list(self.finish_reasons), self.input_tokens,
                          self.output_tokens, latency_ms,
                          choices=tuple(Choice(i, c, r) for i, (c, r) in enumerate(zip(self.contents,
                                                                                        self.finish_reasons,
                                                                                        strict=True))),
                          n_requested=len(self.contents), cached_tokens=self.cached_tokens,
                          reasoning_tokens=self.reasoning_tokens, served_model=self.served_model)


def cacheable(done: Completion, n: int, cap: int) -> bool:
    """Whether an answer may be stored: every asked choice came back with content, none refused, filtered,
    stopped at max_tokens or longer than the task stores (``cap`` chars)."""
    return (done.choices_returned == n and not any(c.blocked for c in done.choices)
            and all(isinstance(c, str) and len(c) <= cap for c in done.contents)
            and not any(r in ("length", "content_filter") for r in done.finish_reasons))


def encode(contents: list[str], finish_reasons: list[str | None]) -> dict[str, Any]:  # Any: JSON
    """The ``answer`` JSON of a cacheable answer (contents as recorded in ``attempts``)."""
    return {"contents": contents, "finish_reasons": finish_reasons}


_BAD_LOGGED: set[bytes] = set()


def decode(row: CacheRow, n: int) -> Entry | None:
    """The entry a row holds; None (logged once per key and process) when it cannot be decoded: a miss."""
    try:
        answer = row.answer
        if isinstance(answer, str):
            answer = json.loads(answer)
        contents, reasons = answer["contents"], answer["finish_reasons"]
        if not (isinstance(contents, list) and isinstance(reasons, list) and len(contents) == n == len(reasons)
                and all(isinstance(c, str) for c in contents)
                and all(r is None or isinstance(r, str) for r in reasons)):
            raise ValueError(f"expected {n} string contents and finish reasons")
        tokens = [row.input_tokens, row.output_tokens, row.cached_tokens, row.reasoning_tokens]
        if not all(isinstance(t, int) and t >= 0 for t in tokens) or row.cost_usd is None:
            raise ValueError("missing tokens or cost")
        return Entry(contents, reasons, int(row.input_tokens or 0), int(row.output_tokens or 0),
                     int(row.cached_tokens or 0), int(row.reasoning_tokens or 0), row.served_model,
                     Decimal(row.cost_usd))
    except (ValueError, TypeError, KeyError) as exc:
        if row.key not in _BAD_LOGGED:
            _BAD_LOGGED.add(row.key)
            log.warning("request cache entry %s cannot be decoded (%s): treated as a miss and sent again",
                        row.key.hex()[:16], exc)
        return None
