"""`make bench` (= `python -m bench`): every benchmark, then one table of cascade vs baseline figures.

    python -m bench [--tiny] [--only overhead,concurrency,hops,submit,stats,ratelimit,cache] [--json FILE] [--profile]

Each figure is measured beside its baseline in the same run, on the embedded stack unless
CASCADE_BENCH_DATABASE_URL and CASCADE_BENCH_BROKER_URL are set. ``--tiny`` runs every benchmark on a tiny
size (the test suite's smoke test); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

from rich.console import Console
from rich.table import Table

from bench.harness import Row, dumps, services

BENCHMARKS = {"overhead": "bench.overhead", "concurrency": "bench.concurrency", "hops": "bench.hops",
              "submit": "bench.submission", "stats": "bench.stats_view", "ratelimit": "bench.ratelimit",
              "cache": "bench.cache"}


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: list[Row], title: str) -> Table:
    out = Table(title=title, show_lines=False, title_justify="left")
    for name, justify in (("#", "right"), ("benchmark", "left"), ("cascade", "right"), ("baseline", "right"),
                          ("ratio", "right"), ("unit", "left"), ("target", "left"), ("result", "left")):
        out.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, r in enumerate(rows, start=1):
        result = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "info"}[r.passed]
        out.add_row(str(i), r.benchmark, _fmt(r.cascade), _fmt(r.baseline), _fmt(r.ratio), r.unit, r.target,
                    result)
    return out


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"load average {load[0]:.2f} at start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that every benchmark runs")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--profile", action="store_true", help="print cProfile output where a benchmark has one")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    console, rows, failed = Console(stderr=True), [], False
    console.print(machine())
    started = time.monotonic()
    with services() as svc:
        console.print(f"services: {'embedded' if svc.embedded else 'given by CASCADE_BENCH_*'}")
        for name in names:
            t0 = time.monotonic()
            console.print(f"[bold]{name}[/bold] …")
            try:
                module = importlib.import_module(BENCHMARKS[name])
                rows += module.run(svc, tiny=args.tiny, profile=args.profile)
            except Exception:  # noqa: BLE001  (one crashed benchmark must not hide the others' rows)
                failed = True
                traceback.print_exc()
                rows.append(Row(f"{name}: crashed", None, None, "", "runs", False))
            console.print(f"{name} took {time.monotonic() - t0:.0f} s")
    out = Console(width=max(150, Console().width))
    out.print(table(rows, f"cascade benchmarks ({time.monotonic() - started:.0f} s) — {machine()}"))
    for i, r in enumerate(rows, start=1):
        if r.note:
            out.print(f"{i:>2}. {r.note}", highlight=False, markup=False)
    if args.json:
        args.json.write_text(dumps(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
