"""The ``cascade`` command. Exit codes: 0 ok, 1 some jobs failed, 2 bad input or config, 3 timeout.

``submit`` prints only the batch id on stdout (``BATCH=$(cascade submit ...)``); human messages go to
stderr; every read command has ``--json``.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cascade.client import BatchStatus, Client
from cascade.config import load_settings
from cascade.errors import CascadeError

__all__ = ["app", "main"]

app = typer.Typer(help="Cheap LLM batch jobs through a cascade of models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="cascade.yaml (default: $CASCADE_CONFIG)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _client(config: Path | None = None) -> Client:
    return Client(load_settings(config=config))


def _guard(fn: Callable[[], T]) -> T:
    """Turn cascade's errors into a message on stderr and exit code 2."""
    try:
        return fn()
    except CascadeError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def _json_default(value: object) -> str:
    return str(value)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate cascade's tables and views (CASCADE_DATABASE_URL)."""
    from cascade.migrate import upgrade

    _guard(lambda: upgrade(_client().engine))
    err.print("database is at the latest revision")


@app.command()
def submit(
    task_type: Annotated[str, typer.Argument(help="A task type from cascade.yaml.")],
    file: Annotated[str, typer.Argument(help="JSONL or CSV file, or - for stdin.")],
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: by extension).")] = None,
    key_field: Annotated[str | None, typer.Option(help="Row field used as the job key (default: line number).")]
    = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key + same rows = the same batch.")] = None,
    skip_invalid: Annotated[Path | None, typer.Option(help="Write rejected rows here and submit the rest.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Submit a batch; prints its id on stdout."""
    if fmt not in (None, "jsonl", "csv"):
        err.print(f"error: --format must be jsonl or csv, not {fmt!r}")
        raise typer.Exit(2)
    kind: Literal["jsonl", "csv"] = "csv" if fmt == "csv" or (fmt is None and file.endswith(".csv")) else "jsonl"
    client = _client(config)

    def run() -> Any:  # Any: SubmitResult
        if file == "-":
            from cascade import producer

            snap = client.config.snapshot(task_type)
            rows = producer.read_rows(sys.stdin.buffer, kind, "<stdin>")
            return producer.submit_rows(client.engine, client.publisher, snap, rows, source="<stdin>",
                                        key_field=key_field, idempotency_key=idempotency_key,
                                        rejects_path=skip_invalid)
        return client.submit(task_type, file, fmt=kind, key_field=key_field, idempotency_key=idempotency_key,
                             rejects_path=skip_invalid)

    result = _guard(run)
    verb = "submitted" if result.created else "already submitted (same idempotency key and rows)"
    err.print(f"{verb}: batch {result.batch_id}, {result.rows} rows"
              + (f", {result.rejected} rejected → {skip_invalid}" if result.rejected else ""))
    typer.echo(result.batch_id)


def _print_status(state: BatchStatus) -> None:
    table = Table(title=f"batch {state.batch_id} ({state.task_type})")
    for col in ("rows", "queued", "running", "succeeded", "failed", "cost_usd"):
        table.add_column(col, justify="right")
    c = state.counts
    table.add_row(str(state.rows), str(c.get("queued", 0)), str(c.get("running", 0)), str(c.get("succeeded", 0)),
                  str(c.get("failed", 0)), f"{state.cost_usd:.6f}")
    Console().print(table)


@app.command()
def status(batch: str, as_json: JsonOpt = False) -> None:
    """Counts of a batch's jobs by status."""
    state = _guard(lambda: _client().status(batch))
    if as_json:
        typer.echo(json.dumps(state.to_json()))
    else:
        _print_status(state)


@app.command()
def wait(
    batch: str,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a batch to finish with a progress bar. Exit 1 if some jobs failed, 3 on timeout."""
    client = _client()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=as_json) as bar:
        task = bar.add_task(f"batch {batch[:8]}", total=None)

        def show(state: BatchStatus) -> None:
            tiers = " ".join(f"t{k}:{v}" for k, v in state.by_tier.items())
            bar.update(task, total=state.rows, completed=state.finished,
                       description=f"batch {batch[:8]} [{tiers}] failed:{state.counts.get('failed', 0)}")

        state = _guard(lambda: client.wait(batch, timeout=timeout, on_progress=show))
    if as_json:
        typer.echo(json.dumps(state.to_json()))
    if not state.is_done:
        err.print(f"timeout: {state.finished}/{state.rows} jobs finished")
        raise typer.Exit(3)
    if state.counts.get("failed"):
        err.print(f"{state.counts['failed']} of {state.rows} jobs failed")
        raise typer.Exit(1)


@app.command()
def results(
    batch: str,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
) -> None:
    """One line per input row: key, status, final tier, output, cost, error."""
    client = _client()
    _guard(lambda: client.status(batch))
    rows = client.results(batch)
    out = sys.stdout
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=["key", "status", "tier", "output", "cost_usd", "error"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "output": json.dumps(row["output"]) if row["output"] is not None else ""})
        return
    for row in rows:
        out.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")


@app.command()
def stats(
    task_type: Annotated[str | None, typer.Option(help="Only this task type.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The escalation_stats view: escalation rates, cost and savings per task type."""
    rows = _guard(lambda: _client().stats(task_type))
    if as_json:
        typer.echo(json.dumps(rows, default=_json_default))
        return
    Console().print(stats_table(rows))


def stats_table(rows: list[dict[str, Any]]) -> Table:  # Any: view rows
    table = Table(title="escalation_stats")
    cols = ["task_type", "jobs", "finished", "succeeded", "failed", "escalation_rate", "tier2_rate", "tier3_rate",
            "avg_cost_usd", "baseline_cost_usd", "savings_pct", "p50_latency_ms", "p95_latency_ms"]
    for col in cols:
        table.add_column(col, justify="left" if col == "task_type" else "right")
    for row in rows:
        table.add_row(*[_cell(row.get(col)) for col in cols])
    return table


def _cell(value: Any) -> str:  # Any: a SQL value
    if value is None:
        return "-"
    if isinstance(value, float) or hasattr(value, "quantize"):
        return f"{float(value):.4g}" if abs(float(value)) < 1 else f"{float(value):.1f}"
    return str(value)


@app.command()
def sweep(
    stalled_after: Annotated[float, typer.Option(help="Re-publish queued jobs idle this long (s).")] = 60.0,
    every: Annotated[float | None, typer.Option(help="Loop, sweeping every this many seconds.")] = None,
) -> None:
    """Re-publish jobs whose message was lost or whose worker died (one pass, or a loop with --every)."""
    from cascade.sweeper import sweep as run_sweep

    client = _client()
    while True:
        report = _guard(lambda: run_sweep(client.engine, client.publisher, stalled_after_s=stalled_after))
        err.print(f"sweep: expired={report.expired} due={report.due} stalled={report.stalled}"
                  + ("" if report.locked else " (another sweeper holds the lock)"))
        if every is None:
            return
        time.sleep(every)


@app.command()
def sim(
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8900,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    sim_config: Annotated[Path | None, typer.Option("--config", help="Simulated models (YAML).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random draw.")] = None,
    replay: Annotated[Path | None, typer.Option(help="Serve recorded answers (JSONL) instead.")] = None,
) -> None:
    """An OpenAI-compatible model server for dry runs, demos and tests (no keys, no cost)."""
    from cascade import sim as sim_module

    _guard(lambda: sim_module.serve(host=host, port=port, config_path=str(sim_config) if sim_config else None,
                                    seed=seed, replay=str(replay) if replay else None))


def main() -> None:
    app()
