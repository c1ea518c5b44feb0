"""Scoring evaluation runs and choosing thresholds: pure functions, no I/O.

A run's rows are ``RowOutcome``s; ``measure`` turns them into ``Metrics``. The rows split in two halves by a
hash of their id (``half_of``): a target (``Target``) is reached on one half, the calibration half, and the
choice is reported on the other, the held-out half.

Two choices are made for a target:

- ``choose_threshold``: the cheapest of the threshold runs (one ``min_agreement`` on every tier but the
  last), each a batch that went through the pipeline;
- ``choose_per_tier``: the cheapest combination of one ``min_agreement`` per tier (every tier but the last),
  searched without running the combinations: each row's outcome under a combination is predicted
  (``predict``) from what the tier-alone runs recorded for that row (``TierVote``: the majority's votes, k,
  whether the majority answer is right, the tier's cost) and from the top tier alone's outcome. A tier
  passes at threshold τ exactly as ``cascade.validate.vote`` decides (``accepts``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

import yaml

from cascade.config import TaskSnapshot, TierConfig
from cascade.errors import ConfigError
from cascade.validate import canonicalize

__all__ = [
    "MAX_COMBINATIONS",
    "Half",
    "Metrics",
    "PerTierChoice",
    "RowOutcome",
    "Target",
    "TargetChoice",
    "TierVote",
    "accepts",
    "choose_per_tier",
    "choose_threshold",
    "config_patch",
    "confirm",
    "half_of",
    "in_half",
    "is_calibration",
    "is_correct",
    "measure",
    "other_half",
    "predict",
    "search_grids",
    "vote_levels",
]

Half = Literal["A", "B"]

#: The most per-tier combinations searched: above it ``--thresholds`` must name fewer thresholds.
MAX_COMBINATIONS = 200_000


# --- scoring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOutcome:
    """What one row's job ended with (``job_id`` 0: predicted, not run)."""

    row_id: str
    job_id: int
    status: str
    tier: int
    correct: bool
    cost_usd: Decimal
    output: Any  # Any: the parsed output stored on the job

    def same_as(self, other: RowOutcome) -> bool:
        """Whether both ended alike: status, tier, correctness and cost."""
        return (self.status, self.tier, self.correct, self.cost_usd) == (
            other.status, other.tier, other.correct, other.cost_usd)


@dataclass(frozen=True)
class Metrics:
    rows: int
    correct: int
    accuracy: float
    escalation_rate: float
    tier3_rate: float
    cost_usd: Decimal
    relative_cost: float | None  # cost / the top tier alone's cost on the same rows

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"rows": self.rows, "correct": self.correct, "accuracy": self.accuracy,
                "escalation_rate": self.escalation_rate, "tier3_rate": self.tier3_rate,
                "cost_usd": str(self.cost_usd), "relative_cost": self.relative_cost}


def is_correct(status: str, output: Any, gold: Any, fields: Sequence[str] | None) -> bool:  # Any: JSON values
    """A succeeded job whose output equals ``gold`` on the voted fields (canonical forms, so 18 == 18.0)."""
    if status != "succeeded" or output is None:
        return False
    try:
        return canonicalize(output, fields) == canonicalize(gold, fields)
    except TypeError:
        return False


def measure(outcomes: Sequence[RowOutcome], baseline: Sequence[RowOutcome] | None = None) -> Metrics:
    """Metrics of ``outcomes``; relative cost against the ``baseline`` outcomes of the same rows."""
    n = len(outcomes)
    cost = sum((o.cost_usd for o in outcomes), Decimal(0))
    relative = None
    if baseline is not None:
        ids = {o.row_id for o in outcomes}
        base = sum((o.cost_usd for o in baseline if o.row_id in ids), Decimal(0))
        relative = float(cost / base) if base else None
    correct = sum(o.correct for o in outcomes)
    return Metrics(n, correct, correct / n if n else 0.0, sum(o.tier > 1 for o in outcomes) / n if n else 0.0,
                   sum(o.tier >= 3 for o in outcomes) / n if n else 0.0, cost, relative)


def is_calibration(row_id: str) -> bool:
    """Whether the row is in half A, the half a target calibrates on by default (by hashed id)."""
    return hashlib.sha256(row_id.encode()).digest()[0] % 2 == 0


def half_of(row_id: str) -> Half:
    """The row's half: A (``is_calibration``) or B, about half of the rows each, the same on every run."""
    return "A" if is_calibration(row_id) else "B"


def other_half(half: Half) -> Half:
    return "B" if half == "A" else "A"


