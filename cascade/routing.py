"""Where a job starts, and which accepted answers are audited. Pure: rows, stable hashes and history in, tiers out.

A job's start tier is decided once, when its batch is submitted (``cascade.producer``), and recorded in
``jobs.start_tier`` with what chose it in ``jobs.route``:

1. the task type's ``route:`` rules, in order: the first whose ``when`` holds for the row names the tier;
2. otherwise, with ``routing: {start: learned}``, the tier with the lowest expected cost per finished job
   (``learned_start``) from the task type's recent history, except for an ``explore`` share of the rows (a
   stable hash of batch and key), which start at tier 1 so that the estimate notices a model getting better;
3. otherwise tier 1.

The expected cost of starting at tier t is E_t = c_t + (1 − p_t) × E_{t+1}, with p_t the share of the jobs
validated at tier t that passed there and c_t their average cost at tier t, read from the last ``window``
finished jobs that ran tier t (``TierHistory``). Each tier keeps its own window, so the few jobs that still
explore tier 1 keep its estimate alive while most jobs skip it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cascade.config import MAX_MATCHED_CHARS, RouteRule, RouteWhen, TaskType

__all__ = [
    "EXPLORE",
    "LEARNED",
    "Start",
    "TierHistory",
    "audited",
    "expected_costs",
    "explores",
    "first_rule",
    "learned_start",
    "matches",
    "start_of",
]

#: ``jobs.route`` of a job started by the learned estimate, and of one kept at tier 1 to explore
LEARNED = "learned"
EXPLORE = "explore"


@dataclass(frozen=True)
class Start:
    """A job's start tier and what chose it (None: the default, tier 1)."""

    tier: int = 1
    route: str | None = None


# --- rules ---------------------------------------------------------------------------------------


def _text(value: Any) -> str:  # Any: a row value
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _number(value: Any) -> float | None:  # Any: a row value or a rule's constant
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _same(value: Any, expected: Any) -> bool:  # Any: a row value and a rule's constant
    """Equal as a rule reads it: numbers by value, also written as text (a CSV row's values are all text),
    booleans only to booleans, anything else as text."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return isinstance(value, bool) and isinstance(expected, bool) and value == expected
    a, b = _number(value), _number(expected)
    if a is not None and b is not None:
        return a == b
    return value is not None and expected is not None and _text(value) == _text(expected)


def matches(when: RouteWhen, row: Mapping[str, Any]) -> bool:  # Any: row values
    """Whether every condition of ``when`` holds for ``row`` (a row without the field never matches)."""
    if when.field not in row:
        return False
    value = row[when.field]
    given = when.model_fields_set
    if "equals" in given and not _same(value, when.equals):
        return False
    if when.in_ is not None and not any(_same(value, option) for option in when.in_):
        return False
    if when.min_chars is not None or when.max_chars is not None or when.matches is not None:
        text = _text(value)
        if when.min_chars is not None and len(text) < when.min_chars:
            return False
        if when.max_chars is not None and len(text) > when.max_chars:
            return False
        if when.matches is not None and _compiled(when.matches).search(text[:MAX_MATCHED_CHARS]) is None:
            return False
    return True


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _compiled(pattern: str) -> re.Pattern[str]:
    found = _PATTERNS.get(pattern)
    if found is None:
        found = _PATTERNS[pattern] = re.compile(pattern)
    return found


def first_rule(rules: Sequence[RouteRule], row: Mapping[str, Any]) -> Start | None:  # Any: row values
    """The start of the first rule that matches ``row``; None when none does."""
    for i, rule in enumerate(rules):
        if matches(rule.when, row):
            return Start(rule.start_tier, rule.name or f"route[{i}]")
    return None


# --- stable shares -------------------------------------------------------------------------------


def _share(*parts: str) -> float:
    """A number in [0, 1) fixed by ``parts``: the same row or job always gets the same one."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def explores(batch_id: str, key: str, rate: Decimal | float) -> bool:
    """Whether the row ``key`` of a batch is in its ``explore`` share (starts at tier 1 whatever was learned)."""
    return _share("explore", batch_id, key) < float(rate)


def audited(job_id: int, rate: Decimal | float) -> bool:
    """Whether job ``job_id`` is in its task type's audit share (``audit: {rate}``)."""
    return _share("audit", str(job_id)) < float(rate)


# --- the learned start tier ----------------------------------------------------------------------


@dataclass(frozen=True)
class TierHistory:
    """The last finished jobs that ran one tier: how many, how many passed there, their average cost at the
    tier and above it."""

    tier: int
    jobs: int
    passed: int
    cost_usd: Decimal
    above_usd: Decimal

    @property
    def pass_rate(self) -> Decimal:
        return Decimal(self.passed) / self.jobs if self.jobs else Decimal(0)


def expected_costs(history: Sequence[TierHistory], tiers: int, min_jobs: int) -> dict[int, Decimal]:
    """E_t, the expected cost per finished job of starting at tier t, for each tier with at least ``min_jobs``
    jobs of history: c_t + (1 − p_t) × E_{t+1}; where E_{t+1} is unknown (tier t+1 has too little history),
    what tier t's own jobs paid above it."""
    by_tier = {h.tier: h for h in history if h.jobs >= min_jobs}
    costs: dict[int, Decimal] = {}
    for t in range(tiers, 0, -1):
        h = by_tier.get(t)
        if h is None:
            continue
        if t == tiers:
            costs[t] = h.cost_usd
        elif t + 1 in costs:
            costs[t] = h.cost_usd + (1 - h.pass_rate) * costs[t + 1]
        else:
            costs[t] = h.cost_usd + h.above_usd
    return costs


def learned_start(history: Sequence[TierHistory], tiers: int, min_jobs: int) -> int:
    """The tier with the lowest expected cost (the lowest such tier on a tie); tier 1 while tier 1 itself has
    too little history."""
    costs = expected_costs(history, tiers, min_jobs)
    if 1 not in costs:
        return 1
    return min(costs, key=lambda t: (costs[t], t))


def start_of(task: TaskType, batch_id: str, key: str, row: Mapping[str, Any],  # Any: row values
             learned: int) -> Start:
    """Where one row of a batch starts: its first matching rule, else the ``learned`` tier (1 when the task
    type does not learn) unless the row explores, else tier 1."""
    ruled = first_rule(task.route, row)
    if ruled is not None:
        return ruled
    if task.routing.start != "learned":
        return Start()
    if learned > 1 and explores(batch_id, key, task.routing.explore):
        return Start(1, EXPLORE)
    return Start(learned, LEARNED)
