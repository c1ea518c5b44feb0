"""`cascade dev`: the embedded stack for one's own data, with the variables to export, until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cascade.embedded import start_embedded, stop_embedded
from cascade.stack import DEMO_DATA, free_port
from tests.conftest import ROOT, wait_for
from tests.integration.test_demo import _leftovers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_dev_prints_exports_that_work_and_ctrl_c_stops_everything():
    data_dir = Path(tempfile.mkdtemp(prefix="cascade-dev-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    dev = subprocess.Popen([sys.executable, "-m", "cascade.cli", "dev", "--data-dir", str(data_dir)], cwd=ROOT,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # Given the variables `cascade dev` prints
        exports: dict[str, str] = {}
        deadline = time.monotonic() + 90
        assert dev.stdout is not None
        while len(exports) < 3 and time.monotonic() < deadline:
            line = dev.stdout.readline()
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                exports[name] = value.strip("'")
        assert set(exports) == {"CASCADE_DATABASE_URL", "CASCADE_BROKER_URL", "CASCADE_CONFIG"}
        user_env = {**env, **exports}
        # When a user submits their own rows with them and waits
        submit = subprocess.run([sys.executable, "-m", "cascade.cli", "submit", "ticket_triage",
                                 str(DEMO_DATA / "tickets.jsonl"), "--key-field", "ticket_id"],
                                cwd=ROOT, env=user_env, capture_output=True, text=True, timeout=60, check=False)
        assert submit.returncode == 0, submit.stderr
        batch = submit.stdout.strip()
        waited = subprocess.run([sys.executable, "-m", "cascade.cli", "wait", batch, "--timeout", "120", "--json"],
                                cwd=ROOT, env=user_env, capture_output=True, text=True, timeout=150, check=False)
        # Then the batch runs on the dev stack's workers
        assert waited.returncode in (0, 1), waited.stderr
        assert json.loads(waited.stdout)["finished"] == 200
        children = {p.pid for p in psutil.Process(dev.pid).children(recursive=True)}
        # When the user presses Ctrl-C, nothing it started is left
        dev.send_signal(signal.SIGINT)
        dev.wait(60)
        wait_for(lambda: not _leftovers(data_dir, children), 20, "cascade dev's processes to exit")
    finally:
        if dev.poll() is None:
            dev.kill()
        stop_embedded(data_dir / "services")


def _dev_stop(data_dir: Path) -> subprocess.CompletedProcess[str]:
    # As in a container, cron job or `su` shell: no login session, so no XDG_RUNTIME_DIR.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_") and k != "XDG_RUNTIME_DIR"}
    return subprocess.run([sys.executable, "-m", "cascade.cli", "dev", "--stop", "--data-dir", str(data_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_dev_stop_with_nothing_running_says_so_and_warns_nothing(tmp_path):
    # Given a data directory where no embedded service runs, and no XDG_RUNTIME_DIR
    # When the user stops the embedded services
    stopped = _dev_stop(tmp_path / "cascade")
    # Then it succeeds, says that nothing was running, and prints no library warning
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr.strip() == "no embedded services were running"
    assert "Warning" not in stopped.stderr


def test_dev_stop_stops_running_services_and_warns_nothing(tmp_path):
    # Given embedded services left up for a data directory (as `cascade demo` leaves them)
    data_dir = tmp_path / "cascade"
    stack = start_embedded(data_dir / "services")
    try:
        # When the user stops them, without XDG_RUNTIME_DIR
        stopped = _dev_stop(data_dir)
        # Then they are stopped, it says so, and prints no library warning
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stderr.strip() == "embedded services stopped"
        assert not _leftovers(stack.data_dir, set())
    finally:
        stop_embedded(data_dir / "services")


def test_dev_takes_a_sim_port_and_config_and_prints_a_working_psql(tmp_path):
    # Given a sim config of the user's own models and a port to keep across restarts
    data_dir = Path(tempfile.mkdtemp(prefix="cascade-dev-"))
    sim_yaml = tmp_path / "sim.yaml"
    sim_yaml.write_text("seed: 1\nmodels:\n  mine: {p_correct: 1.0}\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    log = (tmp_path / "dev.err").open("w")
    dev = subprocess.Popen([sys.executable, "-m", "cascade.cli", "dev", "--data-dir", str(data_dir), "--sim-port",
                            str(port), "--sim-config", str(sim_yaml)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=log, text=True)
    try:
        # When it is up
        wait_for(lambda: "Ctrl-C stops everything" in (tmp_path / "dev.err").read_text(), 90, "cascade dev to be up")
        said = (tmp_path / "dev.err").read_text()
        # Then it names the sim's URL on that port and its config
        assert f"sim (OpenAI-compatible): http://127.0.0.1:{port}/v1 simulating {sim_yaml}" in said
        # And the sim serves that config: an unknown model is a 404 naming the user's model
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 404 and "mine" in answer.text
        # And the psql command it prints works as printed
        (psql,) = [line.removeprefix("psql: ") for line in said.splitlines() if line.startswith("psql: ")]
        queried = subprocess.run(f"{psql} -tAc 'SELECT count(*) FROM batches'", shell=True, capture_output=True,
                                 text=True, timeout=30, check=False)
        assert queried.returncode == 0 and queried.stdout.strip() == "0", queried.stderr
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(60)
        finally:
            if dev.poll() is None:
                dev.kill()
            log.close()
            stop_embedded(data_dir / "services")
