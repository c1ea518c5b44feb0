"""The CLI as a pipeline uses it: submit prints only the batch id, wait's exit codes, results and stats."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
import yaml

from cascade import producer
from cascade.client import Client
from cascade.publish import CeleryPublisher
from cascade.sim import SimConfig, SimModel
from tests.conftest import ROOT
from tests.integration import scenario

pytestmark = pytest.mark.integration


def _cli(env, config_path, *args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cascade.cli", *args], check=False, cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=env.environ(CASCADE_CONFIG=str(config_path)))


def _config_file(tmp_path, sim_url):
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(scenario.cascade_config(sim_url).model_dump(mode="json", by_alias=True)))
    return path


def test_submit_wait_results_stats(env, sim, workers, tmp_path):
    # Given a config file and rows on stdin
    config = _config_file(tmp_path, sim(scenario.sim_config(3)).url)
    rows = "".join(json.dumps(r) + "\n" for r in scenario.rows(12, "summary"))
    # When the batch is submitted
    submitted = _cli(env, config, "submit", "summary", "-", "--key-field", "id", stdin=rows)
    # Then stdout holds only the batch id, the human message goes to stderr
    assert submitted.returncode == 0, submitted.stderr
    batch = submitted.stdout.strip()
    assert len(batch) == 32 and "\n" not in batch
    assert "12 rows" in submitted.stderr
    # And waiting without a worker times out with exit 3
    assert _cli(env, config, "wait", batch, "--timeout", "0.5").returncode == 3
    # When a worker runs it, wait exits 0 (every row succeeded) and prints the status with --json
    workers(concurrency=16)
    waited = _cli(env, config, "wait", batch, "--timeout", "60", "--json")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["counts"] == {"succeeded": 12}
    # And results have one line per row, in input order, as JSONL and CSV
    lines = [json.loads(x) for x in _cli(env, config, "results", batch).stdout.splitlines()]
    assert [x["key"] for x in lines] == [f"summary-{i}" for i in range(12)]
    assert all(x["status"] == "succeeded" and x["output"] for x in lines)
    table = list(csv.DictReader(io.StringIO(_cli(env, config, "results", batch, "--format", "csv").stdout)))
    assert [r["key"] for r in table] == [x["key"] for x in lines]
    assert set(table[0]) == {"key", "status", "tier", "output", "cost_usd", "error"}
    # And status and stats read the same database
    status = json.loads(_cli(env, config, "status", batch, "--json").stdout)
    assert (status["rows"], status["finished"]) == (12, 12)
    stats = json.loads(_cli(env, config, "stats", "--json").stdout)
    assert [(s["task_type"], s["jobs"], s["finished"]) for s in stats] == [("summary", 12, 12)]


def test_wait_exits_1_when_jobs_failed(env, sim, workers, tmp_path):
    # Given models that always answer too short
    broken = SimConfig(seed=1, default=SimModel(p_too_short=1.0))
    config = _config_file(tmp_path, sim(broken).url)
    rows = "".join(json.dumps(r) + "\n" for r in scenario.rows(4, "summary"))
    batch = _cli(env, config, "submit", "summary", "-", "--key-field", "id", stdin=rows).stdout.strip()
    workers(concurrency=8)
    # When the batch is waited for
    waited = _cli(env, config, "wait", batch, "--timeout", "60")
    # Then wait exits 1 and says how many failed
    assert waited.returncode == 1
    assert "4 of 4 jobs failed" in waited.stderr


def test_unknown_batch_is_exit_2(env, sim, tmp_path):
    config = _config_file(tmp_path, sim().url)
    result = _cli(env, config, "status", "nope")
    assert result.returncode == 2
    assert "no batch 'nope'" in result.stderr


def test_results_refuses_an_unknown_format(env, sim, tmp_path):
    # Given a submitted batch
    config = _config_file(tmp_path, sim().url)
    rows = "".join(json.dumps(r) + "\n" for r in scenario.rows(2, "summary"))
    batch = _cli(env, config, "submit", "summary", "-", "--key-field", "id", stdin=rows).stdout.strip()
    # When its results are asked for in a format cascade does not write
    result = _cli(env, config, "results", batch, "--format", "xml")
    # Then the command fails with exit 2, names the format and the ones it knows, and prints no rows
    assert result.returncode == 2
    assert "--format must be jsonl or csv, not 'xml'" in result.stderr
    assert result.stdout == ""


def test_submit_with_the_broker_down_prints_the_committed_batch(env, sim, tmp_path):
    # Given a broker URL (with a password) where nothing listens
    config = _config_file(tmp_path, sim().url)
    rows = "".join(json.dumps(r) + "\n" for r in scenario.rows(3, "summary"))
    environ = env.environ(CASCADE_CONFIG=str(config), CASCADE_BROKER_URL="redis://:s3cret@127.0.0.1:9/0")
    # When a batch is submitted
    proc = subprocess.run([sys.executable, "-m", "cascade.cli", "submit", "summary", "-", "--key-field", "id"],
                          check=False, cwd=ROOT, input=rows, text=True, capture_output=True, timeout=120,
                          env=environ)
    # Then it exits 4 with one line naming the host (not the password) and the sweeper, no traceback
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "cannot reach the broker at 127.0.0.1:9" in proc.stderr and "s3cret" not in proc.stderr
    assert "cascade sweep` will publish" in proc.stderr
    # And stdout holds the id of the committed batch, whose jobs wait in Postgres
    batch = proc.stdout.strip()
    assert proc.stdout == batch + "\n" and batch in proc.stderr
    assert env.scalar("SELECT count(*) FROM jobs WHERE batch_id = :b AND status = 'queued'", b=batch) == 3


def test_status_with_the_database_down_is_exit_4(env, tmp_path):
    # Given a database URL (with a password) where nothing listens
    environ = env.environ(CASCADE_DATABASE_URL="postgresql+psycopg://me:s3cret@127.0.0.1:9/db")
    # When a read command runs
    proc = subprocess.run([sys.executable, "-m", "cascade.cli", "status", "abc"], check=False, cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=environ)
    # Then it exits 4 with one line naming the host, never the password
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith("error: cannot reach the database at 127.0.0.1:9")
    assert proc.stderr.count("\n") == 1 and "s3cret" not in proc.stderr


def _in_process_client(env, config_path):
    settings = env.settings(config=config_path)
    return Client(settings, engine=env.engine, publisher=CeleryPublisher.connect(settings, settings.broker_url))


def test_a_unique_prefix_names_a_batch_everywhere(env, sim, tmp_path):
    # Given 17 batches: two of them share their first hex digit
    config = _config_file(tmp_path, sim().url)
    client = _in_process_client(env, config)
    ids = [client.submit("summary", scenario.rows(1, "summary")).batch_id for _ in range(17)]
    client.close()
    target = ids[0]
    # When status, results and wait get the 8-character prefix that `cascade wait` shows
    status = _cli(env, config, "status", target[:8], "--json")
    # Then each of them finds the batch
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["batch_id"] == target
    assert json.loads(_cli(env, config, "results", target[:8]).stdout)["status"] == "queued"
    assert _cli(env, config, "wait", target[:8], "--timeout", "0.1").returncode == 3
    # And an ambiguous prefix is exit 2 naming the candidates; an unknown one is exit 2 too
    first = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    ambiguous = _cli(env, config, "results", first)
    assert ambiguous.returncode == 2 and ambiguous.stdout == ""
    assert f"batch id prefix '{first}' is ambiguous: " in ambiguous.stderr
    assert next(i for i in ids if i.startswith(first)) in ambiguous.stderr
    assert _cli(env, config, "retry", "zz").returncode == 2


def test_results_take_json_like_every_read_command(env, sim, tmp_path):
    # Given a batch
    config = _config_file(tmp_path, sim().url)
    client = _in_process_client(env, config)
    batch = client.submit("summary", scenario.rows(2, "summary")).batch_id
    client.close()
    # When results are asked for with --json, as status and stats are
    as_json = _cli(env, config, "results", batch, "--json")
    # Then they are the JSONL rows, the same as --format jsonl
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout == _cli(env, config, "results", batch, "--format", "jsonl").stdout
    assert [json.loads(x)["key"] for x in as_json.stdout.splitlines()] == ["1", "2"]
    # And --json with --format csv is refused rather than one of them being ignored
    both = _cli(env, config, "results", batch, "--json", "--format", "csv")
    assert both.returncode == 2 and "--json and --format csv" in both.stderr


LONG_TASK = "summarize_customer_support_tickets_for_the_weekly_quality_review_report"


def _long_named_config(tmp_path, sim_url):
    data = scenario.cascade_config(sim_url).model_dump(mode="json", by_alias=True)
    data["task_types"][1]["name"] = LONG_TASK
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli_tty(env, config_path, *args, columns=60):
    """The CLI on a pseudo-terminal ``columns`` wide (stdout and stderr both); returns (exit code, output)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    environ = env.environ(CASCADE_CONFIG=str(config_path), TERM="xterm")
    environ.pop("COLUMNS", None)
    proc = subprocess.Popen([sys.executable, "-m", "cascade.cli", *args], cwd=ROOT, stdin=child, stdout=child,
                            stderr=child, env=environ, close_fds=True)
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    return proc.wait(timeout=60), out.decode(errors="replace")


