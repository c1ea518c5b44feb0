"""Reproduce Table 5 of "LLM cascades with mixture of thoughts" (Yue et al., ICLR 2024) on DATE, through
the real pipeline, then run the three-tier cascade the paper did not, and (``--per-tier``) calibrate a
three-tier cascade's thresholds per tier on one half of the questions and report them on the other.

    .venv/bin/python -m bench.eval_date [--data ../shared/data/mot-date] [--plot docs/evaluation.png] [--json]
        [--full] [--per-tier [--target-relative 0.99]]

The shared DATE recordings (evaluation only; never copied into this repository) are converted at run time,
into a temporary directory, to a `cascade sim --replay` file and a cascade.yaml with one task type per
cascade. Every cascade then runs through `cascade.evaluation.evaluate` (what `cascade eval` runs: one batch
per threshold and per tier alone, real Celery workers, Postgres), all batches submitted at once to one
gevent worker. The paper's accounting (../shared/data/mot-date/README.md) is encoded in the recordings:

- an answer is content ``{"answer": <value>}``, numbers as JSON numbers (18 and 18.0 vote together), a
  null answer as ``{"answer": null}``, which fails the schema: it counts in k and never agrees;
- a variant call reports prompt tokens (meta_prompts.json) + q_tokens once, and the sum of its samples'
  out_tokens; prices per 1k tokens: gpt-3.5-turbo 0.0015/0.002, gpt-4 0.03/0.06, llama-2-13b 0.0002/0.0002;
- tier 1 is gpt-3.5-turbo (one CoT prompt and run, 20 samples; or MoT: 7 CoT + 7 PoT samples voted
  together), tier 2 gpt-4 cot1 sc3 with ``on_exhausted: accept_last`` (its majority, whatever its share).

Relative cost is printed twice: against the paper's baseline (gpt-4 cot1 sc3 on every question, input at
the mean of the cot1 and cot2 prompt lengths, computed from the data) and against the pipeline's own top
tier alone (gpt-4 cot1 sc3 run as a batch, input at the cot1 prompt length).

``--per-tier`` adds the eight MoT cascades with llama-2-13b in front (its CoT prompt of the pair, run a,
the first 10 of its 20 samples): llama → gpt-3.5-turbo MoT (7 CoT + 7 PoT) → gpt-4. Each gets a
``--target-relative`` target (default 0.99 × gpt-4 alone's accuracy on the calibration half), calibrated on
half A and reported on half B, then the other way round, as ``cascade eval --target-relative`` does; the
goal checked is accuracy within 0.01 of gpt-4 alone on the held-out half, at most 0.35 of its cost there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cascade import calibration, evaluation
from cascade.cli_eval import open_pipeline
from cascade.config import CascadeConfig, TaskSnapshot, load_config, load_settings, parse_config
from cascade.sim import load_recordings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mot-date"
THRESHOLDS = [Decimal("0.4"), Decimal("0.6"), Decimal("0.8"), Decimal("1.0")]
PRICES = {"gpt-3.5-turbo": ("1.5", "2"), "gpt-4": ("30", "60"), "llama-2-13b": ("0.2", "0.2")}  # USD per Mtok
SCHEMA = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": ["string", "number"]}}}
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")

#: Table 5 (accuracy, relative cost).
PAPER = {
    "gpt-3.5 CoT SC": (0.677, 0.107), "gpt-4 CoT SC": (0.886, 1.000),
    "CoT-1D-Vote τ=0.4": (0.737, 0.192), "CoT-1D-Vote τ=0.6": (0.779, 0.289),
    "CoT-1D-Vote τ=0.8": (0.835, 0.425), "CoT-1D-Vote τ=1.0": (0.877, 0.657),
    "MoT-1D-Vote τ=0.6": (0.881, 0.417),
}

COT = [(p, run) for p in ("cot1", "cot2") for run in "ab"]
MOT = [(c, cr, p, pr) for c, p in (("cot1", "pot1"), ("cot2", "pot2")) for cr in "ab" for pr in "ab"]
#: the per-tier goal: held-out accuracy at most this far below gpt-4 alone's there, at most this share of its cost
GOAL_ACCURACY_GAP, GOAL_RELATIVE_COST = 0.01, 0.35
LLAMA_SAMPLES = 10


def encode(answer: str | None) -> str | int | float | None:
    """An extracted answer as JSON: a number where the whole string is one, else the string unchanged."""
    if answer is None or not NUMBER.fullmatch(answer):
        return answer
    return int(answer) if re.fullmatch(r"-?\d+", answer) else float(answer)


def _block(row: dict[str, Any], model: str, prompt: str, run: str) -> dict[str, Any]:  # Any: a DATE row
    return next(b for b in row["cheap"] + row["expensive"]
                if (b["model"], b["prompt_id"], b["run"]) == (model, prompt, run))


def _response(block: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:  # Any: JSON
    samples = [{"content": json.dumps({"answer": encode(a)}), "completion_tokens": t}
               for a, t in zip(block["answers"], block["out_tokens"], strict=False)]
    return {"prompt_tokens": prompt_tokens, "samples": samples}


def recording(row: dict[str, Any], prompt_tokens: dict[str, int]) -> dict[str, Any]:  # Any: JSON
    """One replay line: the question, the gold answer and every model's samples under the keys cascades use."""
    q = row["q_tokens"]
    responses = {f"gpt-3.5-turbo#{p}-{run}": _response(_block(row, "gpt-3.5-turbo", p, run), prompt_tokens[p] + q)
                 for p in ("cot1", "cot2", "pot1", "pot2") for run in "ab"}
    responses |= {f"llama-2-13b#{p}-a": _response(_block(row, "llama-2-13b", p, "a"), prompt_tokens[p] + q)
                  for p in ("cot1", "cot2")}
    responses["gpt-4"] = _response(_block(row, "gpt-4", "cot1", "sc3"), prompt_tokens["cot1"] + q)
    return {"id": row["id"], "input": {"question": row["question"]}, "gold": {"answer": encode(row["gold"])},
            "responses": responses}


