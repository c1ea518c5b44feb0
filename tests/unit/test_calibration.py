"""Per-tier calibration: the pass rule, the search grid, the search itself on a hand-made recorded set,
predictions, and the config patch."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cascade.calibration import (
    MAX_COMBINATIONS,
    RowOutcome,
    Target,
    TierVote,
    accepts,
    choose_per_tier,
    choose_threshold,
    config_patch,
    half_of,
    predict,
    search_grids,
    vote_levels,
)
from cascade.cli_eval import parse_target
from cascade.config import Length, TaskSnapshot, parse_config
from cascade.errors import ConfigError
from cascade.evaluation import with_thresholds
from cascade.validate import vote


def snapshot(tiers: list[Any] | None = None) -> TaskSnapshot:
    models = [{"name": n, "base_url": "https://api.example.com/v1", "model": n} for n in ("small", "medium", "large")]
    spec = {"name": "qa", "prompt": "Q: {question}", "output": "json",
            "self_consistency": {"samples": 3, "min_agreement": 0.5, "fields": ["answer"]},
            "tiers": tiers or ["small", {"model": "medium", "samples": 3}, {"model": "large", "samples": 1}]}
    return parse_config({"models": models, "task_types": [spec]}, "cascade.yaml").snapshot("qa")


# --- the pass rule and the grid -------------------------------------------------------------------


@given(k=st.integers(1, 8), data=st.data(), threshold=st.decimals(0, 1, places=3))
def test_accepts_is_the_validators_rule(k: int, data: st.DataObject, threshold: Decimal) -> None:
    # Given k samples: v agree on one answer, the rest are invalid (so v is the majority's votes)
    v = data.draw(st.integers(0, k))
    texts = ['{"answer": 1}'] * v + ["not json"] * (k - v)
    # When the validator votes at the threshold, and accepts() reads the recorded votes
    verdict = vote(texts, samples=k, min_agreement=threshold, output="json", schema=None, length=Length(),
                   fields=["answer"])
    # Then both say the same
    assert accepts(TierVote(verdict.votes, verdict.samples, True, Decimal(0)), threshold) is verdict.passed


@pytest.mark.parametrize(("samples", "levels"), [
    (3, ["0.33", "0.66", "1.0"]),
    (10, ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]),
    (14, ["0.07", "0.14", "0.21", "0.28", "0.35", "0.42", "0.5", "0.57", "0.64", "0.71", "0.78", "0.85", "0.92",
          "1.0"]),
    (1, ["0.5"]),  # one sample: the threshold makes no difference, the configured one is kept
])
def test_vote_levels_need_one_more_vote_each(samples: int, levels: list[str]) -> None:
    got = vote_levels(samples, Decimal("0.5"))
    assert [str(t) for t in got] == levels
    if samples > 1:
        # level v needs exactly v votes of k
        assert [min(n for n in range(samples + 1) if accepts(TierVote(n, samples, True, Decimal(0)), t))
                for t in got] == list(range(1, samples + 1))


def test_search_grids_are_the_given_thresholds_or_each_tiers_vote_levels() -> None:
    snap = snapshot(tiers=["small", {"model": "medium", "samples": 5}, "large"])
    assert search_grids(snap, [Decimal("0.6"), Decimal("1.0")]) == ((Decimal("0.6"), Decimal("1.0")),) * 2
    assert [len(g) for g in search_grids(snap, None)] == [3, 5]
    wide = [Decimal(i) / 1000 for i in range(1001)]
    many = snapshot(tiers=["small", "medium", "small", "large"])
    assert 1001**3 > MAX_COMBINATIONS
    with pytest.raises(ConfigError, match="--thresholds: qa: 1,003,003,001 per-tier combinations"):
        search_grids(many, wide)


def test_a_target_is_an_accuracy_or_a_share_of_the_top_tiers() -> None:
    with pytest.raises(ValueError):
        Target()
    with pytest.raises(ConfigError, match="not both"):
        parse_target(0.9, 0.99, None)
    with pytest.raises(ConfigError, match="--target-relative: 0.0 is not above 0"):
        parse_target(None, 0.0, None)
    assert parse_target(None, None, None) is None
    assert parse_target(None, 0.99, [Decimal("0.5")]) == Target(relative=0.99, grid=(Decimal("0.5"),))


# --- the search on a hand-made recorded set -------------------------------------------------------

# Eight rows, three tiers: tier 1 and tier 2 vote 3 samples each (votes of the majority, whether it is right),
# tier 1 costs 1 a row, tier 2 4, the top tier alone 10. Half A holds r1 r3 r4 r5, half B r2 r6 r7 r8.
TIER1 = {"r1": (3, True), "r3": (2, False), "r4": (1, True), "r5": (2, True),
         "r2": (2, True), "r6": (1, False), "r7": (3, False), "r8": (0, False)}
TIER2 = {"r1": (3, True), "r3": (3, True), "r4": (1, False), "r5": (2, True),
         "r2": (3, True), "r6": (2, True), "r7": (2, True), "r8": (1, True)}
TOP = {"r1": True, "r3": True, "r4": True, "r5": False, "r2": True, "r6": True, "r7": False, "r8": True}
ROWS = list(TOP)
THRESHOLDS = {"0.33": Decimal("0.33"), "0.66": Decimal("0.66"), "1.0": Decimal("1.0")}


def recorded() -> tuple[list[list[TierVote]], list[RowOutcome]]:
    votes = [[TierVote(tier[r][0], 3, tier[r][1], Decimal(cost), f"{r}@{i}") for r in ROWS]
             for i, (tier, cost) in enumerate([(TIER1, 1), (TIER2, 4)], start=1)]
    top = [RowOutcome(r, 0, "succeeded", 1, TOP[r], Decimal(10), f"{r}@top") for r in ROWS]
    return votes, top


def test_the_hand_made_rows_are_split_as_the_comments_say() -> None:
    assert [r for r in ROWS if half_of(r) == "A"] == ["r1", "r3", "r4", "r5"]


def test_target_accuracy_picks_the_cheapest_per_tier_combination_no_single_threshold_reaches() -> None:
    # Given the recorded set, searched on each tier's vote levels 0.33 (1 vote of 3), 0.66 (2), 1.0 (3)
    snap = snapshot()
    votes, top = recorded()
    grids = search_grids(snap, None)
    assert grids == (tuple(THRESHOLDS.values()),) * 2
    # When the target accuracy on half A is 0.8, i.e. all 4 rows right. By hand, on r1 r3 r4 r5:
    #   τ1=0.33: every row passes tier 1, r3 wrong: 3/4 for 4, whatever τ2
    #   τ1=0.66: r1 r3 r5 pass tier 1 (r3 wrong), r4 goes on (1 vote):
    #            τ2=0.33 r4 accepted wrong at tier 2: 2/4 for 8; τ2=0.66 or 1.0 r4 right at the top: 3/4 for 18
    #   τ1=1.0:  r1 passes; r3 r4 r5 go to tier 2 (16 spent so far, 1 right):
    #            τ2=0.33 r3 r5 right, r4 wrong: 3/4 for 16
    #            τ2=0.66 r3 r5 right, r4 right at the top: 4/4 for 26
    #            τ2=1.0  r3 right, r4 right and r5 wrong at the top: 3/4 for 36
    # the only combination reaching 4/4 is (1.0, 0.66), and no single threshold (the diagonal) does
    choice = choose_per_tier(snap, votes, top, grids, 0.8, "A")
    # Then it is chosen, and predicted on half B: r7 passes tier 1 wrong; r2 r6 right at tier 2, r8 right
    # at the top (1 vote at tier 2): 3/4 for 4 + 3 × 4 + 10 = 26 against the top tier alone's 40
    assert choice.thresholds == (Decimal("1.0"), Decimal("0.66"))
    assert choice.calibration is not None and (choice.calibration.correct, choice.calibration.cost_usd) == (4, 26)
    assert choice.predicted is not None and (choice.predicted.correct, choice.predicted.cost_usd) == (3, 26)
    assert choice.predicted.relative_cost == pytest.approx(26 / 40)
    assert choice.combinations == 9
    diagonal = [(t, predict(votes, top, [t, t])) for t in THRESHOLDS.values()]
    assert choose_threshold(diagonal, top, 0.8, "A").threshold is None


def test_target_relative_calibrates_on_a_share_of_the_top_tiers_accuracy_on_that_half() -> None:
    # Given the recorded set and half B as the calibration half, where the top tier alone is right on r2 r6 r8
    snap = snapshot()
    votes, top = recorded()
    target = Target(relative=1.0, halves=("B",))
    single_top = choose_threshold([], top, 0.0, "B").calibration_top
    assert single_top is not None and single_top.accuracy == 0.75
    goal = target.on(single_top)
    # When the target is 1.0 × 0.75, i.e. 3 of 4 rows right. By hand, on r2 r6 r7 r8:
    #   τ1=0.33: r2 r6 r7 pass tier 1 (r6 r7 wrong), r8 goes on: 2/4 for 8 (τ2=0.33) or 18
    #   τ1=0.66: r2 r7 pass tier 1 (r7 wrong), r6 r8 go on (12 spent):
    #            τ2=0.33 r6 r8 right at tier 2: 3/4 for 12; τ2=0.66 3/4 for 22; τ2=1.0 3/4 for 32
    #   τ1=1.0:  r7 passes wrong, r2 r6 r8 go on (16 spent): 3/4 for 16, 26 or 36
    # the cheapest reaching 3/4 is (0.66, 0.33) for 12; the cheapest single threshold is 0.66 for 22
    choice = choose_per_tier(snap, votes, top, search_grids(snap, None), goal, "B")
    diagonal = [(t, predict(votes, top, [t, t])) for t in THRESHOLDS.values()]
    single = choose_threshold(diagonal, top, goal, "B", relative=1.0)
    # Then (0.66, 0.33) is chosen, and predicted on half A: r1 r3 r5 pass tier 1 (r3 wrong), r4 passes
    # tier 2 wrong: 2/4 for 4 + 4 = 8
    assert choice.thresholds == (Decimal("0.66"), Decimal("0.33"))
    assert choice.calibration is not None and (choice.calibration.correct, choice.calibration.cost_usd) == (3, 12)
    assert choice.predicted is not None and (choice.predicted.correct, choice.predicted.cost_usd) == (2, 8)
    assert single.threshold == Decimal("0.66") and single.calibration is not None
    assert single.calibration.cost_usd == 22 and single.half == "B" and single.relative == 1.0
    # And a target above every combination chooses nothing
    assert choose_per_tier(snap, votes, top, search_grids(snap, None), 1.0, "B").thresholds is None


def test_predict_walks_the_tiers_and_pays_each_one_tried() -> None:
    votes, top = recorded()
    got = {o.row_id: (o.tier, o.correct, o.cost_usd, o.output, o.status)
           for o in predict(votes, top, [Decimal("1.0"), Decimal("0.66")])}
    assert got["r1"] == (1, True, 1, "r1@1", "succeeded")  # 3 of 3 at tier 1
    assert got["r5"] == (2, True, 5, "r5@2", "succeeded")  # 2 of 3 at tier 2
    assert got["r4"] == (3, True, 15, "r4@top", "succeeded")  # 1 vote at tier 2: the top tier's outcome


# --- the config patch -----------------------------------------------------------------------------


def test_the_config_patch_sets_each_tiers_threshold_and_keeps_the_rest_as_written() -> None:
    # Given tiers written as a bare name, an object with variants and the last tier
    variants = [{"name": "cot", "prompt": "Think: {question}", "samples": 2},
                {"name": "pot", "prompt": "Code: {question}", "samples": 2}]
    snap = snapshot(tiers=["small", {"model": "medium", "variants": variants}, {"model": "large", "samples": 1}])
    thresholds = [Decimal("0.33"), Decimal("0.75")]
    # When the patch is written
    patch = config_patch(snap, thresholds)
    # Then it is the task type's tiers with min_agreement on every tier but the last
    assert patch.splitlines()[:4] == [
        "task_types:", "- name: qa", "  tiers:", "  - {model: small, min_agreement: 0.33}"]
    tiers = yaml.safe_load(patch)["task_types"][0]["tiers"]
    assert tiers[1]["variants"] == variants and tiers[1]["min_agreement"] == 0.75
    assert tiers[2] == {"model": "large", "samples": 1}
    # And pasted over the task type's tiers, it is the cascade the search chose
    models = [{"name": n, "base_url": "https://api.example.com/v1", "model": n} for n in ("small", "medium", "large")]
    spec = {"name": "qa", "prompt": "Q: {question}", "output": "json",
            "self_consistency": {"samples": 3, "min_agreement": 0.5, "fields": ["answer"]}, "tiers": tiers}
    pasted = parse_config({"models": models, "task_types": [spec]}, "cascade.yaml").snapshot("qa")
    assert pasted.config_hash() == with_thresholds(snap, thresholds).config_hash()