def test_ids_and_headers_are_never_folded(env, sim, workers, tmp_path):
    # Given a finished batch of a task type with a long name
    config = _long_named_config(tmp_path, sim(scenario.sim_config(3)).url)
    client = _in_process_client(env, config)
    batch = client.submit(LONG_TASK, scenario.rows(3, "summary")).batch_id
    workers(concurrency=8)
    client.wait(batch, timeout=60)
    client.close()
    # When status and stats print to a pipe (no terminal, no COLUMNS)
    environ = {k: v for k, v in env.environ(CASCADE_CONFIG=str(config)).items() if k != "COLUMNS"}
    piped = [subprocess.run([sys.executable, "-m", "cascade.cli", *args], check=True, cwd=ROOT, text=True,
                            capture_output=True, timeout=60, env=environ).stdout
             for args in (["status", batch], ["stats"])]
    # Then the id, the task type and every row label are whole, each on one line
    assert f"batch {batch} ({LONG_TASK})" in piped[0].splitlines()
    assert LONG_TASK in piped[1] and "…" not in piped[1]
    assert all(label in piped[1] for label in ("escalation_rate", "baseline_cost_usd", "p95_latency_ms"))
    # And on a terminal 60 columns wide the id is still whole, with the row labels of stats
    code, shown = _cli_tty(env, config, "status", batch)
    assert code == 0 and batch in shown
    code, shown = _cli_tty(env, config, "stats", "--task-type", LONG_TASK)
    assert code == 0 and "escalation_rate" in shown and "baseline_cost_usd" in shown


