"""Real services for every test run.

``CASCADE_TEST_DATABASE_URL`` and ``CASCADE_TEST_BROKER_URL`` point the suite at running servers;
without them the session starts an embedded PostgreSQL and Redis (cascade.embedded). Each test gets
its own Postgres schema (migrated to head, dropped afterwards) and its own Redis key prefix, so runs
and xdist workers never collide and nothing is flushed on a shared Redis.

``CASCADE_TEST_AMQP_URL`` (a RabbitMQ, e.g. ``amqp://guest:guest@127.0.0.1:5672//``; `make test` sets it when one
answers on 127.0.0.1:5672) runs the tests parametrized with ``broker="amqp"`` on RabbitMQ too: each gets a
virtual host of its own (made and deleted with ``rabbitmqctl``), and Redis only for what workers share besides
messages (``CASCADE_REDIS_URL``). Without it they are skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest
from sqlalchemy import Engine, text

from cascade.config import CascadeSettings
from cascade.migrate import upgrade
from cascade.publish import worker_queues
from cascade.sim import SimConfig, SimServer
from cascade.store import make_engine
from cascade.workercmd import worker_command

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Services:
    database_url: str
    broker_url: str


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    from cascade.stack import scratch_services

    with scratch_services(os.environ.get("CASCADE_TEST_DATABASE_URL"), os.environ.get("CASCADE_TEST_BROKER_URL"),
                          prefix="cascade-test-") as (db, broker):
        yield Services(db, broker)


AMQP_URL = os.environ.get("CASCADE_TEST_AMQP_URL")


class Vhost:
    """A RabbitMQ virtual host owned by one test: its queues, and a way to drop its connections or messages."""

    def __init__(self, name: str) -> None:
        self.name = name
        parts = urlsplit(AMQP_URL or "")
        self.url = urlunsplit((parts.scheme, parts.netloc, "/" + quote(name, safe=""), "", ""))

    @staticmethod
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False)

    def create(self) -> str | None:
        """Make the vhost and let the URL's user use it; the reason when that cannot be done here."""
        if shutil.which("rabbitmqctl") is None:
            return "rabbitmqctl is not on PATH: cannot give the test a RabbitMQ vhost of its own"
        user = unquote(urlsplit(AMQP_URL or "").username or "guest")
        for args in (("add_vhost", self.name), ("set_permissions", "-p", self.name, user, ".*", ".*", ".*")):
            done = self.ctl(*args)
            if done.returncode != 0:
                return f"rabbitmqctl {args[0]} failed: {(done.stderr or done.stdout).strip()[:300]}"
        return None

    def delete(self) -> None:
        self.ctl("delete_vhost", self.name)

    def drop_connections(self) -> None:
        """What a broker restart does to its clients: every connection to the vhost is closed."""
        self.ctl("close_all_connections", "-p", self.name, "cascade test: broker restart")

    def purge(self) -> None:
        """What a flush does: every queued message of the vhost is gone."""
        names = self.ctl("list_queues", "-p", self.name, "name", "--no-table-headers", "--quiet").stdout.split()
        for name in names:
            self.ctl("purge_queue", "-p", self.name, name)


@dataclass
class Env:
    """One test's isolated slice of the services: a schema and a key prefix (and a RabbitMQ vhost when the
    test runs on RabbitMQ)."""

    services: Services
    schema: str
    prefix: str
    engine: Engine
    vhost: Vhost | None = None

    @property
    def broker_url(self) -> str:
        return self.vhost.url if self.vhost is not None else self.services.broker_url

    def settings(self, **overrides: Any) -> CascadeSettings:
        values: dict[str, Any] = {
            "database_url": self.services.database_url, "broker_url": self.broker_url,
            "db_schema": self.schema, "key_prefix": self.prefix, "max_inline_wait_s": 1.0,
        }
        if self.vhost is not None:
            values["redis_url"] = self.services.broker_url
        return CascadeSettings(**{**values, **overrides})

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        env.update({
            "CASCADE_DATABASE_URL": self.services.database_url, "CASCADE_BROKER_URL": self.broker_url,
            "CASCADE_DB_SCHEMA": self.schema, "CASCADE_KEY_PREFIX": self.prefix, "CASCADE_MAX_INLINE_WAIT_S": "1",
            "PYTHONPATH": str(ROOT),
        })
        if self.vhost is not None:
            env["CASCADE_REDIS_URL"] = self.services.broker_url
        env.update(extra)
        return env

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> str:
    """The broker a test runs on: ``redis`` unless parametrized (``@pytest.mark.parametrize("broker", BROKERS,
    indirect=True)``)."""
    return str(getattr(request, "param", "redis"))


