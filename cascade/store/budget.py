"""A capped batch's spend in Postgres: reserve a request's cost bound before it goes out, settle after.

``batches.spent_usd`` is what the batch's ended requests cost (an interrupted one at its bound: an
estimate); ``batches.reserved_usd`` the bounds of its requests in flight. Every reservation is one
conditional UPDATE under the batch row's lock, so any number of workers together never reserve past the cap;
since a request never costs more than its bound, the sum of the batch's ``attempts.cost_usd`` never exceeds
it either. Only batches with a cap keep these counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from sqlalchemy import Connection, text

__all__ = ["batch_budget", "budget_used", "daily_budget", "reserve_budget", "reserve_daily", "settle_budget", "settle_daily", "settle_daily_now"]

_RESERVE_ONE = text("""
UPDATE batches SET reserved_usd = reserved_usd + :amount
WHERE id = :b AND spent_usd + reserved_usd + :amount <= :cap
RETURNING spent_usd
""")
_LOCK = text("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b FOR NO KEY UPDATE")
_ADD = text("UPDATE batches SET reserved_usd = reserved_usd + :total WHERE id = :b")


def reserve_budget(conn: Connection, batch_id: str, cap: Decimal, amounts: Sequence[Decimal]) -> tuple[int, Decimal]:
    """Reserve the longest prefix of ``amounts`` that keeps the batch within ``cap``; returns how many, and
    what the batch had spent (an amount that is not reserved may fit once requests in flight settle, unless
    spent + amount is past the cap already). One amount is one conditional UPDATE; several lock the batch
    row, then add the prefix that fits."""
    if not amounts:
        return 0, Decimal(0)
    if len(amounts) == 1:
        row = conn.execute(_RESERVE_ONE, {"b": batch_id, "cap": cap, "amount": amounts[0]}).first()
        if row is not None:
            return 1, Decimal(row.spent_usd)
        return 0, batch_budget(conn, batch_id)[0]
    spent, reserved = conn.execute(_LOCK, {"b": batch_id}).one()
    fits, total = _prefix(spent + reserved, cap, amounts)
    if total:
        conn.execute(_ADD, {"b": batch_id, "total": total})
    return fits, Decimal(spent)


def _prefix(used: Decimal, cap: Decimal, amounts: Sequence[Decimal]) -> tuple[int, Decimal]:
    """How many of ``amounts``, in order, fit on top of ``used`` under ``cap``, and their sum."""
    fits, total = 0, Decimal(0)
    for amount in amounts:
        if used + total + amount > cap:
            break
        fits, total = fits + 1, total + amount
    return fits, total


_SETTLE = text("""
UPDATE batches SET spent_usd = spent_usd + :spent, reserved_usd = greatest(reserved_usd - :released, 0)
WHERE id = :b
""")


def settle_budget(conn: Connection, batch_id: str, *, spent: Decimal, released: Decimal) -> None:
    """Count ``spent`` as spent and give back ``released`` of what was reserved."""
    if spent or released:
        conn.execute(_SETTLE, {"b": batch_id, "spent": spent, "released": released})


def budget_used(conn: Connection, batch_id: str | None, task_type: str | None) -> tuple[Decimal, Decimal]:
    """(spent + reserved) of the batch and of the task type's last 24 hours (0 where not asked), read
    without locks."""
    batch = sum(batch_budget(conn, batch_id), Decimal(0)) if batch_id is not None else Decimal(0)
    day = Decimal(0)
    if task_type is not None:
        spent, reserved = conn.execute(_DAY_USED, {"t": task_type}).one()
        day = Decimal(spent) + Decimal(reserved)
    return batch, day


def batch_budget(conn: Connection, batch_id: str) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of a capped batch."""
    row = conn.execute(text("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b"), {"b": batch_id}).one()
    return Decimal(row.spent_usd), Decimal(row.reserved_usd)


# --- a task type's rolling 24 hours (migration 0011) ---------------------------------------------------

_DAY_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended('cascade.budget:' || :t, 0))")
_DAY_USED = text("""
SELECT coalesce(sum(spent_usd), 0) AS spent, coalesce(sum(reserved_usd), 0) AS reserved FROM task_budgets
WHERE task_type = :t AND hour >= date_trunc('hour', now() - interval '24 hours')
""")
_DAY_ADD = text("""
INSERT INTO task_budgets AS b (task_type, hour, spent_usd, reserved_usd)
VALUES (:t, date_trunc('hour', now()), :spent, :reserved)
ON CONFLICT (task_type, hour) DO UPDATE SET spent_usd = b.spent_usd + excluded.spent_usd,
                                            reserved_usd = greatest(b.reserved_usd + excluded.reserved_usd, 0)
""")


def reserve_daily(conn: Connection, task_type: str, cap: Decimal, amounts: Sequence[Decimal]) -> tuple[int, Decimal]:
    """As ``reserve_budget``, against ``task_type``'s spend over the last 24 hours (serialized per task type by
    an advisory lock held until the transaction ends)."""
    if not amounts:
        return 0, Decimal(0)
    conn.execute(_DAY_LOCK, {"t": task_type})
    spent, reserved = conn.execute(_DAY_USED, {"t": task_type}).one()
    fits, total = _prefix(spent + reserved, cap, amounts)
    if total:
        conn.execute(_DAY_ADD, {"t": task_type, "spent": 0, "reserved": total})
    return fits, Decimal(spent)


def daily_budget(conn: Connection, task_type: str) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of ``task_type`` over the window its daily budget counts (the last 24 hours and the hour
    that window starts in)."""
    spent, reserved = conn.execute(_DAY_USED, {"t": task_type}).one()
    return Decimal(spent), Decimal(reserved)


def settle_daily_now(conn: Connection, task_type: str, *, spent: Decimal, released: Decimal) -> None:
    """Settle in the current hour's bucket: for a reservation made earlier in this transaction."""
    if spent or released:
        conn.execute(_DAY_ADD, {"t": task_type, "spent": spent, "reserved": -released})


_DAY_SETTLE = text("""
UPDATE task_budgets t SET spent_usd = t.spent_usd + s.spent, reserved_usd = greatest(t.reserved_usd - s.released, 0)
FROM (SELECT date_trunc('hour', a.created_at) AS hour, sum(x.spent) AS spent, sum(x.released) AS released
      FROM unnest(CAST(:ids AS bigint[]), CAST(:spent AS numeric[]), CAST(:released AS numeric[]))
           AS x(id, spent, released)
      JOIN attempts a ON a.id = x.id GROUP BY 1) s
WHERE t.task_type = :t AND t.hour = s.hour
""")


def settle_daily(conn: Connection, task_type: str, settled: Sequence[tuple[int, Decimal, Decimal]]) -> None:
    """Settle requests (attempt id, spent, released) in the buckets of the hours they were reserved in."""
    if settled:
        conn.execute(_DAY_SETTLE, {"t": task_type, "ids": [a for a, _, _ in settled],
                                   "spent": [s for _, s, _ in settled], "released": [r for _, _, r in settled]})
