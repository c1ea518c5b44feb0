"""``cascade report BATCH --html FILE``: one static HTML file about one batch (``cascade.report``).

Exit codes: 0 written (stdout: the file's absolute path), 2 a bad path or no such batch, 4 the database cannot be
reached.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from cascade.cli_common import fail, guard, make_client
from cascade.client import Client
from cascade.errors import InputError

__all__ = ["report_command"]


def report_command(
    batch: Annotated[str, typer.Argument(help="A batch id, or a unique prefix of one.")],
    html: Annotated[Path, typer.Option("--html", metavar="FILE", help="Write the report here (an HTML file; an "
                                                                     "existing file is replaced).")],
) -> None:
    """Write one self-contained HTML report about a batch: a header (task type, rows, jobs by status, cost,
    created, config hash, and where present cache hits, budget and audit agreement), savings against the top
    tier alone, cost by tier and model, where jobs ended, escalation reasons per tier, and a histogram of job
    latency (first request to finished). Charts are inline SVG with their numbers in tables beside them; the file
    needs no network to open. Prints the file's absolute path."""
    target = _checked(html)
    client = make_client()
    page = guard(lambda: _render(client, batch))
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(InputError(f"cannot write the report: {exc.strerror}", source=str(html)))
    typer.echo(str(target))


def _checked(html: Path) -> Path:
    """The absolute path to write to; exit 2 when it is a folder or its folder does not exist."""
    target = html.expanduser().absolute()
    if target.is_dir():
        fail(InputError("is a folder; give a file name such as report.html", source=str(html)))
    if not target.parent.is_dir():
        fail(InputError(f"no such folder: {target.parent}", source=str(html)))
    return target


def _render(client: Client, batch: str) -> str:
    from cascade.report import render_report
    from cascade.store.report_data import read_report

    batch_id = client.resolve(batch)
    # One snapshot: the numbers agree with one another while the batch still runs.
    with client.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        data = read_report(conn, batch_id)
    if data is None:
        raise InputError(f"no batch {batch_id!r}")
    return render_report(data, generated_at=datetime.now(UTC))
