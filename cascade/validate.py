"""Checking model output and voting between samples: pure functions, no I/O, no clock.

A sample is checked for length, JSON and JSON Schema (``check_sample``). Valid samples vote on
the canonical form of their answer (``canonicalize``); ``vote`` turns k samples into a ``Verdict``.
A failed validation is an expected outcome, returned as a ``Verdict``, never raised.

Reason codes (DESIGN.md "Validation"): ``too_short``, ``too_long``, ``invalid_json``,
``schema:<json-pointer>:<validator>``, ``inconsistent``, ``model_error:<kind>``, ``custom:<name>``.
Human text goes in the detail, never in the code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from cascade.config import Length

__all__ = [
    "Reason",
    "Verdict",
    "answer_key",
    "canonicalize",
    "check_sample",
    "model_error",
    "vote",
]

_Output = Literal["json", "text"]

# Longest detail kept on a reason (schema messages can quote a whole answer).
_MAX_DETAIL = 200
# Deepest JSON nesting accepted; deeper answers would exhaust the recursion limit downstream.
_MAX_DEPTH = 100
# Integral numbers with at most this many digits are written out in full, the way json.loads
# reads them back as exact ints (CPython's default int/str limit); beyond it (1e999999) they keep
# their exponent instead of being expanded to a megabyte of zeros.
_MAX_PLAIN_DIGITS = 4300

_FENCE = re.compile(r"\A```(?:json)?[ \t]*\r?\n(.*?)\r?\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Reason:
    """Why a sample or a verdict failed: a stable ``code`` for machines, a ``detail`` for people."""

    code: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        """The reason as a JSON object ``{"code": ..., "detail": ...}``."""
        return {"code": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Verdict:
    """The outcome of validating one stage: k samples checked and voted on.

    Attributes:
        passed: Whether the answer is accepted.
        reasons: Why it was not (empty when ``passed``).
        result: The chosen answer (parsed JSON, or the text); None when no sample was valid.
        agreement: Votes of the majority answer divided by k; None when no sample was valid.
        votes: Votes of the majority answer.
        samples: k, the configured number of samples.
    """

    passed: bool
    reasons: tuple[Reason, ...]
    result: Any | None  # Any: a parsed JSON value or the text
    agreement: Decimal | None
    votes: int
    samples: int


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def _pointer(path: Sequence[str | int]) -> str:
    """RFC 6901 JSON pointer: "" for the root, ``~`` and ``/`` escaped in each segment."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Draft202012Validator:
    # Cached by the schema's canonical dump: a stage checks k samples against one schema.
    return Draft202012Validator(json.loads(schema_json))


def _schema_reason(value: Any, schema: dict[str, Any]) -> Reason | None:  # Any: parsed JSON
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = best_match(validator.iter_errors(value))
    if error is None:
        return None
    return Reason(f"schema:{_pointer(list(error.absolute_path))}:{error.validator}", _truncate(error.message))


def _reject_constant(name: str) -> Any:  # Any: json.loads' parse_constant hook type
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"number out of range: {text[:40]}")
    return number


def _too_deep(value: Any, limit: int) -> bool:  # Any: parsed JSON
    stack: list[tuple[Any, int]] = [(value, 1)]  # Any: parsed JSON
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _parse_json(text: str) -> tuple[Any | None, Reason | None]:  # Any: parsed JSON
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        return None, Reason("invalid_json", f"nested deeper than {_MAX_DEPTH} levels")
    except ValueError as exc:  # JSONDecodeError, plus the hooks above and the int digit limit
        return None, Reason("invalid_json", _truncate(str(exc)))
    if _too_deep(value, _MAX_DEPTH):
        return None, Reason("invalid_json", f"nested deeper than {_MAX_DEPTH} levels")
    return value, None


def _length_reason(text: str, length: Length) -> Reason | None:
    if len(text) < length.min_chars:
        return Reason("too_short", f"{len(text)} chars, need at least {length.min_chars}")
    if len(text) > length.max_chars:
        return Reason("too_long", f"{len(text)} chars, at most {length.max_chars} allowed")
    return None


