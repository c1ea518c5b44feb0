"""An OpenAI-compatible chat server for tests, demos, dry runs and evaluation on recordings.

Simulated mode answers from a hash of (seed, model, last user message, sample index), so every
answer, wrong sample and fault is reproducible and predictable through ``SimConfig``. Replay mode
(``cascade sim --replay FILE``) answers with recorded samples (DESIGN.md, "Evaluation on recorded
answers"): a ``model#variant`` recording holds that variant's own samples, indexed from 0 by
``X-Cascade-Variant-Sample`` (falling back to ``X-Cascade-Sample``), so one recording serves every
mixture of variants whatever their order and sizes. Both serve ``/v1/chat/completions``, ``/health``, ``/v1/models`` and ``/stats``.

Like real backends and gateways (PROVIDERS.md), a simulated model can ignore or refuse ``n``, report cached and
reasoning tokens, refuse or filter samples, send its Retry-After in each form gateways use, and send a gateway's
headers (request id, served model, cost). Every such option is off by default, and each draws from its own hash
salt, so configs without them answer exactly as before. The sim never streams: ``stream: true`` gets a 400.
"""

from __future__ import annotations

import _thread
import dataclasses
import email.utils
import hashlib
import json
import math
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cascade.errors import ConfigError

__all__ = [
    "Fault",
    "Outcome",
    "Recording",
    "SeenRequest",
    "SimConfig",
    "SimModel",
    "SimPrice",
    "SimServer",
    "expected_answer",
    "load_recordings",
    "serve",
]

Outcome = Literal["correct", "wrong", "invalid_json", "schema_violation", "too_short"]
Fault = Literal["429", "500", "timeout", "drop", "empty_body", "non_json_body", "garbage", "truncated", "huge"]
_FAULTS: tuple[Fault, ...] = ("429", "500", "timeout", "drop", "empty_body", "non_json_body", "garbage",
                              "truncated", "huge")
_INVALID_JSON = 'Sure! Here is the JSON: {"answer": '
_HUGE_CHARS = 5 * 1024 * 1024
_REFUSAL = "I'm sorry, but I can't help with that request."
Blocked = Literal["refusal", "content_filter"]
_P = Field(0.0, ge=0, le=1)
_T = TypeVar("_T")


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the hash of ``parts``."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2**64


def _hex8(*parts: object) -> str:
    return _digest(*parts).hex()[:8]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(map(str, err["loc"]))
    return f"{where}: {err['msg']}" if where else err["msg"]


def _bucket(u: float, weights: Iterable[tuple[_T, float]]) -> _T | None:
    """The name whose cumulative-probability bucket holds ``u``, or None past the last one."""
    edge = 0.0
    for name, p in weights:
        edge += p
        if u < edge:
            return name
    return None


