"""The call stage's side of budgets (``cascade.store.budget``): what a request may cost at most, and what a job
that cannot afford its next request keeps."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection

from cascade import store
from cascade.config import ResolvedTier, TaskSnapshot
from cascade.ratelimit import upper_bound_tokens
from cascade.stages.requests import Request
from cascade.stages.validate import judge
from cascade.store import Claim

__all__ = ["BudgetBusy", "OverBudget", "cost_bound", "count_estimates", "earlier_answer", "settle_rows", "settled"]


class OverBudget(Exception):
    """The next request of a job does not fit in what is left of its batch's budget."""


class BudgetBusy(Exception):
    """The next request of a job would fit in the budget, but requests in flight hold the rest for now."""


def cost_bound(tier: ResolvedTier, request: Request) -> Decimal:
    """The most ``request`` can cost: its prompt's UTF-8 bytes (a token is never shorter than a byte) plus a
    small overhead per message as input, ``max_tokens`` for each of its n choices as output, at the model's
    prices (no cached-token discount)."""
    prompt = upper_bound_tokens(request.messages, n=0, max_tokens=0)
    return tier.model.price.cost(prompt, tier.max_tokens * request.n, 0)


def settled(row: dict[str, Any], late: set[int]) -> tuple[int, Decimal, Decimal]:  # Any: a row
    """(attempt id, spent, released) of an ended request: its cost counts as spent and its reservation is
    given back; a late one's reservation was already counted, as its estimated cost, when it was
    interrupted, so only the difference is spent."""
    bound = row.get("reserved_usd") or Decimal(0)
    if row["id"] in late:
        return row["id"], row["cost_usd"] - bound, Decimal(0)
    return row["id"], row["cost_usd"], bound


def settle_rows(conn: Connection, batch_id: str, rows: Iterable[dict[str, Any]], late: set[int]) -> None:  # Any: rows
    """Settle ended requests (``settled``) in their batch's budget."""
    parts = [settled(row, late) for row in rows]
    store.settle_budget(conn, batch_id, spent=sum((p[1] for p in parts), Decimal(0)),
                        released=sum((p[2] for p in parts), Decimal(0)))


def count_estimates(conn: Connection, claimed: Iterable[tuple[TaskSnapshot, str, store.History]]) -> None:
    """Count the requests of earlier claims that never came back as spent at their bound, for each (snapshot,
    batch id, history) claimed: the batch rows, then the task types' buckets (the lock order of every
    transaction that touches a budget)."""
    claimed = list(claimed)
    for snap, batch_id, past in claimed:
        if snap.max_cost_usd is not None:
            store.settle_budget(conn, batch_id, spent=past.estimated, released=past.estimated)
    for snap, _, past in claimed:
        if snap.task_type.budget is not None:
            store.settle_daily(conn, snap.task_type.name, [(a, b, b) for a, b in past.interrupted])


def earlier_answer(conn: Connection, snap: TaskSnapshot, claim: Claim) -> Any:  # Any: the answer's JSON value
    """The valid answer of the highest tier before the job's current one (what ``on_exhausted: accept_last``
    keeps when the budget ends the job), or None."""
    for tier in range(claim.tier - 1, 0, -1):
        got = store.answers_many(conn, [claim.job_id], tier)[claim.job_id]
        verdict = judge(snap, tier, got.contents, got.truncated, got.refused)
        if verdict.votes > 0:
            return verdict.result
    return None
