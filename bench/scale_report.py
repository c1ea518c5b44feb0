"""bench.scale's output: one JSON document and the rich tables printed from it."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_report"]

#: A sim process busier than this share of one core may be what limits the rate.
SIM_WARN = 0.7


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def main_table(doc: dict[str, Any]) -> Table:  # Any: bench.scale's JSON
    out = Table(title=f"scale-out: {doc['settings']['jobs']:,} jobs per point, gevent -c "
                      f"{doc['settings']['concurrency']} per process, sim 0 ms × {doc['settings']['sims']} processes",
                title_justify="left")
    heads = ["N", "cascade jobs/s", "eff.", "bare chains/s", "eff.", "worker CPU ms/job", "Postgres CPU ms/job",
             "Redis CPU ms/job", "sim CPU ms/job (share)", "PG conns peak", "WAL B/job", "rows/job", "HOT"]
    for name in heads:
        out.add_column(name, justify="right")
    for p in doc["points"]:
        c, b, pg = p["cascade"], p["bare"], p["cascade"]["postgres"]
        cpu = c["cpu_ms_per_job"]
        out.add_row(str(p["processes"]), _num(c["rate"]), _num(p["efficiency"]["cascade"], 2), _num(b["rate"]),
                    _num(p["efficiency"]["bare"], 2), _num(cpu.get("worker")), _num(cpu.get("postgres")),
                    _num(cpu.get("redis")), f"{_num(cpu.get('sim'))} ({_pct(c['sim_share'])})",
                    str(pg["peak_connections"]), _num(pg["wal_bytes_per_job"]), _num(pg["rows_written_per_job"]),
                    _pct(pg["hot_share"]))
    return out


def tables_table(doc: dict[str, Any]) -> Table:  # Any: bench.scale's JSON
    out = Table(title="Postgres rows written per job, by table (pg_stat_user_tables, whole batch)",
                title_justify="left")
    for name in ("N", "table", "inserted", "updated", "deleted", "HOT share of updates", "indexes"):
        out.add_column(name, justify="left" if name == "table" else "right")
    for p in doc["points"]:
        for name, t in p["cascade"]["postgres"]["tables"].items():
            out.add_row(str(p["processes"]), name, _num(t["inserted"]), _num(t["updated"]), _num(t["deleted"]),
                        _pct(t["hot_share"]), str(t["indexes"]))
    return out


def notes(doc: dict[str, Any]) -> list[str]:  # Any: bench.scale's JSON
    lines = []
    for p in doc["points"]:
        c, b, pg = p["cascade"], p["bare"], p["cascade"]["postgres"]
        waits = ", ".join(f"{name} {_pct(share)}" for name, share in pg["wait_events"]) or "none sampled"
        stmts = ", ".join(f"{name!r} {_pct(share)}" for name, share in pg["busy_statements"]) or "none sampled"
        lines.append(
            f"N={p['processes']}: cascade window {c['window_jobs']:,} jobs in {c['window_s']:.1f} s (first to last "
            f"finished {_num(c['rate_first_to_last'])} jobs/s), machine CPU busy {_pct(c['machine_busy'])} "
            f"(outside the measured processes {_pct(c['unmeasured_cpu_share'])}), busiest sim process "
            f"{_pct(c['busiest_sim_core'])} of a core, {c['not_succeeded']} jobs not succeeded; WAL records "
            f"{_num(pg['wal_records_per_job'])} and full-page images {_num(pg['wal_fpi_per_job'])} per job, "
            f"checkpoints in the run {pg['checkpoints_during_run']}, autovacuum/analyze runs "
            f"{pg['autovacuum_runs']}; non-idle backends (mean {pg['mean_busy_backends']:.2f}): {waits}; "
            f"by statement: {stmts}. "
            f"Bare: window {b['window_jobs']:,} chains in {b['window_s']:.1f} s, worker CPU "
            f"{_num(b['cpu_ms_per_job'].get('worker'))} ms/chain, machine busy {_pct(b['machine_busy'])}.")
        if (c["busiest_sim_core"] or 0) > SIM_WARN:
            lines.append(f"N={p['processes']}: WARNING a sim process was busy {_pct(c['busiest_sim_core'])} of a "
                         "core: the sim may limit the rate; raise --sims.")
    return lines


def print_report(console: Console, doc: dict[str, Any]) -> None:  # Any: bench.scale's JSON
    console.print(main_table(doc))
    console.print(tables_table(doc))
    for line in notes(doc):
        console.print(line, highlight=False, markup=False)
    m = doc["machine"]
    console.print(f"{m['node']}: {m['cpus']} CPUs, {m['arch']}, Python {m['python']}, PostgreSQL {m['postgres']}, "
                  f"services {m['services']}; load average {m['load_start']:.2f} at start, {m['load_end']:.2f} at "
                  f"end; {doc['duration_s']:.0f} s", highlight=False, markup=False)
