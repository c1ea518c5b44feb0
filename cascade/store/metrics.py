"""What ``cascade metrics`` reads at each scrape, all in one REPEATABLE READ snapshot (``scrape_snapshot``).

Nothing here reads a whole ledger table. Jobs come from the summary migration 0004 keeps by triggers
(``escalation_summary``) plus the backlog, counted from the index of active jobs; the request, verdict and audit
ledgers (``attempts``, ``validations``, ``audits``) are read as tallies (``Ledger``): the scrape reads only
the rows past a watermark id, and rows at or below it that were still open when the watermark passed them
(``cascade.metrics`` keeps the sums of the rest).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, text

__all__ = [
    "ATTEMPTS",
    "AUDITS",
    "LEDGERS",
    "VALIDATIONS",
    "BatchBudget",
    "JobCounts",
    "Ledger",
    "TallyRead",
    "batch_budgets",
    "daily_budgets",
    "job_counts",
    "ledger_writers",
    "max_ids",
    "read_tally",
    "scrape_snapshot",
    "still_running",
    "task_tiers",
]


def scrape_snapshot(conn: Connection, timeout_s: float) -> None:
    """Settings of a scrape's transaction (which the caller opens REPEATABLE READ, READ ONLY, so that every
    statement sees one snapshot and the figures of a scrape agree): its statements give up after ``timeout_s``,
    and run without parallel workers (they cost more to start than the few rows a scrape reads take)."""
    conn.execute(text("SELECT set_config('statement_timeout', :ms, true), "
                      "set_config('max_parallel_workers_per_gather', '0', true)"),
                 {"ms": str(max(1, round(timeout_s * 1000)))})


@dataclass(frozen=True)
class Ledger:
    """A ledger table read as a tally: rows grouped by ``keys``, summed by ``values``.

    A row counts once it is ``final`` (its keys and values never change again); the others are read again at
    each scrape until they are. ``source`` names the table as ``x`` (with whatever it joins).
    """

    name: str
    source: str
    keys: tuple[str, ...]
    values: tuple[str, ...]
    final: str


#: Requests to models: per task type, model, error ('' for an answer, 'in_flight' while out) and whether the
#: request cache answered it. An interrupted request may still get its answer back (its estimated cost is then
#: replaced), so it stays open for an hour after it went out.
ATTEMPTS = Ledger(
    name="attempts",
    source="attempts x JOIN jobs j ON j.id = x.job_id",
    keys=("j.task_type", "x.model", "coalesce(x.error, '')", "x.cached"),
    values=("count(*)", "coalesce(sum(x.cost_usd), 0)", "coalesce(sum(x.saved_usd), 0)",
            "coalesce(sum(x.input_tokens), 0)", "coalesce(sum(x.output_tokens), 0)"),
    final="x.error IS DISTINCT FROM 'in_flight' "
          "AND (x.error IS DISTINCT FROM 'interrupted' OR x.created_at < now() - interval '1 hour')",
)

#: Verdicts: per task type and tier, whether the verdict passed, and whether the job then moved above that tier
#: (an escalation into tier + 1). The verdict and the job's move are written in one transaction, so a verdict is
#: final when it is seen; one whose job is still unfinished at that tier is read again until it is not. A verdict
#: of an earlier run of a job that ``cascade retry`` ran again (``superseded``) is history: its job moved up then
#: if that run sent requests at the tier above.
VALIDATIONS = Ledger(
    name="validations",
    source="validations x JOIN jobs j ON j.id = x.job_id",
    keys=("j.task_type", "x.tier", "x.passed",
          ("CASE WHEN x.superseded THEN EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = x.job_id "
           "AND a.tier = x.tier + 1 AND a.superseded) ELSE j.tier > x.tier END")),
    values=("count(*)",),
    final="x.superseded OR j.tier > x.tier OR j.status NOT IN ('queued', 'running')",
)

#: Quality audits: per task type, audited tier and model, status and verdict (NULL until done, or when the
#: auditor gave no valid answer), with their cost.
AUDITS = Ledger(
    name="audits",
    source="audits x",
    keys=("x.task_type", "x.tier", "x.model", "x.status", "x.agreed"),
    values=("count(*)", "coalesce(sum(x.cost_usd), 0)"),
    final="x.status IN ('done', 'skipped')",
)

LEDGERS = (ATTEMPTS, VALIDATIONS, AUDITS)

Key = tuple[Any, ...]  # Any: a ledger's key columns
Sums = tuple[Any, ...]  # Any: int or Decimal sums


def max_ids(conn: Connection, ledgers: Sequence[Ledger] = LEDGERS) -> dict[str, int]:
    """The largest id each ledger shows in ``conn``'s snapshot (0 when it is empty)."""
    ids = ", ".join(f"(SELECT coalesce(max(id), 0) FROM {ledger.name})" for ledger in ledgers)
    row = conn.execute(text(f"SELECT {ids}")).one()
    return {ledger.name: int(v) for ledger, v in zip(ledgers, row, strict=True)}


