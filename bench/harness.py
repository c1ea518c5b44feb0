"""What every benchmark shares: the services, a scratch schema and key prefix, child processes, result rows.

Services are the embedded stack (``cascade.embedded``, in a ``tempfile.mkdtemp`` directory) unless
``CASCADE_BENCH_DATABASE_URL`` and ``CASCADE_BENCH_BROKER_URL`` name running ones. Each benchmark gets its own
Postgres schema (migrated to head, dropped afterwards) and Redis key prefix (its keys deleted afterwards;
never a FLUSHALL), so a shared server is left as it was found.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml
from sqlalchemy import Engine, text

from cascade.config import CascadeSettings
from cascade.migrate import upgrade
from cascade.ratelimit import redis_url
from cascade.store import make_engine
from cascade.workercmd import worker_command

__all__ = ["ROOT", "Row", "Scratch", "Services", "Sim", "scratch", "services", "wait_for"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One line of the result table. ``higher_is_better`` decides how ``ratio`` is read against the target."""

    benchmark: str
    cascade: float | None
    baseline: float | None
    unit: str
    target: str
    passed: bool | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.cascade is None or not self.baseline:
            return None
        return self.cascade / self.baseline

    def to_json(self) -> dict[str, Any]:  # Any: JSON
        return {"benchmark": self.benchmark, "cascade": self.cascade, "baseline": self.baseline,
                "ratio": self.ratio, "unit": self.unit, "target": self.target, "passed": self.passed,
                "note": self.note}


@dataclass(frozen=True)
class Services:
    database_url: str
    broker_url: str
    embedded: bool

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(redis_url(self.broker_url))


@contextlib.contextmanager
def services() -> Iterator[Services]:
    """The benchmark's Postgres and Redis: given by CASCADE_BENCH_* or an embedded stack under /tmp."""
    from cascade.stack import scratch_services

    given = os.environ.get("CASCADE_BENCH_DATABASE_URL"), os.environ.get("CASCADE_BENCH_BROKER_URL")
    with scratch_services(*given, prefix="cascade-bench-") as (db, broker):
        yield Services(db, broker, embedded=not all(given))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


@dataclass
class Sim:
    """A `cascade sim` child process."""

    url: str
    pid: int

    @property
    def _base(self) -> str:
        return self.url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:  # Any: JSON
        return dict(httpx.get(self._base + "/stats", timeout=5).json())

    def reset(self) -> None:
        httpx.post(self._base + "/stats/reset", timeout=5)


@dataclass
class Scratch:
    """One benchmark's slice of the services, its working directory and the processes it started."""

    services: Services
    schema: str
    prefix: str
    engine: Engine
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def settings(self, **overrides: Any) -> CascadeSettings:  # Any: settings values
        values: dict[str, Any] = {"database_url": self.services.database_url,  # Any: settings values
                                  "broker_url": self.services.broker_url, "db_schema": self.schema,
                                  "key_prefix": self.prefix, "config": self.workdir / "cascade.yaml"}
        return CascadeSettings(**{**values, **overrides})

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        env.update({"CASCADE_DATABASE_URL": self.services.database_url,
                    "CASCADE_BROKER_URL": self.services.broker_url, "CASCADE_DB_SCHEMA": self.schema,
                    "CASCADE_KEY_PREFIX": self.prefix, "CASCADE_CONFIG": str(self.workdir / "cascade.yaml"),
                    "PYTHONPATH": str(ROOT), "BENCH_PREFIX": self.prefix})
        env.update(extra)
        return env

    def redis(self) -> redis.Redis:
        return self.services.redis()

    def scalar(self, sql: str, **params: Any) -> Any:  # Any: a SQL value
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def start(self, cmd: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, env=env or self.environ(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill a child at once: a warm Celery shutdown takes seconds, and what a benchmark's worker leaves
        behind (unacked messages, running jobs) is deleted with its schema and key prefix anyway."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_logged(self, started: dict[str, subprocess.Popen[bytes]], marker: str, timeout: float, what: str) -> None:
        """Wait until the log of every process in ``started`` (by name) holds ``marker``; RuntimeError with the log's
        end as soon as one of them exits."""
        def every() -> bool:
            for name, proc in started.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log(name)[-3000:]}")
            return all(marker in self.log(name) for name in started)

        wait_for(every, timeout, what)

    def sim(self, models: dict[str, dict[str, Any]], *, name: str = "sim") -> Sim:  # Any: sim settings
        """Start `cascade sim` with these models (SimModel fields) on a free port."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"seed": 1, "models": models, "unknown_models": "default"}))
        port = free_port()
        proc = self.start([sys.executable, "-m", "cascade.cli", "sim", "--port", str(port), "--config", str(path)],
                          name)
        sim = Sim(f"http://127.0.0.1:{port}/v1", proc.pid)
        wait_for(lambda: _answers(sim), 30, f"the sim on port {port} (log {self.workdir / name}.log)")
        return sim

    def write_config(self, config: dict[str, Any]) -> Path:  # Any: cascade.yaml
        path = self.workdir / "cascade.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def worker(self, queues: str | Sequence[str], *, name: str, app: str = "workers.app", pool: str = "gevent",
               concurrency: int = 256, extra: tuple[str, ...] = (), **env: str) -> subprocess.Popen[bytes]:
        """A real `celery worker` child, returned once it logged "ready"."""
        cmd = worker_command(queues, concurrency, name=f"{name}-{self.schema}@%h", pool=pool, app=app, loglevel="info",
                             extra=("--without-heartbeat", *os.environ.get("BENCH_WORKER_ARGS", "").split(), *extra))
        proc = self.start(cmd, name, self.environ(**env))
        wait_for(lambda: " ready." in self.log(name) or proc.poll() is not None, 60, f"worker {name}")
        if proc.poll() is not None:
            raise RuntimeError(f"worker {name} exited: {self.log(name)[-3000:]}")
        return proc

    def delete_keys(self) -> None:
        client = self.redis()
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=self.prefix + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
        finally:
            client.close()


def _answers(sim: Sim) -> bool:
    try:
        return httpx.get(sim.url.removesuffix("/v1") + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def scratch(svc: Services, name: str, *, migrate: bool = True) -> Iterator[Scratch]:
    """A fresh schema (migrated to head unless ``migrate`` is False), key prefix and temp directory."""
    tag = uuid.uuid4().hex[:8]
    schema, prefix = f"bench_{name}_{tag}", f"bench-{name}-{tag}:"
    admin = make_engine(svc.database_url, pool_size=1)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = make_engine(svc.database_url, schema=schema, pool_size=8)
    workdir = Path(tempfile.mkdtemp(prefix=f"cascade-bench-{name}-"))
    box = Scratch(svc, schema, prefix, engine, workdir)
    try:
        if migrate:
            upgrade(engine)
        yield box
    finally:
        for proc in list(box.procs):
            box.stop(proc)
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        box.delete_keys()
        if os.environ.get("BENCH_KEEP_LOGS"):
            print(f"bench logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def models(sim_url: str, **extra: dict[str, Any]) -> list[dict[str, Any]]:  # Any: cascade.yaml
    """Cascade models named by ``extra`` (their settings), all served by the sim at ``sim_url``."""
    price = {"input_per_mtok": 0.15, "output_per_mtok": 0.60}
    return [{"name": name, "base_url": sim_url, "model": name, "price": price, **over} for name, over in extra.items()]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (the same definition as Postgres' percentile_cont)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def dumps(rows: list[Row]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=2)