#: Parametrize ``broker`` with these (indirect) to run a test on Redis and on RabbitMQ.
BROKERS = ["redis", "amqp"]


@pytest.fixture
def env(services: Services, broker: str) -> Iterator[Env]:
    tag = uuid.uuid4().hex[:10]
    vhost = None
    if broker == "amqp":
        if not AMQP_URL:
            pytest.skip("RabbitMQ variant: CASCADE_TEST_AMQP_URL is not set (no RabbitMQ on 127.0.0.1:5672)")
        vhost = Vhost(f"cascade-test-{tag}")
        if (why := vhost.create()) is not None:
            pytest.skip(f"RabbitMQ variant: {why}")
    schema = f"t_{tag}"
    admin = make_engine(services.database_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(services.database_url, schema=schema, pool_size=10)
    upgrade(engine)
    try:
        yield Env(services, schema, f"{tag}:", engine, vhost)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        if vhost is not None:
            vhost.delete()


@pytest.fixture
def sim() -> Iterator[Callable[..., SimServer]]:
    """Factory: ``sim(config)`` starts a SimServer on a free port, stopped at teardown."""
    servers: list[SimServer] = []

    def start(config: SimConfig | None = None, **kw: Any) -> SimServer:
        server = SimServer(config, **kw).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class WorkerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 3) -> None:
        # The test is over: a worker that takes longer to warm-shut down is killed (gevent workers take 5-7 s).
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def workers(env: Env, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``workers(queues="tier1,...", concurrency=64)`` starts a real `celery worker` process (queues:
    names or one comma-separated string; by default every stage's queue of a three-tier cascade)."""
    started: list[WorkerProcess] = []

    def start(queues: str | Sequence[str] = tuple(worker_queues()), concurrency: int = 64, pool: str = "gevent",
              args: tuple[str, ...] = (), **extra_env: str) -> WorkerProcess:
        name = f"w{len(started)}-{env.schema}@%h"
        log = tmp_path / f"worker{len(started)}.log"
        cmd = worker_command(queues, concurrency, name=name, pool=pool, extra=args)
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env.environ(**extra_env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        worker = WorkerProcess(proc, log)
        started.append(worker)
        return worker

    yield start
    # The test is over: kill them all at once (a gevent worker's warm shutdown takes seconds, times every test
    # that uses one; nothing it would still do is checked, and its log is line-buffered).
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
    for worker in started:
        worker.proc.wait(10)
    for worker in started:
        text_ = worker.log.read_text(errors="replace")
        if "Traceback" in text_ or "CRITICAL" in text_:
            print(f"--- {worker.log} ---\n{text_[-5000:]}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    """Poll until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


class OwnRedis:
    """A Redis server owned by one test (to restart or flush it), on a unix socket, keeping nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket))

    def start(self) -> None:
        from cascade.embedded import _redis_server_executable

        self.proc = subprocess.Popen(
            [str(_redis_server_executable()), "--port", "0", "--unixsocket", str(self.socket), "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 10, "the test's Redis to answer", poll=0.05)

    def _answers(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    directory = Path(tempfile.mkdtemp(prefix="cascade-redis-"))
    server = OwnRedis(directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sweeper(env: Env, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Factory: a real `cascade sweep --every` process for the test's schema (and broker, if overridden)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(every: float = 1.0, stalled_after: float = 2.0, **extra_env: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"sweeper{len(procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cascade.cli", "sweep", "--every", str(every), "--stalled-after", str(stalled_after)],
            env=env.environ(**extra_env), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
