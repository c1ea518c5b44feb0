"""Evaluation on recorded answers (``cascade eval``): a labelled dataset through the real pipeline.

Each task type is run once per threshold (``min_agreement`` of every tier but the last) and once per
tier alone (that tier as a one-tier cascade). Every run is a batch submitted with
``producer.submit_rows`` and worked by real Celery workers, with every model of the task type pointed
at a replay sim serving the dataset's recordings. A run reports accuracy (over all rows: the result
equals ``gold`` on the voted fields; a failed job is wrong), escalation and tier-3 rates, cost, and
``relative_cost``: cost divided by the cost of the top tier alone on the same rows, which is its own
batch through the same pipeline (not an estimate from recorded usage). Runs and per-row outcomes are
written to ``eval_runs`` and ``eval_results``.

Identical tier-alone runs of several task types (same tier, same checks) share one batch. The edge
(``cli_eval.open_pipeline``) builds the ``Pipeline``: services, the replay sim and a worker.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from subprocess import Popen
from typing import Any, Literal

from sqlalchemy import Engine

from cascade import producer, store
from cascade.config import CascadeSettings, TaskSnapshot, TierConfig, render
from cascade.errors import CascadeError, InputError
from cascade.publish import Publisher
from cascade.sim import Recording
from cascade.validate import canonicalize

__all__ = [
    "Metrics",
    "Pipeline",
    "RowOutcome",
    "RunPlan",
    "RunReport",
    "TargetChoice",
    "TaskReport",
    "check_recordings",
    "choose_threshold",
    "evaluate",
    "is_calibration",
    "is_correct",
    "measure",
    "plan_runs",
    "point_at",
    "tier_alone",
    "with_threshold",
]

RunKind = Literal["threshold", "tier"]


# --- planning (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """One run of a task type: a threshold over the cascade, or one tier alone."""

    task_type: str
    label: str
    kind: RunKind
    threshold: Decimal | None
    tier: int | None  # tier-alone runs: which tier
    snapshot: TaskSnapshot
    is_top: bool = False  # the top tier alone: the cost baseline of its task type's runs


def with_threshold(snap: TaskSnapshot, threshold: Decimal) -> TaskSnapshot:
    """The snapshot with ``min_agreement`` = ``threshold`` on every tier but the last."""
    task = snap.task_type
    tiers: list[str | TierConfig] = []
    for i, spec in enumerate(task.tiers, start=1):
        if i == len(task.tiers):
            tiers.append(spec)
            continue
        over = TierConfig(model=spec) if isinstance(spec, str) else spec
        tiers.append(over.model_copy(update={"min_agreement": threshold}))
    return snap.model_copy(update={"task_type": task.model_copy(update={"tiers": tiers})})


def tier_alone(snap: TaskSnapshot, index: int) -> TaskSnapshot:
    """A one-tier cascade of tier ``index`` (1-based): it is the last tier, so ``on_exhausted`` applies."""
    task = snap.task_type
    spec = task.tiers[index - 1]
    name = spec if isinstance(spec, str) else spec.model
    return TaskSnapshot(task_type=task.model_copy(update={"tiers": [spec]}), models={name: snap.models[name]})


def plan_runs(snap: TaskSnapshot, thresholds: Sequence[Decimal]) -> list[RunPlan]:
    """One run per threshold, then one per tier alone (the last of which is the top tier alone)."""
    name = snap.task_type.name
    runs = [RunPlan(name, f"τ={t}", "threshold", t, None, with_threshold(snap, t)) for t in thresholds]
    for i in range(1, snap.tier_count + 1):
        model = snap.tier(i).model.name
        label = f"top tier alone ({model})" if i == snap.tier_count else f"tier {i} alone ({model})"
        runs.append(RunPlan(name, label, "tier", None, i, tier_alone(snap, i), i == snap.tier_count))
    return runs


def point_at(snap: TaskSnapshot, base_url: str) -> TaskSnapshot:
    """Every model of the snapshot sent to ``base_url`` (the replay sim), with no key, no rate limit and no
    request cache: each run's figures are those of the run alone, every request paid."""
    models = {name: m.model_copy(update={"base_url": base_url, "api_key_env": None, "rate_limit_rpm": None,
                                         "cache": False})
              for name, m in snap.models.items()}
    return snap.model_copy(update={"models": models})


