"""The CLI as a pipeline uses it: submit prints only the batch id, wait's exit codes, results and stats."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import yaml

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
