"""How the CLI shows things to people: consoles that never fold an id, and money and rates rounded.

Machines get the exact values (``--json``, ``results``, SQL): money there is ``numeric(24,12)`` as text.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["accuracy_table", "console", "count", "drifted", "latency", "money", "parse_since", "percent", "rate",
           "stats_table"]

#: the width of a console that is not a terminal: lines and tables as long as their content
UNFOLDED_WIDTH = 10_000


def console(*, stderr: bool = False) -> Console:
    """A rich console for stdout or stderr. On a terminal it has the terminal's width; anywhere else (a pipe, a
    CI log) nothing is folded or cut, unless ``COLUMNS`` asks for a width."""
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return Console(stderr=stderr, width=UNFOLDED_WIDTH)


def _decimal(value: object) -> Decimal | None:
    try:
        return None if value is None else Decimal(str(value))
    except InvalidOperation:
        return None


def money(value: object) -> str:
    """USD for people: cents from a dollar up, else two significant digits, never an exponent
    (``$1,234.50``, ``$0.0042``, ``$0.000015``); ``-`` for none."""
    v = _decimal(value)
    if v is None:
        return "-"
    if v == 0:
        return "$0"
    digits = 2 if abs(v) >= 1 else -v.adjusted() + 1
    return f"${v:,.{digits}f}"


def rate(value: object) -> str:
    """A share (0..1) as a percentage with one decimal: ``5.0%``."""
    v = _decimal(value)
    return "-" if v is None else f"{v * 100:.1f}%"


def percent(value: object) -> str:
    """A value already in percent, one decimal: ``37.5%``."""
    v = _decimal(value)
    return "-" if v is None else f"{v:.1f}%"


def latency(value: object) -> str:
    """Milliseconds, whole: ``1,234 ms``."""
    v = _decimal(value)
    return "-" if v is None else f"{v:,.0f} ms"


def count(value: object) -> str:
    return "-" if value is None else f"{value}"


_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: an age (``30m``, ``24h``, ``7d``, ``2w``) before ``now``, or an ISO date or time (naive means
    ``now``'s zone). ValueError says what is accepted."""
    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in _UNITS:
        return now - timedelta(**{_UNITS[text[-1]]: int(text[:-1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give an age (30m, 24h, 7d, 2w) or an ISO date/time "
                         "(2026-11-23, 2026-11-23T08:00)") from None
    return when if when.tzinfo else when.replace(tzinfo=now.tzinfo)


#: escalation_stats columns as people read them; ``--json`` and SQL keep the exact values
STATS_COLUMNS: dict[str, Callable[[object], str]] = {
    "jobs": count, "finished": count, "succeeded": count, "failed": count, "escalation_rate": rate,
    "tier2_rate": rate, "tier3_rate": rate, "skipped_rate": rate, "avg_cost_usd": money, "baseline_cost_usd": money,
    "savings_pct": percent, "p50_latency_ms": latency, "p95_latency_ms": latency, "total_cost_usd": money,
}


def stats_table(rows: list[dict[str, Any]]) -> Table:  # Any: view rows
    """escalation_stats with one column per task type (it stays readable in 80 columns), rounded for people."""
    table = Table(title="escalation_stats")
    table.add_column("", no_wrap=True, min_width=max(len(c) for c in STATS_COLUMNS))
    for row in rows:
        table.add_column(str(row["task_type"]), justify="right", no_wrap=True)
    for col, show in STATS_COLUMNS.items():
        table.add_row(col, *[show(row.get(col)) for row in rows])
    return table


def accuracy_table(rows: list[dict[str, Any]], min_agreement: float | None = None) -> Table:  # Any: view rows
    """routing_accuracy, one row per task type, tier and model; with ``min_agreement``, rows whose interval's
    upper end is below it are marked ``DRIFT``."""
    table = Table(title="routing_accuracy")
    for name in ("task_type", "tier", "model"):
        table.add_column(name, no_wrap=True)
    for name in ("accepted", "audited", "agreed", "agreement", "95% interval", "escalated", "escalated agreement"):
        table.add_column(name, justify="right", no_wrap=True)
    if min_agreement is not None:
        table.add_column("")
    for row in rows:
        interval = "-" if row["ci_low"] is None else f"{rate(row['ci_low'])} - {rate(row['ci_high'])}"
        cells = [str(row["task_type"]), str(row["tier"]), str(row["model"]), count(row["accepted"]),
                 count(row["audited"]), count(row["agreed"]), rate(row["agreement_rate"]), interval,
                 count(row["escalated"]), rate(row["escalated_agreement"])]
        if min_agreement is not None:
            cells.append("DRIFT" if drifted(row, min_agreement) else "")
        table.add_row(*cells)
    return table


def drifted(row: dict[str, Any], min_agreement: float) -> bool:  # Any: a view row
    """Whether a routing_accuracy row's agreement is surely below ``min_agreement``: its 95 % interval ends
    below it."""
    return row["ci_high"] is not None and float(row["ci_high"]) < min_agreement