def _prompts(snap: TaskSnapshot, index: int) -> list[tuple[str, str, int]]:
    """(recording key, user prompt template, samples) of each request prompt of tier ``index``."""
    tier = snap.tier(index)
    if tier.variants:
        return [(f"{tier.model.name}#{v.name}", v.prompt, v.samples) for v in tier.variants]
    return [(tier.model.name, tier.prompt, tier.samples)]


def check_recordings(snap: TaskSnapshot, recordings: Sequence[Recording], source: str) -> None:
    """Fail early, naming the row, when the replay sim could not answer a request the runs may send.

    Every row needs a gold answer, prompts that contain its input values (that is how the sim finds it)
    and, for every tier and variant, a recording with at least the configured number of samples.

    Raises:
        InputError: naming ``source``, the row's line and id, and what is missing.
    """
    if not recordings:
        raise InputError("no recordings", source=source)
    for line, rec in enumerate(recordings, start=1):
        where = f"row {rec.id!r}: "
        if rec.gold is None:
            raise InputError(where + "no gold answer", source=source, line=line, field="gold")
        for index in range(1, snap.tier_count + 1):
            for key, prompt, samples in _prompts(snap, index):
                try:
                    message = render(prompt, rec.input)
                except (KeyError, IndexError) as exc:
                    raise InputError(where + f"input has no field {exc} for tier {index}", source=source,
                                     line=line, field="input") from None
                if not all(needle in message for needle in rec.needles()):
                    raise InputError(where + f"the tier {index} prompt of {key!r} does not contain every input "
                                     "value, so the replay sim cannot find the row", source=source, line=line)
                got = rec.responses.get(key)
                if got is None or len(got.samples) < samples:
                    have = "none" if got is None else f"{len(got.samples)} samples"
                    raise InputError(where + f"tier {index} needs {samples} samples recorded under {key!r}, "
                                     f"found {have}", source=source, line=line, field="responses")


# --- scoring (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOutcome:
    """What one row's job ended with."""

    row_id: str
    job_id: int
    status: str
    tier: int
    correct: bool
    cost_usd: Decimal
    output: Any  # Any: the parsed output stored on the job


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
    """The deterministic half of the rows ``--target-accuracy`` calibrates on (by hashed id)."""
    return hashlib.sha256(row_id.encode()).digest()[0] % 2 == 0


@dataclass(frozen=True)
class TargetChoice:
    """The cheapest threshold reaching ``target`` on the calibration half, measured on the other half."""

    target: float
    threshold: Decimal | None  # None: no threshold reached the target on the calibration half
    calibration: Metrics | None
    holdout: Metrics | None
    holdout_top: Metrics  # the top tier alone on the held-out half

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"target_accuracy": self.target, "threshold": None if self.threshold is None else str(self.threshold),
                "calibration": self.calibration.to_json() if self.calibration else None,
                "holdout": self.holdout.to_json() if self.holdout else None,
                "holdout_top_tier_alone": self.holdout_top.to_json()}


def choose_threshold(runs: Sequence[tuple[Decimal, Sequence[RowOutcome]]], top: Sequence[RowOutcome],
                     target: float) -> TargetChoice:
    """Pick the threshold run with the lowest calibration cost (then the lowest threshold) whose calibration
    accuracy reaches ``target``, and report it on the held-out rows."""
    def half(outcomes: Sequence[RowOutcome], calibration: bool) -> list[RowOutcome]:
        return [o for o in outcomes if is_calibration(o.row_id) == calibration]

    holdout_top = measure(half(top, False), top)
    scored = [(measure(half(o, True), top), t, o) for t, o in runs]
    good = [s for s in scored if s[0].rows and s[0].accuracy >= target]
    if not good:
        return TargetChoice(target, None, None, None, holdout_top)
    calib, threshold, outcomes = min(good, key=lambda s: (s[0].cost_usd, s[1]))
    return TargetChoice(target, threshold, calib, measure(half(outcomes, False), top), holdout_top)