def check_sample(
    text: str | None,
    *,
    output: _Output,
    schema: dict[str, Any] | None,  # Any: a JSON Schema document
    length: Length,
) -> tuple[Any | None, list[Reason]]:  # Any: parsed JSON or the text
    """Check one sample: length on the raw text, then JSON parsing and the schema (json output).

    A missing sample (``None``) is ``too_short`` ("no sample returned"). ``too_long`` stops the
    checks (a huge answer is never parsed); ``too_short`` does not, so its list may carry a second
    reason. For json output one surrounding markdown fence (```` ```json ````) is stripped, NaN and
    Infinity are rejected, and nesting deeper than 100 levels is ``invalid_json``.

    Returns:
        ``(value, [])`` when valid, where value is the parsed JSON or the text unchanged;
        ``(None, reasons)`` otherwise.
    """
    if text is None:
        return None, [Reason("too_short", "no sample returned")]
    reasons: list[Reason] = []
    too = _length_reason(text, length)
    if too is not None:
        reasons.append(too)
        if too.code == "too_long":
            return None, reasons
    if output == "text":
        return (None, reasons) if reasons else (text, [])
    value, bad = _parse_json(text)
    if bad is None and schema is not None:
        bad = _schema_reason(value, schema)
    if bad is not None:
        reasons.append(bad)
    return (None, reasons) if reasons else (value, [])


def _number(value: float | Decimal) -> str:
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite():
        return "NaN" if number.is_nan() else ("-Infinity" if number.is_signed() else "Infinity")
    # Strip trailing zeros by hand: Decimal.normalize() would round to the context's 28 digits.
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    kept = list(digits)
    while len(kept) > 1 and kept[-1] == 0:
        kept.pop()
        exponent += 1
    if kept == [0]:
        return "0"  # -0 and 0E+5 are zero too
    if exponent >= 0 and len(kept) + exponent <= _MAX_PLAIN_DIGITS:
        return ("-" if sign else "") + "".join(map(str, kept)) + "0" * exponent
    return str(Decimal((sign, tuple(kept), exponent)))


