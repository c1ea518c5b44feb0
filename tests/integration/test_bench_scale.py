"""bench/scale.py: the scale-out benchmark runs on a tiny batch and reports every figure (not their values)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.scale import efficiency
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("rates", "expected"), [
    ({1: 100.0, 2: 150.0}, {1: 1.0, 2: 0.75}),
    ({2: 100.0, 4: 100.0}, {2: 1.0, 4: 0.5}),
    ({1: 100.0, 3: 330.0}, {1: 1.0, 3: 1.1}),
    ({1: None, 2: 10.0}, {1: None, 2: None}),
])
def test_efficiency_is_the_rate_per_process_against_the_smallest_count(rates, expected):
    # Given rates per worker process count; When scaling efficiency is taken; Then it is per-process rate ÷ base
    assert efficiency(rates) == pytest.approx(expected)


@pytest.mark.slow
def test_scale_runs_on_a_tiny_batch(env, tmp_path):
    # Given the test's services
    out = tmp_path / "scale.json"
    environ = env.environ(CASCADE_BENCH_DATABASE_URL=env.services.database_url,
                          CASCADE_BENCH_BROKER_URL=env.services.broker_url)
    # When `python -m bench.scale` runs one worker process on 400 jobs with one sim
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--processes", "1", "--jobs", "400", "--sims", "1",
                           "--json", str(out)], env=environ, cwd=ROOT, check=False, capture_output=True, text=True,
                          timeout=90)
    # Then it reports one point with both rates and every job succeeded
    assert proc.returncode == 0, proc.stderr[-4000:]
    (point,) = json.loads(out.read_text())["points"]
    cascade, bare, pg = point["cascade"], point["bare"], point["cascade"]["postgres"]
    assert point["processes"] == 1 and point["efficiency"] == {"cascade": 1.0, "bare": 1.0}
    assert cascade["not_succeeded"] == 0
    assert cascade["rate"] > 0 and bare["rate"] > 0
    assert cascade["cpu_ms_per_job"]["worker"] > 0 and cascade["cpu_ms_per_job"]["sim"] >= 0
    # And Postgres' counters cover exactly the batch's writes: one attempt and one verdict per job
    assert pg["tables"]["attempts"]["inserted"] == 1 and pg["tables"]["validations"]["inserted"] == 1
    assert pg["tables"]["jobs"]["updated"] >= 1 and pg["rows_written_per_job"] > 0
    assert pg["peak_connections"] >= 1 and pg["wal_bytes_per_job"] > 0