@dataclass(frozen=True)
class RunReport:
    plan: RunPlan
    batch_id: str
    metrics: Metrics
    outcomes: list[RowOutcome]

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        plan = self.plan
        return {"label": plan.label, "kind": plan.kind, "threshold": None if plan.threshold is None
                else str(plan.threshold), "tier": plan.tier, "model": plan.snapshot.tier(1).model.name
                if plan.kind == "tier" else None, "batch_id": self.batch_id, **self.metrics.to_json()}


@dataclass(frozen=True)
class TaskReport:
    """Every run of one task type on one dataset."""

    task_type: str
    dataset: str
    eval_id: str
    runs: list[RunReport]
    target: TargetChoice | None = None

    @property
    def top(self) -> RunReport:
        return next(r for r in self.runs if r.plan.is_top)

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"task_type": self.task_type, "dataset": self.dataset, "eval_id": self.eval_id,
                "rows": self.top.metrics.rows,
                "baseline": f"{self.top.plan.label}: its own batch through the pipeline on the same rows",
                "runs": [r.to_json() for r in self.runs],
                "target": self.target.to_json() if self.target else None}


# --- the pipeline -------------------------------------------------------------------------------


@dataclass
class Pipeline:
    """Where runs go: Postgres, a publisher on the broker, the replay sim, and our worker (if we started one)."""

    engine: Engine
    publisher: Publisher
    sim_url: str
    settings: CascadeSettings
    worker: Popen[bytes] | None = None
    worker_log: Path | None = None
    psql_command: str | None = None

    def check_worker(self) -> None:
        """Raise when the worker we started has exited (its log says why)."""
        if self.worker is not None and self.worker.poll() is not None:
            raise CascadeError(f"the eval worker exited with code {self.worker.returncode}; see {self.worker_log}")


def _dedupe_key(snap: TaskSnapshot) -> str:
    data = snap.to_json()
    data["task_type"]["name"] = ""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _submit(pipe: Pipeline, plan: RunPlan, recordings: Sequence[Recording], dataset: str,
            submitted: dict[str, str]) -> str:
    """The batch of ``plan``, shared with an identical tier-alone run already in ``submitted`` (key → batch)."""
    snap = point_at(plan.snapshot, pipe.sim_url)
    key = _dedupe_key(snap) if plan.kind == "tier" else None
    if key is not None and key in submitted:
        return submitted[key]
    rows = ((i, rec.input) for i, rec in enumerate(recordings, start=1))
    batch_id = producer.submit_rows(pipe.engine, pipe.publisher, snap, rows, source=f"cascade eval {dataset}").batch_id
    if key is not None:
        submitted[key] = batch_id
    return batch_id


