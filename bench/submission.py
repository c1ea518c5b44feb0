"""Benchmark 4, submission: the real `cascade submit single FILE` (a child process) on 200,000 and 1,000,000
JSONL rows: rows/s into Postgres and the broker (wall time of the whole command, interpreter start included)
and its peak RSS (VmHWM). Checked after each run: every row is a job and every job has its
message on queue tier1.

Baseline: ``bench.rawsubmit``, the floor with no checks: the same file's lines COPYed into a bare table and
one short message per line LPUSHed to Redis in pipelines, in a child process the same way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from bench.harness import ROOT, Row, Scratch, Services, scratch
from bench.workload import config

__all__ = ["run"]

TARGET_ROWS_S = 20_000
TARGET_RSS_MB = 200


@dataclass(frozen=True)
class Run:
    rows: int
    seconds: float
    rss_mb: float
    redis_bytes: float = 0.0  # Redis memory per queued message

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def write_rows(path: Path, n: int) -> None:
    with path.open("w") as out:
        for i in range(n):
            out.write(f'{{"id": {i}, "text": "support ticket {i}: the invoice total looks wrong, please check"}}\n')


def _high_water_kb(pid: int) -> int:
    """VmHWM: the peak RSS of the process's current image (wait4's ru_maxrss would also count the forked
    copy of this big parent before exec)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB) of that child alone (VmHWM read every 10 ms)."""
    peak = 0
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _high_water_kb(proc.pid))
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {log.read_text()[-2000:]}")
    return elapsed, peak / 1024


def _redis_memory(box: Scratch) -> int:
    client = box.redis()
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def _queued(box: Scratch, key: str) -> int:
    client = box.redis()
    try:
        return int(client.llen(box.prefix + key))
    finally:
        client.close()


def _reset(box: Scratch) -> None:
    with box.engine.begin() as conn:
        conn.execute(text("TRUNCATE validations, attempts, jobs, batches CASCADE"))
        conn.execute(text("DROP TABLE IF EXISTS raw_jobs"))
    box.delete_keys()


def cascade_submit(box: Scratch, path: Path, n: int) -> Run:
    cmd = [sys.executable, "-m", "cascade.cli", "submit", "single", str(path)]
    memory = _redis_memory(box)
    seconds, rss = timed(cmd, box.environ(), box.workdir / f"submit-{n}.log")
    per_job = (_redis_memory(box) - memory) / n
    jobs = int(box.scalar("SELECT count(*) FROM jobs"))
    queued = _queued(box, "tier1")
    _reset(box)
    expected = -(-n // box.settings().jobs_per_message)
    if jobs != n or queued != expected:
        raise RuntimeError(f"submit of {n} rows left {jobs} jobs and {queued} messages on tier1 ({expected} expected)")
    return Run(n, seconds, rss, per_job)


def raw_submit(box: Scratch, path: Path, n: int) -> Run:
    cmd = [sys.executable, "-m", "bench.rawsubmit", str(path)]
    seconds, rss = timed(cmd, box.environ(), box.workdir / f"raw-{n}.log")
    queued = _queued(box, "raw")
    _reset(box)
    if queued != n:
        raise RuntimeError(f"raw submit of {n} rows left {queued} messages")
    return Run(n, seconds, rss)


def run(svc: Services, *, tiny: bool = False, profile: bool = False) -> list[Row]:
    sizes = [2_000, 5_000] if tiny else [200_000, 1_000_000]
    rows: list[Row] = []
    with scratch(svc, "submit") as box:
        box.write_config(config("http://127.0.0.1:9/v1"))
        for n in sizes:
            path = box.workdir / f"rows-{n}.jsonl"
            write_rows(path, n)
            base = raw_submit(box, path, n)
            got = cascade_submit(box, path, n)
            path.unlink()
            rows += [
                Row(f"4 submit {n:,} rows: rows/s", got.rate, base.rate, "rows/s", f"≥ {TARGET_ROWS_S:,}",
                    got.rate >= TARGET_ROWS_S, f"`cascade submit` wall {got.seconds:.1f} s (process start "
                    f"included); baseline: bare COPY + LPUSH ({base.seconds:.1f} s)"),
                Row(f"4 submit {n:,} rows: peak RSS", got.rss_mb, base.rss_mb, "MB", f"< {TARGET_RSS_MB}",
                    got.rss_mb < TARGET_RSS_MB, "VmHWM of the submit process, sampled every 10 ms; Redis memory "
                    f"per queued job {got.redis_bytes:,.0f} bytes ({box.settings().jobs_per_message} jobs per message)"),
            ]
    return rows
