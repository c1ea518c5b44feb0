"""`cascade demo` end to end on embedded services, and Ctrl-C leaving nothing behind."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from sqlalchemy import text

from cascade.cli import DEMO_BATCHES
from cascade.embedded import start_embedded, stop_embedded
from cascade.stack import DEMO_DATA
from cascade.store import make_engine
from tests.conftest import ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _demo(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    return subprocess.Popen([sys.executable, "-m", "cascade.cli", "demo", "--data-dir", str(data_dir), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _leftovers(data_dir: Path, pids: set[int]) -> list[str]:
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.info["pid"] in pids or str(data_dir) in cmd:
                out.append(f"{proc.info['pid']}: {cmd[:120]}")
        except psutil.Error:
            continue
    return out


def _psql(command: str, sql: str) -> list[list[str]]:
    """Run the printed psql command with ``sql``, as a user would paste it; rows of unaligned output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # only what the command says counts
    proc = subprocess.run([*shlex.split(command), "-X", "-At", "-c", sql], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return [line.split("|") for line in proc.stdout.splitlines()]


def _psycopg(command: str, sql: str) -> list[list[str]]:
    """Connect with the host, port and user the printed psql command names, as psql would (dbname = user)."""
    args = shlex.split(command)
    named = {flag: args[args.index(flag) + 1] for flag in ("-h", "-p", "-U")}
    with psycopg.connect(host=named["-h"], port=named["-p"], user=named["-U"], dbname=named["-U"]) as conn:
        return [[str(value) for value in row] for row in conn.execute(sql).fetchall()]


@pytest.fixture
def data_dir():
    path = Path(tempfile.mkdtemp(prefix="cascade-demo-"))
    yield path
    stop_embedded(path / "services")


def test_demo_runs_end_to_end_and_prints_what_the_database_holds(data_dir):
    # When the demo runs on embedded services
    proc = _demo(data_dir, "--json")
    out, err = proc.communicate(timeout=240)
    # Then it succeeds and its stats are the database's
    assert proc.returncode == 0, err[-3000:]
    printed = json.loads(out)
    assert "Flower: http://127.0.0.1:" in err
    # And the printed psql command reaches that database after the demo exits: run as printed where its psql
    # exists, and always through psycopg with the host, port and user it names (CI may have no psql at all)
    sql = "SELECT task_type, jobs FROM escalation_stats ORDER BY task_type"
    expected = sorted([r["task_type"], str(r["jobs"])] for r in printed["stats"])
    assert sorted(_psycopg(printed["psql"], sql)) == expected
    if Path(shlex.split(printed["psql"])[0]).exists():
        assert sorted(_psql(printed["psql"], sql)) == expected
    stack = start_embedded(data_dir / "services")  # the demo leaves Postgres up for the printed psql command
    engine = make_engine(stack.database_url)
    with engine.connect() as conn:
        rows = {r.task_type: r for r in conn.execute(text("SELECT * FROM escalation_stats"))}
        batches = conn.execute(text("SELECT count(*) FROM batches")).scalar()
    engine.dispose()
    assert batches == 2
    stats = {r["task_type"]: r for r in printed["stats"]}
    assert set(stats) == set(rows) == {"ticket_triage", "review_summary"}
    for task, row in rows.items():
        assert stats[task]["jobs"] == row.jobs == row.finished
        assert str(stats[task]["escalation_rate"]) == str(row.escalation_rate)
        assert str(stats[task]["savings_pct"]) == str(row.savings_pct)


def test_ctrl_c_mid_run_leaves_no_process_and_a_second_run_works(data_dir):
    # Given a demo that has started its services, workers and Flower and submitted its batches
    proc = _demo(data_dir)
    deadline = time.monotonic() + 120
    stderr = ""
    assert proc.stderr is not None
    while "submitted" not in stderr and time.monotonic() < deadline and proc.poll() is None:
        stderr += proc.stderr.readline()
    assert "submitted" in stderr, stderr
    children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    # When the user presses Ctrl-C
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    # Then no process it started is left (workers, Flower, sweeper, Postgres, Redis)
    wait_for(lambda: not _leftovers(data_dir, children), 20, "the demo's processes to exit")
    # And a second run succeeds
    again = _demo(data_dir, "--json")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-3000:]
    # And its summary counts its own batches only, not those of the interrupted run
    sizes = {task: len((DEMO_DATA / file).read_text().splitlines()) for task, (file, _) in DEMO_BATCHES.items()}
    assert {r["task_type"]: r["jobs"] for r in json.loads(out)["stats"]} == sizes