def wait(pipe: Pipeline, batch_ids: Sequence[str], *, timeout: float | None,
         on_progress: Callable[[int, int], None] | None = None, poll_s: float = 0.25) -> bool:
    """Poll Postgres until every job of the batches is finished; False after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with pipe.engine.connect() as conn:
            total, done = store.count_finished(conn, batch_ids)
        if on_progress:
            on_progress(done, total)
        if done >= total:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        pipe.check_worker()
        time.sleep(poll_s)


def _outcomes(pipe: Pipeline, batch_id: str, snap: TaskSnapshot, recordings: Sequence[Recording]) -> list[RowOutcome]:
    fields = snap.task_type.self_consistency.fields
    with pipe.engine.connect() as conn:
        rows = list(store.job_results(conn, batch_id))
    out = []
    for r in sorted(rows, key=lambda r: int(r.key)):
        rec = recordings[int(r.key) - 1]
        out.append(RowOutcome(rec.id, r.job_id, r.status, r.tier, is_correct(r.status, r.output, rec.gold, fields),
                              r.cost_usd, r.output))
    return out


def _record(engine: Engine, report: TaskReport, dataset_hash: str, golds: dict[str, Any]) -> None:  # Any: JSON
    with engine.begin() as conn:
        for run in report.runs:
            run_id = uuid.uuid4().hex
            m = run.metrics
            store.record_eval_run(conn, {
                "id": run_id, "eval_id": report.eval_id, "task_type": report.task_type, "dataset": report.dataset,
                "dataset_hash": dataset_hash, "label": run.plan.label, "kind": run.plan.kind,
                "threshold": run.plan.threshold, "tier": run.plan.tier, "batch_id": run.batch_id,
                "config_hash": run.plan.snapshot.config_hash(), "rows": m.rows, "correct": m.correct,
                "accuracy": m.accuracy, "escalation_rate": m.escalation_rate, "tier3_rate": m.tier3_rate,
                "cost_usd": m.cost_usd, "relative_cost": m.relative_cost}, [{
                "run_id": run_id, "row_id": o.row_id, "job_id": o.job_id, "status": o.status, "tier": o.tier,
                "correct": o.correct, "cost_usd": o.cost_usd, "calibration": is_calibration(o.row_id),
                "gold": json.dumps(golds[o.row_id]), "output": None if o.output is None else json.dumps(o.output),
            } for o in run.outcomes])


def evaluate(
    pipe: Pipeline,
    plans: Sequence[RunPlan],
    recordings: Sequence[Recording],
    *,
    dataset: str,
    target_accuracy: float | None = None,
    timeout: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[TaskReport] | None:
    """Submit every run at once through ``pipe``, wait, score and record them; one report per task type.

    ``plans`` come from ``plan_runs`` (a caller may leave runs out, but not a task type's top tier alone,
    its cost baseline). Returns None when ``timeout`` passed before every job finished (nothing is
    recorded then).

    Raises:
        InputError: the recordings cannot answer a run (``check_recordings``).
        ValueError: a task type has no top-tier-alone run.
        CascadeError: the worker we started died.
    """
    tasks = list(dict.fromkeys(p.task_type for p in plans))
    tops = {p.task_type: p for p in plans if p.is_top}
    if missing := [t for t in tasks if t not in tops]:
        raise ValueError(f"no top-tier-alone run for {', '.join(missing)}")
    for snap in {_dedupe_key(p.snapshot): p.snapshot for p in plans}.values():
        check_recordings(snap, recordings, dataset)
    submitted: dict[str, str] = {}
    batches = [_submit(pipe, plan, recordings, dataset, submitted) for plan in plans]
    if not wait(pipe, batches, timeout=timeout, on_progress=on_progress):
        return None
    outcomes = {b: _outcomes(pipe, b, p.snapshot, recordings) for p, b in zip(plans, batches, strict=True)}
    golds = {rec.id: rec.gold for rec in recordings}
    dataset_hash = hashlib.sha256("\n".join(r.model_dump_json() for r in recordings).encode()).hexdigest()[:16]
    eval_id, reports = uuid.uuid4().hex, []
    for task in tasks:
        mine = [(p, b) for p, b in zip(plans, batches, strict=True) if p.task_type == task]
        top = next(outcomes[b] for p, b in mine if p.is_top)
        runs = [RunReport(p, b, measure(outcomes[b], top), outcomes[b]) for p, b in mine]
        target = None
        if target_accuracy is not None:
            pairs = [(p.threshold, outcomes[b]) for p, b in mine if p.threshold is not None]
            target = choose_threshold(pairs, top, target_accuracy)
        report = TaskReport(task, dataset, eval_id, runs, target)
        _record(pipe.engine, report, dataset_hash, golds)
        reports.append(report)
    return reports
