"""Evaluation on recorded answers (``cascade eval``): a labelled dataset through the real pipeline.

Each task type is run once per threshold (``min_agreement`` of every tier but the last) and once per
tier alone (that tier as a one-tier cascade). Every run is a batch submitted with
``producer.submit_rows`` and worked by real Celery workers, with every model of the task type pointed
at a replay sim serving the dataset's recordings. A run reports accuracy (over all rows: the result
equals ``gold`` on the voted fields; a failed job is wrong), escalation and tier-3 rates, cost, and
``relative_cost``: cost divided by the cost of the top tier alone on the same rows, which is its own
batch through the same pipeline (not an estimate from recorded usage). Runs and per-row outcomes are
written to ``eval_runs`` and ``eval_results``.

With a target (``calibration.Target``), each calibration half gets two choices: the cheapest threshold run
reaching the target there, and the cheapest per-tier combination, searched from the votes the tier-alone
runs recorded in Postgres (``calibration.choose_per_tier``). The chosen combination then runs as one more
batch through the same pipeline, which confirms (or not) the prediction row by row.

Identical tier-alone runs of several task types (same tier, same checks) share one batch. The edge
(``cli_eval.open_pipeline``) builds the ``Pipeline``: services, the replay sim and a worker. Scoring and
choosing are pure, in ``cascade.calibration``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from subprocess import Popen
from typing import Any, Literal

from sqlalchemy import Engine

from cascade import calibration, producer, store
from cascade.calibration import (
    Metrics,
    RowOutcome,
    Target,
    TargetChoice,
    TierVote,
    choose_threshold,
    is_calibration,
    is_correct,
    measure,
)
from cascade.config import CascadeSettings, TaskSnapshot, TierConfig, render
from cascade.errors import CascadeError, InputError
from cascade.publish import Publisher
from cascade.sim import Recording
from cascade.stages.validate import judge

__all__ = [
    "Metrics",
    "Pipeline",
    "RowOutcome",
    "RunPlan",
    "RunReport",
    "Target",
    "TargetChoice",
    "TaskReport",
    "check_recordings",
    "choose_threshold",
    "evaluate",
    "is_calibration",
    "is_correct",
    "measure",
    "per_tier_plan",
    "plan_runs",
    "point_at",
    "tier_alone",
    "with_threshold",
    "with_thresholds",
]

RunKind = Literal["threshold", "tier"]


# --- planning (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """One run of a task type: a threshold over the cascade, a threshold per tier, or one tier alone.

    A per-tier run (``per_tier``: tier i's threshold at i-1) is of kind ``threshold`` with tier 1's threshold
    as ``threshold``, the one number ``eval_runs.threshold`` holds.
    """

    task_type: str
    label: str
    kind: RunKind
    threshold: Decimal | None
    tier: int | None  # tier-alone runs: which tier
    snapshot: TaskSnapshot
    is_top: bool = False  # the top tier alone: the cost baseline of its task type's runs
    per_tier: tuple[Decimal, ...] | None = None
    cascade: TaskSnapshot | None = None  # the task type as configured (a per-tier search starts from it)


def with_thresholds(snap: TaskSnapshot, thresholds: Sequence[Decimal]) -> TaskSnapshot:
    """The snapshot with ``min_agreement`` = ``thresholds[i-1]`` on tier i, for every tier but the last."""
    task = snap.task_type
    if len(thresholds) != len(task.tiers) - 1:
        raise ValueError(f"{len(task.tiers)} tiers take {len(task.tiers) - 1} thresholds, got {len(thresholds)}")
    tiers: list[str | TierConfig] = []
    for spec, threshold in zip(task.tiers, [*thresholds, None], strict=True):
        if threshold is None:
            tiers.append(spec)
            continue
        over = TierConfig(model=spec) if isinstance(spec, str) else spec
        tiers.append(over.model_copy(update={"min_agreement": threshold}))
    return snap.model_copy(update={"task_type": task.model_copy(update={"tiers": tiers})})


def with_threshold(snap: TaskSnapshot, threshold: Decimal) -> TaskSnapshot:
    """The snapshot with ``min_agreement`` = ``threshold`` on every tier but the last."""
    return with_thresholds(snap, [threshold] * (snap.tier_count - 1))


def per_tier_plan(snap: TaskSnapshot, thresholds: Sequence[Decimal]) -> RunPlan:
    """The run of ``snap`` (as configured) with one threshold per tier but the last."""
    label = "per tier τ=(" + ", ".join(map(str, thresholds)) + ")"
    return RunPlan(snap.task_type.name, label, "threshold", thresholds[0] if thresholds else None, None,
                   with_thresholds(snap, thresholds), per_tier=tuple(thresholds), cascade=snap)


def tier_alone(snap: TaskSnapshot, index: int) -> TaskSnapshot:
    """A one-tier cascade of tier ``index`` (1-based): it is the last tier, so ``on_exhausted`` applies."""
    task = snap.task_type
    spec = task.tiers[index - 1]
    name = spec if isinstance(spec, str) else spec.model
    return TaskSnapshot(task_type=task.model_copy(update={"tiers": [spec]}), models={name: snap.models[name]})


def plan_runs(snap: TaskSnapshot, thresholds: Sequence[Decimal]) -> list[RunPlan]:
    """One run per threshold, then one per tier alone (the last of which is the top tier alone)."""
    name = snap.task_type.name
    runs = [RunPlan(name, f"τ={t}", "threshold", t, None, with_threshold(snap, t), cascade=snap) for t in thresholds]
    for i in range(1, snap.tier_count + 1):
        model = snap.tier(i).model.name
        label = f"top tier alone ({model})" if i == snap.tier_count else f"tier {i} alone ({model})"
        runs.append(RunPlan(name, label, "tier", None, i, tier_alone(snap, i), i == snap.tier_count, cascade=snap))
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


@dataclass(frozen=True)
class RunReport:
    plan: RunPlan
    batch_id: str
    metrics: Metrics
    outcomes: list[RowOutcome]

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        plan = self.plan
        per_tier = None if plan.per_tier is None else [str(t) for t in plan.per_tier]
        return {"label": plan.label, "kind": plan.kind, "threshold": None if plan.threshold is None
                else str(plan.threshold), "thresholds": per_tier, "tier": plan.tier,
                "model": plan.snapshot.tier(1).model.name if plan.kind == "tier" else None,
                "batch_id": self.batch_id, **self.metrics.to_json()}


@dataclass(frozen=True)
class TaskReport:
    """Every run of one task type on one dataset."""

    task_type: str
    dataset: str
    eval_id: str
    runs: list[RunReport]
    targets: list[TargetChoice] = field(default_factory=list)  # one per calibration half

    @property
    def top(self) -> RunReport:
        return next(r for r in self.runs if r.plan.is_top)

    @property
    def target(self) -> TargetChoice | None:
        """The choice calibrated on the first half asked for (``cascade eval``: half A)."""
        return self.targets[0] if self.targets else None

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"task_type": self.task_type, "dataset": self.dataset, "eval_id": self.eval_id,
                "rows": self.top.metrics.rows,
                "baseline": f"{self.top.plan.label}: its own batch through the pipeline on the same rows",
                "runs": [r.to_json() for r in self.runs],
                "target": self.target.to_json() if self.target else None,
                "targets": [t.to_json() for t in self.targets]}


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
    targets: Mapping[str, Target] | None = None,
    timeout: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[TaskReport] | None:
    """Submit every run at once through ``pipe``, wait, score and record them; one report per task type.

    ``plans`` come from ``plan_runs`` (a caller may leave runs out, but not a task type's top tier alone,
    its cost baseline). ``targets`` (by task type) adds the choices of ``TaskReport.targets``, one per
    calibration half of the target; the per-tier combinations chosen then run as one more round of batches
    (a combination equal to a threshold run reuses its batch). Returns None when ``timeout`` passed before
    every job finished (nothing is recorded then).

    Raises:
        InputError: the recordings cannot answer a run (``check_recordings``).
        ValueError: a task type has no top-tier-alone run, or one with a target lacks a tier alone.
        ConfigError: a per-tier search would be too large (``calibration.search_grids``).
        CascadeError: the worker we started died.
    """
    targets = targets or {}
    grids = _check_plans(plans, targets)
    for snap in {_dedupe_key(p.snapshot): p.snapshot for p in plans}.values():
        check_recordings(snap, recordings, dataset)
    deadline = None if timeout is None else time.monotonic() + timeout
    submitted: dict[str, str] = {}
    batches = [_submit(pipe, plan, recordings, dataset, submitted) for plan in plans]
    if not wait(pipe, batches, timeout=_left(deadline), on_progress=on_progress):
        return None
    outcomes = {b: _outcomes(pipe, b, p.snapshot, recordings) for p, b in zip(plans, batches, strict=True)}
    eval_id, reports = uuid.uuid4().hex, []
    for task in dict.fromkeys(p.task_type for p in plans):
        mine = [(p, b) for p, b in zip(plans, batches, strict=True) if p.task_type == task]
        top = next(outcomes[b] for p, b in mine if p.is_top)
        runs = [RunReport(p, b, measure(outcomes[b], top), outcomes[b]) for p, b in mine]
        choices = [] if task not in targets else _choose(pipe, mine, outcomes, targets[task], grids[task], recordings)
        reports.append(TaskReport(task, dataset, eval_id, runs, choices))
    if not _confirm(pipe, reports, recordings, dataset, deadline, on_progress):
        return None
    golds = {rec.id: rec.gold for rec in recordings}
    dataset_hash = hashlib.sha256("\n".join(r.model_dump_json() for r in recordings).encode()).hexdigest()[:16]
    for report in reports:
        _record(pipe.engine, report, dataset_hash, golds)
    return reports


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _check_plans(plans: Sequence[RunPlan], targets: Mapping[str, Target]) -> dict[str, tuple[tuple[Decimal, ...], ...]]:
    """Raise ValueError for a task type without its top tier alone, or with a target but not every tier alone
    or its configured snapshot; return the per-tier search grids of the task types with a target."""
    tasks = list(dict.fromkeys(p.task_type for p in plans))
    if missing := [t for t in tasks if not any(p.is_top for p in plans if p.task_type == t)]:
        raise ValueError(f"no top-tier-alone run for {', '.join(missing)}")
    grids = {}
    for task in tasks:
        if task not in targets:
            continue
        mine = [p for p in plans if p.task_type == task]
        snap = next((p.cascade for p in mine if p.cascade is not None), None)
        if snap is None:
            raise ValueError(f"{task}: a target needs the task type's snapshot (RunPlan.cascade)")
        alone = {p.tier for p in mine if p.kind == "tier"}
        if lacking := [i for i in range(1, snap.tier_count + 1) if i not in alone]:
            raise ValueError(f"{task}: a target needs every tier alone; no run of tier {lacking[0]} alone")
        grids[task] = calibration.search_grids(snap, targets[task].grid)
    return grids


def _choose(pipe: Pipeline, mine: Sequence[tuple[RunPlan, str]], outcomes: Mapping[str, list[RowOutcome]],
            target: Target, grids: Sequence[Sequence[Decimal]], recordings: Sequence[Recording]) -> list[TargetChoice]:
    """For each calibration half of ``target``: the single-threshold choice and the per-tier one."""
    snap = next(p.cascade for p, _ in mine if p.cascade is not None)
    assert snap is not None
    top = next(outcomes[b] for p, b in mine if p.is_top)
    alone = {p.tier: (p, b) for p, b in mine if p.kind == "tier"}
    votes = [_tier_votes(pipe, *alone[i], outcomes[alone[i][1]], top, recordings) for i in range(1, snap.tier_count)]
    pairs = [(p.threshold, outcomes[b]) for p, b in mine if p.threshold is not None and p.per_tier is None]
    out = []
    for half in target.halves:
        goal = target.on(measure(calibration.in_half(top, half), top))
        single = choose_threshold(pairs, top, goal, half, target.relative)
        if snap.tier_count > 1:  # one tier has no threshold to choose
            single = dataclasses.replace(single, per_tier=calibration.choose_per_tier(snap, votes, top, grids, goal,
                                                                                      half))
        out.append(single)
    return out


def _tier_votes(pipe: Pipeline, plan: RunPlan, batch_id: str, outcomes: Sequence[RowOutcome],
                top: Sequence[RowOutcome], recordings: Sequence[Recording]) -> list[TierVote]:
    """What the tier-alone run recorded for each row, in ``top``'s row order: the majority's votes and k
    (``validations``), its answer and the cost. A job that failed its vote (``on_exhausted: fail``) keeps no
    output, so its majority answer is voted again from its recorded samples (``attempts``)."""
    snap = plan.snapshot
    with pipe.engine.connect() as conn:
        recorded = store.batch_votes(conn, batch_id, 1)  # a tier-alone run is a one-tier cascade
        lost = [o.job_id for o in outcomes if o.output is None and recorded.get(o.job_id, (0, 0))[0] > 0]
        answers = store.answers_many(conn, lost, 1) if lost else {}
    golds = {rec.id: rec.gold for rec in recordings}
    fields = snap.task_type.self_consistency.fields
    by_row = {}
    for o in outcomes:
        votes, samples = recorded.get(o.job_id, (0, snap.tier(1).samples))
        output = o.output
        if o.job_id in answers:
            got = answers[o.job_id]
            output = judge(snap, 1, got.contents, got.truncated, got.refused).result
        right = votes > 0 and is_correct("succeeded", output, golds[o.row_id], fields)
        by_row[o.row_id] = TierVote(votes, samples, right, o.cost_usd, output)
    return [by_row[o.row_id] for o in top]


def _confirm(pipe: Pipeline, reports: Sequence[TaskReport], recordings: Sequence[Recording], dataset: str,
             deadline: float | None, on_progress: Callable[[int, int], None] | None) -> bool:
    """Run each chosen per-tier combination as a batch (one per distinct combination; a threshold run with
    the same snapshot is reused), then put its numbers in the choices and its run in the report. False:
    the deadline passed first."""
    wanted: list[tuple[TaskReport, int, RunPlan]] = []  # (report, index of the choice, the run confirming it)
    for report in reports:
        snap = next((r.plan.cascade for r in report.runs if r.plan.cascade is not None), None)
        for k, choice in enumerate(report.targets):
            if snap is not None and choice.per_tier is not None and choice.per_tier.thresholds is not None:
                wanted.append((report, k, per_tier_plan(snap, choice.per_tier.thresholds)))
    runs = {(r.task_type, run.plan.snapshot.config_hash()): run for r in reports for run in r.runs
            if run.plan.kind == "threshold"}
    new: dict[tuple[str, str], tuple[TaskReport, RunPlan]] = {}
    for report, _, plan in wanted:
        if (key := (report.task_type, plan.snapshot.config_hash())) not in runs:
            new.setdefault(key, (report, plan))
    batches = {key: _submit(pipe, plan, recordings, dataset, {}) for key, (_, plan) in new.items()}
    if batches and not wait(pipe, list(batches.values()), timeout=_left(deadline), on_progress=on_progress):
        return False
    for key, (report, plan) in new.items():
        got = _outcomes(pipe, batches[key], plan.snapshot, recordings)
        runs[key] = RunReport(plan, batches[key], measure(got, report.top.outcomes), got)
        report.runs.append(runs[key])
    for report, k, plan in wanted:
        choice, run = report.targets[k], runs[(report.task_type, plan.snapshot.config_hash())]
        assert choice.per_tier is not None
        report.targets[k] = dataclasses.replace(choice, per_tier=calibration.confirm(
            choice.per_tier, run.batch_id, run.outcomes, report.top.outcomes, choice.half))
    return True