class SimPrice(BaseModel):
    """USD per million tokens, for the cost a simulated gateway reports (``x-litellm-response-cost``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: Decimal = Field(Decimal(0), ge=0)
    output_per_mtok: Decimal = Field(Decimal(0), ge=0)
    cached_input_per_mtok: Decimal | None = Field(None, ge=0)  # None: cached tokens cost input_per_mtok

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Decimal:
        """The exact cost of one answer; ``cached_tokens`` are part of ``prompt_tokens``."""
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        return ((prompt_tokens - cached_tokens) * self.input_per_mtok + cached_tokens * cached_price
                + completion_tokens * self.output_per_mtok) / Decimal(1_000_000)


class SimModel(BaseModel):
    """How one simulated model behaves: answer quality per sample, latency and faults per request.

    Backend and gateway behaviours (all off by default):
        n_support: ``full`` answers n choices; ``ignored`` answers exactly one (Ollama, LiteLLM with drop_params);
            ``rejected`` answers n > 1 with LiteLLM's 400 ``UnsupportedParamsError ... ['n']``.
        cached_prompt_fraction: this share of the prompt tokens (rounded down) is reported as
            ``usage.prompt_tokens_details.cached_tokens``.
        reasoning_tokens: hidden reasoning tokens per returned choice, counted in ``completion_tokens`` and
            reported as ``usage.completion_tokens_details.reasoning_tokens``.
        p_refusal, p_content_filter: per sample, a choice with ``content: null`` and a ``refusal`` text, or with
            ``finish_reason: content_filter`` and empty content (``SimConfig.blocked`` predicts which).
        retry_after_style: how a 429 says ``retry_after_s``: ``seconds`` (Retry-After: 7), ``http_date``
            (Retry-After: an HTTP date at least that far ahead), ``ms`` (retry-after-ms), ``litellm``
            (llm_provider-retry-after), ``openai_reset`` (x-ratelimit-*-requests spent, reset as ``6m0s``).
        gateway_headers: send ``x-request-id``, ``x-litellm-call-id`` and ``x-litellm-model-name`` on answers.
        served_model: the model the answer says answered (body ``model``, ``x-litellm-model-name``); None: the
            requested one.
        gateway_price: send ``x-litellm-response-cost``, the answer's cost at these prices.
        rpm_limit, tpm_limit: requests and tokens (prompt + completion, as answered) per minute, enforced per fixed
            window of ``limit_window_s`` (a share of the limit each, as OpenAI quantizes its limits), which starts at
            the model's first request: a request over either gets OpenAI's 429 ``rate_limit_exceeded`` with
            ``Retry-After`` and ``x-ratelimit-*`` headers, and counts no attempt (the draws of the requests that
            pass stay the same) and no tokens. With a limit set, every 200 sends ``x-ratelimit-limit`` (per
            minute), ``-remaining`` (in this window) and ``-reset`` (the window's end) for it. A request over the
            token limit is one whose prompt does not fit in what remains.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    p_correct: float = Field(1.0, ge=0, le=1)
    p_invalid_json: float = _P
    p_schema_violation: float = _P
    p_too_short: float = _P
    latency_ms: float = Field(0, ge=0)
    latency_jitter_ms: float = Field(0, ge=0)
    p_429: float = _P
    retry_after_s: float | None = Field(1.0, ge=0)  # None: no Retry-After header
    p_500: float = _P
    p_timeout: float = _P
    hang_s: float = Field(30, ge=0)
    p_drop: float = _P
    p_empty_body: float = _P
    p_non_json_body: float = _P
    p_garbage: float = _P
    p_truncated: float = _P
    p_huge: float = _P
    n_support: Literal["full", "ignored", "rejected"] = "full"
    cached_prompt_fraction: float = _P
    reasoning_tokens: int = Field(0, ge=0)
    p_refusal: float = _P
    p_content_filter: float = _P
    retry_after_style: Literal["seconds", "http_date", "ms", "litellm", "openai_reset"] = "seconds"
    gateway_headers: bool = False
    served_model: str | None = None
    gateway_price: SimPrice | None = None
    rpm_limit: int | None = Field(None, gt=0)
    tpm_limit: int | None = Field(None, gt=0)
    limit_window_s: float = Field(60.0, gt=0, le=60)
    #: a regular expression: a request whose key (its last user message) it matches gets one wrong answer, the
    #: same in every sample: valid, self-consistent and wrong, a mistake no validator sees (audits catch it)
    confidently_wrong: str | None = Field(None, min_length=1, max_length=200)

    def is_confidently_wrong(self, key: str) -> bool:
        return self.confidently_wrong is not None and re.search(self.confidently_wrong, key) is not None

    @model_validator(mode="after")
    def _check_sums(self) -> SimModel:
        if self.p_invalid_json + self.p_schema_violation + self.p_too_short > 1 + 1e-9:
            raise ValueError("p_invalid_json + p_schema_violation + p_too_short exceeds 1")
        if self.p_refusal + self.p_content_filter > 1 + 1e-9:
            raise ValueError("p_refusal + p_content_filter exceeds 1")
        if sum(self.fault_weights()) > 1 + 1e-9:
            raise ValueError("the fault probabilities (p_429 ... p_huge) add up to more than 1")
        return self

    def fault_weights(self) -> tuple[float, ...]:
        """The probabilities of ``_FAULTS``, in the order the draw uses."""
        return (self.p_429, self.p_500, self.p_timeout, self.p_drop, self.p_empty_body, self.p_non_json_body,
                self.p_garbage, self.p_truncated, self.p_huge)


class SimConfig(BaseModel):
    """The simulated models; a name not under ``models`` behaves like ``default``.

    ``unknown_models`` says whether a request for a name not under ``models`` is answered: ``404`` refuses it
    as OpenAI does (``model_not_found``), ``default`` answers it as ``default``, and ``auto`` (the default) is
    ``default`` for a config that lists no models or sets ``default`` itself, and ``404`` otherwise.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    default: SimModel = SimModel()
    models: dict[str, SimModel] = {}
    unknown_models: Literal["auto", "404", "default"] = "auto"
    #: when set, a request whose bearer key differs gets OpenAI's 401 invalid_api_key
    api_key: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> SimConfig:
        """Read a YAML file. Raises ConfigError naming the file and the field path."""
        file = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read sim config: {exc.strerror}", file=file) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", file=file) from None
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_first_error(exc), file=file) from None

    def model(self, name: str) -> SimModel:
        """The behaviour of model ``name``."""
        return self.models.get(name, self.default)

    def knows(self, name: str) -> bool:
        """Whether a request for model ``name`` is answered (see ``unknown_models``), not refused with a 404."""
        if name in self.models:
            return True
        mode = self.unknown_models
        if mode == "auto":
            mode = "default" if not self.models or "default" in self.model_fields_set else "404"
        return mode == "default"

    def blocked(self, model: str, key: str, sample: int) -> Blocked | None:
        """Whether sample number ``sample`` is refused or filtered instead of answered (p_refusal, p_content_filter)."""
        m = self.model(model)
        if not (m.p_refusal or m.p_content_filter):
            return None
        u = _unit(self.seed, "blocked", model, key, sample)
        weights: list[tuple[Blocked, float]] = [("refusal", m.p_refusal), ("content_filter", m.p_content_filter)]
        return _bucket(u, weights)

    def outcome(self, model: str, key: str, sample: int) -> Outcome:
        """What sample number ``sample`` of ``model`` is for the request keyed ``key``."""
        m = self.model(model)
        if m.is_confidently_wrong(key):
            return "wrong"
        u = _unit(self.seed, "outcome", model, key, sample)
        bad: list[tuple[Outcome, float]] = [("invalid_json", m.p_invalid_json),
                                            ("schema_violation", m.p_schema_violation), ("too_short", m.p_too_short)]
        edge = sum(p for _, p in bad)
        return _bucket(u, bad) or ("correct" if u < edge + m.p_correct * (1 - edge) else "wrong")

    def fault(self, model: str, key: str, first_sample: int, attempt: int) -> Fault | None:
        """The fault the ``attempt``-th (0-based) identical request gets, or None for a normal answer."""
        u = _unit(self.seed, "fault", model, key, first_sample, attempt)
        return _bucket(u, zip(_FAULTS, self.model(model).fault_weights(), strict=True))

    def content(self, model: str, key: str, sample: int, response_format: Mapping[str, Any] | None = None) -> str:
        """The message content of a sample when the request has no fault."""
        outcome = self.outcome(model, key, sample)
        if outcome == "correct":
            return expected_answer(self.seed, key, response_format)
        if outcome == "too_short":
            return ""
        if outcome == "invalid_json":
            return _INVALID_JSON
        if outcome == "schema_violation":
            return _violation(_schema_of(response_format))
        confident = self.model(model).is_confidently_wrong(key)
        return self._wrong(model, key, 0 if confident else sample, response_format)

    def _wrong(self, model: str, key: str, sample: int, response_format: Mapping[str, Any] | None) -> str:
        correct = expected_answer(self.seed, key, response_format)
        for retry in range(8):
            wrong = _generate(response_format, (self.seed, "wrong", model, key, sample, retry))
            if wrong != correct:
                return wrong
        return wrong  # a schema with one or two possible values: nothing else is valid

    def latency_s(self, model: str, key: str, first_sample: int, attempt: int) -> float:
        """Seconds to wait before answering: latency_ms plus a deterministic jitter."""
        m = self.model(model)
        jitter = (2 * _unit(self.seed, "latency", model, key, first_sample, attempt) - 1) * m.latency_jitter_ms
        return max(0.0, m.latency_ms + jitter) / 1000


def _schema_of(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not response_format or response_format.get("type") != "json_schema":
        return None
    schema = (response_format.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def expected_answer(seed: int, key: str, response_format: Mapping[str, Any] | None = None) -> str:
    """The correct answer for ``key``, the same for every model and sample.

    A JSON Schema in ``response_format`` gives a compact JSON instance of it; ``json_object`` gives
    ``{"answer": "v<hex8>"}``; no response format gives the text ``answer v<hex8>``.
    """
    return _generate(response_format, (seed, "answer", key))


def _generate(response_format: Mapping[str, Any] | None, salt: tuple[object, ...]) -> str:
    schema = _schema_of(response_format)
    if schema is not None:
        return json.dumps(_instance(schema, schema, "|".join(map(str, salt)), 0), separators=(",", ":"),
                          sort_keys=True)
    if response_format and response_format.get("type") in ("json_object", "json_schema"):
        return json.dumps({"answer": "v" + _hex8(*salt)}, separators=(",", ":"))
    return "answer v" + _hex8(*salt)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        node: Any = root
        for part in filter(None, ref[1:].split("/")):
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
        return _resolve(node, root) if isinstance(node, dict) else {}
    for branch in ("anyOf", "oneOf"):
        if schema.get(branch):
            return _resolve(schema[branch][0], root)
    if schema.get("allOf"):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged.update(_resolve(part, root))
        return merged
    return schema


def _type_of(schema: dict[str, Any]) -> str:
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if isinstance(typ, str):
        return typ
    return "object" if "properties" in schema else "array" if "items" in schema else "string"


def _instance(schema: Any, root: dict[str, Any], salt: str, depth: int) -> Any:  # Any: a JSON value
    schema = _resolve(schema, root) if isinstance(schema, dict) else {}
    h = int.from_bytes(_digest(salt)[:8], "big")
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][h % len(schema["enum"])]
    typ = _type_of(schema)
    if typ == "object":
        props = (schema.get("properties") or {}) if depth < 8 else {}
        return {name: _instance(sub, root, f"{salt}/{name}", depth + 1) for name, sub in props.items()}
    if typ == "array":
        lo, hi = schema.get("minItems", 1), schema.get("maxItems", 3)
        count = min(max(1 + h % 3, lo), max(hi, lo)) if depth < 8 else 0
        return [_instance(schema.get("items"), root, f"{salt}/{i}", depth + 1) for i in range(count)]
    if typ in ("integer", "number"):
        return _number(schema, h, typ == "integer")
    if typ == "boolean":
        return h % 2 == 0
    if typ == "null":
        return None
    text = "v" + _digest(salt).hex()[:8]
    text += "x" * max(0, schema.get("minLength", 0) - len(text))
    return text[: schema["maxLength"]] if "maxLength" in schema else text


def _bound(schema: dict[str, Any], key: str, exclusive: str, step: float) -> float | None:
    value = schema.get(key)
    ex = schema.get(exclusive)
    if value is None and isinstance(ex, int | float) and not isinstance(ex, bool):
        value = ex + step
    return value if isinstance(value, int | float) else None


def _number(schema: dict[str, Any], h: int, integer: bool) -> int | float:
    step = 1 if integer else 0.01
    lo, hi = _bound(schema, "minimum", "exclusiveMinimum", step), _bound(schema, "maximum", "exclusiveMaximum", -step)
    if integer:
        lo, hi = (math.ceil(lo) if lo is not None else None), (math.floor(hi) if hi is not None else None)
        if lo is not None and hi is not None:
            return lo + h % max(hi - lo + 1, 1)
        base: int | float = h % 1000
    elif lo is not None and hi is not None:
        return lo + (hi - lo) * (h % 100001) / 100000
    else:
        base = h % 100000 / 100
    return lo + base if lo is not None else hi - base if hi is not None else base


def _violation(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return json.dumps(["not", "an", "object"])
    typ = schema.get("type", "object" if "properties" in schema else None)
    allowed = set(typ) if isinstance(typ, list) else {typ}
    values = {"array": ["schema", "violation"], "object": {"schema": "violation"}, "string": "schema violation"}
    return json.dumps(next((v for t, v in values.items() if t not in allowed), None))


class RecordedSample(BaseModel):
    """One recorded completion."""

    model_config = ConfigDict(frozen=True)

    content: str
    completion_tokens: int = Field(ge=0)


class RecordedResponse(BaseModel):
    """The recorded samples of one model (or ``model#variant``) for one input."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = Field(ge=0)
    samples: list[RecordedSample]


class Recording(BaseModel):
    """One line of a replay file: an input, its gold answer and each model's recorded samples."""

    model_config = ConfigDict(frozen=True)

    id: str
    input: dict[str, Any]  # Any: the row's fields, as submitted
    gold: Any = None  # Any: whatever the dataset calls correct
    responses: dict[str, RecordedResponse] = {}

    def needles(self) -> list[str]:
        """The strings a prompt must contain to match: each input value, rendered as prompts render it."""
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in self.input.values()]


def load_recordings(path: str | Path) -> list[Recording]:
    """Read a JSONL replay file. Raises ConfigError naming the file and the line."""
    file = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read recordings: {exc.strerror}", file=file) from None
    recordings: list[Recording] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = Recording.model_validate_json(line)
        except ValidationError as exc:
            raise ConfigError(_first_error(exc), file=file, path=f"line {number}") from None
        if rec.id in seen:
            raise ConfigError(f"duplicate recording id {rec.id!r}", file=file, path=f"line {number}")
        seen.add(rec.id)
        recordings.append(rec)
    return recordings


class _HttpError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param  # with code: an OpenAI-style invalid_request_error body
        self.code = code


@dataclass(frozen=True)
class _Request:
    model: str
    variant: str | None
    first: int
    variant_first: int  # the first sample's index within its variant (replay indexes model#variant by it)
    n: int
    key: str
    prompt_tokens: int
    response_format: Mapping[str, Any] | None
    bearer: str | None = None  # the Authorization header's key
    params: frozenset[str] = frozenset()  # the body's top-level keys (temperature, max_tokens, ...)


@dataclass(frozen=True)
class SeenRequest:
    """One request as the sim received it (``SimServer.seen``), for tests that check what was sent and when."""

    at: float  # time.monotonic() on arrival
    model: str
    first: int
    n: int
    params: frozenset[str]
    status: int = 0  # filled in once answered


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    tokens: int = 0  # usage.total_tokens of an answer


_STATIC_REPLIES: dict[Fault | None, _Reply] = {
    "drop": _Reply(0, drop=True), "empty_body": _Reply(200), "non_json_body": _Reply(200, b"<html>oops</html>", "text/html")}


def _text(content: Any) -> str:  # Any: a message content, a string or a list of parts
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _parse(raw: bytes, headers: Message[str, str]) -> _Request:
    try:
        body = json.loads(raw)
        messages = body["messages"]
        texts = [(m.get("role"), _text(m.get("content"))) for m in messages]
        first, n = int(headers.get("X-Cascade-Sample") or 0), int(body.get("n") or 1)
        variant_first = int(headers.get("X-Cascade-Variant-Sample") or first)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _HttpError(400, f"not a chat completion request: {exc!r}") from None
    if body.get("stream"):
        raise _HttpError(400, "stream: true is not supported: cascade sim answers whole completions only "
                              "(send \"stream\": false or leave it out)", param="stream", code="unsupported_value")
    model = headers.get("X-Cascade-Model") or body.get("model")
    users = [text for role, text in texts if role == "user"]
    if not model or not users or n < 1 or first < 0 or variant_first < 0:
        raise _HttpError(400, "a request needs a model, a user message, n >= 1 and X-Cascade-Sample >= 0")
    rf = body.get("response_format")
    auth = headers.get("Authorization") or ""
    return _Request(model=str(model), variant=headers.get("X-Cascade-Variant") or None, first=first,
                    variant_first=variant_first, n=n,
                    key=users[-1], prompt_tokens=1 + sum(len(t) for _, t in texts) // 4,
                    response_format=rf if isinstance(rf, dict) else None,
                    bearer=auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None,
                    params=frozenset(body))


def _json(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:  # Any: a JSON value
    return _Reply(status, json.dumps(data).encode(), headers=headers)


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _json(status, {"error": {"message": message, "type": "cascade_sim", "code": status}}, headers)


def _request_error(status: int, message: str, param: str | None, code: str | None) -> _Reply:
    """An error body shaped as OpenAI's: the shape client libraries and cascade's providers read."""
    return _json(status, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                    "code": code}})