def _variant(model: str, variants: Iterable[tuple[str, int]]) -> dict[str, Any]:  # Any: YAML
    return {"model": model, "variants": [{"name": n, "prompt": "{question}", "samples": k} for n, k in variants]}


def task_types(per_tier: bool = False) -> dict[str, list[Any]]:  # Any: tier specs (YAML)
    """Tiers of every cascade, by task type name (``per_tier``: with the llama → MoT → gpt-4 ones, ``mot3_``)."""
    top = {"model": "gpt-4", "samples": 3}
    tasks: dict[str, list[Any]] = {}
    for p, run in COT:
        tasks[f"cot_{p}{run}"] = [_variant("gpt-3.5-turbo", [(f"{p}-{run}", 20)]), top]
    for c, cr, p, pr in MOT:
        tasks[f"mot_{c}{cr}_{p}{pr}"] = [_variant("gpt-3.5-turbo", [(f"{c}-{cr}", 7), (f"{p}-{pr}", 7)]), top]
    for p, run in COT:
        tasks[f"three_{p}{run}"] = [_variant("llama-2-13b", [(f"{p}-a", 20)]),
                                    _variant("gpt-3.5-turbo", [(f"{p}-{run}", 20)]), top]
    for c, cr, p, pr in MOT if per_tier else []:
        tasks[f"mot3_{c}{cr}_{p}{pr}"] = [_variant("llama-2-13b", [(f"{c}-a", LLAMA_SAMPLES)]),
                                          _variant("gpt-3.5-turbo", [(f"{c}-{cr}", 7), (f"{p}-{pr}", 7)]), top]
    return tasks


