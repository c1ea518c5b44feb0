"""``cascade eval``: accuracy and cost of a task type's cascade on a labelled recording set, per threshold.

Registered in ``cli.py`` as ``app.command("eval")(eval_command)``. Exit codes as every command: 0 ok,
2 bad input or config, 3 timeout; 1 when ``--target-accuracy`` or ``--target-relative`` is given and neither
a threshold nor a per-tier combination reaches it.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cascade import calibration, display, evaluation
from cascade.config import CascadeSettings, load_config, load_settings
from cascade.errors import CascadeError, ConfigError
from cascade.publish import CeleryPublisher, configured_tiers, worker_queues
from cascade.sim import Recording, SimServer, load_recordings
from cascade.store import make_engine
from cascade.workercmd import worker_command

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["eval_command", "open_pipeline", "parse_target", "parse_thresholds", "plot_figure", "plot_reports",
           "report_table", "target_table"]

#: The thresholds run when ``--thresholds`` is not given; the per-tier search then tries each tier's vote levels.
DEFAULT_THRESHOLDS = "0.4,0.6,0.8"

err = Console(stderr=True)


def parse_thresholds(value: str) -> list[Decimal]:
    """``"0.4,0.6,0.8"`` → Decimals in [0, 1], in the order given. Raises ConfigError."""
    out: list[Decimal] = []
    for part in value.split(","):
        try:
            t = Decimal(part.strip())
        except InvalidOperation:
            raise ConfigError(f"not a number: {part.strip()!r}", path="--thresholds") from None
        if not (t.is_finite() and 0 <= t <= 1):
            raise ConfigError(f"{part.strip()} is not between 0 and 1", path="--thresholds")
        if t not in out:
            out.append(t)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_table(report: evaluation.TaskReport) -> Table:
    """One line per run: the thresholds, then each tier alone."""
    top = report.top
    table = Table(title=f"{report.task_type} on {report.dataset} ({top.metrics.rows} rows)",
                  caption=f"relative_cost: against the {top.plan.label}, run as its own batch through the pipeline")
    for col in ("run", "accuracy", "escalation_rate", "tier3_rate", "cost_usd", "relative_cost"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for run in report.runs:
        m = run.metrics
        table.add_row(run.plan.label, _pct(m.accuracy), _pct(m.escalation_rate), _pct(m.tier3_rate),
                      f"{m.cost_usd:.6f}", _pct(m.relative_cost))
    return table


def parse_target(accuracy: float | None, relative: float | None, grid: Sequence[Decimal] | None
                 ) -> calibration.Target | None:
    """The target of ``--target-accuracy`` or ``--target-relative`` (not both). Raises ConfigError."""
    if accuracy is not None and relative is not None:
        raise ConfigError("give --target-accuracy or --target-relative, not both", path="--target-relative")
    if relative is not None and not relative > 0:
        raise ConfigError(f"{relative} is not above 0", path="--target-relative")
    if accuracy is None and relative is None:
        return None
    return calibration.Target(accuracy, relative, None if grid is None else tuple(grid))


def _goal(choice: calibration.TargetChoice) -> str:
    half, other = choice.half, calibration.other_half(choice.half)
    if choice.relative is None:
        goal = f"target accuracy {choice.target:g}"
    else:
        top = choice.calibration_top
        goal = (f"target {choice.relative:g} × the top tier alone's accuracy on half {half} "
                f"({_pct(top.accuracy if top else None)}) = {choice.target:.4f}")
    return f"{goal}: calibrated on half {half}, reported on half {other}"


def _row(name: str, thresholds: str, calib: calibration.Metrics | None,
         held: calibration.Metrics | None) -> list[str]:
    def cells(m: calibration.Metrics | None) -> list[str]:
        return ["-", "-"] if m is None else [_pct(m.accuracy), f"{m.cost_usd:.6f}"]

    return [name, thresholds, *cells(calib), *cells(held), _pct(held.relative_cost if held else None)]


def target_table(choice: calibration.TargetChoice, top_label: str) -> Table:
    """The choices for one target and calibration half, beside the top tier alone, on both halves."""
    c_rows = choice.calibration_top.rows if choice.calibration_top else 0
    table = Table(title=_goal(choice), title_justify="left", caption_justify="left",
                  caption="relative_cost: against the top tier alone on the held-out half")
    for col in ("choice", "τ", f"calibration ({c_rows} rows) accuracy", "cost_usd",
                f"held-out ({choice.holdout_top.rows} rows) accuracy", "cost_usd", "relative_cost"):
        table.add_column(col, justify="left" if col in ("choice", "τ") else "right")
    single = "-" if choice.threshold is None else str(choice.threshold)
    table.add_row(*_row("single threshold" if choice.threshold is not None else "single threshold: none reaches it",
                        single, choice.calibration, choice.holdout))
    per = choice.per_tier
    if per is not None and per.thresholds is not None:
        taus = ", ".join(map(str, per.thresholds))
        table.add_row(*_row("per tier, predicted", taus, per.calibration, per.predicted))
        if per.batch_id is not None:
            table.add_row(*_row(f"per tier, batch {per.batch_id[:8]}", taus, per.confirmed_calibration, per.confirmed))
    elif per is not None:
        table.add_row(*_row("per tier: none reaches it", "-", None, None))
    table.add_row(*_row(escape(top_label), "-", choice.calibration_top, choice.holdout_top))
    return table


def _per_tier_lines(per: calibration.PerTierChoice) -> str:
    tiers = ", ".join(f"tier {i} ({m})" for i, m in enumerate(per.models, start=1))
    tried = (f"the thresholds {', '.join(map(str, per.grids[0]))} on each" if len(set(per.grids)) == 1
             else "each tier's vote levels")
    head = (f"per tier: {per.combinations} combinations of {tiers} searched ({tried}), predicted from the votes "
            "of the tier-alone runs")
    if per.thresholds is None:
        return head + "; none reaches the target on the calibration half"
    if per.batch_id is None:
        return head
    rows = len(per.outcomes)
    check = (f"its batch matches the prediction on all {rows} rows" if not per.mismatched else
             f"its batch differs from the prediction on {len(per.mismatched)} of {rows} rows: "
             + ", ".join(per.mismatched[:10]) + (", …" if len(per.mismatched) > 10 else ""))
    patch = "\n".join("  " + line for line in (per.patch or "").splitlines())
    return f"{head};\n  {check}\nconfig patch (cascade.yaml: the task type's tiers with these thresholds):\n{patch}"


#: one marker per tier-alone point, in tier order (the top tier alone is always the star)
TIER_MARKERS = ("s", "^", "D", "v", "P", "X", "h", "<", ">")


def plot_figure(reports: Sequence[evaluation.TaskReport]) -> Figure:
    """Cost against accuracy: each task type's thresholds as a line, each tier alone as a marker of its own, a
    per-tier run as a pentagon; the title names the task types and their row counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for report in reports:
        runs = [r for r in report.runs if r.plan.kind == "threshold" and r.plan.per_tier is None]
        xs, ys = [float(r.metrics.cost_usd) for r in runs], [r.metrics.accuracy for r in runs]
        (line,) = ax.plot(xs, ys, "o-", label=f"{report.task_type}: cascade by threshold")
        for run, x, y in zip(runs, xs, ys, strict=True):
            ax.annotate(f"τ={run.plan.threshold}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        for run in (r for r in report.runs if r.plan.per_tier is not None):
            ax.plot(float(run.metrics.cost_usd), run.metrics.accuracy, "p", linestyle="none", color=line.get_color(),
                    markersize=9, label=f"{report.task_type}: {run.plan.label}")
        tiers = [run for run in report.runs if run.plan.kind == "tier"]
        for k, run in enumerate(tiers):
            top = run is report.top
            ax.plot(float(run.metrics.cost_usd), run.metrics.accuracy, "*" if top else TIER_MARKERS[k % 9],
                    linestyle="none", color=line.get_color(), markersize=12 if top else 7,
                    label=f"{report.task_type}: {run.plan.label}")
    ax.set_title("; ".join(f"{r.task_type} on {Path(r.dataset).name}: {_rows(r)} rows" for r in reports),
                 fontsize=10)
    ax.set_xlabel("cost (USD)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _rows(report: evaluation.TaskReport) -> int:
    return max((run.metrics.rows for run in report.runs), default=0)


def plot_reports(reports: Sequence[evaluation.TaskReport], path: Path) -> None:
    """Write ``plot_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    fig = plot_figure(reports)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextmanager
def open_pipeline(settings: CascadeSettings, recordings: list[Recording], *, start_worker: bool = True,
                  concurrency: int = 32) -> Iterator[evaluation.Pipeline]:
    """Postgres and Redis (embedded when no URL is set, as ``cascade demo``; left running like the demo's),
    migrations, a replay sim in this process and, with ``start_worker``, one gevent worker subprocess on
    queues of its own (a private Redis key prefix), so workers already on the broker never see eval jobs.
    Everything started here, but the embedded services, stops when the block exits."""
    from cascade.migrate import upgrade
    from cascade.stack import Children, with_services, worker_env

    data_dir = settings.data_dir.resolve()
    with ExitStack() as stack:
        settings, services = with_services(stack, settings, data_dir / "services")
        psql = services.psql_command if services else None
        database_url, broker_url = settings.database_url, settings.broker_url
        assert database_url and broker_url
        engine = make_engine(database_url, schema=settings.db_schema, pool_size=2, pooler=settings.database_pooler)
        stack.callback(engine.dispose)
        upgrade(engine)
        sim = stack.enter_context(SimServer(recordings=recordings))
        tiers = configured_tiers(settings)
        worker, log = None, None
        if start_worker:
            settings = settings.model_copy(update={"key_prefix": f"{settings.key_prefix}eval-{uuid.uuid4().hex[:8]}:"})
            log = data_dir / "logs" / "eval-worker.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            children = Children()
            stack.callback(children.stop)
            cmd = worker_command(worker_queues(tiers), concurrency, name=f"eval-{os.getpid()}@%h")
            worker = children.start(cmd, worker_env(settings, settings.config), log)
        publisher = CeleryPublisher.connect(settings, broker_url, tiers=tiers)
        stack.callback(publisher.close)
        yield evaluation.Pipeline(engine, publisher, sim.url, settings, worker, log, psql)


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err)


def eval_command(
    task_type: Annotated[str, typer.Argument(help="Task type from cascade.yaml (several: comma-separated).")],
    data: Annotated[Path, typer.Argument(help="Labelled recordings (JSONL: id, input, gold, responses).")],
    thresholds: Annotated[str | None, typer.Option(
        help="min_agreement values for every tier but the last (default 0.4,0.6,0.8); with a target, also the "
             "values each tier's threshold is searched among (default: every vote count of the tier).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of cost against accuracy here.")] = None,
    target_accuracy: Annotated[float | None, typer.Option(
        help="Pick the cheapest threshold, and the cheapest threshold per tier, reaching this accuracy on a "
             "calibration half; report them on the rest.")]
    = None,
    target_relative: Annotated[float | None, typer.Option(
        help="As --target-accuracy, the accuracy being this share of the top tier alone's on the calibration "
             "half (0.99: 99%).")]
    = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds (exit 3).")] = 3600,
    start_worker: Annotated[bool, typer.Option(
        help="Start a worker on private queues (--no-start-worker: use the workers on CASCADE_BROKER_URL).")]
    = True,
    concurrency: Annotated[int, typer.Option(help="Greenlets (messages at once) of the worker eval starts.")] = 32,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="cascade.yaml (default: $CASCADE_CONFIG)")]
    = None,
    data_dir: Annotated[Path | None, typer.Option(help="Embedded services' data (default .cascade).")] = None,
) -> None:
    """Run a labelled recording set through the real pipeline once per threshold; print accuracy and cost.

    Every model of the task type is pointed at a replay sim serving DATA. Each threshold, each tier alone
    and the top tier alone is a batch worked by real workers; results land in eval_runs and eval_results.
    With a target, the cheapest threshold per tier is searched from the tier-alone runs' votes, confirmed
    by one more batch, and printed as a config patch.
    Without CASCADE_DATABASE_URL and CASCADE_BROKER_URL the embedded stack is used (as by `cascade demo`).
    """
    try:
        settings = load_settings(config=config, data_dir=data_dir)
        cfg = load_config(settings.config)
        snaps = [cfg.snapshot(name.strip()) for name in task_type.split(",") if name.strip()]
        levels = parse_thresholds(thresholds or DEFAULT_THRESHOLDS)
        target = parse_target(target_accuracy, target_relative, None if thresholds is None else levels)
        recordings = load_recordings(data)
        for snap in snaps:
            evaluation.check_recordings(snap, recordings, str(data))
        with open_pipeline(settings, recordings, start_worker=start_worker,
                                      concurrency=concurrency) as pipe, _progress_bar() as bar:
            task = bar.add_task("eval jobs", total=None)
            plans = [plan for snap in snaps for plan in evaluation.plan_runs(snap, levels)]
            reports = evaluation.evaluate(
                pipe, plans, recordings, dataset=str(data),
                targets=None if target is None else {snap.task_type.name: target for snap in snaps}, timeout=timeout,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total))
            psql = pipe.psql_command
    except CascadeError as exc:
        # The message may hold user data (paths, rows, YAML): escaped, as cli.py does.
        err.print("[red]error:[/red] " + escape(str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if reports is None:
        err.print(f"timeout: not every job finished within {timeout:g} s")
        raise typer.Exit(3)
    _print(reports, as_json)
    if plot is not None:
        plot_reports(reports, plot)
        err.print(f"plot written to {plot}")
    if psql:
        err.print("query the results in the embedded database (it stays up until `cascade dev --stop`):")
        err.print(f"  {psql} -c 'SELECT task_type, label, accuracy, relative_cost FROM eval_runs'",
                  highlight=False, soft_wrap=True)
    if any(r.target is not None and not r.target.reached for r in reports):
        raise typer.Exit(1)


def _print(reports: Sequence[evaluation.TaskReport], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in reports]))
        return
    out = display.console()
    for report in reports:
        out.print(report_table(report))
        for choice in report.targets:
            out.print(target_table(choice, report.top.plan.label))
            if choice.per_tier is not None:
                out.print(_per_tier_lines(choice.per_tier), highlight=False, markup=False)
