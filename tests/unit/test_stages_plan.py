"""Unit tests for the pure parts of cascade.stages: plan_requests (which requests a tier sends), judge, and
how a verdict ends a claim (Writes.verdict, as cascade.policy decides)."""

from __future__ import annotations

import json
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from cascade.config import TaskSnapshot, parse_config
from cascade.providers import ProviderPool
from cascade.stages import Request, judge, plan_requests, send
from cascade.stages.ledger import Writes
from cascade.store import Claim, JobStatus, Stage

SCHEMA = {"type": "object", "required": ["label"], "properties": {"label": {"enum": ["yes", "no", "maybe"]}}}
ROW = {"text": "the invoice", "lang": "de", "n": 3}


def make_snapshot(*, tiers: list[Any], sc: dict[str, Any] | None = None, **task: Any) -> TaskSnapshot:
    """A TaskSnapshot built the way a batch gets it: parse a config, take the task type's snapshot."""
    data = {
        "models": [
            {"name": "nfull", "base_url": "http://sim.test/v1", "model": "m-n", "supports_n": True},
            {"name": "single", "base_url": "http://sim.test/v1", "model": "m-1", "supports_n": False},
        ],
        "task_types": [{
            "name": "classify",
            "system": "Classify ({lang}).",
            "prompt": "Text: {text} ({n})",
            "output": "json",
            "schema": SCHEMA,
            "self_consistency": sc or {"samples": 3, "min_agreement": 0.6},
            "tiers": tiers,
            **task,
        }],
    }
    return parse_config(data, "cascade.yaml").snapshot("classify")


SYSTEM = {"role": "system", "content": "Classify (de)."}
USER = {"role": "user", "content": "Text: the invoice (3)"}
VARIANTS = [
    {"name": "terse", "prompt": "Label: {text}", "samples": 2},
    {"name": "careful", "prompt": "Think, then label: {text}", "system": "Careful, {lang}.", "samples": 3},
]


# --- plan_requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "answered", "expected"),
    [
        ("nfull", set(), [(0, 3)]),
        ("nfull", {0, 1, 2}, []),
        ("nfull", {0}, [(0, 3)]),  # an n=3 request is all or nothing: a partial answer asks again
        ("single", set(), [(0, 1), (1, 1), (2, 1)]),
        ("single", {1}, [(0, 1), (2, 1)]),
        ("single", {0, 1, 2}, []),
        ("single", {7}, [(0, 1), (1, 1), (2, 1)]),
    ],
)
def test_plan_requests_without_variants(model: str, answered: set[int], expected: list[tuple[int, int]]) -> None:
    # Given a tier of 3 samples on a model that does (nfull) or does not (single) support n
    tier = make_snapshot(tiers=[model]).tier(1)

    # When its requests are planned, some samples already answered
    requests = plan_requests(tier, ROW, answered)

    # Then one n=3 request at sample 0, or one n=1 request per sample, skipping answered samples
    assert [(g.sample, g.n) for g in requests] == expected
    assert all(g.variant is None for g in requests)


def test_plan_requests_messages_are_rendered() -> None:
    # Given a tier with a system template and a prompt template
    tier = make_snapshot(tiers=["single"]).tier(1)

    # When its requests are planned
    requests = plan_requests(tier, ROW, set())

    # Then every request carries the rendered system message, then the rendered user prompt
    assert all(g.messages == [SYSTEM, USER] for g in requests)


def test_plan_requests_without_system_sends_only_the_prompt() -> None:
    # Given a task type with an empty system prompt
    tier = make_snapshot(tiers=["nfull"], system="").tier(1)

    # When its requests are planned
    (request,) = plan_requests(tier, ROW, set())

    # Then the only message is the user prompt
    assert request.messages == [USER]


