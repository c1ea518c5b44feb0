"""Evaluation on recorded answers: run planning, scoring, the calibration split, recordings checks, replay."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest

from bench.eval_date import encode
from cascade.cli_eval import parse_thresholds
from cascade.config import TaskSnapshot, parse_config
from cascade.errors import ConfigError, InputError
from cascade.evaluation import (
    RowOutcome,
    check_recordings,
    choose_threshold,
    is_calibration,
    is_correct,
    measure,
    per_tier_plan,
    plan_runs,
    point_at,
    tier_alone,
    with_threshold,
    with_thresholds,
)
from cascade.sim import Recording, SimServer
from cascade.validate import vote

SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": ["string", "number"]}}}


def snapshot(tiers: list[Any] | None = None, **task: Any) -> TaskSnapshot:
    models = [{"name": n, "base_url": "https://api.example.com/v1", "model": n, "api_key_env": "KEY",
               "rate_limit_rpm": 60} for n in ("small", "medium", "large")]
    spec = {"name": "qa", "prompt": "Q: {question}", "output": "json", "schema": SCHEMA,
            "self_consistency": {"samples": 3, "min_agreement": 0.5, "fields": ["answer"]},
            "tiers": tiers or ["small", {"model": "medium", "samples": 5}, {"model": "large", "samples": 1}], **task}
    return parse_config({"models": models, "task_types": [spec]}, "test.yaml").snapshot("qa")


def answer(value: Any) -> str:
    return json.dumps({"answer": value})


def outcome(row: str, *, tier: int = 1, correct: bool = True, cost: str = "1", status: str = "succeeded") -> RowOutcome:
    return RowOutcome(row, 0, status, tier, correct, Decimal(cost), None)


# --- planning -------------------------------------------------------------------------------------


def test_threshold_applies_to_every_tier_but_the_last() -> None:
    # Given a three-tier task whose tiers are a bare name and objects with their own settings
    snap = snapshot(tiers=["small", {"model": "medium", "samples": 5, "min_agreement": 0.9},
                           {"model": "large", "samples": 3, "min_agreement": 0.7}])
    # When the threshold 0.8 is applied
    run = with_threshold(snap, Decimal("0.8"))
    # Then tiers 1 and 2 vote at 0.8, keeping their other settings; the last tier is untouched
    assert [run.tier(i).min_agreement for i in (1, 2, 3)] == [Decimal("0.8"), Decimal("0.8"), Decimal("0.7")]
    assert [run.tier(i).samples for i in (1, 2, 3)] == [3, 5, 3]
    assert run.config_hash() != snap.config_hash()


def test_thresholds_per_tier_and_their_run() -> None:
    # Given a three-tier task
    snap = snapshot()
    # When tiers 1 and 2 get thresholds of their own
    run = per_tier_plan(snap, [Decimal("0.33"), Decimal("0.8")])
    # Then each votes at its own, the last is untouched, and the run is a threshold run labelled with both
    assert [run.snapshot.tier(i).min_agreement for i in (1, 2, 3)] == [Decimal("0.33"), Decimal("0.8"),
                                                                      Decimal("0.5")]
    assert (run.label, run.kind, run.threshold, run.per_tier) == (
        "per tier τ=(0.33, 0.8)", "threshold", Decimal("0.33"), (Decimal("0.33"), Decimal("0.8")))
    # And equal thresholds are the single-threshold run's snapshot
    same = with_thresholds(snap, [Decimal("0.6")] * 2)
    assert same.config_hash() == with_threshold(snap, Decimal("0.6")).config_hash()
    with pytest.raises(ValueError, match="3 tiers take 2 thresholds, got 1"):
        with_thresholds(snap, [Decimal("0.6")])


def test_tier_alone_is_a_one_tier_cascade() -> None:
    snap = snapshot()
    alone = tier_alone(snap, 2)
    assert alone.tier_count == 1 and alone.tier(1).model.name == "medium" and alone.tier(1).samples == 5
    assert set(alone.models) == {"medium"}


def test_runs_are_thresholds_then_each_tier_alone() -> None:
    runs = plan_runs(snapshot(), [Decimal("0.4"), Decimal("0.6")])
    assert [(r.label, r.kind, r.threshold, r.tier, r.is_top) for r in runs] == [
        ("τ=0.4", "threshold", Decimal("0.4"), None, False), ("τ=0.6", "threshold", Decimal("0.6"), None, False),
        ("tier 1 alone (small)", "tier", None, 1, False), ("tier 2 alone (medium)", "tier", None, 2, False),
        ("top tier alone (large)", "tier", None, 3, True)]


def test_point_at_sends_every_model_to_the_sim_without_keys() -> None:
    pointed = point_at(snapshot(), "http://127.0.0.1:9/v1")
    assert {(m.base_url, m.api_key_env, m.rate_limit_rpm) for m in pointed.models.values()} == {
        ("http://127.0.0.1:9/v1", None, None)}


@pytest.mark.parametrize(("text", "expected"), [
    ("0.4,0.6, 0.8", [Decimal("0.4"), Decimal("0.6"), Decimal("0.8")]),
    ("1,1.0", [Decimal(1)]),
])
def test_parse_thresholds(text: str, expected: list[Decimal]) -> None:
    assert parse_thresholds(text) == expected


@pytest.mark.parametrize("text", ["0.4,x", "1.5", "-0.1", "nan"])
def test_parse_thresholds_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--thresholds"):
        parse_thresholds(text)


# --- scoring --------------------------------------------------------------------------------------


def test_recorded_numbers_vote_together_and_match_gold_numerically() -> None:
    # Given three recorded samples: 18, 18.0 and the string "18"
    texts = [answer(18), answer(18.0), answer("18")]
    # When they are voted on (2 of 3 needed)
    verdict = vote(texts, samples=3, min_agreement=Decimal("0.6"), output="json", schema=SCHEMA,
                   length=snapshot().task_type.length, fields=["answer"])
    # Then 18 and 18.0 are one answer with two votes, the string is another, and the result equals gold 18.0
    assert verdict.passed and verdict.votes == 2
    assert is_correct("succeeded", verdict.result, {"answer": 18.0}, ["answer"])
    assert not is_correct("succeeded", {"answer": "18"}, {"answer": 18}, ["answer"])


@pytest.mark.parametrize(("status", "output", "gold", "fields", "expected"), [
    ("succeeded", {"answer": "A", "why": "x"}, {"answer": "A"}, ["answer"], True),
    ("succeeded", {"answer": "A", "why": "x"}, {"answer": "A"}, None, False),
    ("failed", None, {"answer": "A"}, ["answer"], False),
    ("succeeded", " yes ", "yes", None, True),
    ("succeeded", {"answer": 1e1}, {"answer": 10}, ["answer"], True),
])
def test_is_correct(status: str, output: Any, gold: Any, fields: list[str] | None, expected: bool) -> None:
    assert is_correct(status, output, gold, fields) is expected


def test_measure_rates_and_relative_cost() -> None:
    # Given four rows ending on tiers 1, 2, 3 and 3 (one failed), and the top tier alone costing 10 a row
    rows = [outcome("a", cost="1"), outcome("b", tier=2, cost="3"), outcome("c", tier=3, correct=False, cost="6"),
            outcome("d", tier=3, correct=False, cost="6", status="failed")]
    top = [outcome(r, tier=1, cost="10") for r in "abcde"]
    # When measured
    m = measure(rows, top)
    # Then rates are over all rows and the baseline covers the same rows only
    assert (m.rows, m.correct, m.accuracy, m.escalation_rate, m.tier3_rate) == (4, 2, 0.5, 0.75, 0.5)
    assert m.cost_usd == Decimal(16) and m.relative_cost == pytest.approx(0.4)


def test_calibration_split_is_deterministic_and_about_half() -> None:
    ids = [f"row-{i}" for i in range(2000)]
    first = [is_calibration(i) for i in ids]
    assert first == [is_calibration(i) for i in ids]
    assert 900 < sum(first) < 1100


def test_target_picks_the_cheapest_threshold_reaching_it_on_calibration_and_reports_the_rest() -> None:
    ids = [f"r{i}" for i in range(40)]
    calib = [i for i in ids if is_calibration(i)]
    # Given: τ=0.4 cheap but wrong on every calibration row, τ=0.6 right everywhere, τ=0.8 right but dearer
    low = [outcome(i, correct=i not in calib, cost="1") for i in ids]
    mid = [outcome(i, tier=2, cost="2") for i in ids]
    high = [outcome(i, tier=2, cost="3") for i in ids]
    top = [outcome(i, cost="4") for i in ids]
    runs = [(Decimal("0.4"), low), (Decimal("0.6"), mid), (Decimal("0.8"), high)]
    # When the target is 0.9
    choice = choose_threshold(runs, top, 0.9)
    # Then τ=0.6 is chosen and measured on the held-out rows only
    assert choice.threshold == Decimal("0.6")
    assert choice.calibration is not None and choice.calibration.rows == len(calib)
    assert choice.holdout is not None and choice.holdout.rows == len(ids) - len(calib)
    assert choice.holdout.relative_cost == pytest.approx(0.5)
    # And an unreachable target chooses nothing
    assert choose_threshold(runs, top, 1.01).threshold is None


# --- recordings -----------------------------------------------------------------------------------


def recording(rid: str = "r1", question: str = "What is 2+2?", **responses: list[str]) -> Recording:
    return Recording.model_validate({
        "id": rid, "input": {"question": question}, "gold": {"answer": 4},
        "responses": {k.replace("__", "#"): {"prompt_tokens": 10, "samples": [
            {"content": c, "completion_tokens": 3} for c in v]} for k, v in responses.items()}})


def two_tier() -> TaskSnapshot:
    return snapshot(tiers=["small", {"model": "large", "samples": 1}])


def test_check_recordings_accepts_complete_rows() -> None:
    check_recordings(two_tier(), [recording(small=[answer(4)] * 3, large=[answer(4)])], "rec.jsonl")


@pytest.mark.parametrize(("rec", "match"), [
    (recording(small=[answer(4)] * 3), r"rec.jsonl:1: row 'r1': tier 2 needs 1 samples recorded under 'large'"),
    (recording(small=[answer(4)] * 2, large=[answer(4)]), r"tier 1 needs 3 samples .* found 2 samples"),
    (Recording(id="r1", input={"question": "q"}, gold=None), "no gold answer"),
])
def test_check_recordings_names_the_row_and_what_is_missing(rec: Recording, match: str) -> None:
    with pytest.raises(InputError, match=match):
        check_recordings(two_tier(), [rec], "rec.jsonl")


def test_check_recordings_needs_prompts_that_contain_the_input() -> None:
    snap = snapshot(tiers=["small"], prompt="Q: {question}")
    rec = Recording.model_validate({**recording(small=[answer(4)] * 3).model_dump(), "input": {
        "question": "What is 2+2?", "id": 7}})
    with pytest.raises(InputError, match="does not contain every input value"):
        check_recordings(snap, [rec], "rec.jsonl")


def test_variant_recordings_are_checked_under_model_hash_variant() -> None:
    variants = [{"name": "cot", "prompt": "{question}", "samples": 2}, {"name": "pot", "prompt": "{question}",
                                                                        "samples": 2}]
    snap = snapshot(tiers=[{"model": "small", "variants": variants}])
    check_recordings(snap, [recording(small__cot=[answer(4)] * 2, small__pot=[answer(4)] * 2)], "r")
    with pytest.raises(InputError, match="'small#pot'"):
        check_recordings(snap, [recording(small__cot=[answer(4)] * 2)], "r")


def test_date_answers_are_encoded_as_numbers_only_when_they_are_numbers() -> None:
    assert [encode(a) for a in ["18", "18.0", "-2", "05/01/2021", "2019\n", None]] == [
        18, 18.0, -2, "05/01/2021", "2019\n", None]


# --- replay ---------------------------------------------------------------------------------------


def _post(client: httpx.Client, server: SimServer, text: str, *, sample: int = 0, n: int = 1,
          variant: str | None = None, variant_sample: int | None = None) -> httpx.Response:
    headers = {"X-Cascade-Model": "small", "X-Cascade-Sample": str(sample)}
    if variant:
        headers["X-Cascade-Variant"] = variant
    if variant_sample is not None:
        headers["X-Cascade-Variant-Sample"] = str(variant_sample)
    return client.post(f"{server.url}/chat/completions", headers=headers,
                       json={"model": "m", "n": n, "messages": [{"role": "user", "content": text}]})


def _contents(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["message"]["content"] for c in response.json()["choices"]]


def test_replay_is_deterministic_bills_recorded_usage_and_names_unmatched_requests() -> None:
    recs = [recording(small=["s0", "s1", "s2"], small__cot=["c0", "c1"], small__pot=["p0", "p1", "p2", "p3"])]
    with SimServer(recordings=recs) as server, httpx.Client() as client:
        # When the same request is retried, and asked as n=2 or as two single samples
        first = _post(client, server, "Q: What is 2+2?", sample=1, n=2)
        again = _post(client, server, "Q: What is 2+2?", sample=1, n=2)
        singles = [_post(client, server, "Q: What is 2+2?", sample=i) for i in (1, 2)]
        # Then every retry gets the same samples, and usage is the recorded prompt once plus the samples' tokens
        assert _contents(first) == _contents(again) == [c for s in singles for c in _contents(s)] == ["s1", "s2"]
        assert first.json()["usage"] == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}
        assert [s.json()["usage"]["prompt_tokens"] for s in singles] == [10, 10]
        # And a variant is indexed within its own samples when the request says where in the variant it starts
        pot = _post(client, server, "What is 2+2?", sample=2, n=2, variant="pot", variant_sample=0)
        assert _contents(pot) == ["p0", "p1"]
        assert _contents(_post(client, server, "What is 2+2?", sample=2, n=2, variant="pot")) == ["p2", "p3"]
        # And a request matching no recording gets a 404 that quotes it
        missing = _post(client, server, "What is 3+3?")
        assert missing.status_code == 404 and "no recording matches" in missing.text and "3+3" in missing.text