def cascade_yaml(per_tier: bool = False) -> dict[str, Any]:  # Any: YAML
    models = [{"name": name, "base_url": "http://replay.invalid/v1", "model": name,
               "price": {"input_per_mtok": i, "output_per_mtok": o}} for name, (i, o) in PRICES.items()]
    tasks = [{"name": name, "prompt": "{question}", "output": "json", "schema": SCHEMA,
              "self_consistency": {"samples": 1, "fields": ["answer"]}, "tiers": tiers,
              "on_exhausted": "accept_last", "temperature": 0.4} for name, tiers in task_types(per_tier).items()]
    return {"models": models, "task_types": tasks}


def convert(data: Path, out: Path, limit: int | None = None, per_tier: bool = False) -> tuple[Path, Path, Decimal]:
    """Write recordings and cascade.yaml into ``out``; return their paths and the paper's baseline cost (USD)."""
    meta = json.loads((data / "meta_prompts.json").read_text())
    tokens = {k: v["tokens"] for k, v in meta["date_prompts"].items()}
    rows = [json.loads(line) for line in (data / "date.jsonl").read_text().splitlines() if line.strip()][:limit]
    recordings, config = out / "date.jsonl", out / "cascade.yaml"
    recordings.write_text("".join(json.dumps(recording(r, tokens)) + "\n" for r in rows))
    config.write_text(yaml.safe_dump(cascade_yaml(per_tier), sort_keys=False, allow_unicode=True))
    mean_prompt = Decimal(tokens["cot1"] + tokens["cot2"]) / 2
    baseline = sum(((mean_prompt + r["q_tokens"]) * Decimal("0.03")
                    + sum(_block(r, "gpt-4", "cot1", "sc3")["out_tokens"]) * Decimal("0.06")) / 1000 for r in rows)
    return recordings, config, Decimal(baseline)


# --- aggregation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """The mean over several cascades of one run (same label)."""

    name: str
    accuracy: float
    cost_usd: Decimal
    relative_paper: float  # cost / the paper's baseline
    relative_pipeline: float  # mean of relative_cost against the pipeline's top tier alone
    escalation_rate: float
    tier3_rate: float


def mean_point(name: str, runs: list[evaluation.RunReport], baseline: Decimal) -> Point | None:
    n = len(runs)
    if not n:
        return None
    cost = sum((r.metrics.cost_usd for r in runs), Decimal(0)) / n
    return Point(name, sum(r.metrics.accuracy for r in runs) / n, cost, float(cost / baseline),
                 sum(r.metrics.relative_cost or 0.0 for r in runs) / n, sum(r.metrics.escalation_rate for r in runs) / n,
                 sum(r.metrics.tier3_rate for r in runs) / n)


def points(reports: list[evaluation.TaskReport], baseline: Decimal) -> list[Point]:
    """The table's rows: each family of cascades averaged per threshold, and the tiers alone."""
    def runs(prefix: str, pick: Any) -> list[evaluation.RunReport]:  # Any: a predicate on RunReport
        return [r for rep in reports if rep.task_type.startswith(prefix) for r in rep.runs if pick(r)]

    def at(t: Decimal) -> Any:  # Any: a predicate
        return lambda r: r.plan.threshold == t

    out = [mean_point("gpt-3.5 CoT SC", runs("cot_", lambda r: r.plan.tier == 1), baseline),
           mean_point("gpt-4 CoT SC", runs("cot_", lambda r: r.plan.tier == 2), baseline)]
    out += [mean_point(f"CoT-1D-Vote τ={t}", runs("cot_", at(t)), baseline) for t in THRESHOLDS]
    out += [mean_point("gpt-3.5 MoT SC (7+7)", runs("mot_", lambda r: r.plan.tier == 1), baseline)]
    out += [mean_point(f"MoT-1D-Vote τ={t}", runs("mot_", at(t)), baseline) for t in THRESHOLDS]
    out += [mean_point("llama-2-13b CoT SC", runs("three_", lambda r: r.plan.tier == 1), baseline)]
    out += [mean_point(f"3-tier llama→3.5→4 τ={t}", runs("three_", at(t)), baseline) for t in THRESHOLDS]
    return [p for p in out if p is not None]