def test_plan_requests_uses_tier_overrides() -> None:
    # Given a tier overriding prompt, system and samples
    tier = make_snapshot(tiers=[{"model": "nfull", "samples": 5, "prompt": "Again: {text}", "system": "Sys {n}"}]).tier(1)

    # When its requests are planned
    requests = plan_requests(tier, ROW, set())

    # Then the request uses the tier's prompt, system and sample count
    assert requests == [Request(0, 5, None, [{"role": "system", "content": "Sys 3"},
                                         {"role": "user", "content": "Again: the invoice"}])]


@pytest.mark.parametrize(
    ("model", "answered", "expected"),
    [
        ("nfull", set(), [(0, 2, "terse"), (2, 3, "careful")]),
        ("nfull", {0, 1}, [(2, 3, "careful")]),
        ("nfull", {2, 3, 4}, [(0, 2, "terse")]),
        ("single", set(), [(0, 1, "terse"), (1, 1, "terse"), (2, 1, "careful"), (3, 1, "careful"),
                           (4, 1, "careful")]),
        ("single", {0, 3}, [(1, 1, "terse"), (2, 1, "careful"), (4, 1, "careful")]),
    ],
)
def test_plan_requests_with_variants(model: str, answered: set[int], expected: list[tuple[int, int, str]]) -> None:
    # Given a tier voting two variants (2 + 3 samples)
    tier = make_snapshot(tiers=[{"model": model, "variants": VARIANTS}]).tier(1)

    # When its requests are planned
    requests = plan_requests(tier, ROW, answered)

    # Then variants go in list order, the first variant's samples first, each group naming its variant
    assert [(g.sample, g.n, g.variant) for g in requests] == expected


def test_plan_requests_variant_messages() -> None:
    # Given variants with and without their own system prompt
    tier = make_snapshot(tiers=[{"model": "nfull", "variants": VARIANTS}]).tier(1)

    # When their requests are planned
    terse, careful = plan_requests(tier, ROW, set())

    # Then each renders its own prompt; a variant without system falls back to the tier's system
    assert terse.messages == [SYSTEM, {"role": "user", "content": "Label: the invoice"}]
    assert careful.messages == [{"role": "system", "content": "Careful, de."},
                                {"role": "user", "content": "Think, then label: the invoice"}]


def test_task_level_variants_are_planned_for_a_bare_tier() -> None:
    # Given variants under self_consistency and a tier that is a bare model name
    snap = make_snapshot(tiers=["nfull"], sc={"samples": 1, "variants": VARIANTS})

    # When the tier's requests are planned
    requests = plan_requests(snap.tier(1), ROW, set())

    # Then the task's variants are used
    assert [(g.sample, g.n, g.variant) for g in requests] == [(0, 2, "terse"), (2, 3, "careful")]


def test_variant_name_reaches_the_wire() -> None:
    # Given a planned variant group and a provider pool whose server records requests
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"index": i, "message": {"content": "{}"}} for i in range(3)]})

    snap = make_snapshot(tiers=[{"model": "nfull", "variants": VARIANTS}])
    tier = snap.tier(1)
    _, careful = plan_requests(tier, ROW, set())
    pool = ProviderPool(transport=httpx.MockTransport(handler))
    try:
        # When the group's request is sent
        send(SimpleNamespace(providers=pool), snap, tier, careful)  # type: ignore[arg-type]
    finally:
        pool.close()

    # Then it carries the model, first sample and variant headers, n and the task's response format
    (request,) = seen
    assert request.headers["X-Cascade-Model"] == "nfull"
    assert request.headers["X-Cascade-Sample"] == "2"
    assert request.headers["X-Cascade-Variant"] == "careful"
    body = json.loads(request.content)
    assert body["n"] == 3
    assert body["messages"] == careful.messages
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "classify", "schema": SCHEMA}}


# --- judge -------------------------------------------------------------------------------------------


def answers(*labels: str | None) -> dict[int, str | None]:
    return {i: None if label is None else json.dumps({"label": label}) for i, label in enumerate(labels)}


