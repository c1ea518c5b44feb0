"""The ``cascade`` command. Exit codes: 0 ok, 1 some jobs failed, 2 bad input or config, 3 timeout,
4 the database or the broker cannot be reached.

``submit`` prints only the batch id on stdout (``BATCH=$(cascade submit ...)``), as soon as it is committed;
human messages go to stderr; every read command has ``--json``; a batch id may be a unique prefix.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cascade.cli_common import err, fail, guard, make_client
from cascade.cli_eval import eval_command
from cascade.cli_metrics import metrics_command
from cascade.cli_report import report_command
from cascade.client import BatchStatus, Client
from cascade.config import CascadeSettings, load_settings
from cascade.display import accuracy_table, console, drifted, money, parse_since, stats_table
from cascade.errors import CascadeError, ConfigError

if TYPE_CHECKING:
    from cascade.stack import DevStack

__all__ = ["app", "main"]

app = typer.Typer(help="Cheap LLM batch jobs through a cascade of models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
cache_app = typer.Typer(help="The request cache (answers kept in Postgres, reused by identical requests).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")
audit_app = typer.Typer(help="Quality audits: accepted answers re-run on a bigger model (routing_accuracy).",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="cascade.yaml (default: $CASCADE_CONFIG)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@contextmanager
def _running_stack(settings: CascadeSettings, **options: Any) -> Iterator[DevStack]:  # Any: run_stack's options
    """``run_stack``, with a service that never came up (a dead Flower, Postgres) reported as exit 2."""
    from cascade.stack import run_stack

    try:
        with run_stack(settings, **options) as stack:
            yield stack
    except CascadeError as exc:
        fail(exc)


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

    guard(lambda: upgrade(make_client().engine))
    err.print("database is at the latest revision")


@cache_app.command("prune")
def cache_prune(
    older_than: Annotated[float | None, typer.Option(
        "--older-than", min=0, help="Delete entries answered more than this many days ago "
                                    "(default: CASCADE_CACHE_TTL_S, when set).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Delete every entry.")] = False,
) -> None:
    """Delete request cache entries: older than --older-than DAYS, older than CASCADE_CACHE_TTL_S, or --all.
    The next identical request is sent (and paid) again."""
    from cascade.store.cache import prune_cache

    client = make_client()
    if all_ and older_than is not None:
        err.print("error: give --older-than or --all, not both", markup=False, highlight=False)
        raise typer.Exit(2)
    age_s = older_than * 86400 if older_than is not None else client.settings.cache_ttl_s
    if age_s is None and not all_:
        err.print("error: give --older-than DAYS or --all (CASCADE_CACHE_TTL_S is not set, so there is no default "
                  "age)", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    def prune() -> int:
        with client.engine.begin() as conn:
            return prune_cache(conn, None if all_ else age_s)

    deleted = guard(prune)
    err.print(f"deleted {deleted} request cache entr{'y' if deleted == 1 else 'ies'}", markup=False, highlight=False)


@app.command()
def submit(
    task_type: Annotated[str, typer.Argument(help="A task type from cascade.yaml.")],
    file: Annotated[str, typer.Argument(help="JSONL or CSV file, or - for stdin.")],
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl or csv (default: by extension).")] = None,
    key_field: Annotated[str | None, typer.Option(help="Row field used as the job key (default: line number).")]
    = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key + same rows = the same batch.")] = None,
    skip_invalid: Annotated[Path | None, typer.Option(help="Write rejected rows here and submit the rest.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Send every request again instead of reading "
                                           "answers from the request cache (answers are still written).")] = False,
    max_cost: Annotated[str | None, typer.Option(
        "--max-cost", metavar="USD", help="Cap the batch's spend: no request goes out unless its cost's upper bound "
                                          "fits in what is left; jobs that cannot afford their next request end "
                                          "failed as budget_exhausted.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Submit a batch; prints its id on stdout."""
    _check_format(fmt)
    kind: Literal["jsonl", "csv"] = "csv" if fmt == "csv" or (fmt is None and file.lower().endswith(".csv")) \
        else "jsonl"

    def run() -> Any:  # Any: SubmitResult
        from cascade import producer
        from cascade.client import parse_cap
        from cascade.errors import ConfigError, InputError

        client = make_client(config)
        cap = parse_cap(max_cost, "--max-cost")
        try:
            snap = client.config.snapshot(task_type, cache_reads=not no_cache, max_cost_usd=cap)
        except ConfigError as exc:
            if exc.file is not None:
                raise
            # An unknown task type: say which file was searched.
            raise ConfigError(str(exc), file=str(client.settings.config), path="task_types") from None
        if skip_invalid is not None and file != "-" and skip_invalid.resolve() == Path(file).resolve():
            raise InputError("--skip-invalid must not name the input file", source=file)
        if file == "-":
            rows = producer.read_rows(sys.stdin.buffer, _stdin_format(fmt), "<stdin>")
            return producer.submit_rows(client.engine, client.publisher, snap, rows, source="<stdin>",
                                        key_field=key_field, idempotency_key=idempotency_key,
                                        rejects_path=skip_invalid, on_committed=announce)
        return client.submit(task_type, file, fmt=kind, key_field=key_field, idempotency_key=idempotency_key,
                             rejects_path=skip_invalid, on_committed=announce, cache=not no_cache, max_cost=cap)

    committed: list[str] = []

    def announce(batch_id: str) -> None:
        # On stdout the moment it is committed: if publishing fails next, the user still has the id.
        committed.append(batch_id)
        typer.echo(batch_id)

    result = guard(run)
    verb = "submitted" if result.created else "already submitted (same idempotency key and rows)"
    err.print(f"{verb}: batch {result.batch_id}, {result.rows} rows"
              + (f", {result.rejected} rejected → {skip_invalid}" if result.rejected else ""),
              markup=False, highlight=False, soft_wrap=True)
    if not committed:
        typer.echo(result.batch_id)


