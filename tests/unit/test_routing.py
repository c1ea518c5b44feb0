"""Start tiers and audit picks (cascade.routing): route rules, the learned start tier, stable shares."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from cascade.config import RouteRule, parse_config
from cascade.errors import ConfigError
from cascade.routing import (
    EXPLORE,
    LEARNED,
    Start,
    TierHistory,
    audited,
    expected_costs,
    explores,
    first_rule,
    learned_start,
    start_of,
)


def _config(**task: Any) -> dict[str, Any]:  # Any: YAML
    models = [{"name": n, "base_url": "http://sim", "model": n} for n in ("small", "medium", "large")]
    return {"models": models, "task_types": [{"name": "t", "prompt": "{text}", "tiers": ["small", "medium", "large"],
                                              **task}]}


def _rules(*rules: dict[str, Any]) -> list[RouteRule]:  # Any: YAML
    return parse_config(_config(route=list(rules)), "c.yaml").task_types[0].route


@pytest.mark.parametrize(("when", "row", "matched"), [
    ({"min_chars": 5}, {"f": "abcde"}, True),
    ({"min_chars": 5}, {"f": "abcd"}, False),
    ({"max_chars": 4}, {"f": "abcd"}, True),
    ({"max_chars": 4}, {"f": "abcde"}, False),
    ({"min_chars": 2, "max_chars": 3}, {"f": "abcd"}, False),  # every condition must hold
    ({"equals": "high"}, {"f": "high"}, True),
    ({"equals": "high"}, {"f": "High"}, False),
    ({"equals": 3}, {"f": "3"}, True),  # a CSV row's numbers are text
    ({"equals": 3}, {"f": 3.0}, True),
    ({"equals": True}, {"f": 1}, False),  # booleans only equal booleans
    ({"equals": True}, {"f": True}, True),
    ({"in": ["a", "b"]}, {"f": "b"}, True),
    ({"in": ["a", "b"]}, {"f": "c"}, False),
    ({"in": [1, 2]}, {"f": "2"}, True),
    ({"matches": "^urgent"}, {"f": "urgent: fix"}, True),
    ({"matches": "^urgent"}, {"f": "not urgent"}, False),
    ({"matches": "x{3}"}, {"f": 12}, False),  # a number is matched as its JSON text
    ({"matches": "^12$"}, {"f": 12}, True),
    ({"min_chars": 0}, {"g": "x"}, False),  # a row without the field never matches
])
def test_each_condition(when: dict[str, Any], row: dict[str, Any], matched: bool) -> None:
    rules = _rules({"when": {"field": "f", **when}, "start_tier": 2})
    assert (first_rule(rules, row) is not None) is matched


def test_the_first_rule_that_matches_wins_and_is_named() -> None:
    rules = _rules({"when": {"field": "text", "min_chars": 10}, "start_tier": 2},
                   {"when": {"field": "priority", "equals": "high"}, "start_tier": 3, "name": "vip"},
                   {"when": {"field": "text", "min_chars": 1}, "start_tier": 1})
    assert first_rule(rules, {"text": "a long enough text", "priority": "high"}) == Start(2, "route[0]")
    assert first_rule(rules, {"text": "short", "priority": "high"}) == Start(3, "vip")
    assert first_rule(rules, {"text": "short", "priority": "low"}) == Start(1, "route[2]")
    assert first_rule(rules, {"text": "", "priority": "low"}) is None


def test_matches_reads_a_bounded_prefix() -> None:
    rules = _rules({"when": {"field": "f", "matches": "needle"}, "start_tier": 2})
    assert first_rule(rules, {"f": "x" * 9_990 + "needle"}) is not None
    assert first_rule(rules, {"f": "x" * 10_000 + "needle"}) is None


@pytest.mark.parametrize(("rule", "path", "message"), [
    ({"when": {"field": "f", "longer_than": 3}, "start_tier": 2}, "task_types[0].route[0].when.longer_than",
     "unknown condition 'longer_than'"),
    ({"when": {"field": "f", "min_chars": 3}, "start_tier": 4}, "task_types[0].route[0].start_tier",
     "out of range: the task type has 3 tiers"),
    ({"when": {"field": "f", "min_chars": 3}, "start_tier": 0}, "task_types[0].route[0].start_tier", "greater than"),
    ({"when": {"field": "f"}, "start_tier": 2}, "task_types[0].route[0].when", "needs a condition"),
    ({"when": {"field": "f", "matches": "(unclosed"}, "start_tier": 2}, "task_types[0].route[0].when.matches",
     "not a valid regular expression"),
    ({"when": {"field": "f", "matches": "a" * 201}, "start_tier": 2}, "task_types[0].route[0].when.matches",
     "at most 200"),
    ({"when": {"field": "f", "in": []}, "start_tier": 2}, "task_types[0].route[0].when.in", "at least 1"),
])
def test_bad_rules_are_refused_naming_the_rule(rule: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(route=[rule]), "c.yaml")
    assert caught.value.path == path
    assert message in str(caught.value)


def test_an_unknown_audit_model_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(audit={"rate": 0.1, "model": "huge"}), "c.yaml")
    assert caught.value.path == "task_types[0].audit.model"


def test_the_audit_tier_takes_a_tier_models_settings() -> None:
    config = _config(audit={"rate": 0.1, "model": "medium"},
                     tiers=["small", {"model": "medium", "samples": 5, "min_agreement": 0.8}, "large"])
    tier = parse_config(config, "c.yaml").snapshot("t").audit_tier()
    assert tier is not None and (tier.index, tier.model.name, tier.samples, tier.min_agreement) == (
        0, "medium", 5, Decimal("0.8"))
    default = parse_config(_config(audit={"rate": 0.1}), "c.yaml").snapshot("t").audit_tier()
    assert default is not None and default.model.name == "large"


def _h(tier: int, jobs: int, passed: int, cost: str, above: str = "0") -> TierHistory:
    return TierHistory(tier, jobs, passed, Decimal(cost), Decimal(above))


def test_expected_costs_follow_the_recursion() -> None:
    # E3 = 10; E2 = 2 + (1 - 0.5) * 10 = 7; E1 = 1 + (1 - 0.1) * 7 = 7.3
    history = [_h(1, 100, 10, "1"), _h(2, 100, 50, "2"), _h(3, 100, 100, "10")]
    assert expected_costs(history, 3, 20) == {1: Decimal("7.3"), 2: Decimal(7), 3: Decimal(10)}
    assert learned_start(history, 3, 20) == 2
    # a better tier 1 (half pass): E1 = 1 + 0.5 * 7 = 4.5 < 7
    assert learned_start([_h(1, 100, 50, "1"), *history[1:]], 3, 20) == 1


def test_an_unknown_next_tier_uses_what_the_jobs_paid_above() -> None:
    # tier 3 never reached (too few jobs): E2 = 2 + its jobs' average cost above it
    history = [_h(1, 30, 0, "1", "2.5"), _h(2, 30, 29, "2", "0.5"), _h(3, 1, 1, "10")]
    assert expected_costs(history, 3, 20) == {1: Decimal("3.5"), 2: Decimal("2.5")}
    assert learned_start(history, 3, 20) == 2


def test_too_little_history_starts_at_tier_1() -> None:
    assert learned_start([_h(1, 19, 0, "1"), _h(2, 50, 50, "0.5")], 2, 20) == 1
    assert learned_start([], 3, 20) == 1
    # a tie goes to the lower tier
    assert learned_start([_h(1, 20, 0, "0"), _h(2, 20, 20, "1")], 2, 20) == 1


def test_shares_are_stable_and_about_their_rate() -> None:
    picked = [i for i in range(10_000) if audited(i, Decimal("0.05"))]
    assert picked == [i for i in range(10_000) if audited(i, 0.05)]
    assert 400 < len(picked) < 600
    assert not audited(1, 0) and audited(1, 1)
    keys = [str(i) for i in range(10_000)]
    assert 400 < sum(explores("b1", k, 0.05) for k in keys) < 600
    assert [k for k in keys if explores("b1", k, 0.05)] != [k for k in keys if explores("b2", k, 0.05)]


def test_start_of_rules_then_learned_then_explore() -> None:
    task = parse_config(_config(routing={"start": "learned", "explore": 0.5},
                                route=[{"when": {"field": "text", "min_chars": 5}, "start_tier": 3}]),
                        "c.yaml").task_types[0]
    assert start_of(task, "b", "k", {"text": "long text"}, learned=2) == Start(3, "route[0]")
    starts = [start_of(task, "b", str(i), {"text": "x"}, learned=2) for i in range(200)]
    assert set(starts) == {Start(1, EXPLORE), Start(2, LEARNED)}
    assert start_of(task, "b", "k", {"text": "x"}, learned=1) == Start(1, LEARNED)
    first = parse_config(_config(), "c.yaml").task_types[0]
    assert start_of(first, "b", "k", {"text": "x"}, learned=2) == Start()
