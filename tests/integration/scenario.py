"""A two-task-type, three-tier cascade on the sim, and what the sim's seed predicts for each row."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from cascade.config import CascadeConfig, TaskSnapshot, parse_config, render
from cascade.sim import SimConfig, SimModel, expected_answer

PRICES = {"small": (Decimal("0.15"), Decimal("0.60")), "medium": (Decimal(1), Decimal(4)),
          "large": (Decimal(5), Decimal(15))}

LABEL_SCHEMA = {"type": "object", "required": ["label", "confidence"],
                "properties": {"label": {"type": "string"}, "confidence": {"type": "number"}}}


def cascade_config(sim_url: str, *, fallbacks: bool = False, **model_overrides: Any) -> CascadeConfig:
    """The two task types; with ``fallbacks``, tier 1 of each has a backup (``small_b``, priced as ``small``)."""
    models = [
        {"name": name, "base_url": sim_url, "model": f"sim-{name}", "timeout_s": 10, "max_retries": 3,
         "price": {"input_per_mtok": str(i), "output_per_mtok": str(o)}, **model_overrides}
        for name, (i, o) in PRICES.items()
    ]
    if fallbacks:
        models.append({**models[0], "name": "small_b", "model": "sim-small_b"})
    first: Any = {"model": "small", "fallbacks": ["small_b"]} if fallbacks else "small"
    tasks = [
        {"name": "label", "system": "You label support tickets. Answer with JSON only.",
         "prompt": "Ticket {id}: {text}", "output": "json", "schema": LABEL_SCHEMA,
         "self_consistency": {"samples": 3, "min_agreement": 0.6, "fields": ["label"]},
         "tiers": [first, "medium", {"model": "large", "samples": 1}]},
        {"name": "summary", "prompt": "Summarize in one line: {text}", "output": "text",
         "length": {"min_chars": 3, "max_chars": 400}, "tiers": [first, "medium", "large"]},
    ]
    return parse_config({"models": models, "task_types": tasks}, "test.yaml")


def sim_config(seed: int = 11) -> SimConfig:
    return SimConfig(seed=seed, models={
        "small": SimModel(p_correct=0.6, p_invalid_json=0.08, p_schema_violation=0.05, p_too_short=0.1),
        "medium": SimModel(p_correct=0.8, p_invalid_json=0.03, p_too_short=0.05),
        "large": SimModel(p_correct=0.95, p_too_short=0.02),
    })


def rows(n: int, task: str) -> list[dict[str, Any]]:
    return [{"id": f"{task}-{i}", "text": f"row {i} of {task}: printer on floor {i % 7} is jammed"} for i in range(n)]


def _valid(outcome: str, output: str) -> bool:
    if outcome == "too_short":
        return False
    return output == "text" or outcome in ("correct", "wrong")


def predict(snap: TaskSnapshot, sim: SimConfig, row: dict[str, Any]) -> tuple[str, int, Any]:
    """(status, final tier, output) the cascade must produce for ``row``, derived from the sim's draws."""
    task = snap.task_type
    fmt = {"type": "json_schema", "json_schema": {"name": task.name, "schema": task.schema_}} if task.schema_ else None
    for index in range(1, snap.tier_count + 1):
        tier = snap.tier(index)
        key = render(tier.prompt, row)
        outcomes = [sim.outcome(tier.model.name, key, s) for s in range(tier.samples)]
        valid = [o for o in outcomes if _valid(o, task.output)]
        if tier.samples == 1:
            if valid:
                return "succeeded", index, sim.content(tier.model.name, key, 0, fmt)
            continue
        need = math.ceil(tier.min_agreement * tier.samples)
        if outcomes.count("correct") >= need:  # wrong answers are unique, so only the correct one can win
            return "succeeded", index, expected_answer(sim.seed, key, fmt)
    return "failed", snap.tier_count, None


def pass_probability(m: SimModel, samples: int, min_agreement: Decimal, output: str) -> float:
    """P(a tier passes) for independent samples."""
    invalid = m.p_too_short + (0 if output == "text" else m.p_invalid_json + m.p_schema_violation)
    if samples == 1:
        return 1 - invalid
    q = (1 - (m.p_invalid_json + m.p_schema_violation + m.p_too_short)) * m.p_correct
    need = math.ceil(min_agreement * samples)
    return sum(math.comb(samples, j) * q**j * (1 - q) ** (samples - j) for j in range(need, samples + 1))
