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
    used, fits = spent + reserved, 0
    for amount in amounts:
        if used + amount > cap:
            break
        used, fits = used + amount, fits + 1
    if used > spent + reserved:
        conn.execute(_ADD, {"b": batch_id, "total": used - spent - reserved})
    return fits, Decimal(spent)


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