def test_stats_filters_round_for_people_and_stay_exact_for_machines(env, sim, workers, tmp_path):
    # Given two batches and one that `cascade eval` submitted, all finished
    config = _config_file(tmp_path, sim(scenario.sim_config(3)).url)
    client = _in_process_client(env, config)
    # (the batches share rows: the first reads nothing from the request cache, so its cost is its own)
    first = client.submit("summary", scenario.rows(4, "summary"), cache=False).batch_id
    second = client.submit("summary", scenario.rows(6, "summary")).batch_id
    evaluated = producer.submit_rows(client.engine, client.publisher, client.config.snapshot("summary"),
                                     enumerate(scenario.rows(5, "summary"), start=1),
                                     source="cascade eval recorded.jsonl").batch_id
    workers(concurrency=16)
    for batch in (first, second, evaluated):
        assert client.wait(batch, timeout=60).is_done
    client.close()

    def jobs(*args):
        proc = _cli(env, config, "stats", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return [(s["task_type"], s["jobs"]) for s in json.loads(proc.stdout)], proc.stderr

    # When stats are asked for one batch (by prefix), then only its jobs count
    assert jobs("--batch", first[:8])[0] == [("summary", 4)]
    assert jobs("--batch", first, "--batch", second)[0] == [("summary", 10)]
    # And by default the eval batch is left out, and stderr says so; --include-eval counts it
    default, note = jobs()
    assert default == [("summary", 10)] and "1 batches of `cascade eval` left out" in note
    assert jobs("--include-eval")[0] == [("summary", 15)]
    # And --since filters by submission time, as an age or a date
    assert jobs("--since", "1h")[0] == [("summary", 10)]
    assert jobs("--since", "2999-01-01")[0] == []
    bad = _cli(env, config, "stats", "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr
    # And people get rounded money and percentages; --json keeps the exact values
    exact = json.loads(_cli(env, config, "stats", "--json").stdout)[0]
    human = _cli(env, config, "stats").stdout
    assert len(str(exact["avg_cost_usd"]).split(".")[1]) > 8
    assert "e-0" not in human and str(exact["avg_cost_usd"]) not in human
    assert re.search(r"avg_cost_usd\s*│\s*\$0\.0\d+\s", human) and re.search(r"escalation_rate\s*│\s*\d+\.\d%", human)
    status = _cli(env, config, "status", first).stdout
    assert re.search(r"│ \$0\.0\d+ │", status), status


def test_status_watch_follows_a_batch_to_the_end(env, sim, workers, tmp_path):
    # Given a batch being worked on
    config = _config_file(tmp_path, sim(scenario.sim_config(3)).url)
    client = _in_process_client(env, config)
    batch = client.submit("summary", scenario.rows(12, "summary")).batch_id
    later = client.submit("summary", scenario.rows(6, "summary")).batch_id
    client.close()
    workers(concurrency=16)
    # When it is watched from a pipe
    piped = _cli(env, config, "status", batch[:8], "--watch", "--every", "0.2")
    # Then it ends once the batch is finished, with one plain progress line per poll and the final table
    assert piped.returncode == 0, piped.stderr
    lines = [line for line in piped.stdout.splitlines() if line.startswith(f"batch {batch}: ")]
    assert lines and "12/12 finished" in lines[-1] and "jobs/s, ETA" in lines[-1] and "cost so far $" in lines[-1]
    assert f"batch {batch} (summary)" in piped.stdout.splitlines()
    # And on a terminal it draws the table of jobs per tier and stage with the queues' messages
    code, shown = _cli_tty(env, config, "status", later, "--watch", "--every", "0.2", columns=100)
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert code == 0, shown
    assert re.search(r"tier\s+stage\s+queued\s+running\s+succeeded\s+failed\s+queue\s+messages", shown), shown
    assert "6/6 finished" in shown and "cost so far $" in shown