def _canonical(value: Any) -> str:  # Any: a JSON value
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # before int: True is an int, but true != 1
    if isinstance(value, int | float | Decimal):
        return _number(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(item) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("canonicalize: object keys must be strings")
        items = sorted(value.items())
        return "{" + ",".join(json.dumps(key) + ":" + _canonical(item) for key, item in items) + "}"
    raise TypeError(f"canonicalize: {type(value).__name__} is not a JSON value")


def canonicalize(value: Any, fields: Sequence[str] | None = None) -> str:  # Any: a JSON value
    """The canonical JSON text of an answer: equal answers give equal text.

    Keys are sorted, there is no whitespace, numerically equal numbers are equal (18, 18.0 and
    1.8e1 all give ``18``; huge exponents stay exponents), booleans differ from numbers, and
    strings are compared exactly, except that a top-level string (a text answer) is stripped of
    surrounding whitespace. With ``fields``, a dict is projected onto those keys (a missing key is
    null); any other value is canonicalized whole.

    Raises:
        TypeError: ``value`` is not made of JSON types (dict keys must be strings).
    """
    if isinstance(value, str):
        return json.dumps(value.strip())
    if fields is not None and isinstance(value, dict):
        value = {field: value.get(field) for field in fields}
    return _canonical(value)


def answer_key(value: Any, fields: Sequence[str] | None = None) -> str:  # Any: a JSON value
    """A short fixed-size name of an answer's canonical form (``canonicalize``): equal answers get equal keys.
    ``validations.answer_key`` stores it, so answers can be compared in SQL without storing them again."""
    return hashlib.sha256(canonicalize(value, fields).encode()).hexdigest()[:16]


@dataclass
class _Tally:
    votes: int
    value: Any  # Any: the parsed answer of the first sample with this canonical form


def _tally(values: Sequence[Any], fields: Sequence[str] | None) -> list[_Tally]:  # Any: parsed answers
    # A dict keeps insertion order, so ties go to the answer whose first vote came earliest.
    tallies: dict[str, _Tally] = {}
    for value in values:
        key = canonicalize(value, fields)
        if key in tallies:
            tallies[key].votes += 1
        else:
            tallies[key] = _Tally(1, value)
    return list(tallies.values())


def _failure_reasons(
    invalid: Sequence[Reason], votes: int, k: int, min_agreement: Decimal, any_valid: bool
) -> tuple[Reason, ...]:
    reasons: dict[str, Reason] = {}
    if any_valid:
        reasons["inconsistent"] = Reason("inconsistent", f"{votes}/{k} samples agree, need {min_agreement}")
    for reason in invalid:
        reasons.setdefault(reason.code, reason)  # first detail seen for each code
    return tuple(reasons.values())


def vote(
    texts: Sequence[str | None],
    *,
    samples: int,
    min_agreement: Decimal,
    output: _Output,
    schema: dict[str, Any] | None,  # Any: a JSON Schema document
    length: Length,
    fields: Sequence[str] | None = None,
    truncated: Collection[int] = (),
    refused: Mapping[int, tuple[str, str]] | None = None,
) -> Verdict:
    """Check k samples and vote on their canonical answers.

    A sample in ``truncated`` (the model stopped at max_tokens) that passes every other check is
    ``too_long`` all the same: a cut text can look complete. A sample in ``refused`` (index → (code,
    detail): ``refused`` with the model's refusal text, or ``content_filter``) is a failed sample with that
    reason, never a vote.

    k is ``samples``: texts beyond k are ignored and missing ones count as invalid. Invalid samples
    do not vote but count in k. The majority answer (ties: the one whose first vote came earliest)
    passes when its votes reach ``min_agreement`` × k, exactly; with k == 1 a valid sample passes. A failed
    vote still names its majority (``result``, ``votes``): whether to accept it anyway (``on_exhausted:
    accept_last``) is ``cascade.policy``'s decision.

    Returns:
        A ``Verdict`` whose result is the full parsed output of the first sample in the majority.
        On failure its reasons are ``inconsistent`` (when some sample was valid), then one reason
        per distinct code of the invalid samples, in first-seen order.

    Raises:
        ValueError: ``samples`` is below 1.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    padded = [*texts[:samples], *[None] * (samples - len(texts))]
    valid: list[Any] = []  # Any: parsed answers
    invalid: list[Reason] = []
    for index, text in enumerate(padded):
        if refused and index in refused:
            invalid.append(Reason(*refused[index]))
            continue
        value, problems = check_sample(text, output=output, schema=schema, length=length)
        if not problems and index in truncated:
            problems = [Reason("too_long", "cut off at max_tokens (finish_reason length)")]
        if problems:
            invalid.extend(problems)
        else:
            valid.append(value)
    if not valid:
        return Verdict(False, _failure_reasons(invalid, 0, samples, min_agreement, False), None, None, 0, samples)
    best = max(_tally(valid, fields), key=lambda tally: tally.votes)  # max keeps the first of equals
    passed = samples == 1 or Decimal(best.votes) >= min_agreement * samples
    reasons = () if passed else _failure_reasons(invalid, best.votes, samples, min_agreement, True)
    return Verdict(passed, reasons, best.value, Decimal(best.votes) / Decimal(samples), best.votes, samples)


def model_error(kind: str, detail: str, *, samples: int = 0) -> Verdict:
    """A failed verdict for a stage whose model call failed (``model_error:<kind>``).

    ``samples`` is k when the caller knows it; no sample voted, so votes is 0 and result None.
    """
    return Verdict(False, (Reason(f"model_error:{kind}", _truncate(detail)),), None, None, 0, samples)
