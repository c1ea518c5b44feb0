"""cascade.embedded starts real Postgres and Redis servers, reuses them after a crash and stops them all."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kombu
import psutil
import psycopg
import pytest
import redis
import sqlalchemy

from cascade.embedded import EmbeddedStack, start_embedded, stop_embedded
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# Started with `python -c SCRIPT data_dir mode`: mode "exit" returns once the stack is up, "hang" sleeps.
_START_SCRIPT = """
import sys, time
from pathlib import Path
from cascade.embedded import start_embedded
start_embedded(Path(sys.argv[1]))
print("started", flush=True)
if sys.argv[2] == "hang":
    time.sleep(60)
"""

_CONTEXT_SCRIPT = """
import sys, time
from pathlib import Path
from cascade.embedded import embedded_stack
with embedded_stack(Path(sys.argv[1])):
    print("started", flush=True)
    time.sleep(60)
"""


@contextlib.contextmanager
def _fresh_data_dir() -> Iterator[Path]:
    # Not tmp_path: as root, Postgres runs as the user embedded_postgres, which must traverse every parent of
    # the data dir, and each new pytest session chmods /tmp/pytest-of-root back to 0700.
    parent = Path(tempfile.mkdtemp(prefix="cascade-embedded-"))
    try:
        yield parent / "stack"
    finally:
        stop_embedded(parent / "stack")  # a failing test must not leave servers behind for the next one
        shutil.rmtree(parent)


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data dir of its own, for tests that crash, kill or stop the servers."""
    with _fresh_data_dir() as directory:
        yield directory


@pytest.fixture(scope="module")
def shared_stack() -> Iterator[EmbeddedStack]:
    """One running stack for the tests that only use it (initdb takes most of a start)."""
    with _fresh_data_dir() as directory:
        yield start_embedded(directory)


def _server_processes(data_dir: Path) -> list[psutil.Process]:
    """Live postgres and redis-server processes whose command line or working directory is in data_dir."""
    found = []
    for process in psutil.process_iter(["name"]):
        if process.info["name"] not in ("postgres", "redis-server"):
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue  # exited, waiting for init to reap it
            if str(data_dir) in " ".join(process.cmdline()) or process.cwd().startswith(str(data_dir)):
                found.append(process)
        except psutil.Error:  # exited meanwhile
            continue
    return found


def _server_pids(data_dir: Path) -> set[int]:
    """Pids of the postmaster and redis-server: the processes that name data_dir on their command line. A
    backend the postmaster has just forked (start_embedded's readiness probe connects) names it too until it
    sets its own title: it is the postmaster's child, so it is left out."""
    return {p.pid for p in _server_processes(data_dir)
            if str(data_dir) in " ".join(p.cmdline()) and not _is_postgres_child(p)}


def _is_dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _is_postgres_child(process: psutil.Process) -> bool:
    try:
        parent = process.parent()
        return parent is not None and parent.name() == "postgres"
    except psutil.Error:
        return False