def _stdin_format(fmt: str | None) -> Literal["jsonl", "csv"]:
    """--format if given, else what the first line of stdin looks like (said on stderr when it is CSV)."""
    from cascade.rows import sniff_format

    if fmt is not None:
        return "csv" if fmt == "csv" else "jsonl"
    peek = getattr(sys.stdin.buffer, "peek", None)  # a BufferedReader's: nothing is consumed
    kind = sniff_format(peek(65536)) if peek else "jsonl"
    if kind == "csv":
        err.print("reading <stdin> as CSV (its first line is a header, not JSON; --format jsonl to insist)",
                  markup=False, highlight=False, soft_wrap=True)
    return kind


def _print_status(state: BatchStatus) -> None:
    out = console()
    # The id on a line of its own: a table title would fold it at the table's width.
    out.print(f"batch {state.batch_id} ({state.task_type})", markup=False, highlight=False, soft_wrap=True)
    table = Table()
    columns = ["rows", "queued", "running", "succeeded", "failed"]
    columns += ["cancelled"] if state.cancelled or state.counts.get("cancelled") else []
    for col in (*columns, "cost"):
        table.add_column(col, justify="right", no_wrap=True)
    c = state.counts
    table.add_row(str(state.rows), *[str(c.get(col, 0)) for col in columns[1:]], money(state.cost_usd))
    out.print(table)
    if state.budget is not None:
        cap, spent, reserved = state.budget
        out.print(f"budget: {money(spent)} spent, {money(reserved)} reserved, {money(cap - spent - reserved)} left "
                  f"of {money(cap)}", markup=False, highlight=False)
    if state.daily is not None:
        per_day, spent, reserved = state.daily
        out.print(f"daily budget of {state.task_type}: {money(spent)} spent, {money(reserved)} reserved, "
                  f"{money(per_day - spent - reserved)} left of {money(per_day)} over the last 24 h", markup=False,
                  highlight=False, soft_wrap=True)
    if state.cache is not None and state.cache[0]:
        hits, misses, saved = state.cache
        out.print(f"cache: {hits} of {hits + misses} answered requests were hits, saving {money(saved)}",
                  markup=False, highlight=False)
    if state.starts is not None:
        parts = [f"{n} at tier {tier} ({route})" for tier, route, n in state.starts]
        out.print(f"started: {', '.join(parts)}", markup=False, highlight=False, soft_wrap=True)
    if state.audits is not None:
        waiting, agreed, disagreed, cost = state.audits
        out.print(f"audits: {agreed} agreed, {disagreed} disagreed, {waiting} waiting; cost {money(cost)} (not in "
                  "the jobs' cost)", markup=False, highlight=False, soft_wrap=True)
    if state.halted:
        err.print(f"[red]halted:[/red] {escape(state.halted)}\nfix it, then: cascade retry {state.batch_id}",
                  soft_wrap=True)
    for note in state.notes:
        err.print(f"note: {escape(note)}", soft_wrap=True)