def frontier(two_tier: list[Point]) -> list[tuple[float, float]]:
    """The upper-left envelope (relative cost, accuracy) of the two-tier points: cheaper or better than the rest."""
    pts = sorted((p.relative_paper, p.accuracy) for p in two_tier)
    out: list[tuple[float, float]] = []
    for cost, acc in pts:
        if not out or acc > out[-1][1]:
            out.append((cost, acc))
    return out


def frontier_cost(front: list[tuple[float, float]], accuracy: float) -> float | None:
    """The two-tier frontier's relative cost at ``accuracy`` (linear between its points); None above it."""
    for (c0, a0), (c1, a1) in itertools.pairwise(front):
        if a0 <= accuracy <= a1:
            return c0 + (c1 - c0) * (accuracy - a0) / (a1 - a0) if a1 > a0 else c0
    return front[0][0] if front and accuracy <= front[0][1] else None


# --- output -------------------------------------------------------------------------------------


def _d(value: float, paper: float | None) -> str:
    """The difference at the paper's precision (3 decimals), so equal to 3 decimals reads +0.000."""
    return "" if paper is None else f"{round(value, 3) - paper + 0.0:+.3f}"


def table(pts: list[Point], front: list[tuple[float, float]]) -> Table:
    t = Table(title="DATE (369 questions): paper Table 5 vs the cascade pipeline")
    for col in ("run", "paper acc", "acc", "Δ", "paper rel", "rel", "Δ", "rel (pipeline top)", "escalation",
                "tier3", "2-tier frontier rel at acc"):
        t.add_column(col, justify="left" if col == "run" else "right")
    for p in pts:
        paper = PAPER.get(p.name)
        fc = frontier_cost(front, p.accuracy) if p.name.startswith("3-tier") else None
        t.add_row(p.name, f"{paper[0]:.3f}" if paper else "", f"{p.accuracy:.3f}", _d(p.accuracy, paper and paper[0]),
                  f"{paper[1]:.3f}" if paper else "", f"{p.relative_paper:.3f}",
                  _d(p.relative_paper, paper and paper[1]), f"{p.relative_pipeline:.3f}",
                  f"{p.escalation_rate:.3f}", f"{p.tier3_rate:.3f}",
                  "" if not p.name.startswith("3-tier") else ("above" if fc is None else f"{fc:.3f}"))
    return t