def _http_error(exc: _HttpError) -> _Reply:
    return _request_error(exc.status, str(exc), exc.param, exc.code) if exc.code else _error(exc.status, str(exc))


@dataclass(frozen=True)
class _Answer:
    """What a 200 says besides its contents: per-choice finish reasons and refusals, usage and headers."""

    finish: tuple[str, ...]
    refusals: tuple[str | None, ...] = ()
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # per choice
    model: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    price: SimPrice | None = None  # set: send x-litellm-response-cost for the usage reported


def _choices(contents: list[str | None], answer: _Answer) -> list[dict[str, Any]]:  # Any: JSON objects
    choices: list[dict[str, Any]] = []  # Any: JSON objects
    for i, content in enumerate(contents):
        message: dict[str, Any] = {"role": "assistant", "content": content}  # Any: a JSON object
        if i < len(answer.refusals) and answer.refusals[i] is not None:
            message["refusal"] = answer.refusals[i]
        choices.append({"index": i, "message": message, "finish_reason": answer.finish[i]})
    return choices


def _completion(req: _Request, contents: list[str | None], answer: _Answer, completion_tokens: int | None = None,
                prompt_tokens: int | None = None) -> _Reply:
    prompt = req.prompt_tokens if prompt_tokens is None else prompt_tokens
    texts = [c if c is not None else r or "" for c, r in zip(contents, answer.refusals or [None] * len(contents),
                                                              strict=True)]
    done = sum(1 + len(c) // 4 for c in texts) if completion_tokens is None else completion_tokens
    done += answer.reasoning_tokens * len(contents)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    if answer.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": answer.cached_tokens}
    if answer.reasoning_tokens:
        usage["completion_tokens_details"] = {"reasoning_tokens": answer.reasoning_tokens * len(contents)}
    headers = answer.headers
    if answer.price is not None:
        cost = answer.price.cost(prompt, done, answer.cached_tokens)
        headers += (("x-litellm-response-cost", format(cost, "f")),)
    return dataclasses.replace(_json(200, {
        "id": "chatcmpl-" + _hex8(req.model, req.key, req.first, time.monotonic_ns()),
        "object": "chat.completion", "created": int(time.time()), "model": answer.model or req.model,
        "choices": _choices(contents, answer), "usage": usage,
    }, headers), tokens=prompt + done)


def _go_duration(seconds: float) -> str:
    """A duration the way OpenAI's x-ratelimit-reset-* headers write it: ``20ms``, ``7s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(seconds, 60)
    hours, mins = divmod(int(minutes), 60)
    return (f"{hours}h" if hours else "") + (f"{mins}m" if hours or mins else "") + f"{secs:g}s"


def _retry_headers(m: SimModel, now: float) -> tuple[tuple[str, str], ...]:
    """How a 429 says to wait ``retry_after_s``, in the model's ``retry_after_style``."""
    wait = m.retry_after_s
    if wait is None:
        return ()
    if m.retry_after_style == "http_date":  # whole seconds: the date is at least ``wait`` ahead
        return (("Retry-After", email.utils.formatdate(math.ceil(now + wait), usegmt=True)),)
    if m.retry_after_style == "ms":
        return (("retry-after-ms", f"{wait * 1000:g}"),)
    if m.retry_after_style == "litellm":
        return (("llm_provider-retry-after", f"{wait:g}"),)
    if m.retry_after_style == "openai_reset":  # the request limit is spent; the token limit has room
        return (("x-ratelimit-limit-requests", "60"), ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", _go_duration(wait)), ("x-ratelimit-limit-tokens", "150000"),
                ("x-ratelimit-remaining-tokens", "149000"), ("x-ratelimit-reset-tokens", "6ms"))
    return (("Retry-After", f"{wait:g}"),)


def _n_rejected(name: str) -> _Reply:
    """LiteLLM's answer when the upstream provider takes no ``n`` and drop_params is off."""
    return _json(400, {"error": {
        "message": f"litellm.UnsupportedParamsError: anthropic does not support parameters: ['n'], for model={name}. "
                   "To drop these, set `litellm.drop_params=True` or for proxy:\n\n`litellm_settings:\n"
                   " drop_params: true`\n", "type": "None", "param": "None", "code": "400"}})


@dataclass
class _Window:
    """One model's fixed 60 s rate-limit window: when it started, and what it has counted."""

    start: float
    requests: int = 0
    tokens: int = 0

    def roll(self, now: float, length: float) -> None:
        if now - self.start >= length:
            self.start += length * ((now - self.start) // length)
            self.requests = self.tokens = 0

    def headers(self, m: SimModel, now: float) -> tuple[tuple[str, str], ...]:
        reset = _go_duration(max(0.001, round(self.start + m.limit_window_s - now, 3)))
        out: list[tuple[str, str]] = []
        for dim, limit, used in (("requests", m.rpm_limit, self.requests), ("tokens", m.tpm_limit, self.tokens)):
            if limit is not None:
                out += [(f"x-ratelimit-limit-{dim}", str(limit)),
                        (f"x-ratelimit-remaining-{dim}", str(max(0, _quota(limit, m) - used))),
                        (f"x-ratelimit-reset-{dim}", reset)]
        return tuple(out)


def _quota(per_minute: int, m: SimModel) -> int:
    """What one window of ``m`` allows of a per-minute limit."""
    return max(1, int(per_minute * m.limit_window_s / 60))


def _over_limit(req: _Request, m: SimModel, window: _Window, now: float) -> _Reply:
    """OpenAI's 429 for a request over ``rpm_limit`` or ``tpm_limit``, with its headers."""
    if m.rpm_limit is not None and window.requests + 1 > _quota(m.rpm_limit, m):
        what, limit, used, asked = "requests per min (RPM)", m.rpm_limit, window.requests, 1
    else:
        what, limit, used, asked = "tokens per min (TPM)", m.tpm_limit or 0, window.tokens, req.prompt_tokens
    wait = window.start + m.limit_window_s - now
    message = (f"Rate limit reached for {req.model} on {what}: Limit {limit}, Used {used}, Requested {asked}. "
               f"Please try again in {wait:.3f}s.")
    body = {"error": {"message": message, "type": what.split()[0], "param": None, "code": "rate_limit_exceeded"}}
    return _json(429, body, (*window.headers(m, now), ("Retry-After", str(max(1, math.ceil(wait))))))


class _Sim:
    """The server's state and answers; handler threads share one instance."""

    def __init__(self, config: SimConfig, recordings: list[Recording] | None) -> None:
        self.config = config
        self.recordings = None if recordings is None else [(r, r.needles()) for r in recordings]
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._attempts: Counter[tuple[str, str, int, int]] = Counter()
            self._by_model: Counter[str] = Counter()
            self._in_flight = getattr(self, "_in_flight", 0)
            self._peak = self._in_flight
            self.seen: deque[SeenRequest] = deque(maxlen=100_000)
            self._windows: dict[str, _Window] = {}

    def stats(self) -> dict[str, Any]:  # Any: a JSON object
        with self._lock:
            return {"requests": sum(self._by_model.values()), "by_model": dict(self._by_model),
                    "in_flight": self._in_flight, "max_in_flight": self._peak}

    def answer(self, req: _Request) -> _Reply:
        """Log and count the request, wait its latency, then simulate or replay; in flight until it returns."""
        seen = SeenRequest(time.monotonic(), req.model, req.first, req.n, req.params)
        reply = self._answer(req)
        with self._lock:
            self.seen.append(dataclasses.replace(seen, status=reply.status))
        return reply

    def _answer(self, req: _Request) -> _Reply:
        with self._lock:
            self._by_model[req.model] += 1
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            refused = self._refuse(req)
            limited = None if refused is not None else self._limit(req)
            if limited is not None:  # counts no attempt: the draws of the requests that pass stay the same
                return limited
            with self._lock:
                attempt = self._attempts[(req.model, req.key, req.first, req.n)]
                self._attempts[(req.model, req.key, req.first, req.n)] += 1
            if refused is not None:  # a gateway refuses these before any model runs: no latency
                return refused
            self.stopping.wait(self.config.latency_s(req.model, req.key, req.first, attempt))
            reply = self._replay(req) if self.recordings is not None else self._simulate(req, attempt)
            return self._count(req, reply)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _limit(self, req: _Request) -> _Reply | None:
        """The 429 of a request over its model's ``rpm_limit``/``tpm_limit``; None (and counted) when it fits."""
        m = self.config.model(req.model)
        if m.rpm_limit is None and m.tpm_limit is None:
            return None
        now = time.monotonic()
        with self._lock:
            window = self._windows.setdefault(req.model, _Window(now))
            window.roll(now, m.limit_window_s)
            if ((m.rpm_limit is None or window.requests < _quota(m.rpm_limit, m))
                    and (m.tpm_limit is None or window.tokens + req.prompt_tokens <= _quota(m.tpm_limit, m))):
                window.requests += 1
                window.tokens += req.prompt_tokens
                return None
            return _over_limit(req, m, window, now)

    def _count(self, req: _Request, reply: _Reply) -> _Reply:
        """With limits: count an answer's tokens and add the ``x-ratelimit-*`` headers (its prompt was counted on
        arrival, as an estimate, and is replaced by the real usage)."""
        m = self.config.model(req.model)
        if (m.rpm_limit is None and m.tpm_limit is None) or reply.status != 200:
            return reply
        with self._lock:
            window = self._windows.get(req.model)
            if window is None:
                return reply
            now = time.monotonic()
            window.roll(now, m.limit_window_s)
            window.tokens = max(0, window.tokens + reply.tokens - req.prompt_tokens)
            return dataclasses.replace(reply, headers=reply.headers + window.headers(m, now))

    def _refuse(self, req: _Request) -> _Reply | None:
        """The 404 for a model the sim does not serve, or the 400 of a model that rejects ``n`` > 1."""
        if self.recordings is not None:
            return None  # a replay answers 404 per recording, naming what was recorded
        cfg = self.config
        if cfg.api_key is not None and req.bearer != cfg.api_key:
            return _request_error(401, "Incorrect API key provided. You can find your API key at "
                                       "https://platform.openai.com/account/api-keys.", None, "invalid_api_key")
        if not cfg.knows(req.model):
            served = ", ".join(sorted(cfg.models))
            return _request_error(404, f"The model `{req.model}` does not exist in this cascade sim (it serves: "
                                       f"{served}; set unknown_models: default to answer any name as `default`)",
                                  "model", "model_not_found")
        if req.n > 1 and cfg.model(req.model).n_support == "rejected":
            return _n_rejected(req.model)
        return None

    def _simulate(self, req: _Request, attempt: int) -> _Reply:
        cfg, m = self.config, self.config.model(req.model)
        fault = cfg.fault(req.model, req.key, req.first, attempt)
        if fault == "429":
            return _error(429, "rate limited (simulated)", _retry_headers(m, time.time()))
        if fault == "500":
            return _error((500, 502, 503)[int(_unit(cfg.seed, "status", req.model, req.key, attempt) * 3)],
                          "server error (simulated)")
        if fault in _STATIC_REPLIES:
            return _STATIC_REPLIES[fault]
        if fault == "timeout":
            self.stopping.wait(m.hang_s)
        n = 1 if m.n_support == "ignored" else req.n
        contents = [cfg.content(req.model, req.key, req.first + i, req.response_format) for i in range(n)]
        if fault == "garbage":
            contents = ["".join(_digest(cfg.seed, "garbage", req.key, i, j).hex() + " ~#%" for j in range(3))
                        for i in range(n)]
        elif fault == "huge":
            contents = ["x" * _HUGE_CHARS for _ in contents]
        elif fault == "truncated":
            return _completion(req, [c[: len(c) // 2] for c in contents], self._extras(req, m, ("length",) * n))
        blocked = [cfg.blocked(req.model, req.key, req.first + i) for i in range(n)]
        answer = self._extras(req, m, tuple("content_filter" if b == "content_filter" else "stop" for b in blocked),
                              tuple(_REFUSAL if b == "refusal" else None for b in blocked))
        return _completion(req, [None if b == "refusal" else "" if b else c for b, c in zip(blocked, contents,
                                                                                          strict=True)], answer)

    def _extras(self, req: _Request, m: SimModel, finish: tuple[str, ...],
                refusals: tuple[str | None, ...] = ()) -> _Answer:
        """The usage details and gateway headers ``m`` adds to an answer."""
        cached = int(req.prompt_tokens * m.cached_prompt_fraction)
        served = m.served_model or req.model
        headers: list[tuple[str, str]] = []
        if m.gateway_headers:
            call = _digest(req.model, req.key, req.first, time.monotonic_ns()).hex()
            call_id = f"{call[:8]}-{call[8:12]}-{call[12:16]}-{call[16:20]}-{call[20:32]}"
            headers += [("x-request-id", "req_" + call[:24]), ("x-litellm-call-id", call_id),
                        ("x-litellm-model-name", served)]
        return _Answer(finish=finish, refusals=refusals, cached_tokens=cached, reasoning_tokens=m.reasoning_tokens,
                       model=served, headers=tuple(headers), price=m.gateway_price)

    def _replay(self, req: _Request) -> _Reply:
        rec = self._match(req.key)
        model_key = f"{req.model}#{req.variant}" if req.variant else req.model
        resp = rec.responses.get(model_key)
        if resp is None:
            raise _HttpError(404, f"recording {rec.id!r} has no responses for model key {model_key!r} "
                                  f"(recorded: {', '.join(sorted(rec.responses)) or 'none'})")
        first = req.variant_first if req.variant else req.first
        samples = resp.samples[first: first + req.n]
        if not samples:
            raise _HttpError(404, f"recording {rec.id!r} has {len(resp.samples)} samples for {model_key!r}; "
                                  f"sample {first} was asked for")
        return _completion(req, [s.content for s in samples], _Answer(finish=("stop",) * len(samples)),
                           prompt_tokens=resp.prompt_tokens, completion_tokens=sum(s.completion_tokens for s in samples))

    def _match(self, message: str) -> Recording:
        assert self.recordings is not None
        hits = [(sum(map(len, needles)), rec) for rec, needles in self.recordings
                if all(n in message for n in needles)]
        if not hits:
            raise _HttpError(404, f"no recording matches the last user message {message[:80]!r}")
        longest = max(size for size, _ in hits)
        best = [rec for size, rec in hits if size == longest]
        if len(best) > 1:
            raise _HttpError(409, f"several recordings match the last user message: {[r.id for r in best]}")
        return best[0]


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: 300 clients may connect at once

    def __init__(self, address: tuple[str, int], sim: _Sim, *, reuse_port: bool = False) -> None:
        self.sim = sim
        self.allow_reuse_port = reuse_port  # socketserver sets SO_REUSEPORT before bind when this is true
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:  # Any: socketserver's signature
        # threading.Thread.start() waits until the new thread runs, which serializes accepts behind the GIL
        # when hundreds of connections arrive at once; a bare thread lets the accept loop move on. Like a
        # daemon thread it dies with the process, and stop() never waits for it (a p_timeout handler hangs).
        _thread.start_new_thread(self.process_request_thread, (request, client_address))

    def handle_error(self, request: Any, client_address: Any) -> None:  # Any: socketserver's signature
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is not our error
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes; Nagle would hold the body for 40 ms
    timeout = 300  # an idle keep-alive connection frees its thread after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # Any: the base class's signature
        pass

    def do_GET(self) -> None:
        routes: dict[str, Callable[[], Any]] = {"/health": lambda: {"ok": True}, "/stats": self.server.sim.stats,
                  "/v1/models": lambda: {"object": "list", "data": self._models()}}
        route = routes.get(self.path.split("?")[0])
        self._send(_json(200, route()) if route else _error(404, f"no route GET {self.path}"))

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        if path == "/stats/reset":
            self.server.sim.reset()
            self._send(_json(200, {"ok": True}))
        elif path in ("/v1/chat/completions", "/chat/completions"):
            self._send(self._chat(raw))
        else:
            self._send(_error(404, f"no route POST {self.path}"))

    def _chat(self, raw: bytes) -> _Reply:
        try:
            return self.server.sim.answer(_parse(raw, self.headers))
        except _HttpError as exc:
            return _http_error(exc)

    def _models(self) -> list[dict[str, Any]]:  # Any: JSON objects
        sim = self.server.sim
        names = {k.split("#")[0] for r, _ in sim.recordings for k in r.responses} if sim.recordings else set()
        return [{"id": n, "object": "model", "owned_by": "cascade-sim"} for n in sorted(names | set(sim.config.models))]

    def _send(self, reply: _Reply) -> None:
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)


class SimServer:
    """A sim on a real port, run in a background thread (``start``) or in the foreground (``serve_forever``).

    Args:
        config: the simulated models; ``SimConfig()`` (every answer correct, no faults) when None.
        recordings: replay these instead of simulating; the config then only sets latency.
        host: the address to bind.
        port: the port to bind; 0 picks a free one (see ``url``).
        reuse_port: share the port with other sims started the same way (SO_REUSEPORT: the kernel spreads
            connections over them), so that a load test has as many sim processes as it needs. Each keeps its
            own counters.
    """

    def __init__(self, config: SimConfig | None = None, *, recordings: list[Recording] | None = None,
                 host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> None:
        self.config = config or SimConfig()
        self._sim = _Sim(self.config, recordings)
        self._httpd = _Server((host, port), self._sim, reuse_port=reuse_port)
        self._thread: threading.Thread | None = None

    def seen(self) -> list[SeenRequest]:
        """The requests received so far (the last 100,000), oldest first."""
        with self._sim._lock:
            return list(self._sim.seen)

    def reconfigure(self, config: SimConfig) -> None:
        """Serve ``config`` from the next request on (a fixed key, a model added), on the same port."""
        self.config = self._sim.config = config

    @property
    def url(self) -> str:
        """The base URL an OpenAI client uses, e.g. ``http://127.0.0.1:8080/v1``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> Self:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True,
                                        name="cascade-sim")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and close the socket. Safe to call twice."""
        self._sim.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve in this thread until KeyboardInterrupt."""
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self._sim.stopping.set()
            self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(*, host: str, port: int, config_path: str | None, seed: int | None, replay: str | None,
          reuse_port: bool = False) -> None:
    """Run ``cascade sim``: announce the URL on stderr, then serve until interrupted.

    Raises:
        ConfigError: the sim config or the replay file is invalid.
    """
    config = SimConfig.load(config_path) if config_path else SimConfig()
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    server = SimServer(config, recordings=load_recordings(replay) if replay else None, host=host, port=port,
                       reuse_port=reuse_port)
    print(f"cascade sim listening on {server.url}", file=sys.stderr, flush=True)
    server.serve_forever()