@app.command()
def status(
    batch: str,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Live: jobs per tier and stage beside the queues' messages, rate, ETA, cost so far; "
                        "until the batch is finished (Ctrl-C stops watching, not the batch).")] = False,
    every: Annotated[float, typer.Option(help="With --watch: seconds between polls.")] = 1.0,
) -> None:
    """Counts of a batch's jobs by status (--watch: live, per tier and stage)."""
    client = make_client()
    if watch and not as_json:
        _watch(client, batch, every)
    state = guard(lambda: client.status(batch, notes=True))
    if as_json:
        typer.echo(json.dumps(state.to_json()))
    else:
        _print_status(state)


def _watch(client: Client, batch: str, every: float) -> None:
    from cascade.cli_watch import watch as watch_batch

    def queue_lengths() -> dict[str, int]:
        return client.publisher.queue_lengths()

    try:
        guard(lambda: watch_batch(client, batch, console(), poll_s=every, queue_lengths=queue_lengths))
    except KeyboardInterrupt:
        err.print("stopped watching; the batch goes on")
        raise typer.Exit(130) from None


@app.command()
def wait(
    batch: str,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a batch to finish with a progress bar. Exit 1 if some jobs failed or were cancelled, 2 if the
    batch halted on a configuration fault (fix it, then `cascade retry BATCH`), 3 on timeout."""
    client = make_client()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=as_json) as bar:
        task = bar.add_task(f"batch {batch[:8]}", total=None)

        def show(state: BatchStatus) -> None:
            tiers = " ".join(f"t{k}:{v}" for k, v in state.by_tier.items())
            bar.update(task, total=state.rows, completed=state.finished,
                       description=f"batch {state.batch_id[:8]} [{tiers}] failed:{state.counts.get('failed', 0)}")

        state = guard(lambda: client.wait(batch, timeout=timeout, on_progress=show))
    if as_json:
        typer.echo(json.dumps(state.to_json()))
    if state.halted and not state.is_done:
        err.print(f"batch halted: {escape(state.halted)}\nfix it, then: cascade retry {state.batch_id}",
                  soft_wrap=True)
        raise typer.Exit(2)
    if not state.is_done:
        err.print(f"timeout: {state.finished}/{state.rows} jobs finished")
        raise typer.Exit(3)
    if state.counts.get("failed") or state.counts.get("cancelled"):
        failed, cancelled = state.counts.get("failed", 0), state.counts.get("cancelled", 0)
        parts = ([f"{failed} of {state.rows} jobs failed"] if failed else []) + (
            [f"{cancelled}{'' if failed else f' of {state.rows} jobs'} cancelled"] if cancelled else [])
        err.print(", ".join(parts))
        raise typer.Exit(1)


@app.command()
def retry(
    batch: str,
    failed: Annotated[bool, typer.Option("--failed", help="Run the batch's failed rows again from tier 1 (the same "
                                         "jobs, in the same batch; their earlier requests are kept).")] = False,
    cancelled: Annotated[bool, typer.Option("--cancelled", help="Run its cancelled rows again too (with "
                                            "--failed).")] = False,
    max_cost: Annotated[float | None, typer.Option(
        "--max-cost", help="What the retry may spend in USD: the batch's cap becomes what it has spent plus "
                           "this (with --failed).")] = None,
) -> None:
    """Resume a batch halted by a configuration fault (bad key, unknown model), once it is fixed; with --failed,
    run its failed rows again (a batch cancelled is no longer)."""
    client = make_client()
    batch = guard(lambda: client.resolve(batch))
    if not failed:
        if cancelled or max_cost is not None:
            err.print("error: --cancelled and --max-cost go with --failed", markup=False, highlight=False)
            raise typer.Exit(2)
        resumed = guard(lambda: client.resume(batch))
        err.print(f"batch {batch}: {resumed} queued jobs published again")
        return
    count, cap = guard(lambda: client.retry_failed(batch, cancelled=cancelled, max_cost=max_cost))
    which = "failed or cancelled" if cancelled else "failed"
    err.print(f"batch {batch}: {count} {which} jobs run again from tier 1"
              + (f" (the batch's cap is now {money(cap)})" if cap is not None else ""), markup=False, highlight=False)


@app.command()
def cancel(batch: str, as_json: JsonOpt = False) -> None:
    """Stop a batch: its queued (and deferred) jobs are cancelled at once; a running job finishes the request it
    has in flight and stops there, no new request goes out. `cascade wait` on it then exits 1;
    `cascade retry BATCH --failed --cancelled` runs them again."""
    client = make_client()
    batch = guard(lambda: client.resolve(batch))
    done = guard(lambda: client.cancel(batch))
    if as_json:
        typer.echo(json.dumps({"batch_id": batch, "cancelled": done.queued, "stopping": done.running,
                               "audits_skipped": done.audits}))
    err.print(f"batch {batch}: {done.queued} jobs cancelled, {done.running} running stop after their current "
              "request", markup=False, highlight=False)


@app.command()
def batches(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    task_type: Annotated[str | None, typer.Option(help="Only this task type.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The newest batches: id, task type, created, rows, done/failed/open, cost and state (running, done,
    halted, cancelling, cancelled)."""
    client = make_client()
    rows = guard(lambda: client.batches(limit=limit, task_type=task_type))
    if as_json:
        typer.echo(json.dumps([{**dataclasses.asdict(r), "created_at": r.created_at.isoformat(),
                                "cost_usd": str(r.cost_usd)} for r in rows]))
        return
    table = Table(title="batches")
    for col in ("id", "task type", "created", "rows", "succeeded", "failed", "cancelled", "open", "cost", "state"):
        table.add_column(col, justify="right" if col in ("rows", "succeeded", "failed", "cancelled", "open", "cost")
                         else "left", no_wrap=True)
    for r in rows:
        table.add_row(r.id, r.task_type, r.created_at.strftime("%Y-%m-%d %H:%M:%S"), str(r.rows), str(r.succeeded),
                      str(r.failed), str(r.cancelled), str(r.open), money(r.cost_usd), r.state)
    console().print(table)


@app.command()
def results(
    batch: str,
    fmt: Annotated[str | None, typer.Option("--format", help="jsonl (the default) or csv.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row (the same as --format jsonl).")]
    = False,
) -> None:
    """One line per input row: key, status, final tier, output, exact cost, error."""
    _check_format(fmt)
    if as_json and fmt == "csv":
        err.print("error: --json and --format csv ask for two formats; give one", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    client = make_client()
    guard(lambda: _write_results(client, batch, fmt or "jsonl"))


def _write_results(client: Client, batch: str, fmt: str) -> None:
    rows = client.results(client.resolve(batch))
    out = sys.stdout
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=["key", "status", "tier", "output", "cost_usd", "error"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "output": json.dumps(row["output"]) if row["output"] is not None else ""})
        return
    for row in rows:
        out.write(json.dumps(row, default=_json_default, ensure_ascii=False) + "\n")


@audit_app.command("report")
def audit_report(
    task_type: Annotated[str | None, typer.Option(help="Only this task type.")] = None,
    min_agreement: Annotated[float | None, typer.Option(
        "--min-agreement", min=0, max=1,
        help="Exit 1 when a tier's agreement with its auditor is surely below this: the upper end of its 95% "
             "interval is (a drift alarm for cron or CI).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """How often the answers each tier and model accepted agree with the audit model (the routing_accuracy
    view), with a 95% Wilson interval, and how often an escalated job's rejected answer matched the accepted
    one. Exit 1 when --min-agreement is given and some tier falls below it."""
    client = make_client()
    rows = guard(lambda: client.routing_accuracy(task_type))
    if as_json:
        typer.echo(json.dumps(rows, default=_json_default))
    else:
        console().print(accuracy_table(rows, min_agreement))
    if not any(row["audited"] for row in rows):
        err.print("note: no audited answers yet (a task type audits with `audit: {rate: 0.05}`)", highlight=False,
                  soft_wrap=True)
    if min_agreement is not None:
        low = [row for row in rows if drifted(row, min_agreement)]
        for row in low:
            err.print(f"drift: {row['task_type']} tier {row['tier']} ({row['model']}) agrees with its auditor "
                      f"{row['agreed']} of {row['audited']} times; the 95% interval ends at {row['ci_high']}, below "
                      f"{min_agreement}", markup=False, highlight=False, soft_wrap=True)
        if low:
            raise typer.Exit(1)


@app.command()
def stats(
    task_type: Annotated[str | None, typer.Option(help="Only this task type.")] = None,
    batch: Annotated[list[str] | None, typer.Option(
        "--batch", help="Only this batch (an id or unique prefix; repeat for several).")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only batches submitted since: an age (30m, 24h, 7d) or an ISO date/time.")] = None,
    include_eval: Annotated[bool, typer.Option(
        "--include-eval", help="Count the batches `cascade eval` ran too (left out by default).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Escalation rates, cost and savings per task type (the escalation_stats view), for all batches or some.
    People get rounded money and percentages; --json gives the exact values."""
    client = make_client()
    try:
        start = None if since is None else parse_since(since, datetime.now(UTC))
    except ValueError as exc:
        fail(ConfigError(str(exc)))
    rows = guard(lambda: client.stats(task_type, batch_ids=batch, since=start, include_eval=include_eval))
    left_out = 0 if include_eval or batch else guard(client.eval_batches)
    if as_json:
        typer.echo(json.dumps(rows, default=_json_default))
    else:
        console().print(stats_table(rows))
    if left_out:
        err.print(f"note: {left_out} batches of `cascade eval` left out (--include-eval counts them)",
                  highlight=False, soft_wrap=True)


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

    client = make_client()
    settings = client.settings
    stalled_after_s = settings.stalled_after_s if stalled_after is None else stalled_after
    dead_after_s = settings.worker_dead_after_s if dead_after is None else dead_after
    retried: tuple[type[Exception], ...] = (*database_errors(), OSError, *broker_errors())
    while True:
        try:
            report = guard(lambda: run_sweep(client.engine, client.publisher, stalled_after_s=stalled_after_s,
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
    reuse_port: Annotated[bool, typer.Option(
        "--reuse-port", help="Share the port with other sims started so (the kernel spreads connections over "
                             "them: a load test's model server with several processes).")] = False,
) -> None:
    """An OpenAI-compatible model server for dry runs, demos and tests (no keys, no cost)."""
    from cascade import sim as sim_module

    guard(lambda: sim_module.serve(host=host, port=port, config_path=str(sim_config) if sim_config else None,
                                    seed=seed, replay=str(replay) if replay else None, reuse_port=reuse_port))


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
            if rows and all(status in ("succeeded", "failed", "cancelled") for _, status, _ in rows):
                return
            time.sleep(0.3)


def _print_summary(rows: list[dict[str, Any]], flower: str, psql: str | None, elapsed: float) -> None:
    out = console()
    out.print(stats_table(rows))
    cost = sum(float(r["avg_cost_usd"] or 0) * r["finished"] for r in rows)
    baseline = sum(float(r["baseline_cost_usd"] or 0) * r["finished"] for r in rows)
    if baseline:
        out.print(f"cost {money(cost)} vs {money(baseline)} for the top tier alone on the same rows: "
                  f"{100 * (1 - cost / baseline):.1f}% saved", highlight=False)
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
        ids = [guard(lambda t=task, f=file, k=key: client.submit(t, DEMO_DATA / f, key_field=k)).batch_id  # type: ignore[misc]
               for task, (file, key) in DEMO_BATCHES.items()]
        err.print(f"submitted {len(ids)} batches: {', '.join(ids)}")
        _tier_progress(client, ids)
        rows = client.stats(batch_ids=ids)  # this run's batches only, not those of an earlier demo
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
    err.print(f"sim (OpenAI-compatible): {stack.sim_url} simulating {stack.sim_config}\n"
              f"Flower: {stack.flower_url} ({stack.flower_auth})", markup=False, highlight=False, soft_wrap=True)
    if stack.psql_command:
        # Not psql "$CASCADE_DATABASE_URL": that is an SQLAlchemy URL (postgresql+psycopg://), which libpq refuses.
        err.print(f"psql: {stack.psql_command}", markup=False, highlight=False, soft_wrap=True)
    err.print("Ctrl-C stops everything.")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        err.print("stopping")


@app.command()
def dev(
    data_dir: DataDirOpt = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop embedded services a demo left up, then exit.")] = False,
    sim_port: Annotated[int, typer.Option(
        help="The sim's port, fixed so that cascade.yaml's base_url stays valid (0: any free port).")] = 0,
    sim_config: Annotated[Path | None, typer.Option(
        help="Simulated models (YAML, as `cascade sim --config`; default: the demo's).")] = None,
) -> None:
    """Start embedded Postgres and Redis, the sim, workers and Flower; print the env vars, the sim's URL and a
    psql command; stay up until Ctrl-C."""
    from cascade.embedded import stop_embedded

    settings = load_settings(data_dir=data_dir)
    if stop:
        stopped = stop_embedded(settings.data_dir.resolve() / "services")
        err.print("embedded services stopped" if stopped else "no embedded services were running")
        return
    with _running_stack(settings, sim_port=sim_port, sim_config=sim_config) as stack:
        _stay_up(stack)


app.command("eval")(eval_command)
app.command("metrics")(metrics_command)
app.command("report")(report_command)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so demo and dev stop what they started.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()
if __name__ == "__main__":
    main()