def _assert_serving(stack: EmbeddedStack) -> None:
    with psycopg.connect(stack.database_url.replace("+psycopg", "", 1)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert redis.Redis.from_url(stack.redis_url).ping()


def _run_starter(script: str, data_dir: Path, mode: str = "") -> subprocess.Popen[str]:
    """Run `script` in a new session (as a terminal's foreground job would be) and wait until it says started."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(data_dir), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line != "started\n":
        process.kill()
        pytest.fail(f"starter failed: {line!r} {process.communicate()[1]}")
    return process


def test_stack_serves_sql_redis_kombu_and_psql(shared_stack: EmbeddedStack) -> None:
    # Given a started stack
    stack = shared_stack

    # Then psycopg, SQLAlchemy (database_url as is), redis-py and the psql command all reach it
    _assert_serving(stack)
    engine = sqlalchemy.create_engine(stack.database_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select 1")).scalar_one() == 1
    engine.dispose()
    psql = subprocess.run(
        f"{stack.psql_command} -Atc 'select 1'", check=False, shell=True, capture_output=True, text=True
    )
    assert (psql.returncode, psql.stdout) == (0, "1\n"), psql.stderr

    # And kombu publishes and consumes through broker_url
    with kombu.Connection(stack.broker_url) as conn:
        queue = conn.SimpleQueue("cascade-test-db0")
        queue.put({"n": 0})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 0}
        message.ack()
        queue.close()


def test_broker_url_virtual_host_selects_the_redis_db(shared_stack: EmbeddedStack) -> None:
    # Given a stack and a broker URL for Redis database 1
    stack = shared_stack
    db1 = redis.Redis.from_url(stack.redis_url.replace("db=0", "db=1"))
    db0 = redis.Redis.from_url(stack.redis_url)

    # When a message is published there
    with kombu.Connection(stack.broker_url + "?virtual_host=1") as conn:
        queue = conn.SimpleQueue("cascade-test-db1")
        queue.put({"n": 1})

        # Then it waits in database 1, not 0, and is consumed from there
        assert (db1.llen("cascade-test-db1"), db0.llen("cascade-test-db1")) == (1, 0)
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()


def test_start_again_reuses_the_running_servers(shared_stack: EmbeddedStack) -> None:
    pids = _server_pids(shared_stack.data_dir)

    again = start_embedded(shared_stack.data_dir)

    assert again == shared_stack
    assert _server_pids(shared_stack.data_dir) == pids and len(pids) == 2
    _assert_serving(again)


@pytest.mark.slow
@pytest.mark.parametrize("end", ["sigkill", "exit"])
def test_servers_outlive_their_starter_and_are_reused(data_dir: Path, end: str) -> None:
    # Given a stack started by another process that is then killed with SIGKILL, or exits normally
    starter = _run_starter(_START_SCRIPT, data_dir, "hang" if end == "sigkill" else "exit")
    pids = _server_pids(data_dir)
    if end == "sigkill":
        starter.kill()
    starter.communicate(timeout=20)

    # Then the servers are still up (nothing in the starter stopped them at exit)
    assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)

    # When the stack is started again here, it reuses them and serves queries
    stack = start_embedded(data_dir)
    _assert_serving(stack)
    assert _server_pids(data_dir) == pids

    # And stopping it leaves no postgres or redis-server process for data_dir
    stop_embedded(data_dir)
    assert _server_processes(data_dir) == []


@pytest.mark.slow
def test_start_after_servers_were_killed_clears_stale_state(data_dir: Path) -> None:
    # Given a stack whose postmaster and redis-server died by SIGKILL, leaving pid files and orphaned children
    start_embedded(data_dir)
    old_pids = _server_pids(data_dir)
    for pid in old_pids:
        os.kill(pid, signal.SIGKILL)
    # (kill returns before the process is gone: until it is, it still looks like a server that runs)
    wait_for(lambda: all(_is_dead(pid) for pid in old_pids), 10, "the killed servers to die")

    # When it is started again at once
    stack = start_embedded(data_dir)

    # Then new servers answer, and stop leaves nothing behind
    _assert_serving(stack)
    assert _server_pids(data_dir).isdisjoint(old_pids)
    stop_embedded(data_dir)
    assert _server_processes(data_dir) == []


@pytest.mark.slow
def test_ctrl_c_in_embedded_stack_stops_both_servers(data_dir: Path) -> None:
    # Given a process running `with embedded_stack(...)`
    starter = _run_starter(_CONTEXT_SCRIPT, data_dir)
    assert len(_server_pids(data_dir)) == 2

    # When Ctrl-C reaches its process group, as from a terminal
    os.killpg(starter.pid, signal.SIGINT)
    _, stderr = starter.communicate(timeout=20)

    # Then it stopped on KeyboardInterrupt, and no server survives it
    assert "KeyboardInterrupt" in stderr
    assert _server_processes(data_dir) == []


def test_stop_is_safe_twice_and_without_a_stack(data_dir: Path) -> None:
    start_embedded(data_dir)

    # Then the first stop reports servers stopped, and the later ones that nothing was running
    assert stop_embedded(data_dir) is True
    assert stop_embedded(data_dir) is False
    assert stop_embedded(data_dir.parent / "never-started") is False

    assert _server_processes(data_dir) == []
    assert not (data_dir.parent / "never-started").exists()