# A transaction writing a ledger row holds a write lock on its table from before the row takes its id until it
# ends (the lock is taken when the statement is planned, the id when the row is built).
_WRITERS = text("""
SELECT coalesce(array_agg(DISTINCT l.virtualtransaction), '{}') FROM pg_locks l
WHERE l.locktype = 'relation' AND l.granted AND l.relation = ANY(CAST(:tables AS regclass[]))
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.mode IN ('RowExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock')
""")
_RUNNING = text("""
SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{}') FROM pg_locks
WHERE virtualtransaction = ANY(CAST(:vxids AS text[]))
""")


def ledger_writers(conn: Connection, ledgers: Sequence[Ledger] = LEDGERS) -> frozenset[str]:
    """The transactions (virtual ids) that may be writing rows of ``ledgers`` now. Read after ``max_ids``: a row
    with an id at or below those that is not visible yet belongs to one of them."""
    return frozenset(conn.execute(_WRITERS, {"tables": [ledger.name for ledger in ledgers]}).scalar_one())


def still_running(conn: Connection, vxids: Sequence[str]) -> frozenset[str]:
    """Those of the transactions ``vxids`` that have not ended (every transaction holds a lock on its own id)."""
    if not vxids:
        return frozenset()
    return frozenset(conn.execute(_RUNNING, {"vxids": list(vxids)}).scalar_one())


@dataclass(frozen=True)
class TallyRead:
    """One scrape's read of a ledger: the sums of the rows it read, split into those that are now settled (final
    and at or below the new watermark) and the rest, and the ids of the rows at or below it still open."""

    settled: dict[Key, Sums]
    unsettled: dict[Key, Sums]
    open_ids: list[int]


def read_tally(conn: Connection, ledger: Ledger, *, after: int, upto: int, pending: Sequence[int]) -> TallyRead:
    """The rows of ``ledger`` past ``after`` and those of ``pending`` (ids at or below it that were open), grouped;
    those that are final with ids up to ``upto`` are settled. Reads only those rows (the primary key's index)."""
    keys = len(ledger.keys)
    rows = f"FROM {ledger.source} WHERE (x.id > :after OR x.id = ANY(CAST(:pending AS bigint[])))"
    grouped = text(f"SELECT {', '.join(ledger.keys)}, x.id <= :upto AND ({ledger.final}), {', '.join(ledger.values)} "
                   f"{rows} GROUP BY {', '.join(str(i) for i in range(1, keys + 2))}")
    params = {"after": after, "upto": upto, "pending": list(pending)}
    settled: dict[Key, Sums] = {}
    unsettled: dict[Key, Sums] = {}
    for row in conn.execute(grouped, params):
        (settled if row[keys] else unsettled)[tuple(row[:keys])] = tuple(row[keys + 1:])
    still = text(f"SELECT x.id {rows} AND x.id <= :upto AND NOT ({ledger.final})")
    return TallyRead(settled, unsettled, [int(i) for (i,) in conn.execute(still, params)])