@pytest.mark.parametrize(
    ("tier", "given", "passed", "votes", "samples"),
    [
        (1, answers("yes", "yes", "no"), True, 2, 3),  # 2 >= 0.6 × 3
        (1, answers("yes", "no", "maybe"), False, 1, 3),
        (1, answers("yes", "yes"), True, 2, 3),  # a missing sample counts in k but does not vote
        (1, answers("yes"), False, 1, 3),
        (2, answers("yes", "yes", "yes", "yes", "no"), False, 4, 5),  # tier 2: min_agreement 1 over 5 samples
        (2, answers("yes", "yes", "yes", "yes", "yes"), True, 5, 5),
        (3, answers("no"), True, 1, 1),  # tier 3: one sample, no vote
        (3, answers("no", "yes", "yes"), True, 1, 1),  # answers beyond the tier's samples are ignored
    ],
)
def test_judge_uses_the_tier_settings(
    tier: int, given: dict[int, str | None], passed: bool, votes: int, samples: int
) -> None:
    # Given tiers with different samples and min_agreement
    snap = make_snapshot(tiers=["nfull", {"model": "nfull", "samples": 5, "min_agreement": 1},
                                {"model": "single", "samples": 1}])

    # When a tier's answers are judged
    verdict = judge(snap, tier, given)

    # Then k and the threshold are that tier's
    assert (verdict.passed, verdict.votes, verdict.samples) == (passed, votes, samples)


def test_judge_votes_on_the_configured_fields() -> None:
    # Given self_consistency.fields [label] and answers that differ only outside it
    snap = make_snapshot(tiers=["nfull"], sc={"samples": 3, "min_agreement": 1, "fields": ["label"]},
                         schema={"type": "object", "required": ["label"]})
    given = {i: json.dumps({"label": "yes", "why": f"reason {i}"}) for i in range(3)}

    # When they are judged
    verdict = judge(snap, 1, given)

    # Then they agree, and the result is the first majority sample whole
    assert verdict.passed
    assert verdict.agreement == Decimal(1)
    assert verdict.result == {"label": "yes", "why": "reason 0"}


SPLIT = answers("yes", "no", "maybe")  # all valid, no majority reaches 0.6


@pytest.mark.parametrize(
    ("on_exhausted", "tier", "given", "passed"),
    [
        ("accept_last", 1, SPLIT, False),  # not the last tier: the normal threshold applies
        ("accept_last", 2, SPLIT, True),  # last tier: any valid majority is accepted
        ("fail", 2, SPLIT, False),
        ("fail", 1, SPLIT, False),
        ("accept_last", 2, answers(None, None, None), False),  # no valid sample: still fails
        ("accept_last", 2, {0: "not json", 1: '{"label": "perhaps"}'}, False),
    ],
)
def test_accept_last_takes_a_split_vote_only_at_the_last_tier(
    on_exhausted: str, tier: int, given: dict[int, str | None], passed: bool
) -> None:
    # Given a two-tier task type with on_exhausted set
    snap = make_snapshot(tiers=["nfull", "single"], on_exhausted=on_exhausted)
    claim = Claim(7, "b", "k", ROW, tier, Stage.VALIDATE, 1)

    # When a tier's split answers are judged and the verdict ends the claim
    verdict = judge(snap, tier, given)
    writes = Writes()
    writes.verdict(snap, claim, verdict)

    # Then the validator never passes a split vote; the policy accepts it only under accept_last at the last
    # tier, and never without a valid sample
    assert not verdict.passed
    (move,) = writes.moves
    (recorded,) = writes.validations
    assert (move.status is JobStatus.SUCCEEDED) is passed
    assert recorded["passed"] is passed
    if passed:
        assert json.loads(move.output_json or "null") == {"label": "yes"}  # a tie goes to the earliest sample
        assert json.loads(recorded["reasons"]) == []
    else:
        assert move.status is (JobStatus.QUEUED if tier == 1 else JobStatus.FAILED)
