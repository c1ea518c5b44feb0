"""Postgres connections: a worker holds at most two whatever its concurrency, and the cascade runs through a real
PgBouncer in transaction pooling mode (Debian's package, installed by the test set-up when missing; skipped,
saying why, where it cannot be)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from cascade.client import Client
from cascade.publish import CeleryPublisher
from cascade.store import make_engine
from tests.conftest import wait_for
from tests.integration import scenario
from tests.integration.audit import audit
from tests.integration.audit import client as make_client
from tests.integration.debian import find_or_install

pytestmark = pytest.mark.integration


def _worker_connections(env) -> dict[str, int]:
    """Connections per worker process (make_engine names them ``cascade:<schema>:worker:<pid>``)."""
    rows = env.rows("SELECT application_name, count(*) FROM pg_stat_activity WHERE application_name LIKE :app "
                    "GROUP BY 1", app=f"cascade:{env.schema}:worker:%")
    return {name: int(n) for name, n in rows}


def test_a_worker_holds_at_most_two_connections_whatever_its_concurrency(env, sim, workers):
    # Given one worker with 64 slots and a batch that keeps them all busy (a 50 ms model)
    sim_cfg = scenario.sim_config(seed=4)
    server = sim(sim_cfg.model_copy(update={"models": {
        name: m.model_copy(update={"latency_ms": 50}) for name, m in sim_cfg.models.items()}}))
    client = make_client(env, server.url)
    workers(concurrency=64)
    rows = scenario.rows(600, "label")
    batch = client.submit("label", rows, key_field="id").batch_id
    # When its connections are sampled while it works
    peaks: Counter[str] = Counter()
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for name, n in _worker_connections(env).items():
                peaks[name] = max(peaks[name], n)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    state = client.wait(batch, timeout=120, poll_s=0.2)
    done.set()
    sampler.join(5)
    # Then it never held more than two, and the batch is right
    assert state.is_done, state
    assert peaks and max(peaks.values()) <= 2, peaks
    audit(env, client, batch, client.config.snapshot("label"), sim_cfg, rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _open_to_others(path: Path) -> None:
    """PgBouncer runs as nobody: let it reach a Postgres socket under ``path`` (the test's own scratch dirs)."""
    for part in [path, *path.parents]:
        if str(part) in ("/", "/tmp"):
            break
        part.chmod(part.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)


@pytest.fixture
def pgbouncer(services) -> Iterator[str]:
    """A PgBouncer in transaction pooling mode in front of the test Postgres; yields its database URL."""
    binary, why = find_or_install("pgbouncer", ["pgbouncer"])
    if binary is None:
        pytest.skip(f"no PgBouncer: {why}")
    url = make_url(services.database_url)
    host = url.query.get("host") or url.host or "127.0.0.1"
    port = url.query.get("port") or url.port or 5432
    if str(host).startswith("/"):
        _open_to_others(Path(str(host)))
    here = Path(tempfile.mkdtemp(prefix="cascade-pgbouncer-"))  # not under pytest's 0700 tmp: nobody writes here
    here.chmod(0o777)
    listen = _free_port()
    ini = here / "pgbouncer.ini"
    ini.write_text(f"""[databases]
* = host={host} port={port} user={url.username or 'postgres'}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = 20
max_client_conn = 500
ignore_startup_parameters = extra_float_digits
logfile = {here}/pgbouncer.log
pidfile = {here}/pgbouncer.pid
""")
    ini.chmod(0o644)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([binary, *user, str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                log = (here / "pgbouncer.log").read_text(errors="replace") if (here / "pgbouncer.log").exists() else ""
                raise AssertionError(f"pgbouncer exited: {log[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", listen)) == 0

        wait_for(listening, 15, "pgbouncer to listen")
        yield f"postgresql+psycopg://{url.username or 'postgres'}@127.0.0.1:{listen}/{url.database}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(here, ignore_errors=True)


def test_the_cascade_runs_through_pgbouncer_in_transaction_mode(env, sim, workers, sweeper, pgbouncer):
    # Given every process (submit, workers, sweeper) on PgBouncer in transaction pooling mode, in the test's schema
    sim_cfg = scenario.sim_config(seed=8)
    server = sim(sim_cfg)
    settings = env.settings(database_url=pgbouncer, database_pooler="transaction")
    pooled = make_engine(pgbouncer, schema=env.schema, pooler="transaction")
    client = Client(settings, engine=pooled, config=scenario.cascade_config(server.url),
                    publisher=CeleryPublisher.connect(settings, settings.broker_url))
    bounced = {"CASCADE_DATABASE_URL": pgbouncer, "CASCADE_DATABASE_POOLER": "transaction"}
    workers(concurrency=32, **bounced)
    sweeper(stalled_after=3, **bounced)
    rows = scenario.rows(200, "label")
    # When a batch runs
    batch = client.submit("label", rows, key_field="id").batch_id
    state = client.wait(batch, timeout=120, poll_s=0.2)
    # Then it ends exactly as the sim predicts, with nothing prepared or set on a shared server connection
    assert state.is_done, state
    audit(env, client, batch, client.config.snapshot("label"), sim_cfg, rows)
    with env.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar() == 0
    pooled.dispose()