def plot(pts: list[Point], path: Path, calibrated: list[Calibrated] | None = None) -> None:
    """Table 5's figure; with ``calibrated``, a second panel for the per-tier calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if calibrated else 1, figsize=(15, 5.5) if calibrated else (8, 5.5), squeeze=False)
    _plot_table5(axes[0][0], pts)
    if calibrated:
        _plot_per_tier(axes[0][1], calibrated)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_table5(ax: Any, pts: list[Point]) -> None:  # Any: a matplotlib Axes
    series = [("CoT-1D-Vote", "C0", (5, -11)), ("MoT-1D-Vote", "C1", (5, -11)), ("3-tier llama→3.5→4", "C2", (-30, 4))]
    for prefix, color, offset in series:
        sel = [p for p in pts if p.name.startswith(prefix + " ")]
        ax.plot([p.relative_paper for p in sel], [p.accuracy for p in sel], "o-", color=color,
                label=f"{prefix} (pipeline, τ=0.4…1.0)")
        for p in sel:
            ax.annotate(p.name.rsplit(" ", 1)[1], (p.relative_paper, p.accuracy), textcoords="offset points",
                        xytext=offset, fontsize=7, color=color)
    singles = [("gpt-3.5 CoT SC", "s", "C0"), ("gpt-3.5 MoT SC (7+7)", "s", "C1"), ("llama-2-13b CoT SC", "s", "C2"),
               ("gpt-4 CoT SC", "*", "C3")]
    for name, marker, color in singles:
        single = next((q for q in pts if q.name == name), None)
        if single is None:
            continue
        ax.plot(single.relative_paper, single.accuracy, marker, color=color, markersize=12 if marker == "*" else 7,
                label=f"{name} alone (pipeline)")
    ax.plot([v[1] for v in PAPER.values()], [v[0] for v in PAPER.values()], "x", color="black", markersize=8,
            label="paper, Table 5")
    ax.set_xlabel("cost relative to gpt-4 CoT SC (the paper's baseline)")
    ax.set_ylabel("accuracy")
    ax.set_title("DATE: cascades run through cascade eval (real workers, Postgres)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


# --- per-tier calibration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibrated:
    """One three-tier cascade calibrated on one half and reported on the other."""

    cascade: str
    direction: str  # "A→B": calibrated on A, reported on B
    target: float  # the accuracy reached on the calibration half
    thresholds: tuple[Decimal, ...] | None  # llama's, gpt-3.5's
    calibration: evaluation.Metrics | None  # predicted, calibration half
    predicted: evaluation.Metrics | None  # predicted, held-out half
    confirmed: evaluation.Metrics | None  # the confirming batch, held-out half
    matches: bool | None
    top: evaluation.Metrics  # gpt-4 alone, held-out half
    single: Decimal | None  # the single-threshold choice
    single_holdout: evaluation.Metrics | None

    @property
    def gap(self) -> float | None:
        """Confirmed held-out accuracy minus gpt-4 alone's there."""
        return None if self.confirmed is None else self.confirmed.accuracy - self.top.accuracy

    @property
    def reached(self) -> bool:
        m = self.confirmed
        return (m is not None and self.gap is not None and self.gap >= -GOAL_ACCURACY_GAP - 1e-12
                and (m.relative_cost or 0.0) <= GOAL_RELATIVE_COST)


def calibrated(reports: list[evaluation.TaskReport]) -> list[Calibrated]:
    """The per-tier choices of the ``mot3_`` cascades, both directions each."""
    out = []
    for rep in reports:
        for choice in rep.targets:
            per = choice.per_tier
            assert per is not None
            out.append(Calibrated(
                rep.task_type.removeprefix("mot3_"), f"{choice.half}→{calibration.other_half(choice.half)}",
                choice.target, per.thresholds, per.calibration, per.predicted, per.confirmed,
                None if per.batch_id is None else not per.mismatched, choice.holdout_top, choice.threshold,
                choice.holdout))
    return out


@dataclass(frozen=True)
class Pooled:
    """One cascade over every question, each half's numbers those of the thresholds chosen on the other half."""

    cascade: str
    accuracy: float
    relative_cost: float  # against gpt-4 alone on every question
    top_accuracy: float  # gpt-4 alone on every question
    single_accuracy: float | None  # the single-threshold choices, pooled the same way
    single_relative_cost: float | None


def _pool(held: list[evaluation.Metrics | None], tops: list[evaluation.Metrics]) -> tuple[float, float] | None:
    """Accuracy and cost relative to gpt-4 alone of held-out halves taken together (None: one is missing)."""
    got = [m for m in held if m is not None]
    if len(got) < len(held):
        return None
    cost, top_cost = sum((m.cost_usd for m in got), Decimal(0)), sum((t.cost_usd for t in tops), Decimal(0))
    return sum(m.correct for m in got) / sum(t.rows for t in tops), float(cost / top_cost)


def pooled(rows: list[Calibrated]) -> list[Pooled]:
    """Both directions of each cascade together: every question is held out once."""
    out = []
    for name in dict.fromkeys(r.cascade for r in rows):
        mine = [r for r in rows if r.cascade == name]
        tops = [r.top for r in mine]
        conf, single = _pool([r.confirmed for r in mine], tops), _pool([r.single_holdout for r in mine], tops)
        top_accuracy = sum(t.correct for t in tops) / sum(t.rows for t in tops)
        out.append(Pooled(name, *(conf or (0.0, 0.0)), top_accuracy, *(single or (None, None))))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _m(m: evaluation.Metrics | None) -> tuple[str, str]:
    return ("-", "-") if m is None else (f"{m.accuracy:.3f}", f"{m.relative_cost or 0.0:.3f}")


