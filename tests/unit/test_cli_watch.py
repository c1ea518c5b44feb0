"""`cascade status --watch`'s arithmetic and views, without services."""

from __future__ import annotations

from decimal import Decimal

import pytest
from rich.console import Console

from cascade.cli_watch import Progress, eta_s, progress_line, rate_per_s, stage_table
from cascade.client import BatchStatus


@pytest.mark.parametrize(("samples", "rate"), [
    ([], None),
    ([(0.0, 0)], None),
    ([(0.0, 0), (2.0, 10)], 5.0),
    ([(0.0, 0), (40.0, 100), (50.0, 120), (60.0, 140)], 2.0),  # only the last 30 s count
    ([(0.0, 5), (1.0, 5)], 0.0),
])
def test_rate_over_the_window(samples, rate):
    assert rate_per_s(samples) == rate


@pytest.mark.parametrize(("remaining", "rate", "eta"), [(0, None, 0.0), (10, None, None), (10, 0.0, None),
                                                        (10, 2.0, 5.0)])
def test_eta(remaining, rate, eta):
    assert eta_s(remaining, rate) == eta


def test_the_table_shows_jobs_per_tier_and_stage_beside_messages():
    # Given a batch with jobs at two tiers and stages, and the queues' message counts
    state = BatchStatus("b" * 32, "qa", 10, {"queued": 5, "running": 2, "succeeded": 3}, {1: 8, 2: 2},
                        Decimal("0.0000123"))
    progress = Progress(0.0, state, [(1, "call", "queued", 4), (1, "call", "running", 2), (1, "validate", "queued", 1),
                                     (1, "validate", "succeeded", 3), (2, "call", "queued", 0)],
                        {"tier1": 1, "tier2": 0, "validate": 7})
    # When it is drawn in 80 columns
    console = Console(width=80, record=True, force_terminal=True)
    console.print(stage_table(progress))
    lines = console.export_text().splitlines()
    # Then each (tier, stage) is a row with its counts by status and its queue's messages
    assert lines[0].split() == ["tier", "stage", "queued", "running", "succeeded", "failed", "queue", "messages"]
    assert lines[1].split() == ["1", "call", "4", "2", "0", "0", "tier1", "1"]
    assert lines[2].split() == ["1", "validate", "1", "0", "3", "0", "validate", "7"]
    # And the summary line has the rate, the ETA and the cost rounded for people
    assert progress_line(progress, 0.5).endswith("3/10 finished, 0 failed, 0.5 jobs/s, ETA 14s, cost so far $0.000012")
