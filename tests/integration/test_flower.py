"""Flower as users run it: a real `celery flower` process behind basic auth, watching the real broker.

What Flower 2.2.0 does, read in .venv/lib/python3.11/site-packages/flower:

- ``GET /api/queues/length`` (``api/tasks.py`` ``GetQueueLengths``) asks the broker for the lengths of
  ``get_active_queue_names()`` (``views/__init__.py``): the union of the ``active_queues`` of the workers
  its inspector knows. Only when it knows none does it fall back to ``task_default_queue`` plus every
  queue in ``task_queues``. The inspector runs once at start-up and again only when someone opens the
  Workers page or calls ``/api/workers?refresh=1``; it never forgets a worker. So with no worker online
  all four declared queues are listed (this test relies on it), but once Flower has inspected a worker
  that consumes only tier1, a waiting ``validate`` is not listed (CELERY-NOTES §6).
- Lengths are ``LLEN`` of each queue and its priority lists, with ``global_keyprefix`` taken from
  ``broker_transport_options`` (``utils/broker.py`` ``RedisBase.queues``). Our per-test key prefix is
  therefore honoured: without it tier1 would read 0 here.
- ``redis+socket://`` (the embedded Redis) is ``RedisSocket``: the socket path is the URL's path and it
  always uses database 0, ignoring ``?virtual_host=N``. Fine for ``cascade.embedded`` (db 0); a socket
  URL with another database would read empty queues.
- ``FLOWER_BASIC_AUTH`` (comma-separated ``user:password``) protects every page and API; ``/healthcheck``
  is open.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cascade.client import Client
from cascade.publish import CeleryPublisher, worker_queues
from tests.conftest import BROKERS, ROOT, Env, wait_for
from tests.integration import scenario

pytestmark = pytest.mark.integration

AUTH = ("ops", "not-a-real-password")
ROWS = 30
LISTENING = re.compile(rb"Visit me at http://127\.0\.0\.1:(\d+)")


@dataclass
class Flower:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=AUTH, timeout=5)

    def port(self) -> bool:
        """True once Flower logged its port; fails fast if the process died."""
        if self.proc.poll() is not None:
            raise AssertionError(f"flower exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')}")
        match = LISTENING.search(self.log.read_bytes())
        if match:
            self.url = f"http://127.0.0.1:{int(match.group(1))}"
        return bool(match)


@pytest.fixture
def flower(env: Env, tmp_path: Path) -> Iterator[Flower]:
    """A `celery -A workers.app flower` process on a free port, with basic auth, terminated at teardown."""
    environ = {k: v for k, v in env.environ().items() if not k.startswith("FLOWER_")}
    environ["FLOWER_BASIC_AUTH"] = ":".join(AUTH)
    log = tmp_path / "flower.log"
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "flower", "--port=0", "--address=127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=environ, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Flower(proc, log)
    try:
        wait_for(server.port, timeout=20, what="flower to listen")
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _lengths(api: httpx.Client) -> dict[str, int]:
    response = api.get("/api/queues/length")
    response.raise_for_status()
    return {q["name"]: q["messages"] for q in response.json()["active_queues"]}


def test_flower_requires_basic_auth(flower):
    # Given Flower started with FLOWER_BASIC_AUTH
    with httpx.Client(base_url=flower.url, timeout=5) as anonymous:
        # Then the API refuses anonymous and wrong credentials, and the health check stays open
        assert anonymous.get("/api/queues/length").status_code == 401
        assert anonymous.get("/api/queues/length", auth=(AUTH[0], "wrong")).status_code == 401
        assert anonymous.get("/healthcheck").status_code == 200
    with flower.api() as api:
        assert api.get("/api/queues/length").status_code == 200


def _refresh(api: httpx.Client) -> dict[str, list[str]]:
    """Make Flower inspect the online workers now; their names and the queues each consumes."""
    response = api.get("/api/workers", params={"refresh": 1}, timeout=15)
    response.raise_for_status()
    return {name: sorted(q["name"] for q in info.get("active_queues", [])) for name, info in response.json().items()}


def test_flower_shows_the_backlog_drain(env, sim, workers, flower):
    # Given a batch submitted while no worker runs
    server = sim(scenario.sim_config())
    settings = env.settings()
    client = Client(settings, engine=env.engine, config=scenario.cascade_config(server.url),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    batch = client.submit("label", scenario.rows(ROWS, "label"), key_field="id").batch_id
    # (Flower counts messages; a message carries up to jobs_per_message job ids)
    messages = -(-ROWS // settings.jobs_per_message)
    assert 1 < messages < ROWS
    with flower.api() as api:
        # Then Flower lists every declared queue (it knows no worker yet) and sees the whole backlog on
        # tier1, read under this test's key prefix
        seen: dict[str, int] = {}

        def backlog() -> bool:
            seen.update(_lengths(api))
            return seen.get("tier1") == messages

        wait_for(backlog, timeout=10, what=f"flower to report {messages} messages on tier1")
        assert seen == {"tier1": messages, "tier2": 0, "tier3": 0, "validate": 0, "audit": 0, "sweep": 0}

        # When a tier1-only worker runs the call stage of every job
        workers(queues="tier1", concurrency=32)
        # Then Flower sees tier1 drain into validate (still listed: Flower has not inspected the worker)
        wait_for(lambda: _lengths(api) == {"tier1": 0, "tier2": 0, "tier3": 0, "validate": messages, "audit": 0,
                                           "sweep": 0},
                 timeout=20,
                 what="tier1 to drain into validate")
        # But once Flower has inspected that worker it lists only tier1: the waiting validate messages vanish
        # from the API (CELERY-NOTES §6), so the backlog must be read from Postgres, not from Flower
        # (an inspect reply may miss Flower's 1 s timeout on a busy machine, so ask until the worker answers)
        wait_for(lambda: list(_refresh(api).values()) == [["tier1"]], timeout=10, what="flower to inspect the worker")
        assert _lengths(api) == {"tier1": 0}

        # When workers for the other queues join and Flower inspects them
        workers(queues="tier2,tier3,validate", concurrency=32)
        wait_for(lambda: len(_refresh(api)) == 2, timeout=10, what="flower to see both workers")
        # Then every queue is listed again, the batch finishes and every queue drains
        state = client.wait(batch, timeout=20, poll_s=0.2)
        assert state.is_done, state
        wait_for(lambda: _lengths(api) == {"tier1": 0, "tier2": 0, "tier3": 0, "validate": 0}, timeout=5,
                 what="every queue to be listed and empty")


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_flower_sees_the_workers_and_their_queues(env, workers, flower):
    # Given a worker consuming every queue (on Redis, and on RabbitMQ)
    workers(concurrency=4)
    with flower.api() as api:
        # When Flower inspects the workers through the broker
        def seen() -> dict[str, list[str]]:
            return {name: queues for name, queues in _refresh(api).items() if env.schema in name}

        wait_for(lambda: bool(seen()), timeout=30, what="flower to see the worker")
        # Then it lists the worker with the queues it consumes
        [queues] = seen().values()
        assert queues == sorted(worker_queues())
