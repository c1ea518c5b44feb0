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

__all__ = ["batch_budget", "reserve_budget", "settle_budget"]

# The longest prefix of ``amounts`` (in order) that fits under the cap is reserved; returns its length.
_RESERVE = text("""
WITH b AS (
    SELECT spent_usd + reserved_usd AS used FROM batches WHERE id = :b FOR NO KEY UPDATE
), w AS (
    SELECT amount, sum(amount) OVER (ORDER BY ord) AS upto
    FROM unnest(CAST(:amounts AS numeric[])) WITH ORDINALITY AS w(amount, ord)
), g AS (
    SELECT count(*) AS n, coalesce(sum(w.amount), 0) AS total FROM w, b WHERE b.used + w.upto <= :cap
), u AS (
    UPDATE batches SET reserved_usd = reserved_usd + g.total FROM g WHERE id = :b AND g.total > 0
)
SELECT n FROM g
""")


def reserve_budget(conn: Connection, batch_id: str, cap: Decimal, amounts: Sequence[Decimal]) -> int:
    """Reserve the longest prefix of ``amounts`` that keeps the batch within ``cap``; returns how many."""
    if not amounts:
        return 0
    return int(conn.execute(_RESERVE, {"b": batch_id, "cap": cap, "amounts": list(amounts)}).scalar_one())


_SETTLE = text("""
UPDATE batches SET spent_usd = spent_usd + :spent, reserved_usd = greatest(reserved_usd - :released, 0)
WHERE id = :b
""")


def settle_budget(conn: Connection, batch_id: str, *, spent: Decimal, released: Decimal) -> None:
    """Count ``spent`` as spent and give back ``released`` of what was reserved."""
    if spent or released:
        conn.execute(_SETTLE, {"b": batch_id, "spent": spent, "released": released})


def batch_budget(conn: Connection, batch_id: str) -> tuple[Decimal, Decimal]:
    """(spent, reserved) of a capped batch."""
    row = conn.execute(text("SELECT spent_usd, reserved_usd FROM batches WHERE id = :b"), {"b": batch_id}).one()
    return Decimal(row.spent_usd), Decimal(row.reserved_usd)