def per_tier_table(rows: list[Calibrated], relative: float) -> Table:
    t = Table(title=f"DATE per-tier calibration: llama ×{LLAMA_SAMPLES} → gpt-3.5 MoT (7+7) → gpt-4; target "
                    f"{relative:g} × gpt-4 alone's accuracy on the calibration half; relative cost against gpt-4 "
                    "alone on the held-out half")
    for col in ("cascade", "calib→held-out", "τ llama, gpt-3.5", "calib acc", "calib rel", "predicted acc",
                "predicted rel", "confirmed acc", "confirmed rel", "= prediction", "gpt-4 acc", "Δ acc",
                "single τ", "single acc", "single rel", "goal"):
        t.add_column(col, justify="left" if col in ("cascade", "calib→held-out", "τ llama, gpt-3.5") else "right")
    for r in rows:
        t.add_row(r.cascade, r.direction, "-" if r.thresholds is None else ", ".join(map(str, r.thresholds)),
                  *_m(r.calibration), *_m(r.predicted), *_m(r.confirmed),
                  {True: "yes", False: "NO", None: "-"}[r.matches], f"{r.top.accuracy:.3f}",
                  "-" if r.gap is None else f"{r.gap:+.3f}", "-" if r.single is None else str(r.single),
                  *_m(r.single_holdout), "yes" if r.reached else "no")
    for direction in sorted({r.direction for r in rows}):
        sel = [r for r in rows if r.direction == direction and r.confirmed is not None]
        mean = [_mean([getattr(r, k).accuracy for r in sel]) for k in ("calibration", "predicted", "confirmed")]
        rel = [_mean([getattr(r, k).relative_cost or 0.0 for r in sel]) for k in ("calibration", "predicted",
                                                                                     "confirmed")]
        gap = _mean([r.gap or 0.0 for r in sel])
        t.add_row("mean", direction, "", f"{mean[0]:.3f}", f"{rel[0]:.3f}", f"{mean[1]:.3f}", f"{rel[1]:.3f}",
                  f"{mean[2]:.3f}", f"{rel[2]:.3f}", "", f"{_mean([r.top.accuracy for r in sel]):.3f}",
                  f"{gap:+.3f}", "", "", "", f"{sum(r.reached for r in sel)}/{len(sel)}")
    pools = pooled(rows)
    if pools:
        acc, top = _mean([p.accuracy for p in pools]), _mean([p.top_accuracy for p in pools])
        t.add_row("mean, pooled", "both held out", "", "", "", "", "", f"{acc:.3f}",
                  f"{_mean([p.relative_cost for p in pools]):.3f}", "", f"{top:.3f}", f"{acc - top:+.3f}", "",
                  f"{_mean([p.single_accuracy or 0.0 for p in pools]):.3f}",
                  f"{_mean([p.single_relative_cost or 0.0 for p in pools]):.3f}", "")
    return t


def per_tier_json(rows: list[Calibrated]) -> list[dict[str, Any]]:  # Any: JSON
    def js(m: evaluation.Metrics | None) -> dict[str, Any] | None:  # Any: JSON
        return None if m is None else m.to_json()

    return [{"cascade": r.cascade, "direction": r.direction, "target_accuracy": r.target,
             "thresholds": None if r.thresholds is None else list(map(str, r.thresholds)),
             "calibration_predicted": js(r.calibration), "holdout_predicted": js(r.predicted),
             "holdout_confirmed": js(r.confirmed), "matches_prediction": r.matches, "holdout_gpt4": js(r.top),
             "single_threshold": None if r.single is None else str(r.single),
             "single_holdout": js(r.single_holdout), "goal_reached": r.reached} for r in rows] + [
        {"cascade": p.cascade, "direction": "pooled", **p.__dict__} for p in pooled(rows)]


