"""The ``cascade`` command. Exit codes: 0 ok, 1 some jobs failed, 2 bad input or config, 3 timeout.

``submit`` prints only the batch id on stdout (``BATCH=$(cascade submit ...)``); human messages go to
stderr; every read command has ``--json``.
"""

from __future__ import annotations

import csv
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cascade.cli_eval import eval_command
from cascade.client import BatchStatus, Client
from cascade.config import CascadeSettings, load_settings
from cascade.errors import CascadeError

if TYPE_CHECKING:
    from cascade.stack import DevStack

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
        _fail(exc)


def _fail(exc: CascadeError) -> NoReturn:
    # The message may hold user data (paths, keys, rows): escaped, never folded mid-word.
    err.print("[red]error:[/red] " + escape(str(exc)), highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


@contextmanager
def _running_stack(settings: CascadeSettings) -> Iterator[DevStack]:
    """``run_stack``, with a service that never came up (a dead Flower, Postgres) reported as exit 2."""
    from cascade.stack import run_stack

    try:
        with run_stack(settings) as stack:
            yield stack
    except CascadeError as exc:
        _fail(exc)


def _json_default(value: object) -> str:
    return str(value)


def _check_format(fmt: str | None) -> None:
    """Exit 2 on a ``--format`` other than jsonl or csv (rather than falling back to one silently)."""
    if fmt not in (None, "jsonl", "csv"):
        err.print(f"error: --format must be jsonl or csv, not {fmt!r}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)


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
    _check_format(fmt)
    kind: Literal["jsonl", "csv"] = "csv" if fmt == "csv" or (fmt is None and file.lower().endswith(".csv")) \
        else "jsonl"

    def run() -> Any:  # Any: SubmitResult
        from cascade import producer
        from cascade.errors import ConfigError, InputError

        client = _client(config)
        try:
            snap = client.config.snapshot(task_type)
        except ConfigError as exc:
            if exc.file is not None:
                raise
            # An unknown task type: say which file was searched.
            raise ConfigError(str(exc), file=str(client.settings.config), path="task_types") from None
        if skip_invalid is not None and file != "-" and skip_invalid.resolve() == Path(file).resolve():
            raise InputError("--skip-invalid must not name the input file", source=file)
        if file == "-":
            rows = producer.read_rows(sys.stdin.buffer, kind, "<stdin>")
            return producer.submit_rows(client.engine, client.publisher, snap, rows, source="<stdin>",
                                        key_field=key_field, idempotency_key=idempotency_key,
                                        rejects_path=skip_invalid)
        return client.submit(task_type, file, fmt=kind, key_field=key_field, idempotency_key=idempotency_key,
                             rejects_path=skip_invalid)

    result = _guard(run)
    verb = "submitted" if result.created else "already submitted (same idempotency key and rows)"
    err.print(f"{verb}: batch {result.batch_id}, {result.rows} rows"
              + (f", {result.rejected} rejected → {skip_invalid}" if result.rejected else ""),
              markup=False, highlight=False, soft_wrap=True)
    typer.echo(result.batch_id)


def _print_status(state: BatchStatus) -> None:
    table = Table(title=f"batch {state.batch_id} ({state.task_type})")
    for col in ("rows", "queued", "running", "succeeded", "failed", "cost_usd"):
        table.add_column(col, justify="right")
    c = state.counts
    table.add_row(str(state.rows), str(c.get("queued", 0)), str(c.get("running", 0)), str(c.get("succeeded", 0)),
                  str(c.get("failed", 0)), f"{state.cost_usd:.6f}")
    Console().print(table)
    if state.halted:
        err.print(f"[red]halted:[/red] {escape(state.halted)}\nfix it, then: cascade retry {state.batch_id}",
                  soft_wrap=True)
    for note in state.notes:
        err.print(f"note: {escape(note)}", soft_wrap=True)


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
    """Wait for a batch to finish with a progress bar. Exit 1 if some jobs failed, 2 if the batch halted on a
    configuration fault (fix it, then `cascade retry BATCH`), 3 on timeout."""
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
    if state.halted and not state.is_done:
        err.print(f"batch halted: {escape(state.halted)}\nfix it, then: cascade retry {batch}", soft_wrap=True)
        raise typer.Exit(2)
    if not state.is_done:
        err.print(f"timeout: {state.finished}/{state.rows} jobs finished")
        raise typer.Exit(3)
    if state.counts.get("failed"):
        err.print(f"{state.counts['failed']} of {state.rows} jobs failed")
        raise typer.Exit(1)


@app.command()
def retry(batch: str) -> None:
    """Resume a batch halted by a configuration fault (bad key, unknown model), once it is fixed."""
    client = _client()
    resumed = _guard(lambda: client.resume(batch))
    err.print(f"batch {batch}: {resumed} queued jobs published again")


@app.command()
def results(
    batch: str,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
) -> None:
    """One line per input row: key, status, final tier, output, cost, error."""
    _check_format(fmt)
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


STATS_COLUMNS = ["jobs", "finished", "succeeded", "failed", "escalation_rate", "tier2_rate", "tier3_rate",
                 "avg_cost_usd", "baseline_cost_usd", "savings_pct", "p50_latency_ms", "p95_latency_ms"]


def stats_table(rows: list[dict[str, Any]]) -> Table:  # Any: view rows
    """escalation_stats with one column per task type (it stays readable in 80 columns)."""
    table = Table(title="escalation_stats")
    table.add_column("")
    for row in rows:
        table.add_column(str(row["task_type"]), justify="right")
    for col in STATS_COLUMNS:
        table.add_row(col, *[_cell(row.get(col)) for row in rows])
    return table


def _cell(value: Any) -> str:  # Any: a SQL value
    if value is None:
        return "-"
    if isinstance(value, float) or hasattr(value, "quantize"):
        return f"{float(value):.4g}" if abs(float(value)) < 1 else f"{float(value):.1f}"
    return str(value)


@app.command()
def sweep(
    stalled_after: Annotated[float | None, typer.Option(
        help="Re-publish queued jobs whose message is missing from the broker after this many seconds "
             "[default: CASCADE_STALLED_AFTER_S, 20].")] = None,
    dead_after: Annotated[float | None, typer.Option(
        help="Take back the running jobs of a worker whose heartbeat is this old (s) "
             "[default: CASCADE_WORKER_DEAD_AFTER_S, 15].")] = None,
    every: Annotated[float | None, typer.Option(help="Loop, sweeping every this many seconds.")] = None,
) -> None:
    """Re-publish jobs whose message was lost or whose worker died (one pass, or a loop with --every)."""
    from cascade.publish import broker_errors
    from cascade.store import database_errors
    from cascade.sweeper import sweep as run_sweep

    client = _client()
    settings = client.settings
    stalled_after_s = settings.stalled_after_s if stalled_after is None else stalled_after
    dead_after_s = settings.worker_dead_after_s if dead_after is None else dead_after
    retried: tuple[type[Exception], ...] = (*database_errors(), OSError, *broker_errors())
    while True:
        try:
            report = _guard(lambda: run_sweep(client.engine, client.publisher, stalled_after_s=stalled_after_s,
                                              dead_after_s=dead_after_s, jobs_per_message=settings.jobs_per_message))
        except retried as exc:
            if every is None:
                raise
            # A Postgres or broker blip must not end the loop: the next tick sweeps again.
            err.print(f"sweep failed, retrying in {every} s: {type(exc).__name__}: {str(exc)[:200]}", markup=False)
        else:
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


DEMO_BATCHES = {"ticket_triage": ("tickets.jsonl", "ticket_id"), "review_summary": ("reviews.jsonl", "review_id")}
DataDirOpt = Annotated[Path | None, typer.Option(help="Where embedded services keep their data (default .cascade).")]


def _tier_progress(client: Client, batch_ids: list[str]) -> None:
    """One live bar per tier: jobs that reached the tier, and how many of them are done with it."""
    from cascade import store

    with client.engine.connect() as conn:
        tiers = store.max_tiers(conn, batch_ids)
    with Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as bar:
        tasks = {t: bar.add_task(f"tier {t}", total=0) for t in range(1, tiers + 1)}
        while True:
            with client.engine.connect() as conn:
                rows = store.count_jobs_by_tier(conn, batch_ids)
            for t, task in tasks.items():
                reached = sum(n for tier, _, n in rows if tier >= t)
                done = sum(n for tier, status, n in rows if tier > t or (tier == t and status in ("succeeded", "failed")))
                bar.update(task, total=reached, completed=done)
            if rows and all(status in ("succeeded", "failed") for _, status, _ in rows):
                return
            time.sleep(0.3)


def _print_summary(rows: list[dict[str, Any]], flower: str, psql: str | None, elapsed: float) -> None:
    out = Console()
    out.print(stats_table(rows))
    cost = sum(float(r["avg_cost_usd"] or 0) * r["finished"] for r in rows)
    baseline = sum(float(r["baseline_cost_usd"] or 0) * r["finished"] for r in rows)
    if baseline:
        out.print(f"cost ${cost:.4f} vs ${baseline:.4f} for the top tier alone on the same rows: "
                  f"{100 * (1 - cost / baseline):.1f}% saved")
    out.print(f"finished in {elapsed:.1f} s; Flower ran at {flower}")
    if psql:
        out.print("query the embedded database (it stays up until `cascade dev --stop`):")
        out.print(f"  {psql} -c 'SELECT task_type, escalation_rate, tier3_rate, savings_pct FROM escalation_stats'",
                  highlight=False, soft_wrap=True)


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Leave the stack up for your own `cascade submit` until Ctrl-C.")]
    = False,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole cascade on bundled rows: embedded Postgres and Redis, the sim, workers and Flower."""
    from cascade.stack import DEMO_DATA

    started = time.monotonic()
    settings = load_settings(data_dir=data_dir)
    with _running_stack(settings) as stack:
        err.print(f"Flower: {stack.flower_url} (basic auth {stack.flower_auth}); logs in {stack.log_dir}")
        client = Client(stack.settings.model_copy(update={"config": stack.config_path}))
        ids = [_guard(lambda t=task, f=file, k=key: client.submit(t, DEMO_DATA / f, key_field=k)).batch_id  # type: ignore[misc]
               for task, (file, key) in DEMO_BATCHES.items()]
        err.print(f"submitted {len(ids)} batches: {', '.join(ids)}")
        _tier_progress(client, ids)
        rows = client.stats()
        # The run completed: leave Postgres up for the printed psql command (with --keep, Ctrl-C ends it all).
        stack.keep_services = not keep
        if as_json:
            typer.echo(json.dumps({"stats": rows, "batches": ids, "flower": stack.flower_url,
                                   "psql": stack.psql_command}, default=_json_default))
        else:
            _print_summary(rows, stack.flower_url, stack.psql_command, time.monotonic() - started)
        if keep:
            _stay_up(stack)
        client.close()


def _stay_up(stack: Any) -> None:  # Any: cascade.stack.DevStack (imported lazily)
    err.print("the stack is up; in another shell:")
    typer.echo(stack.exports())
    err.print(f"sim (OpenAI-compatible): {stack.sim_url}\nFlower: {stack.flower_url} ({stack.flower_auth})\n"
              "Ctrl-C stops everything.")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        err.print("stopping")


@app.command()
def dev(
    data_dir: DataDirOpt = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop embedded services a demo left up, then exit.")] = False,
) -> None:
    """Start embedded Postgres and Redis, the sim, workers and Flower; print the env vars; stay up until Ctrl-C."""
    from cascade.embedded import stop_embedded

    settings = load_settings(data_dir=data_dir)
    if stop:
        stopped = stop_embedded(settings.data_dir.resolve() / "services")
        err.print("embedded services stopped" if stopped else "no embedded services were running")
        return
    with _running_stack(settings) as stack:
        _stay_up(stack)


app.command("eval")(eval_command)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so demo and dev stop what they started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()
if __name__ == "__main__":
    main()