@dataclass(frozen=True)
class JobCounts:
    """One task type's jobs: how many there are in each status, and what they cost (audits not included)."""

    by_status: dict[str, int]
    cost_usd: Decimal


# The backlog, by the index of active jobs (jobs_active carries the task type): no table read.
_ACTIVE = text("SELECT task_type, status, count(*) FROM jobs WHERE status IN ('queued', 'running') GROUP BY 1, 2")
_SUMMARY = text("""
SELECT task_type, sum(jobs)::bigint AS jobs, sum(succeeded)::bigint AS succeeded, sum(failed)::bigint AS failed,
       coalesce(sum(total_cost), 0) AS cost_usd
FROM escalation_summary GROUP BY task_type HAVING sum(jobs) > 0
""")


def job_counts(conn: Connection) -> dict[str, JobCounts]:
    """Per task type: jobs per status, and their cost. Totals come from escalation_summary, queued and running
    from the index of active jobs; cancelled, the one other status a job may have (jobs_status_check), is what
    is left."""
    active: dict[str, dict[str, int]] = {}
    for task_type, status, n in conn.execute(_ACTIVE):
        active.setdefault(task_type, {})[status] = int(n)
    out: dict[str, JobCounts] = {}
    for row in conn.execute(_SUMMARY):
        by_status = {"queued": 0, "running": 0, **active.get(row.task_type, {}), "succeeded": int(row.succeeded),
                     "failed": int(row.failed)}
        by_status["cancelled"] = int(row.jobs) - sum(by_status.values())
        out[row.task_type] = JobCounts(by_status, Decimal(row.cost_usd))
    return out


def task_tiers(conn: Connection) -> dict[str, int]:
    """Per task type, the most tiers any of its batches has (a batch keeps its own snapshot)."""
    return {t: int(n) for t, n in conn.execute(text("SELECT task_type, max(tiers) FROM batches GROUP BY task_type"))}


@dataclass(frozen=True)
class BatchBudget:
    batch_id: str
    task_type: str
    cap_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal


# A capped batch is running while it has requests in flight (reservations) or unfinished jobs; those are found
# in one pass over the backlog (the jobs of jobs_active), only when some batch has a cap.
_BATCH_BUDGETS = text("""
SELECT b.id, b.task_type, b.max_cost_usd, b.spent_usd, b.reserved_usd
FROM batches b
WHERE b.max_cost_usd IS NOT NULL
  AND (b.reserved_usd > 0 OR b.id IN (SELECT j.batch_id FROM jobs j WHERE j.status IN ('queued', 'running')))
ORDER BY b.id
""")


def batch_budgets(conn: Connection) -> list[BatchBudget]:
    """The running capped batches: cap (as it stands: a retry may raise it), spent, reserved."""
    return [BatchBudget(r.id, r.task_type, Decimal(r.max_cost_usd), Decimal(r.spent_usd), Decimal(r.reserved_usd))
            for r in conn.execute(_BATCH_BUDGETS)]


# The window a reservation sums (cascade.store.budget): the last 24 hours and the hour it starts in.
_DAILY = text("""
SELECT task_type, coalesce(sum(spent_usd), 0) AS spent, coalesce(sum(reserved_usd), 0) AS reserved
FROM task_budgets WHERE hour >= date_trunc('hour', now() - interval '24 hours')
GROUP BY task_type ORDER BY task_type
""")


def daily_budgets(conn: Connection) -> dict[str, tuple[Decimal, Decimal]]:
    """Per task type with a daily budget ledger: (spent, reserved) in the window its next reservation sums."""
    return {r.task_type: (Decimal(r.spent), Decimal(r.reserved)) for r in conn.execute(_DAILY)}