def _plot_per_tier(ax: Any, rows: list[Calibrated]) -> None:  # Any: a matplotlib Axes
    for k, direction in enumerate(sorted({r.direction for r in rows})):
        sel = [r for r in rows if r.direction == direction and r.confirmed is not None]
        color = f"C{k}"
        xs = [r.confirmed.relative_cost or 0.0 for r in sel if r.confirmed]
        ys = [r.gap or 0.0 for r in sel]
        ax.plot(xs, ys, "o", color=color, label=f"per tier, calibrated {direction} (confirmed)")
        ax.plot(_mean(xs), _mean(ys), "o", color=color, markersize=13, markeredgecolor="black",
                label=f"mean of the 8, {direction}")
        singles = [r for r in sel if r.single_holdout is not None]
        ax.plot([r.single_holdout.relative_cost or 0.0 for r in singles if r.single_holdout],
                [r.single_holdout.accuracy - r.top.accuracy for r in singles if r.single_holdout], "s",
                color=color, fillstyle="none", label=f"single threshold, calibrated {direction}")
    pools = pooled(rows)
    if pools:
        ax.plot(_mean([p.relative_cost for p in pools]), _mean([p.accuracy - p.top_accuracy for p in pools]), "D",
                color="black", markersize=9, label="mean of the 8, every question held out once")
    paper_acc, paper_rel = PAPER["MoT-1D-Vote τ=0.6"]
    ax.plot(paper_rel, paper_acc - PAPER["gpt-4 CoT SC"][0], "x", color="black", markersize=9,
            label="paper's best two-tier (MoT τ=0.6, whole set)")
    ax.axhline(0, color="C3", linewidth=1)
    low, high = ax.get_ylim()
    ax.fill_between([0, GOAL_RELATIVE_COST], -GOAL_ACCURACY_GAP, high, color="C2", alpha=0.12,
                    label=f"goal: ≥ gpt-4 − {GOAL_ACCURACY_GAP:g}, ≤ {GOAL_RELATIVE_COST:g} of its cost")
    ax.set_ylim(low, high)
    ax.set_xlim(left=0)
    ax.set_xlabel("held-out cost relative to gpt-4 alone on that half")
    ax.set_ylabel("held-out accuracy − gpt-4 alone's on that half")
    ax.set_title(f"DATE: per-tier calibration, llama ×{LLAMA_SAMPLES} → gpt-3.5 MoT → gpt-4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def run_plans(snaps: list[TaskSnapshot], full: bool) -> list[evaluation.RunPlan]:
    """Every run of every cascade; without ``full``, MoT only at τ=0.6 (Table 5's row) and not its tier 1 alone."""
    out: list[evaluation.RunPlan] = []
    for snap in snaps:
        if snap.task_type.name.startswith("mot3_"):
            out += evaluation.plan_runs(snap, THRESHOLDS)  # every tier alone: the per-tier search reads them
            continue
        mot = snap.task_type.name.startswith("mot_") and not full
        for plan in evaluation.plan_runs(snap, [Decimal("0.6")] if mot else THRESHOLDS):
            if not (mot and plan.kind == "tier" and not plan.is_top):
                out.append(plan)
    return out


def variants_indexed() -> bool:
    """Whether the call stage tells the sim where in its variant a request starts (X-Cascade-Variant-Sample);
    without it the second variant of a MoT tier is served its recorded samples from the wrong index."""
    import httpx

    from cascade.providers import ProviderPool
    from cascade.stages import plan_requests, send

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": []})

    snap = load_config_from(cascade_yaml()).snapshot(next(n for n in task_types() if n.startswith("mot_")))
    _, second = plan_requests(snap.tier(1), {"question": "q"}, set())
    pool = ProviderPool(transport=httpx.MockTransport(answer))
    try:
        send(SimpleNamespace(providers=pool), snap, snap.tier(1), second)  # type: ignore[arg-type]
    finally:
        pool.close()
    return bool(seen[0].headers.get("X-Cascade-Variant-Sample") == "0")


def load_config_from(data: dict[str, Any]) -> CascadeConfig:  # Any: YAML
    return parse_config(data, "<bench cascade.yaml>")


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    if not variants_indexed():
        err.print("[red]warning:[/red] cascade.stages does not send X-Cascade-Variant-Sample: the MoT rows below "
                  "vote the PoT variant's samples 8-14 instead of 1-7 and do not follow the paper")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cascade-date-") as tmp:
        data, config, baseline = convert(args.data, Path(tmp), args.limit, args.per_tier)
        recordings = load_recordings(data)
        settings = load_settings(config=config)
        names = task_types(args.per_tier)
        snaps = [load_config(config).snapshot(name) for name in names]
        target = evaluation.Target(relative=args.target_relative, halves=("A", "B"))
        targets = {name: target for name in names if name.startswith("mot3_")}
        err.print(f"converted {len(recordings)} questions into {tmp}; {len(snaps)} cascades × "
                  f"({len(THRESHOLDS)} thresholds + tiers alone{'' if args.full else '; MoT at τ=0.6 only'}), "
                  f"as run by:\n  cascade eval --config {config} {','.join(names)} {data} "
                  f"--thresholds {','.join(map(str, THRESHOLDS))} --json"
                  + (f"\n  and per tier: cascade eval --config {config} {','.join(targets)} {data} "
                     f"--target-relative {args.target_relative:g}" if targets else ""))
        with open_pipeline(settings, recordings, concurrency=args.concurrency) as pipe, \
                Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         console=err) as bar:
            task = bar.add_task("eval jobs", total=None)
            reports = evaluation.evaluate(pipe, run_plans(snaps, args.full), recordings, dataset="DATE (converted)",
                                          targets=targets, timeout=args.timeout,
                                          on_progress=lambda d, t: bar.update(task, completed=d, total=t))
    if reports is None:
        err.print("timeout")
        return 3
    pts = points(reports, baseline)
    front = frontier([p for p in pts if not p.name.startswith(("3-tier", "llama"))])
    per_tier = calibrated([r for r in reports if r.targets])
    if args.json:
        print(json.dumps({"baseline_usd": str(baseline), "points": [
            {**p.__dict__, "cost_usd": str(p.cost_usd), "paper": PAPER.get(p.name)} for p in pts],
            "per_tier": per_tier_json(per_tier)}))
    else:
        out = Console(width=250)
        out.print(table(pts, front))
        if per_tier:
            out.print(per_tier_table(per_tier, args.target_relative))
        out.print(f"paper baseline {baseline:.4f} USD; pipeline top tier alone "
                  f"{reports[0].top.metrics.cost_usd:.4f} USD; {time.monotonic() - started:.0f} s")
    if args.plot:
        plot(pts, args.plot, per_tier)
        err.print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="directory with date.jsonl and meta_prompts.json")
    parser.add_argument("--plot", type=Path, help="write the cost/accuracy figure here")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--full", action="store_true",
                        help="MoT-1D-Vote at every threshold and alone too (its curve in the figure; ~40%% more jobs)")
    parser.add_argument("--per-tier", action="store_true",
                        help="also calibrate llama → gpt-3.5 MoT → gpt-4 per tier, on each half, reported on the other")
    parser.add_argument("--target-relative", type=float, default=0.99,
                        help="the per-tier target: this share of gpt-4 alone's accuracy on the calibration half")
    parser.add_argument("--limit", type=int, help="only the first N questions (a smoke run)")
    parser.add_argument("--concurrency", type=int, default=256, help="greenlets of the one worker")
    parser.add_argument("--timeout", type=float, default=1800)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
