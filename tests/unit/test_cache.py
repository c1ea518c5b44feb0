"""Unit tests for cascade.cache: what the key holds, what may be stored, what a stored row decodes to."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from cascade.cache import cacheable, decode, request_key
from cascade.config import parse_config
from cascade.providers import Choice, Completion
from cascade.stages.requests import plan_requests, request_params
from cascade.store.cache import CacheRow
from tests.unit.test_config import design, task0

ROW = {"text": "Invoice 17 from ACME, total 12.50 EUR"}


def _key(mutate: Callable[[dict[str, Any]], None] | None = None, *, tier: int = 1, row: dict[str, Any] = ROW,
         request: int = 0) -> bytes:
    data = design()
    if mutate is not None:
        mutate(data)
    snap = parse_config(data, "cascade.yaml").snapshot("invoice_fields")
    resolved = snap.tier(tier)
    req = plan_requests(resolved, row, set(), one_by_one=request > 0)[request]
    return request_key(resolved.model.base_url, resolved.model.model, request_params(snap, resolved, req), req.sample)


def _model(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["models"][0][field] = value
    return mutate


def _task(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        task0(data)[field] = value
    return mutate


def _schema(data: dict[str, Any]) -> None:
    task0(data)["schema"]["properties"]["note"] = {"type": "string"}


def _samples(data: dict[str, Any]) -> None:
    task0(data)["self_consistency"]["samples"] = 5


@pytest.mark.parametrize("mutate", [
    _model("base_url", "https://eu.example.com/v1"), _model("model", "gpt-4o-mini-2024-07-18"),
    _task("prompt", "Extract: {text}"), _task("system", "Be brief."), _task("temperature", 0.1),
    _task("max_tokens", 100), _schema, _samples, _model("max_tokens_param", "max_completion_tokens"),
], ids=["endpoint", "model id", "prompt", "system", "temperature", "max_tokens", "schema", "n", "max_tokens_param"])
def test_everything_that_changes_the_answer_changes_the_key(mutate: Callable[[dict[str, Any]], None]) -> None:
    # Given the key of a tier-1 request
    # When one part of what is sent changes
    # Then the key changes
    assert _key(mutate) != _key()


@pytest.mark.parametrize("mutate", [
    _model("api_key_env", "OTHER_KEY"), _model("name", "small"), _model("timeout_s", 5),
    _model("price", {"input_per_mtok": 9, "output_per_mtok": 9}), _model("rate_limit_rpm", 10),
    _model("base_url", "https://api.example.com/v1/"),
], ids=["api key", "config name", "timeout", "price", "rate limit", "trailing slash"])
def test_what_does_not_change_the_answer_keeps_the_key(mutate: Callable[[dict[str, Any]], None]) -> None:
    # Given the key of a tier-1 request
    # When the API key, price, timeout or rate limit changes (or the endpoint gains a trailing slash)
    # Then the key is the same: the same request gets the same answer
    assert _key(mutate) == _key()


def test_the_rendered_row_and_the_first_sample_are_in_the_key() -> None:
    # Given one-sample requests of a model without n (one per sample), and another row
    # When their keys are computed
    # Then each sample has its own key (k samples stay k answers), and so does another row
    keys = {_key(lambda d: d["models"][0].update(supports_n=False), request=i) for i in range(3)}
    assert len(keys) == 3
    assert _key(row={"text": "Invoice 18"}) != _key()
    assert _key(row={"text": ROW["text"], "unused": 1}) == _key()


def _done(contents: list[str | None], reasons: list[str | None], *, n: int | None = None,
          refusal: str | None = None) -> Completion:
    choices = tuple(Choice(i, c, r, refusal if i == 0 else None) for i, (c, r) in enumerate(zip(contents, reasons, strict=True)))
    return Completion(contents, reasons, 10, 5, 1, choices=choices, n_requested=n or len(contents))


@pytest.mark.parametrize(("done", "ok"), [
    (_done(["a", "b"], ["stop", "stop"]), True),
    (_done(["a", "b"], ["stop", "length"]), False),
    (_done(["a", "b"], ["stop", "content_filter"]), False),
    (_done(["a", None], ["stop", "stop"]), False),
    (_done(["a"], ["stop"], n=2), False),
    (_done(["a", "b"], ["stop", "stop"], refusal="I can't"), False),
    (_done(["a", "b" * 11], ["stop", "stop"]), False),
], ids=["answer", "truncated", "filtered", "no content", "fewer choices", "refused", "longer than stored"])
def test_only_whole_answers_are_stored(done: Completion, ok: bool) -> None:
    assert cacheable(done, 2, cap=10) is ok


def _row(answer: Any, **over: Any) -> CacheRow:
    values: dict[str, Any] = {"input_tokens": 10, "output_tokens": 5, "cached_tokens": 0, "reasoning_tokens": 0,
                              "served_model": None, "cost_usd": Decimal("0.01"), **over}
    return CacheRow(b"k" * 32, False, answer, **values)


def test_a_stored_answer_decodes_to_the_original_completion() -> None:
    entry = decode(_row({"contents": ["x", "y"], "finish_reasons": ["stop", None]}), 2)
    assert entry is not None
    done = entry.completion(0)
    assert (done.contents, done.input_tokens, done.output_tokens, done.choices_returned) == (["x", "y"], 10, 5, 2)
    assert entry.cost_usd == Decimal("0.01")


@pytest.mark.parametrize("answer", [
    7, "not json", {"contents": 7}, {"contents": ["x"], "finish_reasons": ["stop"]},
    {"contents": ["x", 1], "finish_reasons": ["stop", "stop"]}, {"finish_reasons": []},
])
def test_an_entry_that_cannot_be_decoded_is_a_miss_logged_once(answer: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # Given a damaged row (wrong shape, wrong number of choices)
    row = CacheRow(repr(answer).encode().ljust(32, b"-"), False, answer, 1, 1, 0, 0, None, Decimal(0))
    # When it is decoded twice
    with caplog.at_level(logging.WARNING, logger="cascade.cache"):
        assert decode(row, 2) is None
        assert decode(row, 2) is None
    # Then it is a miss, logged once
    assert sum("cannot be decoded" in r.message for r in caplog.records) == 1


def test_missing_tokens_are_a_miss() -> None:
    assert decode(_row({"contents": ["x", "y"], "finish_reasons": ["stop", "stop"]}, input_tokens=None), 2) is None
