"""``cascade eval``: accuracy and cost of a task type's cascade on a labelled recording set, per threshold.

Registered in ``cli.py`` as ``app.command("eval")(eval_command)``. Exit codes as every command: 0 ok,
2 bad input or config, 3 timeout; 1 when ``--target-accuracy`` is given and no threshold reaches it.
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

from cascade import evaluation
from cascade.config import CascadeSettings, load_config, load_settings
from cascade.errors import CascadeError, ConfigError
from cascade.publish import CeleryPublisher, configured_tiers, worker_queues
from cascade.sim import Recording, SimServer, load_recordings
from cascade.store import make_engine
from cascade.workercmd import worker_command

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["eval_command", "open_pipeline", "parse_thresholds", "plot_figure", "plot_reports", "report_table"]

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


def _target_lines(choice: evaluation.TargetChoice) -> str:
    if choice.threshold is None or choice.holdout is None:
        return f"target accuracy {choice.target}: no threshold reaches it on the calibration half"
    c, h, top = choice.calibration, choice.holdout, choice.holdout_top
    assert c is not None
    return (f"target accuracy {choice.target}: τ={choice.threshold} is the cheapest on the calibration half "
            f"({c.rows} rows: accuracy {c.accuracy:.3f}, cost {c.cost_usd:.6f} USD);\n"
            f"  on the other {h.rows} rows: accuracy {h.accuracy:.3f}, cost {h.cost_usd:.6f} USD, relative_cost "
            f"{_pct(h.relative_cost)} (top tier alone there: accuracy {top.accuracy:.3f}, cost {top.cost_usd:.6f})")


#: one marker per tier-alone point, in tier order (the top tier alone is always the star)
TIER_MARKERS = ("s", "^", "D", "v", "P", "X", "h", "<", ">")


def plot_figure(reports: Sequence[evaluation.TaskReport]) -> Figure:
    """Cost against accuracy: each task type's thresholds as a line, each tier alone as a marker of its own;
    the title names the task types and their row counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for report in reports:
        runs = [r for r in report.runs if r.plan.kind == "threshold"]
        xs, ys = [float(r.metrics.cost_usd) for r in runs], [r.metrics.accuracy for r in runs]
        (line,) = ax.plot(xs, ys, "o-", label=f"{report.task_type}: cascade by threshold")
        for run, x, y in zip(runs, xs, ys, strict=True):
            ax.annotate(f"τ={run.plan.threshold}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
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
        engine = make_engine(database_url, schema=settings.db_schema, pool_size=2)
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
    thresholds: Annotated[str, typer.Option(help="min_agreement values for every tier but the last.")]
    = "0.4,0.6,0.8",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of cost against accuracy here.")] = None,
    target_accuracy: Annotated[float | None, typer.Option(
        help="Pick the cheapest threshold reaching this accuracy on a calibration half; report it on the rest.")]
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
    Without CASCADE_DATABASE_URL and CASCADE_BROKER_URL the embedded stack is used (as by `cascade demo`).
    """
    try:
        settings = load_settings(config=config, data_dir=data_dir)
        cfg = load_config(settings.config)
        snaps = [cfg.snapshot(name.strip()) for name in task_type.split(",") if name.strip()]
        levels = parse_thresholds(thresholds)
        recordings = load_recordings(data)
        for snap in snaps:
            evaluation.check_recordings(snap, recordings, str(data))
        with open_pipeline(settings, recordings, start_worker=start_worker,
                                      concurrency=concurrency) as pipe, _progress_bar() as bar:
            task = bar.add_task("eval jobs", total=None)
            plans = [plan for snap in snaps for plan in evaluation.plan_runs(snap, levels)]
            reports = evaluation.evaluate(
                pipe, plans, recordings, dataset=str(data), target_accuracy=target_accuracy,
                timeout=timeout, on_progress=lambda done, total: bar.update(task, completed=done, total=total))
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
    if any(r.target is not None and r.target.threshold is None for r in reports):
        raise typer.Exit(1)


def _print(reports: Sequence[evaluation.TaskReport], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in reports]))
        return
    out = Console()
    for report in reports:
        out.print(report_table(report))
        if report.target is not None:
            out.print(_target_lines(report.target), highlight=False)
