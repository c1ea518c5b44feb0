"""``cascade status --watch``: where a batch's jobs are, live, at the cascade's level (Flower counts messages).

On a terminal, a table redrawn in place: jobs per tier and stage by status, with the messages waiting on
each stage's queue beside them, then the rate, the ETA and the cost so far. Anywhere else, one plain line
per poll. It ends when every job is finished or the batch is halted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cascade.client import BatchStatus, Client
from cascade.display import money
from cascade.errors import CascadeError
from cascade.publish import broker_errors

__all__ = ["Progress", "eta_s", "progress_line", "rate_per_s", "stage_table", "watch"]

STATUSES = ("queued", "running", "succeeded", "failed")
#: how far back the rate looks: long enough to smooth message batches, short enough to follow a slowdown
RATE_WINDOW_S = 30.0


@dataclass(frozen=True)
class Progress:
    """One poll of a batch: its status, and where its jobs are."""

    at: float  # monotonic seconds
    status: BatchStatus
    stages: list[tuple[int, str, str, int]]  # (tier, stage, status, count)
    messages: dict[str, int] | None  # messages waiting per queue, None when the broker did not say


def rate_per_s(samples: Sequence[tuple[float, int]], window_s: float = RATE_WINDOW_S) -> float | None:
    """Jobs finished per second over the last ``window_s`` of (time, finished) samples; None before two
    samples at different times."""
    if not samples:
        return None
    last_at, last = samples[-1]
    first_at, first = next((s for s in samples if s[0] >= last_at - window_s), samples[-1])
    if last_at <= first_at:
        return None
    return max(last - first, 0) / (last_at - first_at)


def eta_s(remaining: int, rate: float | None) -> float | None:
    """Seconds until ``remaining`` jobs are done at ``rate``; None when nothing finishes yet."""
    if remaining <= 0:
        return 0.0
    return None if not rate else remaining / rate


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _queue(tier: int, stage: str) -> str:
    return f"tier{tier}" if stage == "call" else "validate"


def stage_table(progress: Progress) -> Table:
    """Jobs per (tier, stage) by status, with the messages waiting on that stage's queue (shared by every
    batch; a message holds several jobs)."""
    table = Table(box=None, pad_edge=False)
    for col in ("tier", "stage", *STATUSES, "queue", "messages"):
        table.add_column(col, justify="left" if col in ("stage", "queue") else "right", no_wrap=True)
    cells: dict[tuple[int, str], dict[str, int]] = {}
    for tier, stage, status, n in progress.stages:
        cells.setdefault((tier, stage), {})[status] = n
    for (tier, stage), counts in sorted(cells.items()):
        queue = _queue(tier, stage)
        waiting = "-" if progress.messages is None else str(progress.messages.get(queue, 0))
        table.add_row(str(tier), stage, *(str(counts.get(s, 0)) for s in STATUSES), queue, waiting)
    return table


def progress_line(progress: Progress, rate: float | None) -> str:
    """The batch in one line: finished, failed, rate, ETA, cost so far."""
    state = progress.status
    return (f"batch {state.batch_id}: {state.finished}/{state.rows} finished, "
            f"{state.counts.get('failed', 0)} failed, "
            f"{'-' if rate is None else f'{rate:.1f}'} jobs/s, ETA {_duration(eta_s(state.rows - state.finished, rate))}, "
            f"cost so far {money(state.cost_usd if state.cost_usd else Decimal(0))}")


def watch(client: Client, batch_id: str, out: Console, *, poll_s: float = 1.0,
          queue_lengths: Callable[[], dict[str, int]] | None = None) -> BatchStatus:
    """Show the batch until it is done or halted (Ctrl-C stops watching, not the batch); returns the last status."""
    batch_id = client.resolve(batch_id)
    samples: deque[tuple[float, int]] = deque(maxlen=600)

    def poll() -> tuple[Progress, float | None]:
        state = client.status(batch_id)
        progress = Progress(time.monotonic(), state, client.jobs_by_stage(batch_id), _messages(queue_lengths))
        samples.append((progress.at, state.finished))
        return progress, rate_per_s(samples)

    progress, rate = poll()
    if not out.is_terminal:
        while True:
            out.print(progress_line(progress, rate), markup=False, highlight=False, soft_wrap=True)
            if progress.status.is_done or progress.status.halted:
                return progress.status
            time.sleep(poll_s)
            progress, rate = poll()
    with Live(_view(progress, rate), console=out, auto_refresh=False) as live:
        while not (progress.status.is_done or progress.status.halted):
            time.sleep(poll_s)
            progress, rate = poll()
            live.update(_view(progress, rate), refresh=True)
    return progress.status


def _view(progress: Progress, rate: float | None) -> Group:
    state = progress.status
    title = Text(f"batch {state.batch_id} ({state.task_type})", no_wrap=True, overflow="ignore")
    return Group(title, stage_table(progress), Text(progress_line(progress, rate).split(": ", 1)[1]))


def _messages(queue_lengths: Callable[[], dict[str, int]] | None) -> dict[str, int] | None:
    if queue_lengths is None:
        return None
    unavailable: tuple[type[Exception], ...] = (CascadeError, OSError, *broker_errors())
    try:
        return queue_lengths()
    except unavailable:  # a hint beside Postgres's truth: a broker blip shows "-"
        return None