def in_half(outcomes: Sequence[RowOutcome], half: Half) -> list[RowOutcome]:
    """The outcomes of the rows in ``half``."""
    return [o for o in outcomes if half_of(o.row_id) == half]


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What to reach on the calibration half, and where to search for per-tier thresholds.

    Exactly one of ``accuracy`` (``--target-accuracy``) and ``relative`` (``--target-relative``: that share of
    the top tier alone's own accuracy on the calibration half) is set. ``grid``: the thresholds tried on
    every tier but the last (``--thresholds``); None: each tier's vote levels (``vote_levels``). ``halves``:
    the halves calibrated on, each reported on the other.
    """

    accuracy: float | None = None
    relative: float | None = None
    grid: tuple[Decimal, ...] | None = None
    halves: tuple[Half, ...] = ("A",)

    def __post_init__(self) -> None:
        if (self.accuracy is None) == (self.relative is None):
            raise ValueError("a target is an accuracy or a relative accuracy, one of the two")

    def on(self, top_calibration: Metrics) -> float:
        """The accuracy to reach, given the top tier alone on the calibration half."""
        if self.accuracy is not None:
            return self.accuracy
        assert self.relative is not None
        return self.relative * top_calibration.accuracy


@dataclass(frozen=True)
class PerTierChoice:
    """The cheapest per-tier combination on the calibration half, predicted from the tier-alone runs, and
    (once run) the batch that confirms it."""

    models: tuple[str, ...]  # the model of each tier searched (every tier but the last)
    grids: tuple[tuple[Decimal, ...], ...]  # the thresholds tried on each of those tiers
    thresholds: tuple[Decimal, ...] | None  # None: no combination reached the target on the calibration half
    calibration: Metrics | None = None  # predicted, calibration half
    predicted: Metrics | None = None  # predicted, held-out half
    outcomes: tuple[RowOutcome, ...] = ()  # predicted, every row
    patch: str | None = None  # cascade.yaml lines setting the thresholds
    batch_id: str | None = None  # the confirming run's batch
    confirmed: Metrics | None = None  # the confirming run, held-out half
    confirmed_calibration: Metrics | None = None  # the confirming run, calibration half
    mismatched: tuple[str, ...] = ()  # rows whose confirmed outcome differs from the prediction

    @property
    def combinations(self) -> int:
        return math.prod(len(g) for g in self.grids)

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        def js(m: Metrics | None) -> dict[str, Any] | None:  # Any: JSON
            return None if m is None else m.to_json()

        tiers = None if self.thresholds is None else [
            {"tier": i, "model": model, "min_agreement": str(t)}
            for i, (model, t) in enumerate(zip(self.models, self.thresholds, strict=True), start=1)]
        return {"thresholds": tiers, "combinations": self.combinations,
                "grid": [[str(t) for t in g] for g in self.grids], "calibration_predicted": js(self.calibration),
                "holdout_predicted": js(self.predicted), "batch_id": self.batch_id,
                "holdout_confirmed": js(self.confirmed), "calibration_confirmed": js(self.confirmed_calibration),
                "matches_prediction": None if self.batch_id is None else not self.mismatched,
                "mismatched_rows": list(self.mismatched), "config_patch": self.patch}


@dataclass(frozen=True)
class TargetChoice:
    """A target on one calibration half: the cheapest threshold run reaching it, measured on the other half,
    and the cheapest per-tier combination (``per_tier``)."""

    target: float  # the accuracy to reach on the calibration half
    threshold: Decimal | None  # None: no threshold reached the target on the calibration half
    calibration: Metrics | None
    holdout: Metrics | None
    holdout_top: Metrics  # the top tier alone on the held-out half
    relative: float | None = None  # --target-relative R: target = R × calibration_top's accuracy
    half: Half = "A"  # the calibration half
    calibration_top: Metrics | None = None  # the top tier alone on the calibration half
    per_tier: PerTierChoice | None = None

    @property
    def reached(self) -> bool:
        """Whether a threshold or a per-tier combination reached the target on the calibration half."""
        return self.threshold is not None or (self.per_tier is not None and self.per_tier.thresholds is not None)

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"target_accuracy": self.target, "target_relative": self.relative, "calibrated_on": self.half,
                "reported_on": other_half(self.half),
                "threshold": None if self.threshold is None else str(self.threshold),
                "calibration": self.calibration.to_json() if self.calibration else None,
                "holdout": self.holdout.to_json() if self.holdout else None,
                "calibration_top_tier_alone": self.calibration_top.to_json() if self.calibration_top else None,
                "holdout_top_tier_alone": self.holdout_top.to_json(),
                "per_tier": self.per_tier.to_json() if self.per_tier else None}


def choose_threshold(runs: Sequence[tuple[Decimal, Sequence[RowOutcome]]], top: Sequence[RowOutcome],
                     target: float, half: Half = "A", relative: float | None = None) -> TargetChoice:
    """Pick the threshold run with the lowest cost on the calibration ``half`` (then the lowest threshold)
    whose accuracy there reaches ``target``, and report it on the other half."""
    holdout_top = measure(in_half(top, other_half(half)), top)
    scored = [(measure(in_half(o, half), top), t, o) for t, o in runs]
    good = [s for s in scored if s[0].rows and s[0].accuracy >= target]
    top_calibration = measure(in_half(top, half), top)
    if not good:
        return TargetChoice(target, None, None, None, holdout_top, relative, half, top_calibration)
    calib, threshold, outcomes = min(good, key=lambda s: (s[0].cost_usd, s[1]))
    held = measure(in_half(outcomes, other_half(half)), top)
    return TargetChoice(target, threshold, calib, held, holdout_top, relative, half, top_calibration)


# --- per-tier search ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TierVote:
    """One row at one tier, as that tier's run alone recorded it."""

    votes: int  # votes of the majority answer; 0: no sample was valid
    samples: int  # k
    correct: bool  # whether the majority answer equals gold
    cost_usd: Decimal  # what the tier's requests for the row cost
    output: Any = None  # Any: the majority answer (parsed output)


def accepts(vote: TierVote, threshold: Decimal) -> bool:
    """Whether the tier passes at ``threshold``, as ``cascade.validate.vote`` decides: some sample is valid and
    the majority's votes reach threshold × k, exactly (k == 1: a valid sample passes)."""
    return vote.votes > 0 and (vote.samples == 1 or Decimal(vote.votes) >= threshold * vote.samples)


def _level(v: int, k: int) -> Decimal:
    """v/k rounded down to two decimals (more if k needed them): a threshold τ with (v-1)/k < τ ≤ v/k, so
    exactly v votes of k pass it (0.57 for 8 of 14)."""
    digits = 2
    while True:
        scaled = v * 10**digits // k
        if Fraction(scaled, 10**digits) > Fraction(v - 1, k):
            break
        digits += 1
    level = Decimal(scaled).scaleb(-digits)
    return Decimal("1.0") if level == 1 else level.normalize()


def vote_levels(samples: int, configured: Decimal) -> list[Decimal]:
    """Every threshold that makes a difference to a tier of ``samples`` votes: one per vote count needed,
    1 of k to k of k (``_level``). A one-sample tier passes any valid sample whatever its threshold, so it
    keeps ``configured``."""
    if samples == 1:
        return [configured]
    return [_level(v, samples) for v in range(1, samples + 1)]


def search_grids(snap: TaskSnapshot, grid: Sequence[Decimal] | None) -> tuple[tuple[Decimal, ...], ...]:
    """The thresholds tried on each tier but the last: ``grid`` on every one, or each tier's ``vote_levels``.

    Raises:
        ConfigError: more than ``MAX_COMBINATIONS`` combinations (name fewer ``--thresholds``).
    """
    tiers = [snap.tier(i) for i in range(1, snap.tier_count)]
    grids = tuple(tuple(grid) if grid is not None else tuple(vote_levels(t.samples, t.min_agreement))
                  for t in tiers)
    count = math.prod(len(g) for g in grids)
    if count > MAX_COMBINATIONS:
        raise ConfigError(f"{snap.task_type.name}: {count:,} per-tier combinations to search, at most "
                          f"{MAX_COMBINATIONS:,}: give fewer thresholds", path="--thresholds")
    return grids


def predict(votes: Sequence[Sequence[TierVote]], top: Sequence[RowOutcome],
            thresholds: Sequence[Decimal]) -> list[RowOutcome]:
    """Each row's outcome under ``thresholds`` (tier i's is ``thresholds[i-1]``): the first tier that passes
    answers with its majority, having paid every tier tried; no tier passing, the row ends as the top tier
    alone ended it. ``votes[i][j]``: tier i+1's record of row j; ``top[j]``: the top tier alone's row j."""
    out = []
    for j, last in enumerate(top):
        cost = Decimal(0)
        for i, threshold in enumerate(thresholds):
            vote = votes[i][j]
            cost += vote.cost_usd
            if accepts(vote, threshold):
                out.append(RowOutcome(last.row_id, 0, "succeeded", i + 1, vote.correct, cost, vote.output))
                break
        else:
            out.append(RowOutcome(last.row_id, 0, last.status, len(thresholds) + 1, last.correct,
                                  cost + last.cost_usd, last.output))
    return out


def _walk(votes: Sequence[Sequence[TierVote]], top: Sequence[RowOutcome], grids: Sequence[Sequence[Decimal]],
          pending: list[int], level: int, cost: Decimal, correct: int,
          chosen: tuple[Decimal, ...]) -> Iterator[tuple[Decimal, int, tuple[Decimal, ...]]]:
    """(cost, correct, thresholds) of every combination extending ``chosen`` over the rows ``pending``
    at tier ``level`` + 1; the combinations that share a prefix share its work."""
    if level == len(grids):
        yield (cost + sum((top[j].cost_usd for j in pending), Decimal(0)),
               correct + sum(top[j].correct for j in pending), chosen)
        return
    spent = cost + sum((votes[level][j].cost_usd for j in pending), Decimal(0))
    for threshold in grids[level]:
        passed = [accepts(votes[level][j], threshold) for j in pending]
        right = sum(votes[level][j].correct for j, p in zip(pending, passed, strict=True) if p)
        rest = [j for j, p in zip(pending, passed, strict=True) if not p]
        yield from _walk(votes, top, grids, rest, level + 1, spent, correct + right, (*chosen, threshold))


def choose_per_tier(snap: TaskSnapshot, votes: Sequence[Sequence[TierVote]], top: Sequence[RowOutcome],
                    grids: Sequence[Sequence[Decimal]], target: float, half: Half = "A") -> PerTierChoice:
    """The combination of ``grids`` (one threshold per tier but the last) with the lowest predicted cost on
    the calibration ``half`` whose predicted accuracy there reaches ``target`` (ties: the more accurate, then
    the lowest thresholds, tier 1 first), predicted on every row. ``votes`` and ``top`` as for ``predict``."""
    models = tuple(snap.tier(i).model.name for i in range(1, snap.tier_count))
    frozen = tuple(tuple(g) for g in grids)
    rows = [j for j, o in enumerate(top) if half_of(o.row_id) == half]
    best: tuple[Decimal, int, tuple[Decimal, ...]] | None = None
    for cost, correct, chosen in _walk(votes, top, frozen, rows, 0, Decimal(0), 0, ()):
        if rows and correct / len(rows) >= target:
            key = (cost, -correct, chosen)
            best = key if best is None or key < best else best
    if best is None:
        return PerTierChoice(models, frozen, None)
    thresholds = best[2]
    outcomes = predict(votes, top, thresholds)
    return PerTierChoice(models, frozen, thresholds, measure(in_half(outcomes, half), top),
                         measure(in_half(outcomes, other_half(half)), top), tuple(outcomes),
                         config_patch(snap, thresholds))


def confirm(choice: PerTierChoice, batch_id: str, outcomes: Sequence[RowOutcome], top: Sequence[RowOutcome],
            half: Half) -> PerTierChoice:
    """``choice`` with the numbers of the batch that ran its thresholds through the pipeline (``outcomes``),
    and the rows whose outcome differs from the prediction."""
    ran = {o.row_id: o for o in outcomes}
    mismatched = tuple(p.row_id for p in choice.outcomes if p.row_id not in ran or not p.same_as(ran[p.row_id]))
    return dataclasses.replace(choice, batch_id=batch_id, confirmed=measure(in_half(outcomes, other_half(half)), top),
                               confirmed_calibration=measure(in_half(outcomes, half), top), mismatched=mismatched)


class _Dumper(yaml.SafeDumper):
    """Writes a Decimal as the YAML number it reads as (0.571, not 0.57099999...)."""


_Dumper.add_representer(Decimal, lambda d, v: d.represent_scalar("tag:yaml.org,2002:float", str(v)))


def config_patch(snap: TaskSnapshot, thresholds: Sequence[Decimal]) -> str:
    """The ``tiers:`` of the task type in cascade.yaml, as written there, with ``min_agreement`` set on every
    tier but the last (YAML to paste over the task type's ``tiers``)."""
    tiers: list[dict[str, Any]] = []  # Any: YAML
    for spec, threshold in itertools.zip_longest(snap.task_type.tiers, thresholds):
        over = TierConfig(model=spec) if isinstance(spec, str) else spec
        item = over.model_dump(mode="json", by_alias=True, exclude_unset=True)
        item["model"] = over.model
        if threshold is not None:
            item["min_agreement"] = threshold
        tiers.append(item)
    data = {"task_types": [{"name": snap.task_type.name, "tiers": tiers}]}
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, allow_unicode=True, width=120)
